"""The embedded synthetic dataset, the default data of the repo (data.py reads it like any COCO set).

    paths = synthetic.ensure_synthetic("data/synthetic")  # train/val json and image folders, made on first use

Shapes (disc, triangle, crescent, star, cross) on noisy backgrounds with exact visible-part masks, so
that box-supervised mask AP can be measured without downloading COCO. Each class has its own outline,
its own two-tone pattern and its own colour family: the demo trains from scratch (no ImageNet weights
offline), and a class cue that a small network picks up in minutes stands in for the semantics
pretrained features bring on COCO. The cases the paper is about are there: same-class objects that
touch and occlude each other, small objects, two-tone objects whose inner edge breaks colour
affinity, and ~20% of objects coloured close to the background under them (each annotation carries
the tags low_contrast and visible_frac, for `python ablate.py --attr_ap`). What is not there on
purpose: shapes with an enclosed hole. Box supervision cannot see one (no colour pair links a hole to
the outside of the box, so BoxInst fills it; with the rings of generator version 5: 9.0 mask AP
against 25.2 with GT masks, BENCHMARKS.md), and a class that no box-supervised method can learn would
say nothing about the implementation.
"""
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES = ("disc", "triangle", "crescent", "star", "cross")  # category ids 1..5 in this order
SYNTH_VERSION = 7  # bump when the generator changes, so cached copies are regenerated


CLASS_HUES = (0.0, 55.0, 120.0, 210.0, 290.0)  # degrees: each class has its own colour family


def _hsv_to_rgb(h, s, v):
    """One colour from hue in degrees, saturation and value in [0, 1] -> RGB float array in 0..255."""
    k = (np.array([5.0, 3.0, 1.0]) + (h % 360) / 60.0) % 6
    return 255.0 * (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))


