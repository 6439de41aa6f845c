"""
COCO evaluation for nanoSIM.

    python eval.py --ckpt=out/ckpt.pt [--val_json=J --val_images=DIR] [--device=cuda] [--out_dir=DIR]

Top to bottom: predictions -> COCO result dicts, COCOeval (bbox and segm, 12 stats in percent),
the evaluation loop used by train.py (DDP-aware), and the CLI (which also writes viz.py's overlay
pictures).
"""
import os
import sys
import time

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

import config
import configurator
import data
import viz
from model import fold_batchnorm, load_checkpoint, model_from_checkpoint

# the 12 numbers COCOeval.summarize() computes, in its order
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]

# -----------------------------------------------------------------------------
# predictions -> COCO results

def to_coco_results(preds, image_ids, cat_ids):
    """
    preds: list of per-image dicts from model.predict ('boxes' (K,4) xyxy, 'scores' (K,), 'labels' (K,)
    contiguous, optional 'masks' (K,H0,W0) bool), image_ids: list of COCO image ids, cat_ids: sorted COCO
    category ids (contiguous label i <-> cat_ids[i]). Returns one dict per detection holding both 'bbox'
    (xywh) and, when masks are present, 'segmentation' (compressed RLE, counts as str so it is JSON-able);
    coco_evaluate keeps the key of the IoU type it scores.
    """
    results = []
    for pred, image_id in zip(preds, image_ids):
        boxes = pred["boxes"].detach().float().cpu()  # (K, 4) xyxy
        if boxes.shape[0] == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()  # (K, 4)
        scores = pred["scores"].detach().float().cpu().tolist()
        labels = pred["labels"].detach().cpu().tolist()
        rles = None
        if "masks" in pred:
            masks = pred["masks"].detach().cpu().bool().numpy()  # (K, H0, W0)
            # pycocotools wants (H, W, K) uint8 in Fortran order
            rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for k in range(len(scores)):
            r = {"image_id": int(image_id), "category_id": int(cat_ids[labels[k]]),
                 "bbox": [float(v) for v in xywh[k]], "score": float(scores[k])}
            if rles is not None:
                r["segmentation"] = {"size": [int(s) for s in rles[k]["size"]],
                                     "counts": rles[k]["counts"].decode("utf-8")}
            results.append(r)
    return results


def results_for(results, iou_type):
    """
    Copies of the result dicts carrying only the geometry of iou_type. For 'segm' the box must go:
    loadRes takes the first geometry key it finds, and with a box present it would set each detection's
    area to the box area, which puts detections in the wrong small/medium/large range. Copies, because
    loadRes writes 'id', 'area', 'iscrowd' into the dicts it is given.
    """
    key = {"bbox": "bbox", "segm": "segmentation"}[iou_type]
    return [{"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"], key: r[key]}
            for r in results if key in r]

# -----------------------------------------------------------------------------
# COCOeval

def coco_evaluate(coco_gt, results, iou_type, image_ids):
    """
    Runs COCOeval ('bbox' or 'segm') on the images image_ids and returns {stat name: value in percent}.
    summarize() prints the usual 12 lines. A stat COCOeval leaves undefined (-1: no GT in that area
    range) stays -1 rather than becoming -100. No detections -> all zeros (loadRes cannot take []).
    """
    dets = results_for(results, iou_type)
    if len(dets) == 0:
        print(f"coco_evaluate({iou_type}): no detections, all stats 0")
        return {name: 0.0 for name in STAT_NAMES}
    coco_dt = coco_gt.loadRes(dets)
    E = COCOeval(coco_gt, coco_dt, iou_type)
    E.params.imgIds = sorted(int(i) for i in image_ids)
    E.evaluate()
    E.accumulate()
    E.summarize()
    print(f"{iou_type} AP per class: " + " | ".join(f"{n} {ap:.1f}" for n, ap in per_class_ap(E).items()))
    return {name: (100.0 * float(v) if v >= 0 else -1.0) for name, v in zip(STAT_NAMES, E.stats)}


