"""Tests of mask2former.py: deformable attention against a hand-written bilinear loop, the reference's
initialisation and positional encoding, masked attention's masking, the projection cost by hand, the
Hungarian matcher against brute force, the network's shapes and predict's format, and a tiny model
that overfits two one-square images with a box-only loss."""

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import config
import losses
import configurator
from box_ops import box_iou_pairs, box_masks_inclusive, masks_to_boxes
from model import build_model
import mask2former
import sim
import step
import viz
from mask2former import (MSDeformAttn, Mask2Former, MaskedCrossAttention, attention_mask, encoder_reference_points,
                         hungarian_match, match, ms_deform_attn_core, projection_cost, sine_position_encoding)
from model import CondInst, model_from_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_cfg(**kw):
    """config.py's defaults with a tiny Mask2Former: ResNet-10 from scratch, width 32, 8 queries, 2 encoder / 3
    decoder layers, box losses at stride 4."""
    cfg = dict(config.defaults(), arch="mask2former", backbone="resnet10", pretrained="", backbone_norm="bn",
               freeze_at=0, num_classes=2, conv_dim=32, mask_dim=32, hidden_dim=32, num_queries=8, nheads=4,
               dim_feedforward=64, enc_dim_feedforward=64, enc_layers=2, dec_layers=3, mask_out_stride=4,
               bottom_pixels_removed=0, pairwise_warmup_iters=1)
    cfg.update(kw)
    return cfg


def square_scene():
    """Two 64 x 64 grey images with one coloured square each (class 0 red, class 1 blue); targets as data.py."""
    images = torch.full((2, 3, 64, 64), 110, dtype=torch.uint8)
    images[0, :, 8:32, 12:36] = torch.tensor([240, 30, 30], dtype=torch.uint8)[:, None, None]
    images[1, :, 30:58, 28:60] = torch.tensor([30, 30, 230], dtype=torch.uint8)[:, None, None]
    targets = [dict(boxes=torch.tensor([[12.0, 8, 36, 32]]), labels=torch.tensor([0]), size=(64, 64), orig_size=(64, 64)),
               dict(boxes=torch.tensor([[28.0, 30, 60, 58]]), labels=torch.tensor([1]), size=(64, 64), orig_size=(64, 64))]
    return images, targets


# -----------------------------------------------------------------------------
# multi-scale deformable attention


def bilinear_by_hand(img, x, y):
    """Sample img (H, W, D) at normalised (x, y) from the formula: pixel j's centre at (j + 0.5) / W, so
    the continuous index is x W - 0.5; the 4 neighbours weighted (1 - fx)(1 - fy), ...; outside = 0."""
    H, W, _ = img.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(img.shape[-1], dtype=img.dtype)
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < H and 0 <= xx < W:
                out += wy * wx * img[yy, xx]
    return out