def _interp_index(n_out, n_in):
    """Left control-point index and weight of linear interpolation from n_in points spread over n_out pixels."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) / n_out * (n_in - 1)
    i0 = np.minimum(np.floor(pos).astype(int), n_in - 2)
    return i0, (pos - i0).astype(np.float32)


def _smooth_field(rng, gh, gw, H, W, lo, hi):
    """A smooth random colour field (H, W, 3): a gh x gw grid of random colours, bilinearly upsampled.
    Done with gathers, not matmuls: BLAS threads are slow on small matrices and not bit-stable across CPUs."""
    grid = rng.uniform(lo, hi, (gh, gw, 3)).astype(np.float32)
    iy, fy = _interp_index(H, gh)
    ix, fx = _interp_index(W, gw)
    rows = grid[iy] * (1 - fy)[:, None, None] + grid[iy + 1] * fy[:, None, None]  # (H, gw, 3)
    return rows[:, ix] * (1 - fx)[None, :, None] + rows[:, ix + 1] * fx[None, :, None]  # (H, W, 3)


def _background(rng, H, W):
    """Textured background: a smooth gradient, large blotches and medium mottling.

    The amplitudes are set so that the background is locally smooth at the mask grid the way a
    natural image's is: at stride 2, 38-44% of BoxInst's neighbour pairs on the background have
    colour similarity >= 0.3 (objects: 60%, pairs across an object edge: 0%; `python ablate.py
    --pair_stats`). Version 4 of the generator had a 3x steeper background (+-35 blotches, +-12 fine
    mottling on a 24x30 grid): only 14-15% of background pairs were similar, so BoxInst's pairwise
    loss saw almost no background inside a box, a failure that has nothing to do with the paper's
    cases (the objects themselves keep their internal edges and low-contrast colours)."""
    bg = _smooth_field(rng, 2, 2, H, W, 30, 225)  # (H, W, 3)
    bg += _smooth_field(rng, 4, 5, H, W, -20, 20)
    bg += _smooth_field(rng, 12, 15, H, W, -6, 6)
    return bg


def _in_polygon(x, y, verts):
    """Even-odd point-in-polygon test of the points (x, y) against the vertex list verts."""
    inside = np.zeros(x.shape, bool)
    for (xa, ya), (xb, yb) in zip(verts, verts[-1:] + verts[:-1]):
        if ya == yb:
            continue
        crosses = (ya > y) != (yb > y)
        inside ^= crosses & (x < (xb - xa) * (y - ya) / (yb - ya) + xa)
    return inside


def _sample_object(rng, H, W, size, objs):
    """Draw one object's geometry and appearance. About 35% are placed next to an earlier object of
    the same class, so that same-class instances touch and occlude each other; the others are
    spread out over the free space."""
    o = {}
    if objs and rng.random() < 0.35:
        ref = objs[rng.integers(len(objs))]
        o["cls"] = ref["cls"]
        o["r"] = float(np.clip(ref["r"] * rng.uniform(0.7, 1.3), 8 * size / 160, 48 * size / 160))
        d, a = (ref["r"] + o["r"]) * rng.uniform(0.3, 0.8), rng.uniform(0, 2 * np.pi)
        o["cx"], o["cy"] = ref["cx"] + d * np.cos(a), ref["cy"] + d * np.sin(a)
    else:  # a free-standing object, placed (up to 10 tries) where it does not cover earlier ones much
        o["cls"] = SHAPES[rng.integers(len(SHAPES))]
        o["r"] = float(np.exp(rng.uniform(np.log(8), np.log(48)))) * size / 160  # diameters 16..96 px at 160
        for _ in range(10):
            o["cx"], o["cy"] = rng.uniform(0, W), rng.uniform(0, H)
            if all(np.hypot(o["cx"] - p["cx"], o["cy"] - p["cy"]) >= 0.9 * (o["r"] + p["r"]) for p in objs):
                break
    o["angle"] = rng.uniform(0, 2 * np.pi)
    o["aspect"] = rng.uniform(0.7, 1.0)  # ellipse minor/major for disc and crescent
    o["bite"] = rng.uniform(0.4, 0.6)  # crescent: centre of the disc (radius 0.75) cut out of its ellipse
    # polygon vertices in the object frame, unit outer radius (disc and crescent are analytic)
    o["verts"] = None
    if o["cls"] == "triangle":  # a jittered equilateral triangle
        o["verts"] = [(np.cos(t), np.sin(t)) for t in np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)]
    elif o["cls"] == "star":  # five points, inner radius 0.4..0.55
        ri = rng.uniform(0.4, 0.55)
        o["verts"] = [((1.0 if k % 2 == 0 else ri) * np.cos(k * np.pi / 5),
                       (1.0 if k % 2 == 0 else ri) * np.sin(k * np.pi / 5)) for k in range(10)]
    elif o["cls"] == "cross":  # a plus sign, arm half-width 0.25..0.4 of the arm length
        a = rng.uniform(0.25, 0.4)
        o["verts"] = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                      (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
    o["split"] = rng.uniform(-0.3, 0.3)  # triangle: where its two halves meet
    o["low_contrast"] = rng.random() < 0.2
    o["colour"] = _hsv_to_rgb(CLASS_HUES[SHAPES.index(o["cls"])] + rng.uniform(-20, 20),
                              rng.uniform(0.45, 0.9), rng.uniform(0.45, 0.95))
    o["jitter"] = rng.uniform(-12, 12, 3)  # low-contrast objects: offset from the local background
    return o


def _object_frame(o, H, W):
    """Pixel-centre coordinates (u, v) in the object's rotated frame over its bounding square, and the slice."""
    r = o["r"]
    y0, y1 = max(int(o["cy"] - r) - 1, 0), min(int(o["cy"] + r) + 2, H)
    x0, x1 = max(int(o["cx"] - r) - 1, 0), min(int(o["cx"] + r) + 2, W)
    if y1 <= y0 or x1 <= x0:
        return None, None, None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xs - o["cx"], ys - o["cy"]
    c, s = np.cos(o["angle"]), np.sin(o["angle"])
    return c * dx + s * dy, -s * dx + c * dy, (slice(y0, y1), slice(x0, x1))


