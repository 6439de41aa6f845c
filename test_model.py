"""Tests of model.py: shapes and exact values of the pieces, post-processing, weights loading,
a learning test, DDP gradient equivalence (2 gloo processes x batch b == 1 process x batch 2b), and the
folded-BatchNorm twins."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

import config
import losses
from model import (aligned_bilinear, build_model, compute_locations, dynamic_mask_head, fold_batchnorm,
                   num_dynamic_params)
from box_ops import mask_centers
from sim import make_teacher, update_teacher


def tiny_cfg(**kw):
    """config.py's defaults with a tiny BoxInst network at the reference's mask stride (4) and size ranges."""
    cfg = dict(config.defaults(), backbone="resnet18", pretrained="", backbone_norm="bn", freeze_at=0, fpn_channels=32,
               head_convs=1, num_classes=3, mask_branch_channels=16, mask_branch_convs=1,
               mask_out_stride=4, sizes_of_interest=(64, 128, 256, 512), method="boxinst", channels_last=False,
               bottom_pixels_removed=0, color_thresh=0.3, pairwise_warmup_iters=1)
    cfg.update(kw)
    return cfg


def scene(n_images=2, size=64):
    """Images with a bright square and a dark disc on grey; targets in the shared format."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n_images):
        img = torch.full((3, size, size), 120, dtype=torch.uint8)
        x0, y0 = 8 + 4 * i, 10
        img[:, y0:y0 + 20, x0:x0 + 20] = torch.tensor([250, 40, 40], dtype=torch.uint8)[:, None, None]
        disc = (xx - 44) ** 2 + (yy - 40 - i) ** 2 <= 12 ** 2
        img[:, disc] = torch.tensor([20, 20, 230], dtype=torch.uint8)[:, None]
        img = (img.int() + torch.randint(-3, 4, img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        boxes = torch.tensor([[x0, y0, x0 + 20, y0 + 20], [32, 28 + i, 57, 53 + i]], dtype=torch.float32)
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, y0:y0 + 20, x0:x0 + 20] = 1
        masks[1][disc] = 1
        images.append(img)
        targets.append(dict(boxes=boxes, labels=torch.tensor([0, 2]), masks=masks, size=(size, size),
                            orig_size=(size, size), image_id=i))
    return torch.stack(images), targets


# -----------------------------------------------------------------------------
# pieces


def test_aligned_bilinear_keeps_cell_centres():
    x = torch.arange(3.0).view(1, 1, 1, 3)  # values = column index at stride s
    y = aligned_bilinear(x, 2)
    assert y.shape == (1, 1, 2, 6)
    # replicate pad on the left by f//2, then the align_corners resize: [0, 0, .5, 1, 1.5, 2]
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.5, 2.0]))
    assert torch.equal(aligned_bilinear(x, 1), x)


def test_aligned_bilinear_factor2_closed_form_equals_pad_resize_crop():
    """Factor 2 has its own closed form (model._upsample2_aligned); it equals CondInst's pad ->
    align_corners resize -> crop on random maps of odd and even sizes."""
    torch.manual_seed(0)
    for h, w in [(5, 6), (1, 4), (7, 3)]:
        x = torch.randn(2, 3, h, w)
        ref = F.pad(x, (0, 1, 0, 1), mode="replicate")
        ref = F.interpolate(ref, size=(2 * h + 1, 2 * w + 1), mode="bilinear", align_corners=True)
        ref = F.pad(ref, (1, 0, 1, 0), mode="replicate")[:, :, :2 * h, :2 * w]
        assert torch.allclose(aligned_bilinear(x, 2), ref, atol=1e-6)


def test_compute_locations():
    locs, lvl = compute_locations([(2, 3), (1, 2)], (8, 16), "cpu")
    assert locs.tolist()[:4] == [[4, 4], [12, 4], [20, 4], [4, 12]]
    assert locs.tolist()[6:] == [[8, 8], [24, 8]]
    assert lvl.tolist() == [0] * 6 + [1] * 2


def test_dynamic_head_param_count_and_shape():
    assert num_dynamic_params(16) == 233 and num_dynamic_params(8) == 169
    feats = torch.randn(2, 16, 5, 6)
    params = torch.randn(3, 233)
    out = dynamic_mask_head(feats, params, torch.tensor([0, 1, 1]), torch.tensor([[4.0, 4], [12, 20], [36, 4]]),
                            torch.tensor([0, 1, 4]), [64, 128, 256, 512, 1024])
    assert out.shape == (3, 1, 10, 12)


