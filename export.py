"""
The whole inference graph of a trained checkpoint as one ONNX file: backbone, FPN, the FCOS head, the
candidate selection and class-aware NMS, CondInst's controller at the kept detections and the dynamic
mask head (per-instance 1x1 convs whose weights are the controller's outputs, on the mask branch's
features with relative coordinates), up to mask probabilities in the input frame.

    python export.py --ckpt=out/demo/ckpt.pt --out=model.onnx [--check] [--full_res=False]

--check runs onnxruntime and PyTorch on the checkpoint's val set (the embedded one for the demo) and
prints the largest |difference| of their mask probabilities and the COCO box/mask AP of both (eval.py).
onnx and onnxruntime are optional: `pip install onnx onnxruntime` (training never imports them).

The graph (ExportModule) and its contract:
  input   images   uint8 (B, 3, Hp, Wp): RGB 0-255, each image resized as the val loader does
                   (data.resize_shape, PIL bilinear) and zero-padded bottom/right to multiples of 32
                   (data.collate); B, Hp and Wp are dynamic.
  outputs boxes    float32 (B, K, 4) xyxy in the resized frame, K = the checkpoint's max_dets
          scores   float32 (B, K) sqrt(class prob x centerness), descending; 0 in an empty slot
          labels   int64   (B, K) contiguous class index (0 in an empty slot)
          masks    float32 (B, K, Hp, Wp) mask probabilities in the padded input frame (full_res=True),
                   or (B, K, Hp/s, Wp/s) at the mask-out stride s (full_res=False: s^2 times smaller;
                   the host then upsamples with model.aligned_bilinear(., s))
          num_dets int64   (B,) how many slots hold a detection (they come first)
to_predictions() turns them into model.predict's per-image dicts at the original size (crop to the
image, bilinear resize, mask_thresh; boxes scaled and clipped), so eval.py's COCO code scores them.

The same function as model.CondInst.predict, with fixed shapes:
  - the per-level top pre_nms_topk over scores > score_thresh is a top-k over scores with the
    others set to -1 (a level with fewer than pre_nms_topk entries is padded with -1 first), so k is
    a constant; a slot below the threshold stays in the tensor with score -1 and NMS drops it;
  - batched_nms (per class, greedy, IoU > nms_thresh suppresses) is ONNX's NonMaxSuppression on
    scores (B, C, N) that hold each candidate's score in its own class row and -1 elsewhere;
  - the max_dets best survivors of each image are a top-k over a dense (B, N) score map;
  - the dynamic mask head runs on all B x K slots at once (batched_dynamic_mask_head: one batched
    matmul per layer), empty slots included (they read location 0 and are ignored).
Exporter: torch.onnx.export with dynamo=False (the TorchScript tracer; deprecated in torch 2.9+ but
present and tested with torch 2.14). Why: it needs no package beyond onnx (the dynamo exporter needs
onnxscript, and the NMS would have to become a torch.library op with its own translation), a custom
autograd Function's `symbolic` emits NonMaxSuppression with its batch and class axes (torchvision's
nms symbolic has one image and one class), and the traced sizes keep batch and image size dynamic.
"""

import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms

import configurator
from box_ops import decode_boxes
from model import (CondInst, aligned_bilinear, dynamic_head_shapes, fold_batchnorm, load_checkpoint,
                   model_from_checkpoint, relative_coords)

OPSET = 17
PIP_HINT = "pip install onnx onnxruntime"

# -----------------------------------------------------------------------------
# the graph


class BatchedNMS(torch.autograd.Function):
    """ONNX NonMaxSuppression: boxes (B, N, 4), scores (B, C, N) -> selected (M, 3) int64 rows
    (image, class, box). Per image and class, greedy: a box whose IoU with a kept higher-scored box is
    > iou_thresh goes; only scores > score_thresh take part. The PyTorch forward is torchvision's
    batched_nms (the op model.predict uses) per image; the symbolic is the ONNX op."""

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class, iou_thresh, score_thresh):
        rows = []
        for b in range(boxes.shape[0]):
            c, n = (scores[b] > score_thresh).nonzero(as_tuple=True)                     # (m,), (m,)
            keep = batched_nms(boxes[b, n], scores[b, c, n], c, iou_thresh)               # by score, descending
            rows.append(torch.stack([torch.full_like(keep, b), c[keep], n[keep]], 1))     # (m', 3)
        return torch.cat(rows)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_thresh, score_thresh):
        const = lambda v, dt: g.op("Constant", value_t=torch.tensor([v], dtype=dt))
        return g.op("NonMaxSuppression", boxes, scores, const(max_per_class, torch.int64),
                    const(iou_thresh, torch.float32), const(score_thresh, torch.float32))


