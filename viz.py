"""
Pictures: prediction overlays and heat-map rows (eval.py, train.py, predict.py), and the grids
that teach: every intermediate map of SIM for one object, in one labelled grid.

    python viz.py --ckpt=out/demo/ckpt.pt                  # grids for objects of val image 0
    python viz.py --ckpt=out/demo/ckpt.pt --index=3 --n=4 --split=train --out=out/viz

Top row: the object's crop with its box; BoxInst's colour affinity (the share of each pixel's 8
dilated neighbours whose colour similarity passes color_thresh: the pairs the pairwise loss links);
M_S by Eq. 1 and by nanoSIM's calibrated map (against background sub-centres); each pixel's nearest
class sub-centre (one colour per sub-centre, Eq. 1's argmax). Bottom row: M_I (Eq. 6) with the
positives that made it (dots, area by their exp(mu * IoU) weight, Fig. 7); M_C (nanoSIM's colour map,
when on); M_prob (Eq. 7); M_hat (white object, black background, orange ignored: Fig. 1 / 6); and the
image after online copy-paste with its updated boxes (Fig. 4; pasted objects in magenta).
A BoxInst checkpoint (no teacher, no prototypes) gives the panels it has: crop, affinity, the network's
own M_I. train.py writes these grids for a fixed val image every viz_interval iterations.
"""

import colorsys
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import configurator
import copypaste
import data
import losses
import mask2former
import prototypes
import sim
from model import load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
# overlays and heat-map rows

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


def save_png_atomic(img, path):
    """A PIL image as a PNG file, written through data.write_atomic."""
    data.write_atomic(path, lambda f: img.save(f, format="PNG"))

# -----------------------------------------------------------------------------
# per-object grids of SIM's maps

ORANGE, MAGENTA, CYAN = (255, 150, 0), (255, 0, 255), (0, 255, 255)


def _heat(m):
    """(h, w) in [0, 1] -> PIL RGB."""
    return Image.fromarray(heat_colormap(m.detach().float().cpu()).numpy())


def _labels_picture(m_hat, weight):
    """M_hat with its ignore band: white object, black background, orange ignored -> PIL RGB."""
    rgb = torch.zeros(*m_hat.shape, 3, dtype=torch.uint8)
    rgb[(m_hat > 0.5) & (weight > 0)] = 255
    rgb[weight == 0] = torch.tensor(ORANGE, dtype=torch.uint8)
    return Image.fromarray(rgb.cpu().numpy())


def _categorical(idx, valid):
    """(h, w) long sub-centre index -> PIL RGB, palette colour per index, black where not valid."""
    rgb = torch.zeros(*idx.shape, 3, dtype=torch.uint8)
    for k in idx[valid].unique().tolist():
        rgb[(idx == k) & valid] = torch.tensor(palette(k), dtype=torch.uint8)
    return Image.fromarray(rgb.cpu().numpy())


def _up(m, s):
    """Mask-grid map (h, w) -> pixel grid (h*s, w*s), nearest."""
    return m.repeat_interleave(s, 0).repeat_interleave(s, 1)


def _grid(rows, path):
    """rows: lists of (title, PIL image) -> one PNG, rows stacked."""
    pics = [titled_row(r) for r in rows if r]
    out = Image.new("RGB", (max(p.width for p in pics), sum(p.height for p in pics) + 4 * (len(pics) - 1)), (255, 255, 255))
    y = 0
    for p in pics:
        out.paste(p, (0, y))
        y += p.height + 4
    save_png_atomic(out, path)


@torch.no_grad()
def object_grids(model, state, cfg, images, targets, out_dir, n=3, prefix="grid"):
    """Write one grid per object (the first n objects with positives) of the batch -> paths.
    model: the student (eval mode here); state: sim.SIMState with a teacher, or None (BoxInst)."""
    was_training = model.training
    model.eval()
    try:
        return _object_grids(model, state, cfg, images, targets, out_dir, n, prefix)
    finally:
        model.train(was_training)


