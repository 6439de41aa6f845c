"""Data: a COCO-format detection dataset with boxes (and optional GT masks), the detectron2-style
resize + flip used by BoxInst, batch collation, data loaders, and the embedded synthetic dataset.

Conventions (shared with the rest of nanoSIM):
- an image is a uint8 tensor (3, h, w), RGB, 0-255, not normalised;
- a target is a dict: 'boxes' float32 (N, 4) xyxy in the resized frame, 'labels' int64 (N,) in
  0..C-1, 'masks' uint8 (N, h, w) when asked for, 'image_id' int, 'orig_size' (H0, W0), 'size' (h, w);
- a batch is (images uint8 (B, 3, Hp, Wp) zero-padded bottom/right to a multiple of 32, [targets]).

The synthetic dataset (ensure_synthetic) is the default data of the repo: shapes (disc, triangle,
crescent, star, cross) on noisy backgrounds with exact visible-part masks, so that box-supervised mask AP
can be measured without downloading COCO. Each class has its own outline, its own two-tone pattern and
its own colour family: the demo trains from scratch (no ImageNet weights offline), and a class cue that
a small network picks up in minutes stands in for the semantics pretrained features bring on COCO. The
cases the paper is about are there: same-class objects that touch and occlude each other, small
objects, two-tone objects whose inner edge breaks colour affinity, and ~20% of objects coloured close
to the background under them (each annotation carries the tags low_contrast and visible_frac, for
`python ablate.py --attr_ap`). What is not there on purpose: shapes with an enclosed hole. Box
supervision cannot see one (no colour pair links a hole to the outside of the box, so BoxInst fills
it; with the rings of generator version 5: 9.0 mask AP against 25.2 with GT masks, BENCHMARKS.md),
and a class that no box-supervised method can learn would say nothing about the implementation.
"""
import contextlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


class DataError(ValueError):
    """Bad input data. The message is one line: '<file>: <what is wrong> (<entry>) — fix: <what to do>'."""


def _error(file, what, entry, fix):
    return DataError(f"{file}: {what} ({entry}) — fix: {fix}")


# -----------------------------------------------------------------------------
# resize + flip (detectron2 ResizeShortestEdge + RandomFlip, as BoxInst trains)