def batched_dynamic_mask_head(mask_feats, params, locations, levels, sizes_of_interest, channels=8,
                              num_layers=3, stride=8):
    """model.dynamic_mask_head with K instances in every image: mask_feats (B, D, H, W), params (B, K, P),
    locations (B, K, 2), levels (B, K) -> mask logits (B, K, 2H, 2W). The same sums in the same order
    (layer 1's coordinate terms, bias, then its feature term; the other layers a batched matmul), with
    no data-dependent split by image, so it traces to a graph of fixed rank for any B and K."""
    B, D, H, W = mask_feats.shape
    K = params.shape[1]
    shapes = dynamic_head_shapes(mask_feats.shape[1], channels, num_layers)
    chunks = torch.split(params.flatten(0, 1), [i * o for i, o in shapes] + [o for _, o in shapes], dim=1)
    weights, biases = chunks[:num_layers], chunks[num_layers:]
    rel_x, rel_y = relative_coords(locations.flatten(0, 1), levels.flatten(), sizes_of_interest, H, W, stride)
    o = shapes[0][1]
    w1 = weights[0].reshape(B * K, o, D + 2)
    x = (w1[:, :, 0, None, None] * rel_x[:, None, None, :] + w1[:, :, 1, None, None] * rel_y[:, None, :, None]
         + biases[0][:, :, None, None])                                                # (BK, o, H, W)
    feat = torch.bmm(w1[:, :, 2:].reshape(B, K * o, D), mask_feats.reshape(B, D, H * W))  # (B, K o, HW)
    x = x.reshape(B * K, o, H * W) + feat.reshape(B * K, o, H * W)
    for l in range(num_layers):
        if l > 0:
            i, o = shapes[l]
            x = torch.baddbmm(biases[l][:, :, None], weights[l].reshape(B * K, o, i), x)  # (BK, o, HW)
        if l < num_layers - 1:
            x = F.relu(x)
    return aligned_bilinear(x.reshape(B * K, 1, H, W), 2).reshape(B, K, 2 * H, 2 * W)


