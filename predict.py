"""
Run a trained nanoSIM/BoxInst checkpoint on your own images, or turn your box annotations into masks.

    python predict.py --ckpt=out/demo/ckpt.pt --images=photos/ --out=out/pred
    python predict.py --ckpt=out/demo/ckpt.pt --images=a.png,b.jpg --out=out/pred
    python predict.py --ckpt=out/demo/ckpt.pt --boxes=boxes.json --images=photos/ --out=out/masks

Detection (no --boxes): every image gets boxes, classes, scores and masks, written as
  results.json      COCO results (a list, for COCO.loadRes), image ids as in predictions.json
  predictions.json  a COCO dataset (images, categories, annotations with score and RLE segmentation)
  pred_<name>.png   input | prediction, drawn at score >= score_thresh after a class-agnostic NMS
                    (the pictures only: the json files keep every detection, as COCO AP needs)

Box-conditioned masks (--boxes=ANNOTATIONS.json, COCO format, class and box per annotation): for
every annotated box, the mask the model predicts for that object, written back into a copy of the
same json (masks.json: each annotation gets a 'segmentation' RLE and its 'area'), plus overlays.
The mask comes from the detector's positives for that box as training picks them (FCOS's
assignment, then BoxInst's top-k by score: model.CondInst.select_instances): combine="mean" (the
default) averages their dynamic-head masks weighted by exp(mu * IoU(predicted box, given box)),
the M_I of SIM's Eq. 6; combine="best" takes the one positive with the highest score. A box the
assignment gives no positive (too small, or every location taken by a smaller box) takes the
location inside it with the highest score (the nearest one to its centre if none lies inside).
The mask is cut to its box: the box is the annotation, so nothing outside it is the object.
The network's mask probabilities are then refined (refine.py; each step a switch, box_*):
box_flip averages them with those of the mirrored image, box_colour mixes in a colour model of the
object against the ring around its box, box_crf runs mean-field steps of a colour-affinity CRF on
the box, box_mask_score multiplies the score by the mask's maskness; box_thresh cuts them.
If the json also holds masks (e.g. a val split), the box-conditioned mask AP against them and the
mIoU (each box's mask against its own GT mask, averaged over the boxes) are printed and written to
metrics.json with the switches.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util
from torchvision.ops import nms

import config
import configurator
import data
import eval as evaluation  # the module, not the builtin
import mask2former
import prototypes
import refine
import sim
import viz
from model import aligned_bilinear, fold_batchnorm, load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
# settings (--key=value)
ckpt = ""               # checkpoint written by train.py
images = ""             # a folder, or comma-separated image files
boxes = ""              # COCO json with boxes and classes: box-conditioned masks instead of detection
out = "out/predict"     # output folder
device = config.device
batch_size = 4
score_thresh = 0.3      # pictures only: detections drawn at this score or above
nms_thresh = 0.5        # pictures only: class-agnostic NMS over the drawn detections
combine = "mean"        # box-conditioned: "mean" (Eq. 6's exp(mu * IoU) weights) or "best" (top positive)
mu = 5.0                # box-conditioned, combine="mean": Eq. 6's mu
# box-conditioned refinement (refine.py), each switch measured alone and together in BENCHMARKS.md
box_flip = True         # average with the masks of the mirrored image and boxes (refine.average_flipped):
                        # the network trains on random flips, so the two are predictions of one mask
box_colour = True       # mix a colour model of the object against the ring around its box into the
                        # probabilities (refine.colour_prior): the box's rim colours, GrabCut's evidence
box_crf = True          # mean-field CRF steps on the box (refine.crf_mean_field): colour-affine
                        # neighbours agree, edges move to colour edges, outside the box is background
box_mask_score = True   # score x maskness (refine.maskness): AP ranks confident masks first, not
                        # confident boxes
box_teacher = False     # the SIM checkpoint's EMA teacher instead of the student: off, as it gains nothing on
                        # a finished demo run (94.1 against 94.0 mIoU, the same AP; BENCHMARKS.md)
box_thresh = 0.5        # the probability a pixel must exceed to be in the mask
crf_weight = 1.0        # refine.crf_mean_field's pairwise weight
crf_iters = 5           # its mean-field steps
crf_kernel = 5          # its neighbourhood: kernel x kernel (dilated by crf_dilation), centre left out
crf_dilation = 1
crf_theta = 2.0         # colour affinity exp(-||dLab|| / theta) (BoxInst's: 2)
colour_weight = 0.7     # refine.colour_prior's weight of the colour model (> 0.5: a sure colour verdict
                        # overrides the network, an unsure one, M_C near 0.5, leaves it the decision)
colour_seeds = "box"    # its object colours: "box" (every in-box colour the ring lacks: GrabCut's start,
                        # there even where the network is unsure) or "network" (its confident pixels)
n_overlays = 16         # pictures written (0: none)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# -----------------------------------------------------------------------------
# the model and the images


def load_model(path, dev, teacher=False):
    """A train.py checkpoint -> (model in eval mode, BatchNorms folded, its config, categories [{'id', 'name'}]).
    teacher: a SIM checkpoint's EMA teacher's weights instead of the student's (a line says so when the
    checkpoint has none: BoxInst, or saved before teacher_start_iter)."""
    if not os.path.isfile(path):
        raise SystemExit(f"predict.py: {path} not found — fix: --ckpt=PATH of a checkpoint written by train.py")
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise SystemExit(f"predict.py: {path} lacks 'model' or 'config' — fix: pass a checkpoint written by train.py")
    sd = (ck.get("sim") or {}).get("teacher") if teacher else None
    if teacher and sd is None:
        print(f"predict.py: {path} holds no EMA teacher — the student's weights are used")
    model = model_from_checkpoint(ck, sd)
    # only forwards from here: the twin with the BatchNorms folded into the convs (the same function, faster)
    return fold_batchnorm(model.to(dev).eval())[0], ck["config"], ck["categories"]


def list_images(spec):
    """--images: a folder (its image files, sorted) or comma-separated files -> list of paths."""
    if not spec:
        raise SystemExit("predict.py: no images — fix: --images=DIR or --images=a.png,b.jpg")
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
        if not paths:
            raise SystemExit(f"predict.py: {spec} holds no image files ({', '.join(IMAGE_EXTS)}) — fix: another --images")
        return paths
    paths = [p for p in spec.split(",") if p]
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"predict.py: {p} not found — fix: --images=DIR or existing files, comma-separated")
    return paths


def read_rgb(path):
    """-> uint8 (3, H0, W0) RGB (grey and RGBA files converted), or None (with a line saying why)
    for a file PIL cannot read."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except Exception as e:
        print(f"predict.py: {path}: cannot read image ({type(e).__name__}: {e}) — skipped")
        return None