def resize_shape(h, w, short, max_size):
    """Output (h', w') of detectron2's ResizeShortestEdge: scale the short side to `short`, then
    shrink both sides if the long one exceeds `max_size`; each side is int(dim * scale + 0.5)."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def hflip_boxes(boxes, w):
    """Mirror xyxy boxes in an image of width w: x0' = w - x1, x1' = w - x0."""
    return torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)  # (N, 4)


# -----------------------------------------------------------------------------
# dataset

class CocoBoxDataset(torch.utils.data.Dataset):
    """COCO-format json + image folder -> (image uint8 (3, h, w), target dict), resized and flipped.

    Boxes come from the json 'bbox' (xywh -> xyxy, clipped to the image); GT masks are decoded only
    when with_masks=True (full supervision and evaluation). Crowd annotations are dropped, as in the
    reference. In train mode images without a valid box are dropped (FILTER_EMPTY_ANNOTATIONS); in
    eval mode they are kept with empty targets so that every image is scored.
    """

    def __init__(self, json_path, image_dir, train=True, min_sizes=(800,), max_size=1333,
                 with_masks=False, hflip_prob=0.5):
        self.json_path, self.image_dir, self.train = str(json_path), str(image_dir), train
        self.min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(min_sizes)
        self.max_size, self.with_masks, self.hflip_prob = max_size, with_masks, hflip_prob
        if not os.path.isfile(self.json_path):
            raise _error(self.json_path, "annotation file not found", f"image dir {self.image_dir}",
                         "check the path, or use the synthetic default dataset")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                self.coco = COCO(self.json_path)
        except json.JSONDecodeError as e:
            raise _error(self.json_path, "not valid JSON", f"line {e.lineno}", "re-export the file") from e
        coco = self.coco
        self.cat_ids = sorted(coco.getCatIds())
        if not self.cat_ids:
            raise _error(self.json_path, "no categories", "'categories' is empty or missing",
                         "list the classes under 'categories'")
        self.num_classes = len(self.cat_ids)
        self.class_names = [coco.cats[c]["name"] for c in self.cat_ids]
        label_of = {c: i for i, c in enumerate(self.cat_ids)}  # COCO category id -> contiguous label

        # every annotation is checked, also those of images that end up skipped: a wrong category id
        # means the json and the category list disagree, which would silently corrupt the labels
        for ann in coco.dataset.get("annotations", []):
            aid = ann.get("id")
            if ann.get("category_id") not in label_of:
                raise _error(self.json_path, f"category_id {ann.get('category_id')} is not in 'categories'",
                             f"annotation id {aid}", "add the category or remove the annotation")
            if ann.get("image_id") not in coco.imgs:
                raise _error(self.json_path, f"image_id {ann.get('image_id')} is not in 'images'",
                             f"annotation id {aid}", "add the image entry or remove the annotation")
            if not (isinstance(ann.get("bbox"), (list, tuple)) and len(ann["bbox"]) == 4):
                raise _error(self.json_path, "bbox is not [x, y, w, h]", f"annotation id {aid}",
                             "write the box as four numbers")

        missing, first_missing, n_crowd, n_bad_box, n_empty = 0, None, 0, 0, 0
        self.ids, self.records, self.aspect_ratios = [], [], []
        for img_id in sorted(coco.imgs):
            info = coco.imgs[img_id]
            if "file_name" not in info or "width" not in info or "height" not in info:
                raise _error(self.json_path, "image entry lacks file_name/width/height", f"image id {img_id}",
                             "add the three fields")
            path = os.path.join(self.image_dir, info["file_name"])
            if not os.path.isfile(path):
                missing += 1
                first_missing = first_missing or path
                continue
            W0, H0 = int(info["width"]), int(info["height"])
            boxes, labels, anns = [], [], []
            for ann in coco.imgToAnns.get(img_id, []):
                if ann.get("iscrowd", 0):
                    n_crowd += 1
                    continue
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                x0, y0 = min(max(x, 0.0), W0), min(max(y, 0.0), H0)
                x1, y1 = min(max(x + bw, 0.0), W0), min(max(y + bh, 0.0), H0)
                if not (x1 - x0 > 0 and y1 - y0 > 0):  # empty, negative or outside the image (NaN too)
                    n_bad_box += 1
                    continue
                boxes.append([x0, y0, x1, y1])
                labels.append(label_of[ann["category_id"]])
                anns.append(ann)
            if train and not boxes:
                n_empty += 1
                continue
            self.ids.append(img_id)
            self.aspect_ratios.append(W0 / H0)
            self.records.append(dict(path=path, size=(H0, W0), anns=anns,
                                     boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                                     labels=np.asarray(labels, np.int64)))

        skipped = []
        if missing:
            skipped.append(f"{missing} images: missing files, e.g. {first_missing}")
        if n_empty:
            skipped.append(f"{n_empty} images: no valid box")
        if n_bad_box:
            skipped.append(f"{n_bad_box} boxes: empty or outside the image")
        if n_crowd:
            skipped.append(f"{n_crowd} crowd annotations")
        if skipped:
            print(f"{self.json_path}: kept {len(self.ids)} images; skipped " + "; ".join(skipped))
        self.skipped = dict(missing_files=missing, no_box_images=n_empty, bad_boxes=n_bad_box, crowd=n_crowd)

    def __len__(self):
        return len(self.ids)

    def _load_image(self, i):
        rec, img_id = self.records[i], self.ids[i]
        try:
            with Image.open(rec["path"]) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError or ValueError depending on the damage
            raise _error(rec["path"], f"cannot read image: {type(e).__name__}: {e}", f"image id {img_id}",
                         f"replace the file or remove image id {img_id} from {self.json_path}") from e
        if (img.height, img.width) != rec["size"]:
            raise _error(rec["path"], f"image is {img.height}x{img.width} but the json says "
                         f"{rec['size'][0]}x{rec['size'][1]}", f"image id {img_id}",
                         "fix width/height in the json or the file")
        return img

    def _load_readable(self, i):
        """Training: image i, or if it cannot be read (truncated, corrupt, gone since the json was
        checked) the next readable one, with a warning line per bad file: hours into a COCO run an
        unreadable file costs one image, not the run. -> ((PIL image, index used), [skipped paths])."""
        skipped = []
        for _ in range(len(self)):
            try:
                return (self._load_image(i), i), skipped
            except DataError as e:
                print(f"warning: {e}; skipped, the next image stands in", file=sys.stderr, flush=True)
                skipped.append(self.records[i]["path"])
                i = (i + 1) % len(self)
        raise _error(self.json_path, "no training image can be read", f"{len(self)} images",
                     "check the image folder")

    def __getitem__(self, i):
        """i: an index, or (index, shorter side, flip) from TrainBatchSampler (the training loader's
        draws; (index, shorter side) draws the flip here)."""
        i, short, flip = (tuple(i) + (None,))[:3] if isinstance(i, tuple) else (i, None, None)
        skipped = []
        if self.train:
            (img, i), skipped = self._load_readable(i)
        else:
            img = self._load_image(i)
        rec = self.records[i]
        H0, W0 = rec["size"]
        if short is None:
            short = random.choice(self.min_sizes) if self.train else self.min_sizes[0]
        h, w = resize_shape(H0, W0, short, self.max_size)
        # PIL bilinear antialiases when shrinking, like detectron2's ResizeTransform on uint8 images
        img = img.resize((w, h), Image.BILINEAR)
        image = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, h, w) uint8
        boxes = torch.from_numpy(rec["boxes"]) * torch.tensor([w / W0, h / H0, w / W0, h / H0])  # (N, 4)
        target = dict(boxes=boxes, labels=torch.from_numpy(rec["labels"]).clone(), image_id=int(self.ids[i]),
                      orig_size=(H0, W0), size=(h, w))
        if self.with_masks:
            target["masks"] = torch.zeros((0, h, w), dtype=torch.uint8)  # (0, h, w): interpolate rejects N = 0
            if rec["anns"]:
                masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in rec["anns"]]))  # (N, H0, W0)
                # nearest-exact samples at pixel centres (as PIL NEAREST); 'nearest' shifts by half a pixel
                target["masks"] = torch.nn.functional.interpolate(
                    masks[None], size=(h, w), mode="nearest-exact")[0]  # (N, h, w) uint8
        if skipped:
            target["skipped"] = skipped  # train.py counts them (pops the key before the step)
        if flip is None:
            flip = self.train and random.random() < self.hflip_prob
        if flip:
            image = image.flip(-1)
            target["boxes"] = hflip_boxes(target["boxes"], w)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


# -----------------------------------------------------------------------------
# batching and loaders

def collate(batch, size_divisibility=32):
    """[(image (3, h, w), target)] -> (images (B, 3, Hp, Wp) uint8 zero-padded bottom/right, [target])."""
    images, targets = zip(*batch)
    Hp = math.ceil(max(im.shape[1] for im in images) / size_divisibility) * size_divisibility
    Wp = math.ceil(max(im.shape[2] for im in images) / size_divisibility) * size_divisibility
    out = images[0].new_zeros((len(images), 3, Hp, Wp))  # (B, 3, Hp, Wp)
    for k, im in enumerate(images):
        out[k, :, :im.shape[1], :im.shape[2]] = im
    return out, list(targets)


class TrainBatchSampler(torch.utils.data.Sampler):
    """Training batches of (index, shorter side, flip) triples, every draw a function of (seed, epoch):
    the image order comes from a DistributedSampler (one rank: num_replicas 1), the scales and flips
    from a generator seeded per epoch, in the main process. So the data of any iteration can be
    replayed: set_epoch(epoch, start) skips the first `start` batches of that epoch without loading
    them (exact resume, train.py), and the workers hold no random state.

    scale_per_batch: one shorter side per batch (the demo) instead of one per image (the reference). The
    reference pads a batch to its largest image: on the demo's 160-200 px images with scales (144, 160,
    176), a batch of 4 then holds 1.1x the pixels it holds with one scale per batch, and a demo step
    takes 1.1x as long (`python bench.py --compare=scale`, BENCHMARKS.md). Each image still sees every
    scale over the epochs. drop_last: an incomplete last batch is not yielded.
    """

    def __init__(self, sampler, batch_size, min_sizes, scale_per_batch=True, hflip_prob=0.5, seed=0):
        self.sampler, self.batch_size, self.min_sizes = sampler, batch_size, tuple(min_sizes)
        self.scale_per_batch, self.hflip_prob, self.seed = scale_per_batch, hflip_prob, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """Epoch `epoch` next, from its batch `start` on (0: all of it)."""
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n, batch, k = self.batch_size, [], 0
        for i in self.sampler:
            batch.append(i)
            if len(batch) == n:
                scales = torch.randint(len(self.min_sizes), (1 if self.scale_per_batch else n,), generator=g)
                flips = torch.rand(n, generator=g) < self.hflip_prob
                if k >= self.start:
                    yield [(j, self.min_sizes[int(scales[0 if self.scale_per_batch else m])], bool(flips[m]))
                           for m, j in enumerate(batch)]
                batch, k = [], k + 1

    def __len__(self):
        return len(self.sampler) // self.batch_size


def make_loader(dataset, batch_size, train, num_workers=2, distributed=False, seed=0, scale_per_batch=False):
    """DataLoader with the repo's collate. train: shuffled, drop_last, TrainBatchSampler (the image order,
    scales and flips drawn per epoch from `seed`; scale_per_batch: one training scale per batch); eval:
    in order.

    Under DDP the images are split over ranks; in eval, DistributedSampler pads the last round with
    repeated images so that all ranks get the same count (the evaluator keeps one result per image_id).
    """
    dist_on = distributed and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist_on else (0, 1)
    if train:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        if len(sampler) < batch_size:
            raise _error(getattr(dataset, "json_path", "training set"),
                         f"{len(sampler)} images per rank, fewer than batch_size {batch_size}",
                         "no full batch with drop_last", "lower --batch_size or add images")
        # the scales and flips differ per rank (the order already does)
        batching = dict(batch_sampler=TrainBatchSampler(sampler, batch_size, dataset.min_sizes, scale_per_batch,
                                                        dataset.hflip_prob, seed + 1000 * rank))
    else:
        sampler = (torch.utils.data.DistributedSampler(dataset, shuffle=False) if distributed else
                   torch.utils.data.SequentialSampler(dataset))
        batching = dict(batch_size=batch_size, sampler=sampler, drop_last=False)
    # its own generator: starting an epoch's iterator (it draws the workers' base seed) leaves the global RNG alone
    return torch.utils.data.DataLoader(dataset, **batching, collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(seed + 1000 * rank))


def infinite(loader, start_iter=0):
    """Yield training batches forever, one epoch after another, starting at batch `start_iter` of the
    whole sequence (a resumed run continues with the batch it would have seen)."""
    epoch, start = divmod(start_iter, len(loader))
    while True:
        loader.batch_sampler.set_epoch(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


# -----------------------------------------------------------------------------
# the embedded synthetic dataset

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
    (25.4 / 12.9) (BENCHMARKS.md, section 1).

    Why these two thresholds (version 7; min_visible_frac=0, low_contrast_bg=0.8 reproduce version 6
    exactly): on version 6 the low-contrast objects (80% background colour) and the occluded ones were
    cases for the detector, not for the masks. `python ablate.py --attr_ap` on the session-5 runs:
    box AP 15 on the low-contrast objects and 13 on the occluded ones, with GT masks as with boxes
    (BENCHMARKS.md, section 1): they measured how fast a from-scratch detector learns to see faint
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
        raise _error(root, "folder exists but is not a synthetic dataset", "no stamp.json",
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