def _shape_mask(o, u, v):
    """Boolean mask of the object's full outline (before occlusion) on the (u, v) grid."""
    r = o["r"]
    if o["cls"] in ("disc", "crescent"):
        inside = (u / r) ** 2 + (v / (r * o["aspect"])) ** 2 <= 1
        if o["cls"] == "crescent":  # the bite reaches past the outline: a concave shape, no enclosed hole
            inside &= (u / r - o["bite"]) ** 2 + (v / r) ** 2 > 0.75 ** 2
        return inside
    return _in_polygon(u / r, v / r, o["verts"])


def _texture(o, u, v):
    """Per-class surface pattern in [0, 1] in the object frame, made of a few large two-tone regions
    (not fine stripes): disc solid, triangle split in two halves, crescent solid (its outline is the cue),
    star with a differently shaded core, cross with one bar lighter than the other. Each internal
    edge is a place where BoxInst's colour affinity breaks inside an object (the heterogeneous
    objects of the paper), while the large flat regions keep most neighbour pairs similar, as on
    real objects at stride 4. The pattern moves and rotates with the object."""
    r = o["r"]
    if o["cls"] in ("disc", "crescent"):
        return np.zeros_like(u)
    if o["cls"] == "triangle":
        return (u > o["split"] * r).astype(np.float32)
    if o["cls"] == "star":
        return ((u ** 2 + v ** 2) <= (0.35 * r) ** 2).astype(np.float32)
    return (np.abs(u) > np.abs(v)).astype(np.float32)  # cross: the horizontal arms


def render_synthetic_image(rng, height, width, size=160, min_visible=20, min_visible_frac=0.3, low_contrast_bg=0.6,
                           n_objects=(4, 9)):
    """One synthetic image: returns (image (H, W, 3) uint8, masks (K, H, W) bool of the VISIBLE parts,
    labels (K,) int indices into SHAPES, attrs: K dicts {"low_contrast": bool, "visible_frac": float}).
    n_objects[0]..n_objects[1] objects are drawn (about 6.2 per image survive); they are painted in
    order, later ones occlude earlier ones. An object is removed before painting unless at least
    min_visible pixels and min_visible_frac of its in-image outline stay visible; about 20% of the
    objects are low-contrast: low_contrast_bg of their colour comes from the background under them.

    Why this many objects: the CPU demo is bound by compute, and most of a sparse image's compute goes
    to background. Generator version 5 drew 2-6 objects (3.9 per image); with 4-9 (probed while the
    crescents were still rings) the same 600-iteration probe learns 25.7 box / 14.5 mask AP instead of
    19.3 / 7.8 at the same images per second, while 6-13 objects (9.2 per image, crowded) give no more
    (25.4 / 12.9) (BENCHMARKS.md D1).

    Why these two thresholds (version 7; min_visible_frac=0, low_contrast_bg=0.8 reproduce version 6
    exactly): on version 6 the low-contrast objects (80% background colour) and the occluded ones were
    cases for the detector, not for the masks. `python ablate.py --attr_ap` on the generator-v6 runs of 2026-11-22:
    box AP 15 on the low-contrast objects and 13 on the occluded ones, with GT masks as with boxes
    (BENCHMARKS.md D1): they measured how fast a from-scratch detector learns to see faint
    slivers, not what box supervision costs. Both cases stay, at a strength the demo's detector can
    learn in its 15 minutes (version 7: box AP 28 and 17)."""
    H, W = height, width
    for _ in range(50):  # redraw the layout until at least two objects are visible (almost always at once)
        objs, frames = [], []
        for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
            o = _sample_object(rng, H, W, size, objs)
            u, v, sl = _object_frame(o, H, W)
            full = np.zeros((H, W), bool)
            if sl is not None:
                full[sl] = _shape_mask(o, u, v)
            objs.append(o)
            frames.append((u, v, sl, full))
        # visibility: removing an object can only enlarge the visible part of the others, so one
        # pruning pass followed by recomputing the owner map is exact
        owner = np.full((H, W), -1)
        for k, f in enumerate(frames):
            owner[f[3]] = k
        keep = [k for k in range(len(objs))
                if (owner == k).sum() >= max(min_visible, min_visible_frac * frames[k][3].sum())]
        if len(keep) >= 2:
            break
    objs, frames = [objs[k] for k in keep], [frames[k] for k in keep]

    canvas = _background(rng, H, W)  # (H, W, 3) float
    owner = np.full((H, W), -1)
    for k, (o, (u, v, sl, full)) in enumerate(zip(objs, frames)):
        m = full[sl]
        base = o["colour"]
        if o["low_contrast"]:  # colour close to what lies under the object right now, a trace of its class
            base = low_contrast_bg * canvas[sl][m].mean(0) + (1 - low_contrast_bg) * base + o["jitter"]
        amp = 15.0 if o["low_contrast"] else 45.0
        sign = 1.0 if base.mean() < 128 else -1.0  # texture: lighter on dark objects, darker on light ones
        shade = 6.0 * u / o["r"]  # a soft lighting gradient across the object
        col = base + (sign * amp * _texture(o, u, v) + shade)[..., None]  # (h, w, 3)
        patch = canvas[sl]
        patch[m] = col[m]
        owner[full] = k
    canvas += 3.0 * rng.standard_normal(canvas.shape, dtype=np.float32)  # sensor noise over everything
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    masks = np.stack([owner == k for k in range(len(objs))])  # (K, H, W) bool
    labels = np.array([SHAPES.index(o["cls"]) for o in objs], np.int64)
    attrs = [dict(low_contrast=bool(o["low_contrast"]), visible_frac=float(m.sum() / f[3].sum()))
             for o, m, f in zip(objs, masks, frames)]
    return image, masks, labels, attrs