def test_ms_deform_attn_core_equals_a_loop_over_queries_heads_levels_points():
    """grid_sample with align_corners=False and zero padding is exactly the hand-written bilinear sum,
    points outside the maps included (locations drawn in [-0.3, 1.3]), on 2 levels 3x4 and 2x2."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    B, M, Dh, Lq, L, P = 2, 2, 3, 5, 2, 2
    value = torch.randn(B, 12 + 4, M, Dh, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    loc[0, 0, 0, 0, 0] = torch.tensor([-0.9, 0.5], dtype=torch.float64)   # far outside: reads 0
    loc[0, 0, 0, 0, 1] = torch.tensor([0.0, 0.0], dtype=torch.float64)    # the corner: 1/4 of pixel (0, 0)
    weights = torch.rand(B, Lq, M, L, P, generator=g, dtype=torch.float64)
    out = ms_deform_attn_core(value, shapes, loc, weights)
    assert out.shape == (B, Lq, M * Dh)
    levels = value.split([12, 4], dim=1)
    expect = torch.zeros(B, Lq, M, Dh, dtype=torch.float64)
    for b, q, m, l, p in itertools.product(range(B), range(Lq), range(M), range(L), range(P)):
        img = levels[l][b, :, m].reshape(*shapes[l], Dh)                                   # (H, W, Dh)
        x, y = loc[b, q, m, l, p].tolist()
        expect[b, q, m] += weights[b, q, m, l, p] * bilinear_by_hand(img, x, y)
    assert (out - expect.reshape(B, Lq, M * Dh)).abs().max() <= 1e-10
    # the two hand-placed points of query 0, head 0, level 0 alone
    one = torch.zeros_like(weights)
    one[0, 0, 0, 0, 1] = 1.0
    corner = ms_deform_attn_core(value, shapes, loc, one)[0, 0, :Dh]
    assert torch.allclose(corner, 0.25 * levels[0][0, 0, 0], atol=1e-12)
    one.zero_()
    one[0, 0, 0, 0, 0] = 1.0
    assert ms_deform_attn_core(value, shapes, loc, one).abs().max() == 0


def test_msdeformattn_offsets_start_on_a_ring_of_directions():
    """8 heads: head m points at angle 2 pi m / 8, scaled to the unit square: (1, 0), (1, 1), (0, 1), (-1, 1), ...;
    point p at (p + 1) times that, the same on every level; attention weights start uniform."""
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=2)
    bias = attn.sampling_offsets.bias.view(8, 3, 2, 2)                                      # (M, L, P, 2)
    ring = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    for lvl in range(3):
        assert torch.allclose(bias[:, lvl, 0], ring, atol=1e-6)
        assert torch.allclose(bias[:, lvl, 1], 2 * ring, atol=1e-6)
    assert attn.sampling_offsets.weight.abs().max() == 0 and attn.attention_weights.weight.abs().max() == 0
    # so at the start a query at a cell centre reads the cell (p + 1) cells away along its head's direction:
    # head 0 (+x), point 0 on a 2 x 4 level samples the next cell's value exactly
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=4, n_points=1)
    with torch.no_grad():
        attn.value_proj.weight.copy_(torch.eye(8))
        attn.output_proj.weight.copy_(torch.eye(8))
    feats = torch.randn(1, 8, 8)                                                          # (B, S = 2 x 4, C)
    ref = encoder_reference_points([(2, 4)])[None, :, None]                               # (1, S, 1, 2)
    out = attn(torch.zeros(1, 8, 8), ref, feats, [(2, 4)])                                # (1, S, C)
    assert torch.allclose(out[0, 0, :2], feats[0, 1, :2], atol=1e-6)                      # cell (0, 0) head 0 -> cell (0, 1)


def test_sine_position_encoding_by_hand():
    """Row i: y = (i + 1) / h * 2 pi; channels 0, 1 = sin y, cos y (dim_t = 1), channel F = sin x; on a 2 x 4 map."""
    pos = sine_position_encoding(2, 4, num_pos_feats=4)
    assert pos.shape == (8, 2, 4)
    y = 2 * math.pi * 1 / 2            # row 0 of 2
    x = 2 * math.pi * 3 / 4            # column 2 of 4
    assert abs(pos[0, 0, 2] - math.sin(y)) < 1e-5 and abs(pos[1, 0, 2] - math.cos(y)) < 1e-5
    assert abs(pos[4, 0, 2] - math.sin(x)) < 1e-5 and abs(pos[5, 0, 2] - math.cos(x)) < 1e-5
    assert abs(pos[6, 0, 2] - math.sin(x / 100)) < 1e-5      # channel 2 of the x half: x / 10000^(2/4)


# -----------------------------------------------------------------------------
# masked attention


def test_masked_attention_ignores_exactly_the_masked_keys():
    """Query 0 sees pixels 1 and 4 of a 2 x 3 map (logit > 0): changing the memory at a masked pixel leaves its
    output bit-identical, changing pixel 4 does not. Query 1's mask is empty: its row is unmasked, so it
    attends everywhere (its output moves whichever pixel changes)."""
    torch.manual_seed(0)
    layer = MaskedCrossAttention(8, 2).eval()
    logits = torch.full((1, 2, 2, 3), -3.0)
    logits[0, 0, 0, 1] = logits[0, 0, 1, 1] = 2.0
    mask = attention_mask(logits, (2, 3), num_heads=2)                                    # (B M, Q, S)
    assert mask.shape == (2, 2, 6)
    assert mask[0, 0].tolist() == [True, False, True, True, False, True]
    assert not mask[:, 1].any()                                                          # empty mask -> everywhere
    x, qpos = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    memory, mpos = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    base = layer(x, qpos, memory, mpos, mask)
    for pixel in range(6):
        changed = memory.clone()
        changed[0, pixel] += 5.0
        out = layer(x, qpos, changed, mpos, mask)
        if pixel in (1, 4):
            assert (out[0, 0] - base[0, 0]).abs().max() > 1e-3
        else:
            assert torch.equal(out[0, 0], base[0, 0])
        assert (out[0, 1] - base[0, 1]).abs().max() > 1e-3


def test_attention_mask_resizes_the_previous_prediction():
    """A mask predicted at 4 x 4 gates a 2 x 2 scale through bilinear resizing (align_corners=False: each
    coarse cell averages its 2 x 2 block)."""
    logits = torch.tensor([[1.0, 1, -1, -1], [1, 1, -1, -1], [-1, -1, -3, -3], [-1, -1, 1, 1]])[None, None]
    mask = attention_mask(logits, (2, 2), num_heads=1)
    assert mask[0, 0].tolist() == [False, True, True, True]                              # block means 1, -1, -1, -1


# -----------------------------------------------------------------------------
# matching


def test_projection_cost_by_hand():
    """On a 3 x 4 grid, box 0 covers rows 0-1, cols 1-2 (x profile [0,1,1,0], y profile [1,1,0]), box 1 the
    pixel (2, 3) ([0,0,0,1], [0,0,1]). Query A: p = 1 at (0,1), 0.5 at (0,2) -> x profile [0,1,.5,0], y [1,0,0]:
    dice_x = 1 - 2(1.5)/(1.25 + 2) = 1/13, dice_y = 1 - 2/3 = 1/3 -> 16/39 against box 0, 1 + 1 against box 1.
    Query B = box 0's mask: 0 / 2. Query C = nothing: 2 / 2. Query D: p = 0.5 at (2, 3): 2 / (0.2 + 0.2)."""
    box = torch.zeros(2, 3, 4)
    box[0, 0:2, 1:3] = 1
    box[1, 2, 3] = 1
    p = torch.zeros(4, 3, 4)
    p[0, 0, 1], p[0, 0, 2] = 1.0, 0.5
    p[1] = box[0]
    p[3, 2, 3] = 0.5
    cost = projection_cost(torch.logit(p), box)
    expect = torch.tensor([[16 / 39, 2], [0, 2], [2, 2], [2, 0.4]])
    assert torch.allclose(cost, expect, atol=1e-4)
    # the cost of a pair is BoxInst's projection loss of that pair (losses.projection_loss)
    loss = losses.projection_loss(torch.logit(p[:1])[:, None], box[:1, None])
    assert torch.allclose(cost[0, 0], loss, atol=1e-6)


