"""
COCO evaluation and pictures for nanoSIM.

    python eval.py --ckpt=out/ckpt.pt [--val_json=J --val_images=DIR] [--device=cuda] [--out_dir=DIR]

Top to bottom: predictions -> COCO result dicts, COCOeval (bbox and segm, 12 stats in percent),
the evaluation loop used by train.py (DDP-aware), overlay and heat-map pictures, and the CLI.
model.py and data.py are imported only inside main(), so everything above it works without them.
"""
import colorsys
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

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
# file writing: atomic, so an interrupted run never leaves a half-written file behind

def write_json_atomic(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def save_png_atomic(img, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# evaluation loop

@torch.no_grad()
def evaluate(model, loader, dataset, device, out_dir=None, amp=False, distributed=False):
    """
    Predicts every batch of loader ((images uint8 (B,3,Hp,Wp), targets) pairs), scores the detections
    with COCOeval against dataset.coco and returns {'bbox': stats, 'segm': stats} (percent). Under DDP
    each rank predicts its shard; results are gathered to rank 0, which alone evaluates and writes files;
    the other ranks return None. The images scored are those the loader yielded (so a subset loader gives
    a subset evaluation).
    """
    device = torch.device(device)
    net = model.module if hasattr(model, "module") else model  # a DDP wrapper has no .predict
    was_training = net.training
    net.eval()
    t0 = time.time()
    per_image = []  # (image_id, [result dicts]) per image
    try:
        for images, targets in loader:
            with torch.autocast(device_type=device.type, enabled=amp):
                preds = net.predict(images.to(device), targets)
            for pred, t in zip(preds, targets):
                image_id = int(t["image_id"])
                per_image.append((image_id, to_coco_results([pred], [image_id], dataset.cat_ids)))
    finally:
        net.train(was_training)

    if distributed:
        import torch.distributed as dist
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_image)
        if dist.get_rank() != 0:
            return None
        per_image = [item for part in gathered for item in part]
    # DistributedSampler pads its shards by repeating images; keep each image once
    by_id = {}
    for image_id, res in per_image:
        by_id.setdefault(image_id, res)
    image_ids = list(by_id)
    results = [r for res in by_id.values() for r in res]

    if out_dir:
        write_json_atomic(results_for(results, "bbox"), os.path.join(out_dir, "results_bbox.json"))
        write_json_atomic(results_for(results, "segm"), os.path.join(out_dir, "results_segm.json"))
    stats = {iou_type: coco_evaluate(dataset.coco, results, iou_type, image_ids) for iou_type in ("bbox", "segm")}
    print(f"eval: {len(image_ids)} images, {len(results)} detections, {time.time() - t0:.1f}s")
    print(f"box AP {stats['bbox']['AP']:.1f} | mask AP {stats['segm']['AP']:.1f}")
    return stats

# -----------------------------------------------------------------------------
# pictures

MASK_ALPHA = 0.5   # opacity of an instance mask over the image
PANEL_GAP = 4      # white pixels between panels of a row
TITLE_H = 16       # height of the title strip above each panel
MIN_SIDE = 320     # panels are upscaled (nearest) until their short side is at least this


def palette(i):
    """Colour of instance i: hues spaced by the golden ratio, so neighbours differ and the order is fixed."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    return (int(255 * r), int(255 * g), int(255 * b))


def heat_colormap(t):
    """(...) values in [0,1] -> (..., 3) uint8: black -> red -> yellow -> white, one channel ramp per third."""
    t = t.clamp(0, 1)
    rgb = torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], dim=-1)  # (..., 3)
    return (rgb * 255).round().to(torch.uint8)


def upscale_factor(h, w):
    """Integer factor that brings the short side to at least MIN_SIDE (1 for images already that big)."""
    return max(1, math.ceil(MIN_SIDE / min(h, w)))


def upscale(image, pred, s):
    """Nearest-neighbour upscale of an image (3,H,W) and of a prediction/GT dict in its frame by factor s."""
    if s == 1:
        return image, pred
    image = image.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # (3, sH, sW)
    pred = dict(pred)
    pred["boxes"] = pred["boxes"] * s  # (K, 4)
    if "masks" in pred:
        pred["masks"] = pred["masks"].repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # (K, sH, sW)
    return image, pred


def draw_predictions(image_uint8, pred, class_names, score_thresh=0.3):
    """
    image_uint8 (3,H,W) RGB; pred: 'boxes' (K,4) xyxy, 'labels' (K,), optional 'masks' (K,H,W) bool in the
    same frame, optional 'scores' (K,) (GT has none: all instances drawn, labels without a score).
    Returns a PIL image: semi-transparent masks, box outlines and 'name score' labels, instance k in palette(k).
    """
    img = image_uint8.detach().cpu().permute(1, 2, 0).float()  # (H, W, 3)
    boxes = pred["boxes"].detach().float().cpu()  # (K, 4)
    labels = pred["labels"].detach().cpu().tolist()
    scores = pred["scores"].detach().float().cpu().tolist() if "scores" in pred else None
    keep = [k for k in range(len(labels)) if scores is None or scores[k] >= score_thresh]
    if "masks" in pred:
        masks = pred["masks"].detach().cpu().bool()  # (K, H, W)
        assert masks.shape[1:] == img.shape[:2], f"masks {tuple(masks.shape)} do not match image {tuple(img.shape)}"
        for k in keep:
            colour = torch.tensor(palette(k), dtype=torch.float32)  # (3,)
            m = masks[k]  # (H, W)
            img[m] = (1 - MASK_ALPHA) * img[m] + MASK_ALPHA * colour
    out = Image.fromarray(img.round().clamp(0, 255).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(out)
    for k in keep:
        x0, y0, x1, y1 = boxes[k].tolist()
        colour = palette(k)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        name = class_names[labels[k]] if labels[k] < len(class_names) else str(labels[k])
        text = name if scores is None else f"{name} {scores[k]:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text)
        tx, ty = max(0.0, x0), max(0.0, y0 - (b - t) - 2)  # above the box, or at the top edge if no room
        draw.rectangle([tx, ty, tx + r - l + 2, ty + b - t + 2], fill=colour)
        draw.text((tx + 1 - l, ty + 1 - t), text, fill=(0, 0, 0))
    return out


def titled_row(panels):
    """panels: list of (title, PIL image) -> one PIL image, panels side by side, each under its title."""
    width = sum(p.width for _, p in panels) + PANEL_GAP * (len(panels) - 1)
    height = TITLE_H + max(p.height for _, p in panels)
    row = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    x = 0
    for title, p in panels:
        draw.text((x + 2, 2), title, fill=(0, 0, 0))
        row.paste(p, (x, TITLE_H))
        x += p.width + PANEL_GAP
    return row


def gt_instances(coco, image_id, cat_ids):
    """GT of one image from the COCO annotations, in the original frame: boxes xyxy, contiguous labels, masks."""
    info = coco.imgs[image_id]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32).reshape(-1, 4)  # (N, 4)
    labels = torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)  # (N,)
    # an annotation without a polygon/RLE (box-only data) is drawn as its box alone
    masks = [torch.from_numpy(coco.annToMask(a)).bool() if a.get("segmentation")
             else torch.zeros(info["height"], info["width"], dtype=torch.bool) for a in anns]
    masks = torch.stack(masks) if masks else torch.zeros(0, info["height"], info["width"], dtype=torch.bool)  # (N, H0, W0)
    return {"boxes": boxes, "labels": labels, "masks": masks}


@torch.no_grad()
def save_overlays(model, dataset, device, out_dir, n=8, score_thresh=0.3):
    """
    For the first n images of dataset writes out_dir/pred_<image_id>.png: [input | GT masks | prediction].
    Drawn in the ORIGINAL frame, on the original image read from dataset.image_dir: predictions and COCO
    annotations both live there, so no mask is resampled; then everything is upscaled (nearest) so that
    small images stay readable. Returns the paths written.
    """
    device = torch.device(device)
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    paths = []
    try:
        for i in range(min(n, len(dataset))):
            image, target = dataset[i]  # (3, h, w) resized uint8
            h, w = image.shape[1:]
            # the model expects batches zero-padded bottom/right to a multiple of 32, as the loader makes them
            pad_h, pad_w = -h % 32, -w % 32
            batch = F.pad(image, (0, pad_w, 0, pad_h))[None].to(device)  # (1, 3, Hp, Wp)
            pred = {k: v.cpu() for k, v in net.predict(batch, [target])[0].items()}
            image_id = int(target["image_id"])
            info = dataset.coco.imgs[image_id]
            orig = Image.open(os.path.join(dataset.image_dir, info["file_name"])).convert("RGB")
            orig = torch.from_numpy(np.asarray(orig).copy()).permute(2, 0, 1)  # (3, H0, W0)
            gt = gt_instances(dataset.coco, image_id, dataset.cat_ids)
            s = upscale_factor(*orig.shape[1:])
            big, pred_big = upscale(orig, pred, s)
            _, gt_big = upscale(orig, gt, s)
            panels = [("input", Image.fromarray(big.permute(1, 2, 0).numpy())),
                      ("GT", draw_predictions(big, gt_big, dataset.class_names)),
                      (f"prediction (score >= {score_thresh})",
                       draw_predictions(big, pred_big, dataset.class_names, score_thresh))]
            path = os.path.join(out_dir, f"pred_{image_id}.png")
            save_png_atomic(titled_row(panels), path)
            paths.append(path)
    finally:
        net.train(was_training)
    return paths


def save_map_panel(image_uint8, maps, path, boxes=None):
    """
    Writes one PNG row: the image (3,H,W) then each map of maps {name: (H,W) float in [0,1]} as a heat map
    titled with its name (SIM's M_S, M_I, M_hat; keep names ASCII: the default font has no combining marks).
    A map of another size is resized (bilinear) to the image. boxes (N,4) xyxy in the image frame, if given,
    are outlined on every panel.
    """
    image = image_uint8.detach().cpu()
    H, W = image.shape[1:]
    s = upscale_factor(H, W)
    panels = [image]
    for m in maps.values():
        m = m.detach().float().cpu()  # (h, w)
        if m.shape != (H, W):
            m = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]  # (H, W)
        panels.append(heat_colormap(m).permute(2, 0, 1))  # (3, H, W)
    titles = ["image"] + list(maps)
    row = []
    for title, p in zip(titles, panels):
        p = p.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # (3, sH, sW)
        pil = Image.fromarray(p.permute(1, 2, 0).numpy())
        if boxes is not None:
            draw = ImageDraw.Draw(pil)
            for b in (boxes.detach().float().cpu() * s).tolist():
                draw.rectangle(b, outline=(0, 255, 255), width=2)  # cyan: absent from the heat colormap
        row.append((title, pil))
    save_png_atomic(titled_row(row), path)

# -----------------------------------------------------------------------------
# CLI

def parse_overrides(argv, defaults):
    """--key=value overrides of defaults, each converted to the type of its default (as nanoGPT's configurator)."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"cannot parse argument {arg!r} — fix: use --key=value")
        key, val = arg[2:].split("=", 1)
        if key not in cfg:
            raise ValueError(f"unknown option --{key} — fix: one of {', '.join('--' + k for k in cfg)}")
        kind = type(cfg[key])
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{key}={val} is not a bool — fix: --{key}=True or --{key}=False")
            cfg[key] = val.lower() in ("true", "1")
        else:
            try:
                cfg[key] = kind(val)
            except ValueError:
                raise ValueError(f"--{key}={val} is not a {kind.__name__} — fix: e.g. --{key}={defaults[key]}")
    return cfg


def fail(msg):
    print(f"eval.py: {msg}", file=sys.stderr)
    return 2


def main(argv):
    defaults = dict(
        ckpt="",            # checkpoint written by train.py (required)
        val_json="",        # COCO annotation json; empty: the one in the checkpoint's config
        val_images="",      # image folder for val_json
        device="cuda" if torch.cuda.is_available() else "cpu",
        out_dir="",         # empty: <checkpoint folder>/eval
        n_overlays=8,       # overlay pictures to write
        batch_size=8,
        amp=False,          # autocast the forward pass
    )
    try:
        cfg = parse_overrides(argv, defaults)
    except ValueError as e:
        return fail(str(e))
    path = cfg["ckpt"]
    if not path:
        return fail("no checkpoint given — fix: python eval.py --ckpt=PATH (a checkpoint written by train.py)")
    if not os.path.isfile(path):
        return fail(f"{path} not found — fix: pass --ckpt=PATH of an existing checkpoint written by train.py")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        return fail("--device=cuda but CUDA is not available — fix: --device=cpu")
    device = torch.device(cfg["device"])

    # the checkpoint holds tensors, state dicts and a config dict of primitives, so the safe loader suffices
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return fail(f"{path} could not be loaded with torch.load(weights_only=True): {first} — "
                    "fix: pass a checkpoint written by train.py (its config must hold only plain Python values)")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        return fail(f"{path} lacks the 'model' or 'config' entry — fix: pass a checkpoint written by train.py")
    config = ckpt["config"]
    needed = ["min_size_test", "max_size_test"] + ([] if cfg["val_json"] else ["val_json", "val_images"])
    missing = [k for k in needed if k not in config]
    if missing:
        return fail(f"{path}: checkpoint config lacks keys {missing} — fix: re-save it from the current train.py"
                    + ("" if cfg["val_json"] else ", or pass --val_json=J --val_images=DIR"))

    from model import build_model
    from data import CocoBoxDataset, make_loader

    val_json = cfg["val_json"] or config["val_json"]
    val_images = cfg["val_images"] or config["val_images"]
    if not val_json:  # the run trained on the embedded synthetic data set
        from data import ensure_synthetic
        # train.py's keys; ensure_synthetic's own defaults for a checkpoint that lacks them
        knobs = {"low_contrast_bg": "synthetic_low_contrast", "min_visible_frac": "synthetic_min_visible"}
        paths = ensure_synthetic(config.get("synthetic_root", "data/synthetic"),
                                 **{arg: config[key] for arg, key in knobs.items() if key in config})
        val_json, val_images = paths["val_json"], paths["val_images"]
    if not os.path.isfile(val_json):
        return fail(f"{val_json} not found — fix: --val_json=PATH of a COCO annotation file")
    if not os.path.isdir(val_images):
        return fail(f"{val_images} is not a folder — fix: --val_images=DIR holding the images of {val_json}")

    try:
        model = build_model(config)
    except KeyError as e:
        return fail(f"{path}: checkpoint config lacks key {e} needed by build_model — fix: re-save it from the current train.py")
    # torch.compile prefixes parameter names with _orig_mod.; strip it so compiled and eager runs load alike
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    model.to(device)
    print(f"eval.py: {path} (iter {ckpt.get('iter', '?')}) on {val_json}, device {device}")

    ds = CocoBoxDataset(val_json, val_images, train=False, min_sizes=(config["min_size_test"],),
                        max_size=config["max_size_test"], with_masks=False)
    loader = make_loader(ds, cfg["batch_size"], train=False, num_workers=2)
    out_dir = cfg["out_dir"] or os.path.join(os.path.dirname(os.path.abspath(path)), "eval")
    stats = evaluate(model, loader, ds, device, out_dir=out_dir, amp=cfg["amp"])
    write_json_atomic({"ckpt": path, "iter": ckpt.get("iter"), "val_json": val_json, **stats},
                      os.path.join(out_dir, "metrics.json"))
    written = save_overlays(model, ds, device, out_dir, n=cfg["n_overlays"])
    print(f"eval.py: wrote {os.path.join(out_dir, 'metrics.json')}, results_*.json and {len(written)} overlays")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