def _write_split(folder, name, n, seed, size, **render_kw):
    """Render n images into folder/name/ and write folder/name.json (COCO, RLE masks, visible parts)."""
    os.makedirs(os.path.join(folder, name))
    images, anns = [], []
    split_code = {"train": 0, "val": 1}[name]
    for i in range(n):
        # one generator per image: images are independent of n and of the other split
        rng = np.random.default_rng([seed, split_code, i])
        H, W = size, size + int(rng.integers(0, size // 4 + 1))  # widths size..1.25*size
        image, masks, labels, attrs = render_synthetic_image(rng, H, W, size=size, **render_kw)
        file_name = f"{i:06d}.jpg"
        Image.fromarray(image).save(os.path.join(folder, name, file_name), quality=95, subsampling=0)
        images.append(dict(id=i + 1, file_name=file_name, height=H, width=W))
        for m, lab, at in zip(masks, labels, attrs):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(lab) + 1, iscrowd=0,
                             segmentation=dict(size=rle["size"], counts=rle["counts"].decode("ascii")),
                             area=float(mask_utils.area(rle)),
                             bbox=[float(b) for b in mask_utils.toBbox(rle)],  # tight xywh of the visible mask
                             # extra keys (COCO tools ignore them): `python ablate.py --attr_ap` scores by them
                             low_contrast=at["low_contrast"], visible_frac=round(at["visible_frac"], 3)))
    cats = [dict(id=k + 1, name=s, supercategory="shape") for k, s in enumerate(SHAPES)]
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=cats), f)