def test_dynamic_head_matches_per_instance_convs():
    """The grouped conv equals running each instance's 3-layer FCN on its own, layout [W1|W2|W3|b1|b2|b3],
    inputs [rel_x, rel_y, feats], rel = (instance location - pixel location) / soi."""
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 3, 3)
    params = torch.randn(2, num_dynamic_params(4))
    locs = torch.tensor([[12.0, 4.0], [4.0, 20.0]])
    out = dynamic_mask_head(feats, params, torch.tensor([1, 0]), locs, torch.tensor([0, 1]), [64, 128])
    for k, (im, soi) in enumerate([(1, 64.0), (0, 128.0)]):
        p = params[k]
        w1, w2, w3 = p[:48].view(8, 6, 1, 1), p[48:112].view(8, 8, 1, 1), p[112:120].view(1, 8, 1, 1)
        b1, b2, b3 = p[120:128], p[128:136], p[136:137]
        pix = torch.arange(3.0) * 8 + 4
        rx = ((locs[k, 0] - pix) / soi).view(1, 3).expand(3, 3)
        ry = ((locs[k, 1] - pix) / soi).view(3, 1).expand(3, 3)
        x = torch.cat([torch.stack([rx, ry])[None], feats[im:im + 1]], 1)
        x = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, w1, b1)), w2, b2)), w3, b3)
        assert torch.allclose(out[k:k + 1], aligned_bilinear(x, 2), atol=1e-5)


def test_relative_coordinates_stay_float32_under_bf16():
    """Past x = 1024 px bf16 holds only multiples of 8: relative coordinates built in the features' bf16
    would be up to 4 px off (0.06 at P3's 1/64). A one-layer head that outputs rel_x alone, on bf16
    features 160 cells wide (stride 8: pixels up to 1276 px), gives rel_x to bf16's rounding of the
    result, as float32 features do."""
    W, loc_x = 160, 1204.0
    params = torch.zeros(1, num_dynamic_params(4, num_layers=1))
    params[0, 0] = 1.0                                            # W1's rel_x column; rel_y, features, bias 0
    locs, lv, im = torch.tensor([[loc_x, 20.0]]), torch.tensor([0]), torch.tensor([0])
    out = {dt: dynamic_mask_head(torch.zeros(1, 4, 3, W, dtype=dt), params, im, locs, lv, [64], num_layers=1)
           for dt in (torch.float32, torch.bfloat16)}
    near = slice(2 * 140, 2 * W)                                  # output cells within ~100 px of the instance
    exact = out[torch.float32][0, 0, 1, near]
    assert exact.abs().max() < 1.6                                # |rel_x| small here: bf16's rounding is ~0.004
    assert (out[torch.bfloat16][0, 0, 1, near].float() - exact).abs().max() < 0.02


def test_dynamic_head_instances_in_any_image_order():
    """Instances listed out of image order, and an image with none, give each instance the mask its
    own image's features give it alone."""
    torch.manual_seed(1)
    feats = torch.randn(3, 4, 3, 4)
    params = torch.randn(4, num_dynamic_params(4))
    im, locs, lv = torch.tensor([2, 0, 2, 0]), torch.rand(4, 2) * 30, torch.tensor([0, 1, 0, 1])
    out = dynamic_mask_head(feats, params, im, locs, lv, [64, 128])
    for k in range(4):
        alone = dynamic_mask_head(feats[im[k]:im[k] + 1], params[k:k + 1], torch.tensor([0]), locs[k:k + 1],
                                  lv[k:k + 1], [64, 128])
        assert torch.allclose(out[k], alone[0], atol=1e-5)


def test_mask_centers():
    m = torch.zeros(1, 5, 6, dtype=torch.uint8)
    m[0, 1:3, 2:6] = 1
    assert mask_centers(m).tolist() == [[3.5, 1.5]]