class ExportModule(nn.Module):
    """The exported function: uint8 image batch -> fixed-shape detections and mask probabilities (the
    contract in this file's docstring). `model` is a CondInst in eval mode; its BatchNorms are folded
    into the convs (model.fold_batchnorm, as eval.py and predict.py predict)."""

    def __init__(self, model, full_res=True):
        super().__init__()
        if not isinstance(model, CondInst):
            raise SystemExit(f"export.py: exports CondInst networks (BoxInst, SIM), not {type(model).__name__} "
                             "— fix: a checkpoint trained with --arch=condinst")
        self.net = fold_batchnorm(model.eval())[0]
        self.full_res = full_res
        c = self.net.cfg
        self.num_classes, self.max_dets = self.net.num_classes, c["max_dets"]
        self.score_thresh, self.pre_nms_topk, self.nms_thresh = c["score_thresh"], c["pre_nms_topk"], c["nms_thresh"]

    def forward(self, images):
        net, C, K = self.net, self.num_classes, self.max_dets
        out = net.features(images)
        B = images.shape[0]
        p = out["cls_logits"].sigmoid() * out["ctr_logits"].sigmoid()[:, :, None]          # (B, L, C)
        # per level: the pre_nms_topk best (location, class) pairs above score_thresh
        cand_s, cand_loc, cand_cls, start = [], [], [], 0
        for f in out["box_feats"]:
            n = f.shape[-2] * f.shape[-1]
            pl = p[:, start:start + n].flatten(1)                                          # (B, n C)
            pl = F.pad(torch.where(pl > self.score_thresh, pl, -1.0), (0, self.pre_nms_topk), value=-1.0)
            s, idx = pl.topk(self.pre_nms_topk, dim=1)                                     # (B, k)
            loc = idx // C
            cand_loc.append(start + torch.where(s > 0, loc, torch.zeros_like(loc)))        # a padded slot reads 0
            cand_cls.append(idx % C)
            cand_s.append(s)
            start = start + n
        s, loc, cls = torch.cat(cand_s, 1), torch.cat(cand_loc, 1), torch.cat(cand_cls, 1)  # (B, N)
        valid = s > 0
        score = torch.where(valid, s.clamp(min=0).sqrt(), -1.0)                             # (B, N)
        stride = torch.tensor(net.strides, dtype=torch.float32)[out["loc_level"][loc]]      # (B, N)
        ltrb = out["reg"].gather(1, loc[:, :, None].expand(-1, -1, 4)) * stride[:, :, None]  # (B, N, 4)
        boxes = decode_boxes(out["locations"][loc].flatten(0, 1), ltrb.flatten(0, 1)).reshape(B, -1, 4)
        N = len(out["box_feats"]) * self.pre_nms_topk                                     # a constant
        # class-aware NMS, then the max_dets best survivors per image
        in_class = cls[:, None, :] == torch.arange(C)[None, :, None]                      # (B, C, N)
        sel = BatchedNMS.apply(boxes, torch.where(in_class, score[:, None, :], -1.0),
                               N, float(self.nms_thresh), 0.0)                              # (M, 3)
        flat = sel[:, 0] * N + sel[:, 2]
        kept = torch.full_like(score.flatten(), -1.0).scatter(0, flat, score.flatten()[flat]).reshape(B, N)
        top_s, top = F.pad(kept, (0, K), value=-1.0).topk(K, dim=1)                        # (B, K)
        ok = top_s > 0
        top = torch.where(ok, top, torch.zeros_like(top))                                  # empty slots read 0
        boxes = boxes.gather(1, top[:, :, None].expand(-1, -1, 4)) * ok[:, :, None]        # (B, K, 4)
        labels = cls.gather(1, top) * ok
        loc = loc.gather(1, top)                                                           # (B, K)
        # the dynamic mask head at the kept locations
        im_inds = (torch.zeros_like(loc) + torch.arange(B)[:, None]).flatten()             # (B K,)
        params = net.head.controller_at(out["box_feats"], im_inds, loc.flatten()).reshape(B, K, -1)
        logits = batched_dynamic_mask_head(out["mask_feats"], params, out["locations"][loc], out["loc_level"][loc],
                                           net.soi_levels, net.cfg["mask_head_channels"], net.cfg["mask_head_layers"],
                                           2 * net.mask_out_stride)                         # (B, K, Hp/s, Wp/s)
        masks = logits.sigmoid()
        if self.full_res:
            masks = aligned_bilinear(masks, net.mask_out_stride)                          # (B, K, Hp, Wp)
        return boxes, torch.where(ok, top_s, 0.0), labels, masks, ok.sum(1)


OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "num_dets")


def to_predictions(outputs, targets, mask_thresh=0.5, upsample=1):
    """ExportModule's outputs (tensors or numpy arrays, in OUTPUT_NAMES order) and the batch's targets
    ('size' (h, w), 'orig_size' (H0, W0)) -> model.predict's per-image dicts: boxes (n, 4) in the
    original frame, scores, labels, masks (n, H0, W0) bool, by CondInst.postprocess's steps (masks
    cropped to the image, bilinear to the original size, > mask_thresh; boxes scaled, clipped, empty
    ones dropped). upsample: the mask-out stride for masks exported with full_res=False, else 1.
    mask_thresh=None: the masks stay probabilities (float (n, H0, W0))."""
    boxes, scores, labels, masks, num = (torch.as_tensor(o) for o in outputs)
    preds = []
    for b, t in enumerate(targets):
        (h, w), (H0, W0) = t["size"], t["orig_size"]
        n = int(num[b])
        m = aligned_bilinear(masks[b, :n, None].float(), upsample)[:, :, :h, :w]              # (n, 1, h, w)
        m = F.interpolate(m, size=(H0, W0), mode="bilinear", align_corners=False)[:, 0]    # (n, H0, W0)
        if mask_thresh is not None:
            m = m > mask_thresh
        bx = boxes[b, :n].float() * torch.tensor([W0 / w, H0 / h, W0 / w, H0 / h])
        bx[:, 0::2] = bx[:, 0::2].clamp(0, W0)
        bx[:, 1::2] = bx[:, 1::2].clamp(0, H0)
        ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
        preds.append(dict(boxes=bx[ok], scores=scores[b, :n][ok], labels=labels[b, :n][ok], masks=m[ok]))
    return preds