def resize_for_model(image, short, max_size):
    """uint8 (3, H0, W0) -> (3, h, w) as the val loader resizes (data.resize_shape, PIL bilinear)."""
    h, w = data.resize_shape(image.shape[1], image.shape[2], short, max_size)
    img = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def to_rle(mask):
    """(H, W) bool -> COCO compressed RLE with str counts (JSON-able)."""
    r = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("utf-8")}


def picture_subset(pred, score_thresh, nms_thresh):
    """The detections an overlay shows: score >= score_thresh, then class-agnostic NMS (one
    drawing per object, not one per class that fired on it)."""
    keep = (pred["scores"] >= score_thresh).nonzero().squeeze(1)
    keep = keep[nms(pred["boxes"][keep].float(), pred["scores"][keep].float(), nms_thresh)]
    return {k: v[keep] for k, v in pred.items()}

# -----------------------------------------------------------------------------
# box-conditioned masks


def fallback_locations(out, img, boxes, labels):
    """For boxes with no FCOS positive: the location inside the box (any level) with the highest
    score for its class, or the nearest P3 location to the box centre if none is inside -> (G',) loc_inds."""
    locs = out["locations"]                                                              # (L, 2)
    inside = ((locs[None, :, 0] > boxes[:, None, 0]) & (locs[None, :, 0] < boxes[:, None, 2])
              & (locs[None, :, 1] > boxes[:, None, 1]) & (locs[None, :, 1] < boxes[:, None, 3]))  # (G', L)
    score = out["cls_logits"][img][torch.arange(len(img)), :, labels].sigmoid() * out["ctr_logits"][img].sigmoid()
    best = torch.where(inside, score, torch.full_like(score, -1.0)).argmax(1)            # (G',)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    d = (locs[None] - centre[:, None]).square().sum(-1) + (out["loc_level"] != 0)[None] * 1e12  # P3 only
    return torch.where(inside.any(1), best, d.argmin(1))