def ensure_synthetic(root="data/synthetic", seed=0, n_train=800, n_val=100, size=160, low_contrast_bg=0.6,
                     min_visible_frac=0.3):
    """Return the paths of the synthetic dataset in root, generating it first if needed.

    Generation is deterministic in (seed, n_train, n_val, size). A stamp file records these; a folder
    with the same stamp is reused, one with another stamp is replaced. The data is written to a temp
    folder beside root and renamed into place, so an interrupted run never leaves half a dataset, and
    concurrent callers (DDP ranks) end up with one complete copy.
    """
    root = os.path.abspath(root)
    render_kw = dict(low_contrast_bg=low_contrast_bg, min_visible_frac=min_visible_frac)
    params = dict(seed=seed, n_train=n_train, n_val=n_val, size=size, version=SYNTH_VERSION, **render_kw)
    paths = dict(train_json=os.path.join(root, "train.json"), train_images=os.path.join(root, "train"),
                 val_json=os.path.join(root, "val.json"), val_images=os.path.join(root, "val"))
    stamp = os.path.join(root, "stamp.json")

    def stamp_matches():
        try:
            with open(stamp) as f:
                return json.load(f) == params
        except (OSError, ValueError):
            return False

    if stamp_matches():
        return paths
    if os.path.exists(root) and not os.path.isfile(stamp):
        raise FileExistsError(f"{root}: folder exists but is not a synthetic dataset (no stamp.json) — fix: "
                              "remove the folder or pass another root")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        _write_split(tmp, "train", n_train, seed, size, **render_kw)
        _write_split(tmp, "val", n_val, seed, size, **render_kw)
        with open(os.path.join(tmp, "stamp.json"), "w") as f:
            json.dump(params, f)
        if os.path.exists(root) and not stamp_matches():  # an older version: move it away, then replace
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            try:
                os.rename(root, os.path.join(old, "x"))
            except FileNotFoundError:  # another process moved it away first
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not stamp_matches():  # another process renamed a complete copy in first: use that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated synthetic dataset ({n_train} train + {n_val} val images, {size} px) "
          f"in {time.time() - t0:.1f} s at {root}")
    return paths


def write_variant(out, src=None, gray=False, one_class=False, boxes_only=False, quality=95):
    """A copy of a COCO dataset (default: the embedded one) in COCO 2017's layout under out (`--data_root=out`
    reads it; data.DATA_LAYOUTS), changed the ways a user's own data differs from the demo's -> its paths.

    gray: every image converted to one 8-bit grey channel (PIL's ITU-R 601 luma), as a grayscale
    camera or a scan gives; data.py reads it back as three equal channels, so the Lab colour of every
    pixel has a = b = 0 and BoxInst's colour affinity sees lightness alone.
    one_class: every annotation becomes category 1, "object" (one class, any number of objects).
    boxes_only: the train split's annotations lose their segmentation (a json with boxes only, what a
    box-supervised user has); the val split keeps its masks so that mask AP can be measured.
    src: {train_json, train_images, val_json, val_images} of another COCO dataset."""
    src = src or ensure_synthetic()
    layout = dict(train=("train2017", "instances_train2017.json"), val=("val2017", "instances_val2017.json"))
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    paths = {}
    for split, (folder, name) in layout.items():
        with open(src[f"{split}_json"]) as f:
            js = json.load(f)
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        for im in js["images"]:
            path_in, path_out = os.path.join(src[f"{split}_images"], im["file_name"]), os.path.join(out, folder, im["file_name"])
            if gray:
                with Image.open(path_in) as img:
                    img.convert("L").save(path_out, quality=quality)
            else:
                shutil.copyfile(path_in, path_out)
        if one_class:
            js["categories"] = [dict(id=1, name="object", supercategory="object")]
            for a in js["annotations"]:
                a["category_id"] = 1
        if boxes_only and split == "train":
            for a in js["annotations"]:
                a.pop("segmentation", None)
        with open(os.path.join(out, "annotations", name), "w") as f:
            json.dump(js, f)
        paths.update({f"{split}_json": os.path.join(out, "annotations", name), f"{split}_images": os.path.join(out, folder)})
    return paths


if __name__ == "__main__":  # python synthetic.py --out=data/gray1 --gray --one_class --boxes_only
    import sys

    import configurator
    args = dict(out="", gray=False, one_class=False, boxes_only=False)
    configurator.configure(sys.argv[1:], args, "synthetic.py")
    if not args["out"]:
        raise SystemExit("synthetic.py: no output folder — fix: --out=DIR (with --gray, --one_class, --boxes_only)")
    p = write_variant(args["out"], gray=args["gray"], one_class=args["one_class"], boxes_only=args["boxes_only"])
    print(f"synthetic.py: the embedded dataset{' in grey' if args['gray'] else ''}{', one class' if args['one_class'] else ''}"
          f"{', train boxes only' if args['boxes_only'] else ''} in {args['out']} (COCO 2017 layout: "
          f"--data_root={args['out']}): {p['train_json']}, {p['val_json']}")