def masks_missing(coco_gt):
    """(annotations of the GT json without a segmentation, their count, the first one's id) or None when
    every annotation has one: mask AP needs a mask for each GT object."""
    missing = [a["id"] for a in coco_gt.dataset.get("annotations", []) if a.get("segmentation") in (None, [], {})]
    return (len(missing), len(coco_gt.dataset["annotations"]), missing[0]) if missing else None


def no_mask_line(missing, json_path):
    """The one line that says why mask AP is not measured (masks_missing's tuple) and what to do."""
    n, total, first = missing
    return (f"{n} of {total} annotations in {json_path} have no segmentation (e.g. id {first}): box AP only — "
            f"for mask AP, a val json whose annotations carry masks (predict.py --boxes writes masks for boxes)")


def per_class_ap(E):
    """{class name: AP in percent} from an accumulated COCOeval, as detectron2's per-category table:
    E.eval['precision'] is (T IoU thresholds, R recall points, K classes, A area ranges, M max dets);
    a class's AP is the mean over T and R of its defined entries (-1: no GT of that class) at area
    'all' and the largest max-dets, the same average that gives the overall AP."""
    precision = E.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    out = {}
    for k, cat_id in enumerate(E.params.catIds):
        p = precision[:, :, k]
        out[E.cocoGt.cats[cat_id]["name"]] = 100.0 * float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return out

# -----------------------------------------------------------------------------
# evaluation loop

@torch.no_grad()
def evaluate(model, loader, dataset, device, out_dir=None, amp=False, distributed=False, amp_dtype=torch.bfloat16):
    """
    Predicts every batch of loader ((images uint8 (B,3,Hp,Wp), targets) pairs), scores the detections
    with COCOeval against dataset.coco and returns {'bbox': stats, 'segm': stats} (percent). Under DDP
    each rank predicts its shard; results are gathered to rank 0, which alone evaluates and writes files;
    the other ranks return None. The images scored are those the loader yielded (so a subset loader gives
    a subset evaluation). The predictions come from a twin with the BatchNorms folded into the convs
    (model.fold_batchnorm: the same function, fewer passes; the model itself is not changed).
    amp: autocast the forward in amp_dtype (train.py passes its training dtype). An image the dataset
    could not read (its target carries 'unreadable') is left out of the scores, counted and named.
    """
    device = torch.device(device)
    net = model.module if hasattr(model, "module") else model  # a DDP wrapper has no .predict
    was_training = net.training
    net.eval()
    predictor = fold_batchnorm(net)[0]
    t0 = time.time()
    per_image = []  # (image_id, [result dicts] or the reason it was not read) per image
    try:
        for images, targets in loader:
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp):
                preds = predictor.predict(images.to(device, non_blocking=True), targets)
            for pred, t in zip(preds, targets):
                image_id = int(t["image_id"])
                per_image.append((image_id, t["unreadable"] if "unreadable" in t else
                                  to_coco_results([pred], [image_id], dataset.cat_ids)))
    finally:
        net.train(was_training)

    if distributed:
        per_image = gather_to_rank0(per_image)
        if per_image is None:
            return None
    # DistributedSampler pads its shards by repeating images; keep each image once
    by_id = {}
    for image_id, res in per_image:
        by_id.setdefault(image_id, res)
    unreadable = [res for res in by_id.values() if isinstance(res, str)]
    if unreadable:
        print(f"eval: {len(unreadable)} unreadable image(s) left out of the scores, e.g. {unreadable[0]}", flush=True)
    image_ids = [i for i, res in by_id.items() if not isinstance(res, str)]
    results = [r for res in by_id.values() if not isinstance(res, str) for r in res]

    if out_dir:
        data.write_json_atomic(results_for(results, "bbox"), os.path.join(out_dir, "results_bbox.json"))
        data.write_json_atomic(results_for(results, "segm"), os.path.join(out_dir, "results_segm.json"))
    no_mask = masks_missing(dataset.coco)
    stats = {iou_type: coco_evaluate(dataset.coco, results, iou_type, image_ids)
             for iou_type in (("bbox",) if no_mask else ("bbox", "segm"))}
    if no_mask:  # boxes-only val json: box AP alone (COCOeval's segm would stop on a KeyError)
        print(f"eval: mask AP not measured: {no_mask_line(no_mask, dataset.json_path)}")
        stats["segm"] = {name: float("nan") for name in STAT_NAMES}
    print(f"eval: {len(image_ids)} images, {len(results)} detections, {time.time() - t0:.1f}s"
          + (f", {len(unreadable)} unreadable left out" if unreadable else ""))
    print(f"box AP {stats['bbox']['AP']:.1f} | mask AP {stats['segm']['AP']:.1f}")
    return stats