def flip_batch(batch, targets):
    """Each image of the batch mirrored left-right inside its own (h, w) (padding stays bottom/right,
    as collate puts it) and its boxes with it (data.hflip_boxes) -> (batch, targets)."""
    out, flipped = batch.clone(), []
    for b, t in enumerate(targets):
        h, w = t["size"]
        out[b, :, :h, :w] = batch[b, :, :h, :w].flip(-1)
        flipped.append(dict(t, boxes=data.hflip_boxes(t["boxes"], w)))
    return out, flipped


@torch.no_grad()
def box_instance_maps(model, batch, targets, combine="mean", mu=5.0):
    """For every box of targets (resized frame, with labels): the model's mask probabilities for that
    object at the mask-out stride -> maps (G, Hp/s, Wp/s), scores (G,), img (G,) each box's image. The
    score is sqrt(class prob x centerness) of the best positive, as detections are scored."""
    if isinstance(model, mask2former.Mask2Former):  # queries matched to the boxes, not FCOS positives
        return mask2former.box_query_maps(model(batch), targets, combine, mu, config.cost_class, config.cost_projection,
                                          config.mix_iou)
    out = model(batch, targets)                         # the training forward: FCOS positives per box
    inst = out["inst"]
    boxes = torch.cat([t["boxes"] for t in targets])                                     # (G, 4)
    labels = torch.cat([t["labels"] for t in targets])                                   # (G,)
    img = torch.cat([torch.full((len(t["boxes"]),), b, dtype=torch.long, device=boxes.device)
                     for b, t in enumerate(targets)])                                    # (G,)
    G = len(boxes)
    im_inds, loc_inds, gi = inst["im_inds"], inst["loc_inds"], inst["gt_inds"]
    probs = out["mask_logits"][:, 0].sigmoid()                                           # (K, Hp/s, Wp/s)
    missing = (torch.bincount(gi, minlength=G) == 0).nonzero().squeeze(1)                # boxes without positives
    if len(missing):
        extra = dict(im_inds=img[missing], loc_inds=fallback_locations(out, img[missing], boxes[missing], labels[missing]))
        probs = torch.cat([probs, model.mask_logits(out, extra)[:, 0].sigmoid()])
        im_inds, loc_inds = torch.cat([im_inds, extra["im_inds"]]), torch.cat([loc_inds, extra["loc_inds"]])
        gi = torch.cat([gi, missing])
    score = (out["cls_logits"][im_inds, loc_inds, labels[gi]].sigmoid() * out["ctr_logits"][im_inds, loc_inds].sigmoid()).sqrt()
    best = score.new_zeros(G).scatter_reduce(0, gi, score, reduce="amax", include_self=False)  # (G,)
    if combine == "best":
        top = torch.full((G,), -1, dtype=torch.long, device=gi.device)
        k = torch.arange(len(gi), device=gi.device)
        top = top.scatter_reduce(0, gi, torch.where(score == best[gi], k, -1), reduce="amax")
        maps = probs[top]                                                                # (G, Hp/s, Wp/s)
    elif combine == "mean":
        ious = sim.positive_box_ious(out, im_inds, loc_inds, model.strides, boxes[gi])    # (K,)
        w = prototypes.positive_weights(ious, gi, G, mu)
        maps = prototypes.instance_map(probs, w, gi, G)
    else:
        raise SystemExit(f"predict.py: --combine={combine!r} — fix: --combine=mean or --combine=best")
    return maps, best, img


# the refinement switches of box_conditioned_masks (predict.py's settings box_*, crf_*, colour_weight);
# all off: the network's own mask
RAW = dict(box_flip=False, box_colour=False, box_crf=False, box_mask_score=False, box_thresh=0.5,
           crf_weight=1.0, crf_iters=5, crf_kernel=5, crf_dilation=1, crf_theta=2.0, colour_weight=0.7,
           colour_seeds="box")