# -----------------------------------------------------------------------------
# export and check


def require_onnx():
    """onnx and onnxruntime, imported only here: optional extras that training never needs."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SystemExit(f"export.py: {e.name} is not installed — fix: {PIP_HINT}")
    return onnx, onnxruntime


def export_onnx(model, path, full_res=True, example=None):
    """ExportModule(model) -> the ONNX file at `path` (batch, height and width dynamic), checked with
    onnx.checker. example: a uint8 (B, 3, Hp, Wp) batch to trace with (default: one grey 256 x 256
    image, large enough that P7 has 2 x 2 cells for the head's GroupNorms; the graph does not depend
    on it). Returns the ExportModule."""
    onnx, _ = require_onnx()
    module = ExportModule(model, full_res).eval()
    if example is None:
        example = torch.full((1, 3, 256, 256), 114, dtype=torch.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # known and harmless here: the tracer bakes aligned_bilinear's factor (the FPN levels' size ratio,
        # fixed for H and W multiples of 32) and the strides and sizes of interest (constants) into the
        # graph; the TorchScript exporter's deprecation notes (chosen on purpose, see the top) and
        # constant folding's
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(torch.jit.script. is deprecated|Constant folding).*")
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "boxes": {0: "batch"}, "scores": {0: "batch"}, "labels": {0: "batch"},
                                        "masks": {0: "batch", 2: "mask_height", 3: "mask_width"},
                                        "num_dets": {0: "batch"}})
    onnx.checker.check_model(onnx.load(path))
    return module


def ort_session(path):
    """An onnxruntime CPU session on the exported file (one thread per OMP_NUM_THREADS, default all)."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    n = int(os.environ.get("OMP_NUM_THREADS", "0"))
    opts.intra_op_num_threads = n
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def matched_slots(boxes_a, labels_a, boxes_b, labels_b, tol=1e-2):
    """Pairs (i, j) of detection slots of one image that are the same detection in two runs: same label
    and box within tol pixels. Why not slot by slot: detections with equal scores (to float rounding)
    may come out in either order. -> (ia, jb) index tensors."""
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    d = (boxes_a[:, None] - boxes_b[None]).abs().amax(-1) + 1e9 * (labels_a[:, None] != labels_b[None])
    dist, j = d.min(1)
    i = (dist <= tol).nonzero().squeeze(1)
    return i, j[i]


def check(module, session, dataset, batch_size=8, full_res=True):
    """PyTorch and onnxruntime on every image of `dataset` (data.CocoBoxDataset, val resizing), batched
    and padded as eval.py batches. -> dict: max_abs_diff (mask probabilities of the same detections,
    every pixel of the output), unmatched (detections found by one run only), n_dets, and the COCO
    stats (eval.coco_evaluate) of model.predict (eval.py's path), of ExportModule in PyTorch and of
    onnxruntime, with each one's wall time."""
    import contextlib
    import io

    import data
    import eval as evaluation
    loader = data.make_loader(dataset, batch_size, train=False, num_workers=0)
    upsample = 1 if full_res else module.net.mask_out_stride
    thresh = module.net.cfg["mask_thresh"]
    results = {"predict": [], "torch": [], "onnxruntime": []}
    secs = dict.fromkeys(results, 0.0)
    max_diff, unmatched, n_dets, image_ids = 0.0, 0, 0, []
    with torch.no_grad():
        for images, targets in loader:
            t0 = time.perf_counter()
            ref = module.net.predict(images, targets)
            t1 = time.perf_counter()
            out_t = module(images)
            t2 = time.perf_counter()
            out_o = [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]
            t3 = time.perf_counter()
            for k, dt in zip(secs, (t1 - t0, t2 - t1, t3 - t2)):
                secs[k] += dt
            for b in range(len(targets)):
                nt, no = int(out_t[4][b]), int(out_o[4][b])
                i, j = matched_slots(out_t[0][b, :nt], out_t[2][b, :nt], out_o[0][b, :no], out_o[2][b, :no])
                if len(i):
                    max_diff = max(max_diff, (out_t[3][b, i] - out_o[3][b, j]).abs().max().item())
                unmatched += nt + no - 2 * len(i)
                n_dets += nt
            ids = [int(t["image_id"]) for t in targets]
            image_ids += ids
            for name, preds in (("predict", ref), ("torch", to_predictions(out_t, targets, thresh, upsample)),
                                ("onnxruntime", to_predictions(out_o, targets, thresh, upsample))):
                results[name] += evaluation.to_coco_results(preds, ids, dataset.cat_ids)
    stats = {}
    for name, res in results.items():
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval's 12-line summaries
            stats[name] = {t: evaluation.coco_evaluate(dataset.coco, res, t, image_ids) for t in ("bbox", "segm")}
    return dict(max_abs_diff=max_diff, unmatched=unmatched, n_dets=n_dets, n_images=len(image_ids),
                stats=stats, seconds=secs)