def _object_grids(model, state, cfg, images, targets, out_dir, n, prefix):
    s = cfg["mask_out_stride"]
    out = model(images, targets)
    teacher = state.teacher if state is not None and state.teacher is not None else None
    obj = sim.objects(targets, images.shape[-2:], s, cfg["occlusion_aware"], images)
    query_based = cfg.get("arch", "condinst") == "mask2former"  # positives: queries, not FCOS locations
    inst = None if query_based else out["inst"]
    if teacher is not None:
        t_out = teacher.features(images, classify=False)
        if query_based:  # the teacher's queries of each object (matched or iou_mix) and its per-pixel embeddings
            pm = mask2former.pseudo_masks(t_out, targets, state.protos, obj, cfg)
            feats = prototypes.normalize_features(t_out["mask_features"], mask2former.STRIDE // s)
        else:
            pm = sim.pseudo_masks(out, t_out, teacher, state.protos, obj, cfg)
            feats = prototypes.normalize_features(t_out["mask_feats"])                  # (B, D, h, w)
        inside = obj["box_mask"] > 0
        eq1 = state.protos.semantic_maps(feats, obj["img"], obj["cls"], False, inside)  # (G, h, w)
        calib = state.protos.semantic_maps(feats, obj["img"], obj["cls"], True, inside)
        w_pos, m_i = pm["pos_weights"], pm["M_I"]
        has_pos = pm["has_pos"]
    else:  # BoxInst: the network's own masks at its positives, Eq. 6's weights
        G = len(obj["boxes"])
        if query_based:  # the queries the matcher gives each object (and, iou_mix, those covering its box)
            probs, ious, gi = mask2former.teacher_queries(out, targets, cfg)
        else:
            gi = inst["gt_inds"]
            probs = out["mask_logits"][:, 0].sigmoid()
            ious = sim.positive_box_ious(out, inst["im_inds"], inst["loc_inds"], model.strides, obj["boxes"][gi])
        w_pos = prototypes.positive_weights(ious, gi, G, cfg["mu"])
        m_i = prototypes.instance_map(probs, w_pos, gi, G)
        has_pos = torch.bincount(gi, minlength=G) > 0
    links = (losses.color_similarity(images, obj["valid"], s) >= cfg["color_thresh"]).float().mean(1)  # (B, h, w)
    pasted = None
    if state is not None and state.bank.full:  # Fig. 4: this batch after copy-paste (a private generator)
        p_images, p_targets = copypaste.copy_paste_batch(images.cpu(), [{k: v.cpu() if torch.is_tensor(v) else v
                                                         for k, v in t.items()} for t in targets], state.bank, 1.0,
                                                         torch.Generator().manual_seed(0), cfg["paste_max_objects"])
        pasted = (p_images, p_targets)
    paths = []
    for g in has_pos.nonzero().squeeze(1)[:n].tolist():
        b = int(obj["img"][g])
        h, w = targets[b]["size"]
        box = obj["boxes"][g].cpu()
        m = 0.5 * float((box[2:] - box[:2]).max())
        x0, y0 = max(int(box[0] - m), 0), max(int(box[1] - m), 0)
        x1, y1 = min(int(box[2] + m) + 1, w), min(int(box[3] + m) + 1, h)
        crop = lambda t: _up(t.cpu(), s)[y0:y1, x0:x1]
        k = max(1, upscale_factor(y1 - y0, x1 - x0) // 2)
        big = lambda pil: pil.resize((pil.width * k, pil.height * k), Image.NEAREST)
        rel = (box - torch.tensor([x0, y0, x0, y0])) * k

        def boxed(pil, colour=CYAN):
            pil = big(pil)
            ImageDraw.Draw(pil).rectangle(rel.tolist(), outline=colour, width=2)
            return pil
        image = Image.fromarray(images[b, :, y0:y1, x0:x1].permute(1, 2, 0).cpu().numpy())
        top = [("image, box", boxed(image)), (f"colour links (S >= {cfg['color_thresh']})", boxed(_heat(crop(links[b]))))]
        bottom = []
        # M_I and its positives: dots at the positives' locations, area by weight (queries have no location)
        mi = boxed(_heat(crop(m_i[g])))
        if query_based:
            matched = cfg["m2f_instance_map"] == "matched"
            bottom.append(("M_I (Eq. 6), matched query" if matched else "M_I (Eq. 6), iou_mix queries", mi))
        else:
            draw = ImageDraw.Draw(mi)
            sel = (inst["gt_inds"] == g).nonzero().squeeze(1)
            wmax = float(w_pos[sel].max()) if len(sel) else 1.0
            for j in sel.tolist():
                px, py = out["locations"][inst["loc_inds"][j]].tolist()
                r = 2 + 5 * (float(w_pos[j]) / wmax) ** 0.5
                cx, cy = (px - x0) * k, (py - y0) * k
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 255, 0), width=2)
            bottom.append(("M_I (Eq. 6), positives by weight", mi))
        if teacher is not None:
            top += [("M_S Eq. 1", boxed(_heat(crop(eq1[g])))), ("M_S calibrated", boxed(_heat(crop(calib[g]))))]
            z = feats[b]                                                                   # (D, h, w)
            cos = torch.einsum("dhw,ld->lhw", z, state.protos.protos[obj["cls"][g]])       # (L, h, w)
            top.append(("nearest sub-centre (in box)", boxed(_categorical(crop(cos.argmax(0)), crop(inside[g])))))
            if pm["M_C"] is not None:
                bottom.append(("M_C (colour)", boxed(_heat(crop(pm["M_C"][g] * obj["box_mask"][g])))))
            bottom += [("M_prob (Eq. 7)", boxed(_heat(crop(pm["M_prob"][g])))),
                       ("M_hat (orange: ignored)", boxed(_labels_picture(crop(pm["M_hat"][g]), crop(pm["W"][g]))))]
        if pasted is not None:
            p_img, p_t = pasted[0][b], pasted[1][b]
            pil = Image.fromarray(p_img[:, :h, :w].permute(1, 2, 0).numpy())
            scale = max(1, upscale_factor(h, w) // 2)
            pil = pil.resize((w * scale, h * scale), Image.NEAREST)
            d = ImageDraw.Draw(pil)
            for bx, is_p in zip(p_t["boxes"].tolist(), p_t["pasted"].tolist()):
                d.rectangle([v * scale for v in bx], outline=MAGENTA if is_p else CYAN, width=2)
            bottom.append(("copy-paste (Fig. 4), updated boxes", pil))
        path = os.path.join(out_dir, f"{prefix}_{len(paths)}.png")
        _grid([top, bottom], path)
        paths.append(path)
    return paths


def main(argv):
    defaults = dict(ckpt="", index=0, n=3, split="val", out="", device="cpu")
    opt = dict(defaults)
    configurator.configure(argv, opt, "viz.py")
    if not os.path.isfile(opt["ckpt"]):
        raise SystemExit(f"viz.py: {opt['ckpt']!r} not found — fix: --ckpt=PATH of a checkpoint written by train.py")
    ck = load_checkpoint(opt["ckpt"])
    cfg = ck["config"]
    dev = torch.device(opt["device"])
    model = model_from_checkpoint(ck).to(dev)
    state = None
    if ck["sim"] is not None:  # a SIM run's teacher, prototypes and bank (a BoxInst run has none)
        state = sim.SIMState(cfg, dev)
        state.load_state_dict(ck["sim"], model)
    ds = data.CocoBoxDataset(cfg[f"{opt['split']}_json"], cfg[f"{opt['split']}_images"], train=False,
                             min_sizes=(cfg["min_size_test"],), max_size=cfg["max_size_test"])
    if not 0 <= opt["index"] < len(ds):
        raise SystemExit(f"viz.py: --index={opt['index']} but {ds.json_path} has {len(ds)} images — fix: 0..{len(ds) - 1}")
    images, targets = data.to_device(*data.collate([ds[opt["index"]], ds[(opt["index"] + 1) % len(ds)]]), dev)
    out = opt["out"] or os.path.join(os.path.dirname(os.path.abspath(opt["ckpt"])), "viz")
    paths = object_grids(model, state, cfg, images, targets, out, opt["n"])
    print(f"viz.py: {len(paths)} grids in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