@torch.no_grad()
def box_conditioned_masks(model, batch, targets, combine="mean", mu=5.0, switches=None):
    """For every box of targets (resized frame, with labels): the model's mask for that object,
    refined as `switches` say (a dict over RAW's keys; None: RAW, the network's mask as it is).
    Returns per image dict(masks (N, H0, W0) bool, probs (N, H0, W0) the probabilities the masks
    threshold (0 outside the box), scores (N,)); the score is sqrt(class prob x centerness) of the best
    positive, as detections are scored (box_mask_score: x the mask's maskness)."""
    sw = dict(RAW, **(switches or {}))
    maps, best, img = box_instance_maps(model, batch, targets, combine, mu)
    if sw["box_flip"]:
        maps_f, best_f, _ = box_instance_maps(model, *flip_batch(batch, targets), combine, mu)
        best = 0.5 * (best + best_f)
    results = []
    for b, t in enumerate(targets):
        sel = (img == b).nonzero().squeeze(1)
        (h, w), (H0, W0) = t["size"], t["orig_size"]
        score = best[sel]
        if len(sel) == 0:
            results.append(dict(masks=torch.zeros((0, H0, W0), dtype=torch.bool), probs=torch.zeros((0, H0, W0)),
                                scores=score.cpu()))
            continue
        stride = mask2former.STRIDE if isinstance(model, mask2former.Mask2Former) else model.mask_out_stride
        up = lambda m: aligned_bilinear(m[:, None], stride)[:, 0, :h, :w]                   # (N, h, w)
        p = up(maps[sel])
        if sw["box_flip"]:
            p = refine.average_flipped(p, up(maps_f[sel]))
        if sw["box_colour"] or sw["box_crf"]:
            p = refine.refine_box_probs(batch[b, :, :h, :w], p, t["boxes"], sw["box_crf"], sw["box_colour"],
                                        sw["crf_weight"], sw["crf_iters"], sw["crf_kernel"], sw["crf_dilation"],
                                        sw["crf_theta"], sw["colour_weight"], sw["colour_seeds"])
        if sw["box_mask_score"]:
            score = score * refine.maskness(p, sw["box_thresh"]).to(score.device)
        p = F.interpolate(p[:, None], size=(H0, W0), mode="bilinear", align_corners=False)[:, 0]  # (N, H0, W0)
        # cut to the box, given in the original frame: pixel centres inside it
        box0 = t["boxes"].cpu() * torch.tensor([W0 / w, H0 / h, W0 / w, H0 / h])
        p = p.cpu() * refine.box_region(box0, H0, W0)
        results.append(dict(masks=p > sw["box_thresh"], probs=p, scores=score.cpu()))
    return results


def box_mask_ious(coco, rles):
    """IoU of each predicted mask with the GT mask of its own annotation: coco (pycocotools COCO of the
    json with masks), rles {annotation id: predicted RLE} -> {annotation id: IoU}; annotations without a
    GT mask are left out. Their mean is the box-conditioned mIoU: each box's mask against its object,
    no matching or ranking (mask AP's), so it reads the masks alone."""
    out = {}
    for a, rle in rles.items():
        ann = coco.anns[a]
        if not ann.get("segmentation"):
            continue
        out[a] = float(mask_util.iou([rle], [coco.annToRLE(ann)], [0])[0, 0])
    return out


def score_box_masks(coco, seg, image_ids):
    """Box-conditioned masks against the GT masks: coco (pycocotools COCO with masks), seg {annotation id:
    (rle, area, score)}, image_ids (those scored) -> (COCO segm stats (eval.coco_evaluate, printed), mIoU
    in percent (nan without GT masks), {annotation id: IoU})."""
    results = [dict(image_id=coco.anns[a]["image_id"], category_id=coco.anns[a]["category_id"], segmentation=v[0],
                    score=v[2]) for a, v in seg.items()]
    stats = evaluation.coco_evaluate(coco, results, "segm", image_ids)
    ious = box_mask_ious(coco, {a: v[0] for a, v in seg.items()})
    return stats, 100.0 * float(np.mean(list(ious.values()))) if ious else float("nan"), ious