def main(argv):
    """The CLI: export, and with --check compare onnxruntime with PyTorch on the checkpoint's val set."""
    cfg = dict(ckpt="",              # checkpoint written by train.py (required)
               out="model.onnx",     # the ONNX file to write
               full_res=True,        # masks in the input frame (False: at the mask-out stride)
               check=False,          # compare onnxruntime with PyTorch on the val set
               val_json="",          # --check's data (default: the checkpoint's val split)
               val_images="",
               batch_size=8)         # --check's batches (eval.py's default)
    configurator.configure(argv, cfg, "export.py")
    require_onnx()
    if not cfg["ckpt"] or not os.path.isfile(cfg["ckpt"]):
        raise SystemExit(f"export.py: checkpoint {cfg['ckpt']!r} not found — "
                         "fix: --ckpt=PATH of a checkpoint written by train.py")
    ck = load_checkpoint(cfg["ckpt"])
    model = model_from_checkpoint(ck).eval()
    t0 = time.time()
    module = export_onnx(model, cfg["out"], cfg["full_res"])
    mb = os.path.getsize(cfg["out"]) / 2**20
    print(f"export.py: {cfg['ckpt']} (iter {ck.get('iter', '?')}) -> {cfg['out']} ({mb:.1f} MB, opset {OPSET}, "
          f"{time.time() - t0:.1f}s): images uint8 "
          f"(B, 3, H, W), H and W multiples of 32 -> {', '.join(OUTPUT_NAMES)} (K = {module.max_dets})")
    if not cfg["check"]:
        return 0
    import data
    mc = ck["config"]
    val_json, val_images = cfg["val_json"] or mc["val_json"], cfg["val_images"] or mc["val_images"]
    if not os.path.isfile(val_json) or not os.path.isdir(val_images):
        raise SystemExit(f"export.py: --check needs the val set ({val_json}, {val_images}) — "
                         "fix: --val_json=J --val_images=DIR")
    ds = data.CocoBoxDataset(val_json, val_images, train=False, min_sizes=(mc["min_size_test"],),
                             max_size=mc["max_size_test"], with_masks=False)
    r = check(module, ort_session(cfg["out"]), ds, cfg["batch_size"], cfg["full_res"])
    s, t = r["stats"], r["seconds"]
    print(f"export.py: {r['n_images']} val images, {r['n_dets']} detections: max |diff| of mask probabilities "
          f"(onnxruntime vs PyTorch, same detections) {r['max_abs_diff']:.2e}; "
          f"detections found by one only: {r['unmatched']}")
    for name, label in (("predict", "PyTorch (model.predict, eval.py)"), ("torch", "PyTorch (ExportModule)"),
                        ("onnxruntime", "onnxruntime")):
        print(f"  {label:34s} box AP {s[name]['bbox']['AP']:.2f} | mask AP {s[name]['segm']['AP']:.2f} "
              f"| {t[name]:.1f}s")
    same = abs(s["onnxruntime"]["segm"]["AP"] - s["predict"]["segm"]["AP"]) < 1e-9
    ok = r["max_abs_diff"] <= 1e-4 and same
    print(f"export.py: check {'passed' if ok else 'FAILED'} (max |diff| <= 1e-4 and equal mask AP)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