def gather_to_rank0(items):
    """Every rank's list of picklable items, concatenated in rank order on rank 0; None on the others.
    gather_object, not all_gather_object: on COCO (5k images x 100 detections with RLE masks, ~100 MB of
    pickles) only rank 0 scores, so the other ranks need not receive (and hold) everything. Under NCCL the
    objects travel as tensors on this rank's current CUDA device (train.py sets it)."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if rank == 0 else None

# -----------------------------------------------------------------------------
# CLI

def fail(msg):
    print(f"eval.py: {msg}", file=sys.stderr)
    return 2


def main(argv):
    defaults = dict(
        ckpt="",            # checkpoint written by train.py (required)
        val_json="",        # COCO annotation json; empty: the one in the checkpoint's config
        val_images="",      # image folder for val_json
        device=config.device,
        out_dir="",         # empty: <checkpoint folder>/eval
        n_overlays=config.n_overlays,  # overlay pictures to write
        batch_size=8,
        amp=False,          # autocast the forward pass
    )
    cfg = dict(defaults)
    configurator.configure(argv, cfg, "eval.py")
    path = cfg["ckpt"]
    if not path:
        return fail("no checkpoint given — fix: python eval.py --ckpt=PATH (a checkpoint written by train.py)")
    if not os.path.isfile(path):
        return fail(f"{path} not found — fix: pass --ckpt=PATH of an existing checkpoint written by train.py")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        return fail("--device=cuda but CUDA is not available — fix: --device=cpu")
    device = torch.device(cfg["device"])

    try:
        ckpt = load_checkpoint(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return fail(f"{path} could not be loaded with torch.load(weights_only=True): {first} — "
                    "fix: pass a checkpoint written by train.py (its config must hold only plain Python values)")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        return fail(f"{path} lacks the 'model' or 'config' entry — fix: pass a checkpoint written by train.py")
    ckpt_cfg = ckpt["config"]
    needed = ["min_size_test", "max_size_test"] + ([] if cfg["val_json"] else ["val_json", "val_images"])
    missing = [k for k in needed if k not in ckpt_cfg]
    if missing:
        return fail(f"{path}: checkpoint config lacks keys {missing} — fix: re-save it from the current train.py"
                    + ("" if cfg["val_json"] else ", or pass --val_json=J --val_images=DIR"))

    # the run's own val data by default: train.py stored the paths it trained with in the config
    val_json, val_images = cfg["val_json"] or ckpt_cfg["val_json"], cfg["val_images"] or ckpt_cfg["val_images"]
    if not os.path.isfile(val_json):
        return fail(f"{val_json} not found — fix: --val_json=PATH of a COCO annotation file")
    if not os.path.isdir(val_images):
        return fail(f"{val_images} is not a folder — fix: --val_images=DIR holding the images of {val_json}")

    model = model_from_checkpoint(ckpt).to(device)
    print(f"eval.py: {path} (iter {ckpt['iter']}) on {val_json}, device {device}")

    ds = data.CocoBoxDataset(val_json, val_images, train=False, min_sizes=(ckpt_cfg["min_size_test"],),
                             max_size=ckpt_cfg["max_size_test"], with_masks=False)
    loader = data.make_loader(ds, cfg["batch_size"], train=False, num_workers=2)
    out_dir = cfg["out_dir"] or os.path.join(os.path.dirname(os.path.abspath(path)), "eval")
    stats = evaluate(model, loader, ds, device, out_dir=out_dir, amp=cfg["amp"])
    data.write_json_atomic({"ckpt": path, "iter": ckpt["iter"], "val_json": val_json, **stats},
                           os.path.join(out_dir, "metrics.json"))
    written = viz.save_overlays(model, ds, device, out_dir, n=cfg["n_overlays"])
    print(f"eval.py: wrote {os.path.join(out_dir, 'metrics.json')}, results_*.json and {len(written)} overlays")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
