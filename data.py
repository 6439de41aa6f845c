"""Data: a COCO-format detection dataset with boxes (and optional GT masks), the detectron2-style
resize + flip used by BoxInst, batch collation, data loaders, and atomic file writing. The embedded
synthetic dataset that is the repo's default data is made by synthetic.py.

Conventions (shared with the rest of nanoSIM):
- an image is a uint8 tensor (3, h, w), RGB, 0-255, not normalised;
- a target is a dict: 'boxes' float32 (N, 4) xyxy in the resized frame, 'labels' int64 (N,) in
  0..C-1, 'masks' uint8 (N, h, w) when asked for, 'image_id' int, 'orig_size' (H0, W0), 'size' (h, w);
- a batch is (images uint8 (B, 3, Hp, Wp) zero-padded bottom/right to a multiple of 32, [targets]).
"""
import contextlib
import io
import json
import math
import os
import random
import sys

import numpy as np
import torch
from PIL import Image
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
    takes 1.1x as long (`python bench.py --compare=scale`, BENCHMARKS.md D3). Each image still sees every
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
# file writing: atomic, so a crash or kill -9 mid-write never leaves a half-written file behind
# nor loses the previous one (checkpoints, metrics, COCO results, pictures)

def write_atomic(path, write):
    """write(f) writes the content to a binary file object; it goes to path + '.tmp' (the folder is
    made if needed), flushed to disk, then renamed over path, and the rename itself is flushed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(obj, path, **dump_kw):
    """json.dump(obj) to path through write_atomic (ASCII: the bytes do not depend on the locale)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, **dump_kw).encode("ascii")))