def test_select_instances_topk_per_gt():
    """64 // G positives per GT object, the best by sigmoid(cls max) * sigmoid(ctr)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(topk_proposals_per_im=2))
    B, L, C = 1, 6, 3
    labels = torch.tensor([[0, 0, 0, 1, 3, 1]])  # 3 = background
    gt = torch.tensor([[0, 0, 0, 1, -1, 1]])
    ctr = torch.tensor([[0.0, 2.0, 1.0, 0.0, 5.0, 3.0]])
    out = dict(cls_logits=torch.zeros(B, L, C), ctr_logits=ctr,
               targets=dict(labels=labels, gt_inds=gt, num_gts=torch.tensor([2])))
    inst = model.select_instances(out)  # k = max(2 // 2, 1) = 1 per GT
    assert sorted(inst["loc_inds"].tolist()) == [1, 5]
    model.cfg["topk_proposals_per_im"] = 64  # k = 32: all positives kept
    assert sorted(model.select_instances(out)["loc_inds"].tolist()) == [0, 1, 2, 3, 5]


def test_controller_at_equals_the_dense_conv():
    """The controller evaluated at chosen locations = the dense 3x3 conv read at those cells,
    on every level, at borders and corners, for any image of the batch."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    sizes = [(5, 7), (3, 4), (2, 2), (1, 1)]
    box_feats = [torch.randn(2, 32, h, w) for h, w in sizes]
    dense = torch.cat([model.head.controller(f).flatten(2).transpose(1, 2) for f in box_feats], 1)  # (2, L, 233)
    L = dense.shape[1]
    im_inds = torch.tensor([0, 1, 1, 0, 1, 0, 1, 0])
    loc_inds = torch.tensor([0, 6, 34, 35, 36, 46, 50, L - 1])  # corners of P3, P4's first and last, P6
    got = model.head.controller_at(box_feats, im_inds, loc_inds)
    assert got.shape == (8, 233)
    assert torch.allclose(got, dense[im_inds, loc_inds], atol=1e-6)
    assert model.head.controller_at(box_feats, im_inds[:0], loc_inds[:0]).shape == (0, 233)