def brute_force_min(cost):
    """Minimal total cost over every injective map of the columns to rows (Q >= G)."""
    Q, G = cost.shape
    return min(sum(cost[r, c].item() for c, r in enumerate(rows)) for rows in itertools.permutations(range(Q), G))


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_match_equals_brute_force_on_square_costs(seed):
    cost = torch.rand(5, 5, generator=torch.Generator().manual_seed(seed))
    rows, cols = hungarian_match(cost)
    assert sorted(rows.tolist()) == list(range(5)) and sorted(cols.tolist()) == list(range(5))
    assert abs(cost[rows, cols].sum().item() - brute_force_min(cost)) < 1e-6


def test_hungarian_match_refuses_a_non_finite_cost():
    """A NaN cost (a diverged run) stops with one line instead of scipy's own error."""
    cost = torch.rand(3, 3)
    cost[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite matching cost"):
        hungarian_match(cost)


def test_hungarian_match_rectangular():
    """5 queries, 3 objects: every object gets a distinct query, at the brute-force minimum."""
    cost = torch.rand(5, 3, generator=torch.Generator().manual_seed(7))
    rows, cols = hungarian_match(cost)
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    assert abs(cost[rows, cols].sum().item() - brute_force_min(cost)) < 1e-6


def test_match_finds_the_query_whose_mask_fills_each_box():
    """3 queries at stride 4 on a 32 x 32 image: query 2 fills box 0, query 0 fills box 1, query 1 is empty;
    classes are uninformative (equal logits), so the projection cost decides; an image without objects gets
    an empty match."""
    boxes = torch.tensor([[0.0, 0, 15, 15], [16, 16, 31, 31]])
    grid = box_masks_inclusive(boxes, (32, 32), 4)                                        # (2, 8, 8)
    masks = torch.full((2, 3, 8, 8), -8.0)
    masks[0, 2] = 16 * grid[0] - 8
    masks[0, 0] = 16 * grid[1] - 8
    outputs = dict(pred_logits=torch.zeros(2, 3, 3), pred_masks=masks)
    targets = [dict(boxes=boxes, labels=torch.tensor([0, 1])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    (q, g), (q1, g1) = match(outputs, targets)
    assert dict(zip(g.tolist(), q.tolist())) == {0: 2, 1: 0}
    assert q1.numel() == 0 and g1.numel() == 0


# -----------------------------------------------------------------------------
# the network


def test_forward_shapes():
    torch.manual_seed(0)
    model = Mask2Former(tiny_cfg())
    out = model(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    assert out["pred_logits"].shape == (2, 8, 3)                                          # K + 1 classes
    assert out["pred_masks"].shape == (2, 8, 16, 24)
    assert out["mask_features"].shape == (2, 32, 16, 24)
    assert len(out["aux_outputs"]) == 3                                                   # learnable queries + 2 layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 8, 3) and aux["pred_masks"].shape == (2, 8, 16, 24)


def test_reference_config_builds():
    """The reference sizes of configs/coco_boxinst_m2f_r101_50e.py (R101, 256 wide, 100 queries, 6 + 9 layers)
    build through model.build_model; the decoder has 9 layers."""
    cfg = config.defaults()
    configurator.configure_run([os.path.join(HERE, "configs", "coco_boxinst_m2f_r101_50e.py"), "--pretrained=''"], cfg)
    cfg["num_classes"] = 80
    model = build_model(cfg)
    assert isinstance(model, Mask2Former) and model.cfg["backbone"] == "resnet101"
    assert len(model.pixel_decoder.layers) == 6 and len(model.decoder.layers) == 9
    assert model.decoder.query_feat.weight.shape == (100, 256)
    assert model.decoder.class_embed.out_features == 81


def test_predict_returns_condinst_format_at_original_size():
    """Boxes (K, 4) = the masks' tight boxes, scores descending in [0, 1], labels in [0, K), bool masks at the
    original size, K <= min(max_dets, Q x classes); images padded 64 x 96 holding a 60 x 90 image of 120 x 180."""
    torch.manual_seed(0)
    model = Mask2Former(tiny_cfg(max_dets=10)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    targets = [dict(size=(60, 90), orig_size=(120, 180)), dict(size=(64, 80), orig_size=(64, 80))]
    res = model.predict(images, targets)
    assert len(res) == 2
    for r, t in zip(res, targets):
        assert set(r) == {"boxes", "scores", "labels", "masks"}
        k = len(r["scores"])
        assert 0 < k <= 10
        assert r["masks"].shape == (k, *t["orig_size"]) and r["masks"].dtype == torch.bool
        assert r["boxes"].shape == (k, 4) and torch.equal(r["boxes"], masks_to_boxes(r["masks"]))
        assert r["labels"].min() >= 0 and r["labels"].max() < 2
        assert (r["scores"] >= 0).all() and (r["scores"] <= 1).all()
        assert torch.equal(r["scores"], r["scores"].sort(descending=True).values)
        assert r["masks"].flatten(1).any(1).all()


def test_tiny_model_overfits_two_squares_from_boxes_alone():
    """40 AdamW steps on 2 images of one square each with BoxInst-dagger's loss (training_losses: per prediction
    set, Hungarian matching from boxes, projection + colour-pairwise on the matched queries, class cross-entropy
    with no-object weight 0.1; the pairwise term warmed up over the 40 steps, as BoxInst's). The matched
    query's mask (logit > 0) must cover the square's box grid with IoU > 0.5, and predict's best detection
    must be the square, with its class (about 6 s on an idle core)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(method="boxinst", pairwise_warmup_iters=40)  # at full weight from step 1 it empties the masks
    model = Mask2Former(cfg)
    images, targets = square_scene()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    box_grids = [box_masks_inclusive(t["boxes"], (64, 64), 4) for t in targets]           # (1, 16, 16) each
    first = None
    for it in range(40):
        out = model(images)
        loss, logs, *_ = mask2former.training_losses(out, None, None, images, targets, it, cfg)
        assert set(logs) == {"loss_prj", "loss_pairwise", "loss_cls"}
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    out = model(images)
    for b, (q, g) in enumerate(match(out, targets)):
        pred = out["pred_masks"][b, q[0]].detach() > 0
        box = box_grids[b][g[0]] > 0
        assert (pred & box).sum() / (pred | box).sum() > 0.5
    model.eval()
    for r, t in zip(model.predict(images, targets), targets):
        assert r["labels"][0] == t["labels"][0]
        assert box_iou_pairs(r["boxes"][:1], t["boxes"]) > 0.5


# -----------------------------------------------------------------------------
# training from boxes: the pieces by hand


def test_to_loss_grid_puts_cells_on_the_box_mask_grid():
    """A stride-4 map holding each cell's pixel x (4j + 2) becomes, at stride 2, each cell's own pixel x
    (2i + 1, the [1::2] grid of box_masks_inclusive) away from the clamped border; stride 4 is the map itself."""
    x = (4 * torch.arange(6.0) + 2).view(1, 1, 1, 6).expand(1, 1, 3, 6)
    assert mask2former.to_loss_grid(x, 4) is x
    y = mask2former.to_loss_grid(x, 2)
    assert y.shape == (1, 1, 6, 12)
    assert torch.allclose(y[0, 0, 2, 1:11], 2 * torch.arange(1.0, 11) + 1)


def test_matched_queries_layout():
    """Two sets, two images (2 + 1 objects): the pairs of set 0 then set 1, objects numbered in batch order
    (image 1's object is 2), each pair's logits those of its query."""
    pm = [torch.randn(2, 4, 3, 3) for _ in range(2)]
    sets = [dict(pred_masks=m) for m in pm]
    targets = [dict(boxes=torch.zeros(2, 4)), dict(boxes=torch.zeros(1, 4))]
    L = lambda *v: torch.tensor(v)
    indices = [[(L(3, 1), L(0, 1)), (L(2), L(0))], [(L(0, 2), L(1, 0)), (L(1), L(0))]]
    m = mask2former.matched_queries(sets, indices, targets, 4)
    assert m["inst"]["gt_inds"].tolist() == [0, 1, 2, 1, 0, 2]
    assert m["inst"]["im_inds"].tolist() == [0, 0, 1, 0, 0, 1]
    expect = torch.stack([pm[0][0, 3], pm[0][0, 1], pm[0][1, 2], pm[1][0, 0], pm[1][0, 2], pm[1][1, 1]])
    assert torch.equal(m["mask_logits"][:, 0], expect)


def test_class_loss_by_hand():
    """Q = 2, K = 2: query 0 (logits 2, 0, 0) matched to class 0, query 1 (0, 0, 1) unmatched: no object, weight
    0.1: (CE_0 + 0.1 CE_1) / 1.1 with CE_0 = -log(e^2 / (e^2 + 2)), CE_1 = -log(e / (e + 2))."""
    logits = torch.tensor([[[2.0, 0, 0], [0, 0, 1]]])
    targets = [dict(labels=torch.tensor([0]))]
    got = mask2former.class_loss(logits, targets, [(torch.tensor([0]), torch.tensor([0]))], 0.1)
    ce0 = -math.log(math.e ** 2 / (math.e ** 2 + 2))
    ce1 = -math.log(math.e / (math.e + 2))
    assert abs(got.item() - (ce0 + 0.1 * ce1) / 1.1) < 1e-6


def test_box_terms_by_hand():
    """A grey 32 x 32 image, box (8, 8, 23, 23): on the stride-4 grid the box covers cells 2-5 of 8 in x and y.
    A query of logit 0 everywhere (p = 0.5): projection dice per axis 1 - 2 (0.5 x 4) / (8 x 0.25 + 4) = 1/3,
    so 2/3; every pixel pair -log(0.5^2 + 0.5^2) = log 2, so the pairwise mean is log 2. A query whose mask is
    the box (logits +-20): projection 0. Mean over the two pairs."""
    images = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    targets = [dict(boxes=torch.tensor([[8.0, 8, 23, 23]]), labels=torch.tensor([0]), size=(32, 32), orig_size=(32, 32))]
    cfg = tiny_cfg()
    zero = torch.zeros(1, 1, 8, 8)
    t = mask2former.box_terms(dict(mask_logits=zero, inst=dict(gt_inds=torch.tensor([0]), im_inds=torch.tensor([0]))),
                              images, targets, cfg)
    assert abs(t["loss_prj"].item() - 2 / 3) < 1e-4 and abs(t["loss_pairwise"].item() - math.log(2)) < 1e-6
    box = box_masks_inclusive(targets[0]["boxes"], (32, 32), 4)                               # (1, 8, 8)
    assert box[0].sum(0).nonzero().flatten().tolist() == [2, 3, 4, 5]
    both = torch.cat([zero, (40 * box - 20)[None]])
    t2 = mask2former.box_terms(dict(mask_logits=both, inst=dict(gt_inds=torch.tensor([0, 0]), im_inds=torch.tensor([0, 0]))),
                               images, targets, cfg)
    assert abs(t2["loss_prj"].item() - 1 / 3) < 1e-4                                        # (2/3 + 0) / 2


def test_training_losses_combine_sets_as_the_reference():
    """The loss is sum over prediction sets of mask_weight (L_prj + w_pair L_pair) + class_weight CE: each mask
    term a mean over all sets' pairs times the number of sets (here 4: learnable queries + 3 layers)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(method="boxinst", pairwise_warmup_iters=10)
    model = Mask2Former(cfg)
    images, targets = square_scene()
    out = model(images)
    loss, logs, pm, obj, feats = mask2former.training_losses(out, None, None, images, targets, 4, cfg)   # it + 1 = 5
    assert pm is None and obj is None and feats is None
    sets = mask2former.prediction_sets(out)
    indices = [match(p, targets) for p in sets]
    m = mask2former.matched_queries(sets, indices, targets, 4)
    t = mask2former.box_terms(m, images, targets, cfg)
    ce = sum(mask2former.class_loss(p["pred_logits"], targets, i, 0.1) for p, i in zip(sets, indices))
    expect = 4 * 5.0 * (t["loss_prj"] + 0.5 * t["loss_pairwise"]) + 2.0 * ce
    assert torch.allclose(loss, expect, atol=1e-5)
    assert torch.allclose(logs["loss_cls"], 2.0 * ce) and torch.allclose(logs["loss_pairwise"], 10 * t["loss_pairwise"])


def instance_map_scene():
    """A teacher's final set on one 64 x 64 image (stride-4 grid 16 x 16) with one object, box (16, 16, 48, 48):
    query 0's mask is the box (IoU 1), query 1's the box moved 8 px right (IoU 768 / 1280 = 0.6), query 2's a
    corner (IoU 0); class logits all equal."""
    pred = torch.full((1, 3, 16, 16), -10.0)
    pred[0, 0, 4:12, 4:12] = 10
    pred[0, 1, 4:12, 6:14] = 10
    pred[0, 2, 0:2, 0:2] = 10
    t_out = dict(pred_logits=torch.zeros(1, 3, 3), pred_masks=pred,
                 mask_features=torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0)))
    targets = [dict(boxes=torch.tensor([[16.0, 16, 48, 48]]), labels=torch.tensor([1]), size=(64, 64), orig_size=(64, 64))]
    return t_out, targets


def test_teacher_queries_matched_and_iou_mix():
    """matched: the one query the matcher gives the object (query 0, IoU 1). iou_mix (mix_iou 0.5): queries 0
    and 1, IoU 1 and 0.6, not the corner."""
    t_out, targets = instance_map_scene()
    probs, ious, gi = mask2former.teacher_queries(t_out, targets, tiny_cfg(m2f_instance_map="matched"))
    assert gi.tolist() == [0] and torch.allclose(ious, torch.tensor([1.0]))
    assert torch.equal(probs[0], t_out["pred_masks"][0, 0].sigmoid())                  # stride 4: the teacher's own grid
    probs, ious, gi = mask2former.teacher_queries(t_out, targets, tiny_cfg(m2f_instance_map="iou_mix", mix_iou=0.5))
    assert gi.tolist() == [0, 0] and torch.allclose(ious, torch.tensor([1.0, 0.6]))
    assert torch.equal(probs[1], t_out["pred_masks"][0, 1].sigmoid())


def test_pseudo_masks_instance_map_by_eq6():
    """M_I through sim.pseudo_masks_from: matched: query 0's mask (weight 1); iou_mix: Eq. 6's exp(5 IoU)
    weights e^5 / (e^5 + e^3) and e^3 / (e^5 + e^3) on queries 0 and 1: in cell (5, 4), inside query 0 and
    outside query 1, M_I = w0 sigmoid(10) + w1 sigmoid(-10). The rest of the maps (M_S on the teacher's
    per-pixel embeddings, M_hat, W) come with their shapes."""
    t_out, targets = instance_map_scene()
    images = torch.full((1, 3, 64, 64), 100, dtype=torch.uint8)
    for mode, w0 in (("matched", 1.0), ("iou_mix", math.exp(5) / (math.exp(5) + math.exp(3)))):
        cfg = tiny_cfg(method="sim", m2f_instance_map=mode, mix_iou=0.5, num_classes=2, mu=5.0)
        state = sim.SIMState(cfg, torch.device("cpu"))
        assert state.protos.protos.shape == (2, cfg["num_subcenters"], 32)                # D = mask_dim
        obj = sim.objects(targets, (64, 64), 4, True, images)
        pm = mask2former.pseudo_masks(t_out, targets, state.protos, obj, cfg)
        s10 = torch.sigmoid(torch.tensor(10.0)).item()
        assert abs(pm["M_I"][0, 5, 4].item() - (w0 * s10 + (1 - w0) * (1 - s10))) < 1e-6
        for k in ("M_S", "M_I", "M_prob", "M_hat", "W"):
            assert pm[k].shape == (1, 16, 16)
        assert pm["has_pos"].tolist() == [True]


def test_sim_steps_on_mask2former_update_prototypes_bank_and_teacher(tmp_path):
    """SIM-dagger through step.train_step (teacher from step 0, L_pseudo from step 2, copy-paste once the
    1-image bank is full): L_pseudo and L_paste appear, the prototypes move, the bank fills, the teacher
    follows the student by EMA, every parameter gets a gradient (DDP's find_unused_parameters=False);
    viz.py draws its pseudo-mask grids (SIM-dagger's, and BoxInst-dagger's without a teacher)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(method="sim", num_classes=3, teacher_start_iter=0, sim_start_iter=1, bank_size=1, paste_prob=1.0,
                   teacher_momentum=0.5, lr=1e-3, solver="adamw", weight_decay=0.0, warmup_iters=0)
    from test_model import scene
    model = Mask2Former(cfg)
    opt = step.build_optimizer(model, cfg)
    state = sim.SIMState(cfg, torch.device("cpu"))
    protos0 = state.protos.protos.clone()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, targets = scene(2)
    keys = []
    for it in range(3):
        loss, logs = step.train_step(model, model, opt, scaler, state, images, targets, it, cfg, torch.device("cpu"),
                                     lambda: torch.autocast("cpu", enabled=False))
        keys.append(set(logs))
        if it == 0:
            assert all(p.grad is None for p in model.parameters())                       # stepped and zeroed
    assert "loss_pseudo" not in keys[0] and {"loss_pseudo", "loss_paste", "loss_cls"} <= keys[2]
    assert not torch.equal(state.protos.protos, protos0)
    assert len(state.bank) == 1
    s, t = dict(model.named_parameters()), dict(state.teacher.named_parameters())
    assert all(not torch.equal(s[k], t[k]) for k in ("decoder.query_feat.weight", "pixel_decoder.level_embed"))
    out = model(images)
    loss, *_ = mask2former.training_losses(out, sim.teacher_outputs(state, images), state, images, targets, 5, cfg)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    for name, st in (("sim", state), ("boxinst", None)):
        paths = viz.object_grids(model, st, cfg, images, targets, str(tmp_path / name), n=2)
        assert len(paths) == 2 and all(os.path.getsize(p) > 0 for p in paths)
        with Image.open(paths[0]) as im:  # SIM's grid has more panels: M_S, sub-centres, M_C, M_prob, M_hat, paste
            size = im.size
        if name == "sim":
            sim_area = size[0] * size[1]
        else:
            assert size[0] * size[1] < sim_area


# -----------------------------------------------------------------------------
# optimisation (step.py) and checkpoints


def test_poly_schedule_lr_mult_and_param_groups():
    """poly: lr (1 - it / max_iters)^0.9 after the warm-up (at it = 300 of 600: lr 0.5^0.9); the backbone's
    groups carry backbone_lr_mult; Mask2Former's LayerNorms, query embeddings and level embeddings have no
    weight decay; CondInst's groups stay decay / norms."""
    cfg = tiny_cfg(lr=1e-3, lr_schedule="poly", poly_power=0.9, max_iters=600, warmup_iters=10, backbone_lr_mult=0.1)
    assert abs(step.get_lr(300, cfg) - 1e-3 * 0.5 ** 0.9) < 1e-12
    assert abs(step.get_lr(5, cfg) - 1e-3 * (0.001 * 0.5 + 0.5) * (1 - 5 / 600) ** 0.9) < 1e-12
    model = Mask2Former(cfg)
    opt = step.build_optimizer(model, cfg)
    step.set_lr(opt, 300, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        backbone = {names[id(p)].startswith("backbone.") for p in g["params"]}
        assert backbone == {g["lr_mult"] == 0.1} and abs(g["lr"] - g["lr_mult"] * 1e-3 * 0.5 ** 0.9) < 1e-12
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"decoder.query_feat.weight", "decoder.query_embed.weight", "decoder.decoder_norm.weight",
            "pixel_decoder.level_embed", "decoder.level_embed.weight"} <= no_decay
    assert "decoder.class_embed.weight" not in no_decay
    from test_model import tiny_cfg as condinst_cfg
    ci = CondInst(condinst_cfg())
    groups = step.param_groups(ci, 0.05)
    assert len(groups) == 2 and groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups) == len(list(ci.parameters()))
    norms = {id(p) for m in ci.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == norms


def test_clip_grad_clips_the_whole_model_norm():
    """clip_grad 1e-3 with SGD at lr 1: the step moves the parameters by a vector of norm 1e-3 exactly."""
    torch.manual_seed(0)
    cfg = tiny_cfg(method="boxinst", clip_grad=1e-3)
    model = Mask2Former(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    images, targets = square_scene()
    step.train_step(model, model, opt, torch.amp.GradScaler("cpu", enabled=False), None, images, targets, 5, cfg,
                    torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert abs(moved.item() - 1e-3) < 1e-7


def test_model_from_checkpoint_builds_the_checkpoints_architecture():
    """A checkpoint's config with arch="mask2former" gives a Mask2Former with its weights; a config written
    before the key existed gives CondInst."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Mask2Former(cfg)
    rebuilt = model_from_checkpoint(dict(config=cfg, model=model.state_dict()))
    assert isinstance(rebuilt, Mask2Former)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    from test_model import tiny_cfg as condinst_cfg
    old = {k: v for k, v in condinst_cfg().items() if k != "arch"}
    assert isinstance(model_from_checkpoint(dict(config=old, model=CondInst(condinst_cfg()).state_dict())), CondInst)


def test_box_query_maps_best_and_eq6_mean_by_hand():
    """predict.py --boxes on Mask2Former: one box [4, 4, 20, 20] on a 32 px image (stride-4 cells 1-4), three
    queries: q0's mask fills the box's cells (IoU 1) and its class is the box's, q1's covers 3 of its 4
    columns (tight box 4-16 x 4-20: IoU 192/256 = 0.75), q2's lies in a far corner (IoU 0). best: q0's mask,
    scored by q0's softmax p(label); mean: Eq. 6 over q0 and q1 (IoU >= 0.5), weights exp(5) : exp(3.75)."""
    masks = torch.full((1, 3, 8, 8), -10.0)
    masks[0, 0, 1:5, 1:5] = 10.0
    masks[0, 1, 1:5, 1:4] = 10.0
    masks[0, 2, 6:8, 6:8] = 10.0
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])    # (1, Q, K + 1), K = 2
    out = dict(pred_logits=logits, pred_masks=masks)
    targets = [dict(boxes=torch.tensor([[4.0, 4, 20, 20]]), labels=torch.tensor([0]))]
    maps, scores, img = mask2former.box_query_maps(out, targets, "best")
    assert torch.equal(maps[0], masks[0, 0].sigmoid()) and img.tolist() == [0]
    assert scores[0].item() == pytest.approx(math.exp(4) / (math.exp(4) + 2))
    maps, scores, _ = mask2former.box_query_maps(out, targets, "mean", mu=5.0)
    w0, w1 = math.exp(5.0), math.exp(5.0 * 0.75)
    want = (w0 * masks[0, 0].sigmoid() + w1 * masks[0, 1].sigmoid()) / (w0 + w1)
    assert torch.allclose(maps[0], want, atol=1e-6)
    assert scores[0].item() == pytest.approx(math.exp(4) / (math.exp(4) + 2))


def test_predict_boxes_runs_on_a_mask2former_checkpoint(tmp_path):
    """predict.py's box-conditioned path on a Mask2Former checkpoint (load_model folds its BatchNorms), every
    refinement switch on: one mask per given box, at the original size, nothing outside its box."""
    import predict
    torch.manual_seed(0)
    cfg = tiny_cfg()
    torch.save(dict(config=cfg, model=Mask2Former(cfg).state_dict(), categories=[dict(id=1, name="a"), dict(id=2, name="b")]),
               tmp_path / "ckpt.pt")
    model, mcfg, cats = predict.load_model(str(tmp_path / "ckpt.pt"), torch.device("cpu"))
    assert isinstance(model, Mask2Former) and mcfg["arch"] == "mask2former"
    images, targets = square_scene()
    on = dict(box_flip=True, box_colour=True, box_crf=True, box_mask_score=True)
    for combine in ("best", "mean"):
        res = predict.box_conditioned_masks(model, images, targets, combine, 5.0, on)
        for r, t in zip(res, targets):
            assert r["masks"].shape == (1, 64, 64) and r["probs"].shape == (1, 64, 64)
            x0, y0, x1, y1 = t["boxes"][0].int().tolist()
            outside = torch.ones(64, 64, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert not r["masks"][0][outside].any() and 0 <= r["scores"][0] <= 1