def dataset_box_masks(model, ds, dev, cfg):
    """box_conditioned_masks on every image of ds (a val-mode data.CocoBoxDataset), with cfg's
    batch_size, combine, mu, n_overlays and refinement switches (RAW's keys) -> (seg {annotation id:
    (rle, area, score)}, pictures [(target, result)] the first n_overlays images, unreadable [(image id,
    why)]: images that could not be read, whose boxes get no mask)."""
    anns_of = {img_id: ds.annotations(i) for i, img_id in enumerate(ds.ids)}  # the annotations ds kept, in its order
    seg, pictures, unreadable = {}, [], []
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], shuffle=False, collate_fn=data.collate)
    for batch, targets in loader:
        tg = [dict(t, boxes=t["boxes"].to(dev), labels=t["labels"].to(dev)) for t in targets]
        res = box_conditioned_masks(model, batch.to(dev), tg, cfg["combine"], cfg["mu"], {k: cfg[k] for k in RAW})
        for t, r in zip(targets, res):
            if "unreadable" in t:  # its boxes get no mask; counted and named by the caller
                unreadable.append((t["image_id"], t["unreadable"]))
                continue
            for a, m, s in zip(anns_of[t["image_id"]], r["masks"].cpu(), r["scores"].cpu().tolist()):
                seg[a["id"]] = (to_rle(m), int(m.sum()), s)
            if len(pictures) < cfg["n_overlays"]:
                pictures.append((t, r))
    return seg, pictures, unreadable


def boxes_main(cfg, model, mcfg, cats, dev):
    """--boxes: masks for every annotated box, written into a copy of the json; AP if it had masks."""
    path = cfg["boxes"]
    if not os.path.isfile(path):
        raise SystemExit(f"predict.py: {path} not found — fix: --boxes=PATH of a COCO annotation json")
    image_dir = cfg["images"] if os.path.isdir(cfg["images"]) else ""
    if not image_dir:
        raise SystemExit("predict.py: --boxes needs --images=DIR, the folder its file_names are relative to")
    ds = data.CocoBoxDataset(path, image_dir, train=False, min_sizes=(mcfg["min_size_test"],),
                             max_size=mcfg["max_size_test"], with_masks=False)
    if ds.cat_ids != sorted(c["id"] for c in cats):
        raise SystemExit(f"predict.py: {path}'s categories {ds.cat_ids} are not the checkpoint's "
                         f"{[c['id'] for c in cats]} — fix: use the category ids the model was trained with")
    with open(path) as f:
        gt_json = json.load(f)
    had_masks = any(a.get("segmentation") for a in gt_json.get("annotations", []))
    seg, pictures, unreadable = dataset_box_masks(model, ds, dev, cfg)
    # every annotation of the input keeps its fields; the ones with a usable box get the mask
    n_empty = 0
    for a in gt_json.get("annotations", []):
        if a["id"] in seg:
            a["segmentation"], a["area"], a["score"] = seg[a["id"]][0], seg[a["id"]][1], seg[a["id"]][2]
            n_empty += seg[a["id"]][1] == 0
    os.makedirs(cfg["out"], exist_ok=True)
    out_json = os.path.join(cfg["out"], "masks.json")
    data.write_json_atomic(gt_json, out_json)
    print(f"predict.py: {len(seg)} boxes -> masks ({n_empty} empty) in {out_json}")
    if unreadable:
        print(f"predict.py: {len(unreadable)} unreadable image(s) skipped (their boxes have no mask), e.g. "
              f"{unreadable[0][1]} — fix: replace the file(s) and run again", file=sys.stderr)
    for t, r in pictures:
        rec = ds.record(ds.ids.index(t["image_id"]))
        orig = read_rgb(rec["path"])
        pred = dict(boxes=torch.from_numpy(rec["boxes"]), labels=torch.from_numpy(rec["labels"]), masks=r["masks"].cpu())
        save_overlay(orig, pred, ds.class_names, os.path.join(cfg["out"], f"masks_{t['image_id']}.png"),
                     f"masks from the given boxes ({cfg['combine']})")
    if had_masks:  # score the box-conditioned masks against the json's own masks
        skipped = {i for i, _ in unreadable}
        stats, miou, ious = score_box_masks(ds.coco, seg, [i for i in ds.ids if i not in skipped])
        switches = {k: cfg[k] for k in ("box_teacher",) + tuple(RAW)}
        data.write_json_atomic({"ckpt": cfg["ckpt"], "boxes": path, "combine": cfg["combine"], "switches": switches,
                                "segm": stats, "mIoU": miou, "n_iou": len(ious)},
                               os.path.join(cfg["out"], "metrics.json"))
        print(f"predict.py: box-conditioned mask AP {stats['AP']:.1f}, mIoU {miou:.1f} over {len(ious)} boxes "
              f"(GT boxes in, masks scored against {path}'s)")
    return 0