def test_controller_at_gradient_is_the_same_every_time_with_two_threads():
    """200 positives on overlapping neighbourhoods (K*9*Ch well past the 32768 elements where a gather's
    accumulating backward goes parallel with atomics): the features' gradient is bit-identical run to run."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    g = torch.Generator().manual_seed(1)
    box_feats = [torch.randn(2, 32, 8, 8, requires_grad=True)]
    im_inds, loc_inds = torch.randint(2, (200,), generator=g), torch.randint(64, (200,), generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(10):
            box_feats[0].grad = None
            model.head.controller_at(box_feats, im_inds, loc_inds).square().sum().backward()
            grads.append(box_feats[0].grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], x) for x in grads[1:])


def test_features_without_the_class_branch():
    """classify=False (SIM's teacher) skips the class tower and leaves every other output unchanged."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    images, _ = scene()
    full, lean = model.features(images), model.features(images, classify=False)
    assert lean["cls_logits"] is None and full["cls_logits"] is not None
    for k in ("reg", "ctr_logits", "mask_feats"):
        assert torch.equal(full[k], lean[k])
    assert all(torch.equal(a, b) for a, b in zip(full["box_feats"], lean["box_feats"]))


def test_mask_out_stride_2_gives_stride_2_masks():
    """mask_out_stride=2 (small images): mask branch on P2-P5 at stride 4, logits at stride 2,
    and the BoxInst losses run on that grid; predictions still come back at the original size."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(mask_out_stride=2))
    images, targets = scene()
    out = model(images, targets)
    assert out["mask_feats"].shape == (2, 16, 16, 16)
    assert out["mask_logits"].shape[1:] == (1, 32, 32)
    loss, logs = losses.compute_losses(out, images, targets, tiny_cfg(mask_out_stride=2), it=1)
    loss.backward()
    assert torch.isfinite(loss) and logs["loss_pairwise"] > 0
    assert model.fpn.lateral_p2.weight.grad.abs().sum() > 0
    model.eval()
    preds = model.predict(images, [dict(t, orig_size=(96, 128)) for t in targets])
    assert all(p["masks"].shape[1:] == (96, 128) for p in preds)


def test_forward_shapes_and_postprocess_to_original_size():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images, targets = scene()
    out = model(images, targets)
    L = 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1
    assert out["cls_logits"].shape == (2, L, 3) and [f.shape[-2:] for f in out["box_feats"]] == [
        (8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert out["mask_feats"].shape == (2, 16, 8, 8)
    assert out["mask_logits"].shape[1:] == (1, 16, 16)
    assert out["mask_logits"].shape[0] == out["inst"]["gt_inds"].numel() > 0
    # post-processing: a detection at a known location, image resized 64x64 from an original 96x128
    model.eval()
    out = model.features(images)
    loc = torch.tensor([27])  # P3 cell (3, 3): location (28, 28)
    probs = model.mask_logits(out, dict(im_inds=torch.tensor([0]), loc_inds=loc)).sigmoid()  # (1, 1, 16, 16)
    probs[0, 0, :8, :4] = 1.0  # top-left quarter-by-half of the 64x64 resized frame (stride 4) is the object
    probs[0, 0, 8:] = probs[0, 0, :, 4:] = 0.0
    res = model.postprocess(probs, torch.tensor([1]), torch.tensor([0.9]),
                            torch.tensor([[20.0, 12.0, 32.0, 36.0]]), dict(size=(64, 64), orig_size=(96, 128)))
    assert res["masks"].shape == (1, 96, 128) and res["masks"].dtype == torch.bool
    assert torch.allclose(res["boxes"], torch.tensor([[40.0, 18.0, 64.0, 54.0]]))
    assert res["masks"][0, :44, :28].all() and not res["masks"][0, 52:].any() and not res["masks"][0, :, 36:].any()
    # predict end to end: boxes clipped to the original frame; an image's results do not depend on
    # its place in the batch (the masks of the whole batch come from one dynamic-head call)
    sized = [dict(t, orig_size=(96, 128)) for t in targets]
    model.cfg["score_thresh"] = 0.0  # the untrained model's scores are low: keep max_dets detections
    preds = model.predict(images, sized)
    flipped = model.predict(images.flip(0), sized[::-1])[::-1]
    for p, q in zip(preds, flipped):
        assert p["masks"].shape[1:] == (96, 128) and len(p["boxes"]) > 0
        assert p["boxes"][:, 2].max() <= 128 and p["boxes"][:, 3].max() <= 96
        assert torch.allclose(p["boxes"], q["boxes"]) and torch.equal(p["labels"], q["labels"])
        assert torch.equal(p["masks"], q["masks"])
    assert not torch.equal(preds[0]["masks"], preds[1]["masks"])


def test_backbone_freezing():
    model = build_model(tiny_cfg(backbone_norm="frozen", freeze_at=2))
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())
    assert isinstance(model.backbone.stem[1], torchvision.ops.FrozenBatchNorm2d)


def test_imagenet_weights_through_torchvision_api(tmp_path, monkeypatch):
    """Offline: random weights saved under the enum's file name in $TORCH_HOME are picked up;
    without them the error is one clear line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), ckpt_dir / os.path.basename(weights.url))
    model = build_model(tiny_cfg(pretrained="imagenet", backbone_norm="frozen", freeze_at=2))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.stem[1].running_var, ref.bn1.running_var)
    # a local file path works too
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = build_model(tiny_cfg(pretrained=str(path)))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    # missing file: one line naming it and the fix
    with pytest.raises(SystemExit) as e:
        build_model(tiny_cfg(pretrained=str(tmp_path / "nope.pth")))
    assert "nope.pth" in str(e.value) and "fix" in str(e.value) and "\n" not in str(e.value)
    # offline and not cached: torchvision's download fails -> one line naming the file to put in the cache
    os.remove(ckpt_dir / os.path.basename(weights.url))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")))
    with pytest.raises(SystemExit) as e:
        build_model(tiny_cfg(pretrained="imagenet"))
    assert os.path.basename(weights.url) in str(e.value) and "\n" not in str(e.value)