# -----------------------------------------------------------------------------
# detection on images


def save_overlay(orig, pred, class_names, path, panel="prediction"):
    s = viz.upscale_factor(*orig.shape[1:])
    big, pred_big = viz.upscale(orig, pred, s)
    panels = [("input", Image.fromarray(big.permute(1, 2, 0).numpy())),
              (panel, viz.draw_predictions(big, pred_big, class_names))]
    viz.save_png_atomic(viz.titled_row(panels), path)


def images_main(cfg, model, mcfg, cats, dev):
    paths = list_images(cfg["images"])
    names = [c["name"] for c in cats]
    os.makedirs(cfg["out"], exist_ok=True)
    results, image_entries, n_skipped, n_pictures = [], [], 0, 0
    for start in range(0, len(paths), cfg["batch_size"]):
        items = []
        for p in paths[start:start + cfg["batch_size"]]:
            orig = read_rgb(p)
            if orig is None:
                n_skipped += 1
                continue
            items.append((p, orig, resize_for_model(orig, mcfg["min_size_test"], mcfg["max_size_test"])))
        if not items:
            continue
        batch, targets = data.collate([(rs, dict(size=tuple(rs.shape[1:]), orig_size=tuple(o.shape[1:])))
                                       for _, o, rs in items])
        with torch.no_grad():
            preds = model.predict(batch.to(dev), targets)
        for (p, orig, _), pred in zip(items, preds):
            pred = {k: v.cpu() for k, v in pred.items()}
            image_id = len(image_entries) + 1
            image_entries.append(dict(id=image_id, file_name=os.path.basename(p), path=os.path.abspath(p),
                                      height=int(orig.shape[1]), width=int(orig.shape[2])))
            results += evaluation.to_coco_results([pred], [image_id], [c["id"] for c in cats])
            if n_pictures < cfg["n_overlays"]:
                shown = picture_subset(pred, cfg["score_thresh"], cfg["nms_thresh"])
                name = os.path.splitext(os.path.basename(p))[0]
                save_overlay(orig, shown, names, os.path.join(cfg["out"], f"pred_{name}.png"),
                             f"prediction (score >= {cfg['score_thresh']}, class-agnostic NMS)")
                n_pictures += 1
    anns = [dict(r, id=k + 1, iscrowd=0, area=float(mask_util.area(r["segmentation"])) if "segmentation" in r
                 else r["bbox"][2] * r["bbox"][3]) for k, r in enumerate(results)]
    data.write_json_atomic(results, os.path.join(cfg["out"], "results.json"))
    data.write_json_atomic(dict(images=image_entries, categories=cats, annotations=anns),
                           os.path.join(cfg["out"], "predictions.json"))
    skipped = f"; {n_skipped} unreadable files skipped" if n_skipped else ""
    print(f"predict.py: {len(image_entries)} images, {len(results)} detections -> {cfg['out']}/results.json, "
          f"predictions.json, {n_pictures} pictures{skipped}")
    return 0


def main(argv):
    defaults = {k: v for k, v in globals().items() if k in
                ("ckpt", "images", "boxes", "out", "device", "batch_size", "score_thresh", "nms_thresh", "combine",
                 "mu", "n_overlays", "box_teacher") + tuple(RAW)}
    cfg = dict(defaults)
    configurator.configure(argv, cfg, "predict.py")
    if not cfg["ckpt"]:
        raise SystemExit("predict.py: no checkpoint — fix: --ckpt=PATH (a checkpoint written by train.py)")
    dev = torch.device(cfg["device"])
    model, mcfg, cats = load_model(cfg["ckpt"], dev, cfg["box_teacher"] and bool(cfg["boxes"]))
    try:
        return boxes_main(cfg, model, mcfg, cats, dev) if cfg["boxes"] else images_main(cfg, model, mcfg, cats, dev)
    except data.DataError as e:
        raise SystemExit(f"predict.py: {e}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