def test_resnet10_and_channels_last():
    """The demo's backbone: one BasicBlock per stage, no ImageNet weights (one clear line); the
    channels_last model computes the same outputs and gradients as the NCHW one."""
    model = build_model(tiny_cfg(backbone="resnet10"))
    assert [len(l) for l in (model.backbone.layer1, model.backbone.layer4)] == [1, 1]
    with pytest.raises(SystemExit) as e:
        build_model(tiny_cfg(backbone="resnet10", pretrained="imagenet"))
    assert "resnet10" in str(e.value) and "fix" in str(e.value) and "\n" not in str(e.value)
    images, targets = scene()
    outs = []
    for cl in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(backbone="resnet10", channels_last=cl)).eval()
        w = model.backbone.stem[0].weight
        assert w.is_contiguous(memory_format=torch.channels_last) == cl
        out = model.features(images)
        out["cls_logits"].sum().backward()
        outs.append((out["cls_logits"], out["mask_feats"], w.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_teacher_ema():
    model = build_model(tiny_cfg())
    teacher = make_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            b.add_(3)
    p_t0 = [p.clone() for p in teacher.parameters()]
    update_teacher(teacher, model, momentum=0.75)
    assert all(torch.allclose(pt, p0 + 0.25) for pt, p0 in zip(teacher.parameters(), p_t0))  # every parameter
    assert all(torch.equal(bt, bs) for bt, bs in zip(teacher.buffers(), model.buffers()))  # BN statistics copied


# -----------------------------------------------------------------------------
# learning


def test_tiny_model_learns_two_images():
    """BoxInst losses of a tiny model on 2 images fall >= 5x (centerness BCE counted above its floor,
    the entropy of its soft targets, which no model can go below)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(pairwise_warmup_iters=100)
    model = build_model(cfg)
    images, targets = scene()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss_above_floor(out, logs):
        t = out["targets"]
        pos = t["labels"] != cfg["num_classes"]
        c = losses.centerness_target(t["reg_targets"][pos]).clamp(1e-6, 1 - 1e-6)
        entropy = -(c * c.log() + (1 - c) * (1 - c).log()).sum() / pos.sum()
        return sum(logs.values()) - entropy

    first = None
    for it in range(120):
        out = model(images, targets)
        loss, logs = losses.compute_losses(out, images, targets, cfg, it + 1)
        if first is None:
            first = loss_above_floor(out, logs).item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = loss_above_floor(out, logs).item()
    assert last < first / 5, (first, last)


# -----------------------------------------------------------------------------
# DDP: 2 processes x batch b give the same averaged gradients as 1 process x batch 2b


def _grads(cfg, images, targets):
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():  # batch statistics differ between batch b and 2b by definition
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def _ddp_worker(rank, world, port, cfg, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    images, targets = scene(4)
    model = _grads(cfg, images, targets)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sl = slice(2 * rank, 2 * rank + 2)
    out = ddp(images[sl], targets[sl])
    loss, _ = losses.compute_losses(out, images[sl], targets[sl], cfg, 5)
    loss.backward()
    if rank == 0:
        q.put({n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None})  # by value
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gradients_equal_big_batch():
    cfg = tiny_cfg()
    images, targets = scene(4)
    model = _grads(cfg, images, targets)
    out = model(images, targets)
    loss, _ = losses.compute_losses(out, images, targets, cfg, 5)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, cfg, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert set(got) == set(ref)
    for n in ref:
        assert torch.allclose(torch.from_numpy(got[n]), ref[n], rtol=1e-3, atol=1e-6), n


def test_dcn_starts_as_half_the_plain_conv_and_learns_offsets():
    """ModulatedDeformConv with its zero-initialised offset conv: offsets 0, modulation sigmoid(0) = 0.5,
    so it computes 0.5 x the conv it replaced; the offsets get a gradient."""
    from backbone import ModulatedDeformConv
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    dcn = ModulatedDeformConv(conv)
    x = torch.randn(2, 4, 9, 11)
    assert torch.allclose(dcn(x), 0.5 * conv(x), atol=1e-5)
    dcn(x).square().sum().backward()
    assert dcn.offset.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # SIM's bf16 teacher (D21): a bf16 input, float32 kernel
        y = dcn(x.bfloat16())
    assert y.dtype == torch.float32 and torch.allclose(y, 0.5 * conv(x.bfloat16().float()), atol=1e-5)


def test_tab1_backbones_load_imagenet_weights_offline(tmp_path, monkeypatch):
    """ResNet-101-DCN (deformable 3x3 in res3-res5 only, the rest the ResNet's) and Swin-B (C2-C5 at strides
    4-32): random weights under the enum's file name in $TORCH_HOME are loaded through torchvision's API."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    from backbone import Backbone, ModulatedDeformConv
    for name, builder, enum in [("resnet101_dcn", torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
                                ("swin_b", torchvision.models.swin_b, torchvision.models.Swin_B_Weights)]:
        torch.manual_seed(0)
        ref = builder()
        torch.save(ref.state_dict(), ckpt_dir / os.path.basename(enum.IMAGENET1K_V1.url))
        b = Backbone(name, "imagenet", "frozen", 2)
        outs = b(torch.randn(1, 3, 64, 96))
        assert [o.shape[1:] for o in outs] == [(c, 64 // s, 96 // s) for c, s in zip(b.out_channels, (4, 8, 16, 32))]
        if name == "swin_b":
            assert torch.equal(b.trunk.features[5][3].mlp[0].weight, ref.features[5][3].mlp[0].weight)
            assert not any(p.requires_grad for p in b.trunk.features[1].parameters())   # freeze_at 2
        else:
            assert isinstance(b.layer2[0].conv2, ModulatedDeformConv) and isinstance(b.layer1[0].conv2, torch.nn.Conv2d)
            assert torch.equal(b.layer3[5].conv2.weight, ref.layer3[5].conv2.weight)
        os.remove(ckpt_dir / os.path.basename(enum.IMAGENET1K_V1.url))


# -----------------------------------------------------------------------------
# forward-only twins with folded BatchNorms


def test_fold_batchnorm_hand_values():
    """conv w 2 then BN(gamma 3, beta 0.5, mean 1, var 3, eps 1): s = 3 / 2, folded w 3, b 0.5 - 1.5 = -1;
    a conv with bias 1 before a frozen BN of the same numbers: b = 1.5 + 0.5 - 1.5 = 0.5."""
    for norm, bias, want_b, want_y in ((torch.nn.BatchNorm2d(1, eps=1.0), False, -1.0, [2.0, 5.0]),
                                       (torchvision.ops.FrozenBatchNorm2d(1, eps=1.0), True, 0.5, [3.5, 6.5])):
        conv = torch.nn.Conv2d(1, 1, 1, bias=bias)
        net = torch.nn.Sequential(conv, norm, torch.nn.ReLU(), torch.nn.BatchNorm2d(1))  # the last BN: no conv before it
        with torch.no_grad():
            conv.weight.fill_(2.0)
            if bias:
                conv.bias.fill_(1.0)
            norm.weight.fill_(3.0), norm.bias.fill_(0.5), norm.running_mean.fill_(1.0), norm.running_var.fill_(3.0)
        net.eval()
        twin, pairs = fold_batchnorm(net)
        assert isinstance(twin[1], torch.nn.Identity) and isinstance(twin[3], torch.nn.BatchNorm2d)
        assert twin[3] is not net[3] and twin[3].weight is net[3].weight  # shared, not copied
        assert len(pairs) == 1 and pairs[0][0] is conv and pairs[0][1] is norm
        assert twin[0].weight.item() == 3.0 and twin[0].bias.item() == want_b
        assert conv.weight.item() == 2.0 and isinstance(net[1], type(norm))  # the network itself is untouched
        x = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
        with torch.no_grad():
            assert net[:2](x).flatten().tolist() == want_y == twin[:2](x).flatten().tolist()
    plain = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(1))  # nothing to fold: the network itself
    twin, pairs = fold_batchnorm(plain)
    assert twin is plain and pairs == []


@pytest.mark.parametrize("name,norm", [("resnet18", "frozen"), ("resnet101_dcn", "bn")])
def test_fold_batchnorm_backbones(name, norm):
    """Every BN of a ResNet (frozen or trained; with DCNv2 convs before some) folds, and the twin's
    C2-C5 equal the network's (BN statistics and affine away from 0/1, so a wrong fold would show)."""
    from backbone import Backbone
    torch.manual_seed(0)
    net = Backbone(name, "", norm, 0).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    twin, pairs = fold_batchnorm(net)
    n_bn = sum(isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)) for m in net.modules())
    assert len(pairs) == n_bn == (20 if name == "resnet18" else 104)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), twin(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_folded_twin_predicts_what_the_model_predicts():
    """eval.py scores a folded twin: its detections and masks are the model's (trained BN statistics)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(score_thresh=0.0))
    images, targets = scene(2)
    with torch.no_grad():
        model.features(images)  # train mode: running statistics move off (0, 1)
    model.eval()
    twin, pairs = fold_batchnorm(model)
    assert len(pairs) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    a, b = model.predict(images, targets), twin.predict(images, targets)
    for p, q in zip(a, b):
        assert len(p["scores"]) > 0 and torch.equal(p["labels"], q["labels"])
        assert torch.allclose(p["scores"], q["scores"], atol=1e-5) and torch.allclose(p["boxes"], q["boxes"], atol=1e-3)
        assert (p["masks"] != q["masks"]).float().mean() < 1e-3
