"""Data: a COCO-format detection dataset with boxes (and optional GT masks), the detectron2-style
resize + flip used by BoxInst, batch collation, data loaders, where a run's data lies (data_root's layout,
explicit paths or the embedded synthetic dataset, which synthetic.py makes), and atomic file writing.

Conventions (shared with the rest of nanoSIM):
- an image is a uint8 tensor (3, h, w), RGB, 0-255, not normalised;
- a target is a dict: 'boxes' float32 (N, 4) xyxy in the resized frame, 'labels' int64 (N,) in
  0..C-1, 'masks' uint8 (N, h, w) when asked for, 'image_id' int, 'orig_size' (H0, W0), 'size' (h, w);
- a batch is (images uint8 (B, 3, Hp, Wp) zero-padded bottom/right to a multiple of 32, [targets]).
"""
import contextlib
import ctypes
import io
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import synthetic


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

def _pack_strings(strings):
    """[str] -> (uint8 (total,) the UTF-8 bytes of all strings end to end, int64 (n + 1,) offsets; string k is
    bytes [offsets[k], offsets[k + 1])). One buffer instead of n str objects: see CocoBoxDataset on why."""
    parts = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.frombuffer(b"".join(parts), np.uint8).copy(), offsets  # copy: own, writable memory


def _unpack_string(blob, offsets, k):
    return blob[offsets[k]:offsets[k + 1]].tobytes().decode("utf-8")


def _files_in(folder):
    """The names of the files in `folder` (a set), or None if it cannot be listed. One directory read
    instead of a stat per image: on a network file system that is seconds instead of minutes for COCO."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_file()}  # is_file follows links, as os.path.isfile
    except OSError:
        return None


def _release_freed_memory():
    """Hand the heap freed by the parsed json back to the OS: glibc keeps freed memory for reuse, and the
    process would stay at its start-up peak (no-op where there is no glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _open_problem(e):
    """Why Image.open or decoding failed, as the one-line messages say it."""
    return "file missing" if isinstance(e, FileNotFoundError) else f"cannot read image: {type(e).__name__}: {e}"


def _size_problem(h, w, H0, W0):
    return None if (h, w) == (H0, W0) else f"image is {h}x{w} but the json says {H0}x{W0}"


def keep_masks(anns, sel, fraction, seed=0):
    """Which of the boxes sel (indices into the json's annotations) train from their mask -> bool (len(sel),):
    those with a segmentation whose draw (one uniform number per json annotation, from `seed`) is below
    `fraction`. Fraction 1 keeps every mask the json has (box-only annotations train from their box);
    the masks kept at a smaller fraction are a subset of those kept at a larger one, for one seed."""
    draw = np.random.default_rng(seed).random(len(anns))  # (A,) one per annotation, whatever is filtered
    return np.array([anns[k].get("segmentation") not in (None, [], {}) and draw[k] < fraction
                     for k in np.asarray(sel).tolist()], bool).reshape(-1)


def _segmentation_mask(text, h, w):
    """A segmentation as json text (polygons, uncompressed or compressed RLE) -> uint8 (h, w), as
    pycocotools' COCO.annToMask decodes it; an empty polygon list is an empty mask."""
    if not text:  # no mask kept (keep_masks)
        return np.zeros((h, w), np.uint8)
    seg = json.loads(text)
    if isinstance(seg, list):
        if not seg:
            return np.zeros((h, w), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))  # polygons of one object -> one RLE
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)                    # uncompressed RLE
    else:
        rle = seg                                                  # compressed RLE
    return mask_utils.decode(rle)


class CocoBoxDataset(torch.utils.data.Dataset):
    """COCO-format json + image folder -> (image uint8 (3, h, w), target dict), resized and flipped.

    Boxes come from the json 'bbox' (xywh -> xyxy, clipped to the image); GT masks are decoded only
    when with_masks=True (full supervision and evaluation). Crowd annotations are dropped, as in the
    reference. In train mode images without a valid box are dropped (FILTER_EMPTY_ANNOTATIONS); in
    eval mode they are kept with empty targets so that every image is scored.

    The index is a few numpy arrays (boxes, labels, image sizes, file names, with_masks: segmentations
    as json text), and the parsed json is dropped once they are built. DataLoader workers are forked
    copies of this object: reading a Python object writes its reference count (and the cyclic GC writes
    the headers of lists and dicts), which copies the page it sits on, so an index of per-image dicts
    (pycocotools' COCO: ~2.5 GB for COCO train) slowly becomes a private copy in every worker of every
    rank; numpy buffers are only read and stay shared. pycocotools' COCO of the json, which evaluation
    and the GT pictures need, is `coco`, built on first access. `python bench.py --compare=index`
    measures start-up time and memory on a COCO-sized json.

    Unreadable images: training takes the next readable image instead and lists the file in
    target['skipped'] (each time; a file that failed is not decoded again by the same process);
    evaluation returns a 32x32 black placeholder with no boxes and target['unreadable'] = '<path>: <reason>'.
    Nothing is printed: the caller counts and names them. check_images() finds, before a run, the
    files that cannot even be opened.
    """

    def __init__(self, json_path, image_dir, train=True, min_sizes=(800,), max_size=1333,
                 with_masks=False, hflip_prob=0.5, mask_fraction=0.0, mask_seed=0):
        self.json_path, self.image_dir, self.train = str(json_path), str(image_dir), train
        self.min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(min_sizes)
        # mask_fraction > 0: some masks plus many boxes (keep_masks); else every mask (with_masks) or none
        self.mask_fraction, self.mask_seed = float(mask_fraction), mask_seed
        self.max_size, self.with_masks, self.hflip_prob = max_size, with_masks or mask_fraction > 0, hflip_prob
        self._coco = None           # pycocotools' COCO, built by the `coco` property when first read
        self._unreadable = set()    # indices whose image failed to load in this process (training skips them)
        if not os.path.isfile(self.json_path):
            raise _error(self.json_path, "annotation file not found", f"image dir {self.image_dir}",
                         "check the path, or use the synthetic default dataset")
        try:
            # text mode: the file's bytes are decoded and freed before parsing (json.load on a binary file
            # holds both the bytes and their text while it parses: +0.4 GB at the peak for COCO train)
            with open(self.json_path, encoding="utf-8") as f:
                js = json.load(f)
        except json.JSONDecodeError as e:
            raise _error(self.json_path, "not valid JSON", f"line {e.lineno}", "re-export the file") from e
        except UnicodeDecodeError as e:
            raise _error(self.json_path, "not valid JSON", f"not UTF-8 text: {e.reason}", "re-export the file") from e
        counts = self._build_index(js)
        del js  # the only reference: the parsed json is freed here
        _release_freed_memory()
        # the public per-image lists, made after the json is freed so that they do not pin its memory;
        # only the main process reads them (__getitem__ reads the arrays)
        self.ids = self._ids.tolist()
        self.aspect_ratios = (self._sizes[:, 1] / self._sizes[:, 0]).tolist()  # w / h, float64 as W0 / H0

        missing, first_missing, n_empty, n_bad_box, n_crowd = counts
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

    def _build_index(self, js):
        """Check the parsed json and build the index from it (nothing of `js` is kept but the category
        dicts). Sets cat_ids, categories, num_classes, class_names and the arrays, for the n images kept
        (in image id order) and their M boxes (per image in json order):
          _ids int64 (n,), _sizes int64 (n, 2) (H0, W0), _names/_name_off the file names (_pack_strings),
          _box_off int64 (n + 1,) (image k's boxes are rows _box_off[k]:_box_off[k + 1]), _boxes float32
          (M, 4) xyxy in the image's frame, _labels int64 (M,), _ann_index int64 (M,) each box's position
          in the json's 'annotations', with_masks: _segs/_seg_off each box's segmentation as json text
          ("" where mask_fraction left it out), with mask_fraction > 0: _has_mask bool (M,).
        -> (missing files, first missing path, images without a valid box, bad boxes, crowd annotations)."""
        jp = self.json_path
        if not isinstance(js, dict):
            raise _error(jp, "not a COCO annotation file", f"the top level is a {type(js).__name__}",
                         "write one object with 'images', 'annotations' and 'categories'")
        cats = {}
        for k, c in enumerate(js.get("categories") or []):
            if not (isinstance(c, dict) and "id" in c and "name" in c):
                raise _error(jp, "category entry lacks id/name", f"entry {k} of 'categories'", "add the two fields")
            cats[c["id"]] = c  # a repeated id: the last entry wins, as in pycocotools
        self.cat_ids = sorted(cats)
        if not self.cat_ids:
            raise _error(jp, "no categories", "'categories' is empty or missing",
                         "list the classes under 'categories'")
        self.categories = [cats[c] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self.class_names = [c["name"] for c in self.categories]
        label_of = {c: i for i, c in enumerate(self.cat_ids)}  # COCO category id -> contiguous label

        imgs = {}
        for k, info in enumerate(js.get("images") or []):
            # integer ids: the targets' image_id is an int, and COCOeval matches results by it
            if not (isinstance(info, dict) and isinstance(info.get("id"), int)):
                raise _error(jp, "image entry lacks an integer id", f"entry {k} of 'images'", "give every image a unique id")
            imgs[info["id"]] = info

        # every annotation is checked, also those of images that end up skipped: a wrong category id
        # means the json and the category list disagree, which would silently corrupt the labels
        anns = js.get("annotations") or []
        a_img, a_label, a_crowd, a_bbox = [], [], [], []
        for k, ann in enumerate(anns):
            if not isinstance(ann, dict):
                raise _error(jp, "annotation is not an object", f"entry {k} of 'annotations'", "re-export the file")
            aid = ann.get("id")
            if ann.get("category_id") not in label_of:
                raise _error(jp, f"category_id {ann.get('category_id')} is not in 'categories'",
                             f"annotation id {aid}", "add the category or remove the annotation")
            if ann.get("image_id") not in imgs:
                raise _error(jp, f"image_id {ann.get('image_id')} is not in 'images'",
                             f"annotation id {aid}", "add the image entry or remove the annotation")
            if not (isinstance(ann.get("bbox"), (list, tuple)) and len(ann["bbox"]) == 4):
                raise _error(jp, "bbox is not [x, y, w, h]", f"annotation id {aid}",
                             "write the box as four numbers")
            if aid is None:  # pycocotools indexes annotations by id: evaluation would fail on this file
                raise _error(jp, "annotation lacks an id", f"entry {k} of 'annotations'",
                             "give every annotation a unique id")
            a_img.append(ann["image_id"])
            a_label.append(label_of[ann["category_id"]])
            a_crowd.append(bool(ann.get("iscrowd", 0)))
            a_bbox.append(ann["bbox"])
        try:
            bbox = np.array(a_bbox, np.float64).reshape(-1, 4)  # (A, 4) xywh; null -> NaN, a bad box below
        except (TypeError, ValueError):  # a value that is not a number: name the first such annotation
            for k, ann in enumerate(anns):
                try:
                    [float(v) for v in ann["bbox"]]
                except (TypeError, ValueError):
                    raise _error(jp, "bbox is not [x, y, w, h]", f"annotation id {ann['id']}",
                                 "write the box as four numbers") from None
            raise
        del a_bbox

        img_ids = sorted(imgs)
        for img_id in img_ids:
            info = imgs[img_id]
            if "file_name" not in info or "width" not in info or "height" not in info:
                raise _error(jp, "image entry lacks file_name/width/height", f"image id {img_id}",
                             "add the three fields")
        # which files exist: one listing per folder (file names may hold subfolders)
        listings, present, first_missing = {}, np.zeros(len(img_ids), bool), None
        for p, img_id in enumerate(img_ids):
            path = os.path.join(self.image_dir, imgs[img_id]["file_name"])
            folder, name = os.path.split(path)
            if folder not in listings:
                listings[folder] = _files_in(folder)
            files = listings[folder]
            present[p] = name in files if files is not None else os.path.isfile(path)
            if not present[p] and first_missing is None:
                first_missing = path
        size = np.array([(int(imgs[i]["height"]), int(imgs[i]["width"])) for i in img_ids], np.int64).reshape(-1, 2)

        # boxes: xywh -> xyxy clipped to the image, in float64 as the checks; NaN fails the check too
        pos = np.searchsorted(np.array(img_ids, np.int64), np.array(a_img, np.int64))  # (A,) image position
        H, W = size[pos, 0].astype(np.float64), size[pos, 1].astype(np.float64)          # (A,)
        x0 = np.minimum(np.maximum(bbox[:, 0], 0.0), W)
        y0 = np.minimum(np.maximum(bbox[:, 1], 0.0), H)
        x1 = np.minimum(np.maximum(bbox[:, 0] + bbox[:, 2], 0.0), W)
        y1 = np.minimum(np.maximum(bbox[:, 1] + bbox[:, 3], 0.0), H)
        crowd, on_disk = np.array(a_crowd, bool).reshape(-1), present[pos]  # counts cover existing files only
        valid = (x1 - x0 > 0) & (y1 - y0 > 0)  # empty, negative or outside the image fail
        good = on_disk & ~crowd & valid
        n_boxes = np.bincount(pos[good], minlength=len(img_ids))            # (images,)
        kept = present & (n_boxes > 0) if self.train else present
        # the kept boxes grouped by image in id order, in json order within an image (stable sort)
        sel = np.flatnonzero(good & kept[pos])
        sel = sel[np.argsort(pos[sel], kind="stable")]                      # (M,) positions in 'annotations'
        kp = np.flatnonzero(kept)                                           # (n,) kept image positions

        self._ids = np.array(img_ids, np.int64)[kp]
        self._sizes = size[kp]
        self._names, self._name_off = _pack_strings([imgs[img_ids[p]]["file_name"] for p in kp])
        self._box_off = np.concatenate([[0], np.cumsum(n_boxes[kp])]).astype(np.int64)
        self._boxes = np.stack([x0, y0, x1, y1], 1)[sel].astype(np.float32).reshape(-1, 4)
        self._labels = np.array(a_label, np.int64)[sel] if len(sel) else np.zeros(0, np.int64)
        self._ann_index = sel.astype(np.int64)
        if self.with_masks and self.mask_fraction > 0:  # some masks, many boxes
            self._has_mask = keep_masks(anns, sel, self.mask_fraction, self.mask_seed)
            self._segs, self._seg_off = _pack_strings(
                [json.dumps(anns[k]["segmentation"], separators=(",", ":")) if m else ""
                 for k, m in zip(sel.tolist(), self._has_mask.tolist())])
        elif self.with_masks:
            texts = []
            for k in sel.tolist():
                if anns[k].get("segmentation") is None:
                    raise _error(jp, "annotation has no segmentation", f"annotation id {anns[k]['id']}",
                                 "use a json with masks, or a box-supervised method")
                texts.append(json.dumps(anns[k]["segmentation"], separators=(",", ":")))
            self._segs, self._seg_off = _pack_strings(texts)
        return (int((~present).sum()), first_missing, int((present & ~kept).sum()),
                int((on_disk & ~crowd & ~valid).sum()), int((on_disk & crowd).sum()))

    @property
    def coco(self):
        """pycocotools' COCO of the json (COCOeval, GT pictures), parsed on first access and kept. Training
        never reads it: on COCO train it would hold ~2.5 GB in every process."""
        if self._coco is None:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                self._coco = COCO(self.json_path)
        return self._coco

    def __len__(self):
        return len(self._ids)

    def image_path(self, i):
        return os.path.join(self.image_dir, _unpack_string(self._names, self._name_off, i))

    def record(self, i):
        """Image i's entry: dict(path, size (H0, W0), boxes float32 (N, 4) xyxy in the image's frame,
        labels int64 (N,)); boxes and labels are views of the index: read, do not modify."""
        a, b = self._box_off[i], self._box_off[i + 1]
        H0, W0 = self._sizes[i].tolist()
        return dict(path=self.image_path(i), size=(H0, W0), boxes=self._boxes[a:b], labels=self._labels[a:b])

    def annotations(self, i):
        """The json's annotation dicts behind image i's boxes, in the same order (from `coco`)."""
        a, b = self._box_off[i], self._box_off[i + 1]
        anns = self.coco.dataset["annotations"]
        return [anns[k] for k in self._ann_index[a:b].tolist()]

    def _masks(self, i):
        """GT masks of image i at its json size: uint8 (N, H0, W0)."""
        H0, W0 = self._sizes[i].tolist()
        a, b = self._box_off[i], self._box_off[i + 1]
        return np.stack([_segmentation_mask(_unpack_string(self._segs, self._seg_off, k), H0, W0) for k in range(a, b)])

    def _load_image(self, i):
        """Image i decoded in full, as a PIL RGB image. DataError if the file cannot be read or its size is
        not the json's; the error's `reason` attribute is '<path>: <reason>'."""
        path, img_id = self.image_path(i), int(self._ids[i])
        H0, W0 = self._sizes[i].tolist()
        problem, fix = None, f"replace the file or remove image id {img_id} from {self.json_path}"
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError or ValueError depending on the damage
            problem, cause = _open_problem(e), e
        else:
            problem, cause = _size_problem(img.height, img.width, H0, W0), None
            fix = "fix width/height in the json or the file"
        if problem is None:
            return img
        err = _error(path, problem, f"image id {img_id}", fix)
        err.reason = f"{path}: {problem}"
        raise err from cause

    def _load_readable(self, i):
        """Training: image i, or if it cannot be read (truncated, corrupt, gone since the json was
        checked) the next readable one: hours into a COCO run an unreadable file costs one image, not
        the run. Nothing is printed (from a worker, every epoch, it would repeat): the paths skipped come
        back, and train.py counts them and names each once. An index that failed is remembered and not
        decoded again by this process (the loader's workers are persistent).
        -> ((PIL image, index used), [skipped paths])."""
        skipped = []
        for _ in range(len(self)):
            if i not in self._unreadable:
                try:
                    return (self._load_image(i), i), skipped
                except DataError:
                    self._unreadable.add(i)
            skipped.append(self.image_path(i))
            i = (i + 1) % len(self)
        raise _error(self.json_path, "no training image can be read", f"{len(self)} images",
                     "check the image folder")

    def _placeholder(self, i, reason):
        """Evaluation's stand-in for an unreadable image i: a black 32x32 image, no boxes, and
        target['unreadable'] = reason, so that the evaluation goes on and can name the file."""
        target = dict(boxes=torch.zeros((0, 4)), labels=torch.zeros((0,), dtype=torch.int64),
                      image_id=int(self._ids[i]), orig_size=tuple(self._sizes[i].tolist()), size=(32, 32),
                      unreadable=reason)
        if self.with_masks:
            target["masks"] = torch.zeros((0, 32, 32), dtype=torch.uint8)
        return torch.zeros((3, 32, 32), dtype=torch.uint8), target

    def check_images(self, max_workers=8):
        """['<path>: <reason>'] for every image that cannot be opened: file missing, not an image, a
        damaged header, or a size other than the json's. Reads only the headers (PIL's Image.open), in
        threads (the time is file-system latency): about a second for COCO val's 5k images. Damage after
        the header shows only when the image is decoded (training then skips it, evaluation scores it
        as unreadable). Images whose file was missing when the dataset was built are not in it
        (self.skipped['missing_files'] counts them)."""
        def problem(i):
            path = self.image_path(i)
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception as e:
                return f"{path}: {_open_problem(e)}"
            p = _size_problem(h, w, *self._sizes[i].tolist())
            return p and f"{path}: {p}"

        with ThreadPoolExecutor(max_workers) as pool:
            return [p for p in pool.map(problem, range(len(self))) if p]

    def __getitem__(self, i):
        """i: an index, or (index, shorter side, flip) from TrainBatchSampler (the training loader's
        draws; (index, shorter side) draws the flip here)."""
        i, short, flip = (tuple(i) + (None,))[:3] if isinstance(i, tuple) else (i, None, None)
        skipped = []
        if self.train:
            (img, i), skipped = self._load_readable(i)
        else:
            try:
                img = self._load_image(i)
            except DataError as e:
                return self._placeholder(i, e.reason)
        rec = self.record(i)
        H0, W0 = rec["size"]
        if short is None:
            short = random.choice(self.min_sizes) if self.train else self.min_sizes[0]
        h, w = resize_shape(H0, W0, short, self.max_size)
        # PIL bilinear antialiases when shrinking, like detectron2's ResizeTransform on uint8 images
        img = img.resize((w, h), Image.BILINEAR)
        image = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, h, w) uint8
        boxes = torch.from_numpy(rec["boxes"]) * torch.tensor([w / W0, h / H0, w / W0, h / H0])  # (N, 4)
        target = dict(boxes=boxes, labels=torch.from_numpy(rec["labels"]).clone(), image_id=int(self._ids[i]),
                      orig_size=(H0, W0), size=(h, w))
        if self.with_masks:
            target["masks"] = torch.zeros((0, h, w), dtype=torch.uint8)  # (0, h, w): interpolate rejects N = 0
            if len(rec["boxes"]):
                masks = torch.from_numpy(self._masks(i))  # (N, H0, W0)
                # nearest-exact samples at pixel centres (as PIL NEAREST); 'nearest' shifts by half a pixel
                target["masks"] = torch.nn.functional.interpolate(
                    masks[None], size=(h, w), mode="nearest-exact")[0]  # (N, h, w) uint8
            if self.mask_fraction > 0:  # which objects train from their mask (the others from their box)
                target["has_mask"] = torch.from_numpy(self._has_mask[self._box_off[i]:self._box_off[i + 1]].copy())
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


def to_device(images, targets, device):
    """A batch onto the training device: the images and every tensor of the targets (non_blocking: from
    pinned memory the copy overlaps the step)."""
    images = images.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


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

    group_by_aspect: every batch holds only landscape (w >= h) or only portrait images (aspect_ratios: w / h
    per dataset index), as detectron2's AspectRatioGroupedDataset makes them: a batch is padded to its
    largest height and largest width, so one landscape and one portrait COCO image pad to a square (~40%
    of random 2-image batches). The grouping runs on the epoch's order before the split over ranks, so
    that every rank gets the same number of batches in every epoch (data.infinite and an exact resume
    count on it): `sampler` must then be a DistributedSampler, whose permutation of the whole dataset
    for the epoch (seed + epoch) is read image by image into two buckets; a bucket that reaches
    batch_size becomes the epoch's next batch, and rank r takes batches r, r + world, ... An epoch has
    (n_landscape // batch_size + n_portrait // batch_size) // world batches per rank; the images left in
    a partly filled bucket sit out that epoch.
    """

    def __init__(self, sampler, batch_size, min_sizes, scale_per_batch=True, hflip_prob=0.5, seed=0,
                 group_by_aspect=False, aspect_ratios=None):
        self.sampler, self.batch_size, self.min_sizes = sampler, batch_size, tuple(min_sizes)
        self.scale_per_batch, self.hflip_prob, self.seed = scale_per_batch, hflip_prob, seed
        self.group_by_aspect = group_by_aspect
        if group_by_aspect:
            # bucket 0: landscape or square, 1: portrait (a list of ints: read once per image per epoch)
            self.portrait = [int(a < 1) for a in aspect_ratios]
            assert len(self.portrait) == len(sampler.dataset), "one aspect ratio per dataset image"
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """Epoch `epoch` next, from its batch `start` on (0: all of it)."""
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def _batches(self):
        """This rank's batches of the epoch, [index] each: consecutive images of the sampler's order."""
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []

    def _grouped_batches(self):
        """This rank's batches of the epoch with group_by_aspect: [[index]], each of one orientation."""
        s = self.sampler
        g = torch.Generator().manual_seed(s.seed + self.epoch)  # the epoch's permutation, as DistributedSampler draws it
        buckets, batches = ([], []), []
        for i in torch.randperm(len(s.dataset), generator=g).tolist():
            bucket = buckets[self.portrait[i]]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        return batches[s.rank::s.num_replicas][:len(self)]  # the same count on every rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.batch_size
        batches = self._grouped_batches() if self.group_by_aspect else self._batches()
        for k, batch in enumerate(batches):
            # drawn for every batch, also the skipped ones: batch k's draws do not depend on `start`
            scales = torch.randint(len(self.min_sizes), (1 if self.scale_per_batch else n,), generator=g)
            flips = torch.rand(n, generator=g) < self.hflip_prob
            if k >= self.start:
                yield [(j, self.min_sizes[int(scales[0 if self.scale_per_batch else m])], bool(flips[m]))
                       for m, j in enumerate(batch)]

    def __len__(self):
        if self.group_by_aspect:
            n_portrait = sum(self.portrait)
            n_landscape = len(self.portrait) - n_portrait
            return (n_landscape // self.batch_size + n_portrait // self.batch_size) // self.sampler.num_replicas
        return len(self.sampler) // self.batch_size


def make_loader(dataset, batch_size, train, num_workers=2, distributed=False, seed=0, scale_per_batch=False,
                group_by_aspect=False, pin_memory=False):
    """DataLoader with the repo's collate. train: shuffled, drop_last, TrainBatchSampler (the image order,
    scales and flips drawn per epoch from `seed`; scale_per_batch: one training scale per batch;
    group_by_aspect: batches of landscape or of portrait images only, from dataset.aspect_ratios); eval:
    in order. pin_memory: batches in page-locked memory, for asynchronous copies to a GPU.

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
        batch_sampler = TrainBatchSampler(sampler, batch_size, dataset.min_sizes, scale_per_batch, dataset.hflip_prob,
                                          seed + 1000 * rank, group_by_aspect,
                                          dataset.aspect_ratios if group_by_aspect else None)
        if len(batch_sampler) == 0:
            n_portrait = sum(batch_sampler.portrait)
            raise _error(getattr(dataset, "json_path", "training set"),
                         f"no batch of {batch_size} images of one orientation for each of {world} ranks",
                         f"{len(dataset) - n_portrait} landscape, {n_portrait} portrait images",
                         "lower --batch_size, add images or train without aspect grouping")
        batching = dict(batch_sampler=batch_sampler)
    else:
        sampler = (torch.utils.data.DistributedSampler(dataset, shuffle=False) if distributed else
                   torch.utils.data.SequentialSampler(dataset))
        batching = dict(batch_size=batch_size, sampler=sampler, drop_last=False)
    # its own generator: starting an epoch's iterator (it draws the workers' base seed) leaves the global RNG alone
    return torch.utils.data.DataLoader(dataset, **batching, collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, pin_memory=pin_memory,
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
# where a run's data lies

# data_root's files per dataset (relative to data_root). VOC: the SBD-augmented VOC 2012 train split
# (10,582 images) and the VOC 2012 val split (1,449) in COCO format, as BoxInst and SIM train and test
# on it; README.md says how to make the two json files.
DATA_LAYOUTS = {
    "coco": dict(train_json="annotations/instances_train2017.json", train_images="train2017",
                 val_json="annotations/instances_val2017.json", val_images="val2017"),
    "voc": dict(train_json="annotations/voc_2012_train_aug_cocostyle.json", train_images="JPEGImages",
                val_json="annotations/voc_2012_val_cocostyle.json", val_images="JPEGImages"),
}


def dataset_paths(cfg, need=("train_json", "train_images", "val_json", "val_images")):
    """The json/image paths of cfg: those given, else data_root's (DATA_LAYOUTS), else the embedded
    synthetic dataset's (generated on first use). Only the `need`ed paths are checked to exist."""
    given = {k: cfg[k] for k in ("train_json", "train_images", "val_json", "val_images")}
    if cfg["data_root"]:
        if cfg["dataset"] not in DATA_LAYOUTS:
            raise SystemExit(f"data.py: --dataset={cfg['dataset']!r} is not a layout — fix: one of {', '.join(DATA_LAYOUTS)}")
        paths = {k: given[k] or os.path.join(cfg["data_root"], v) for k, v in DATA_LAYOUTS[cfg["dataset"]].items()}
        for k in need:
            p = paths[k]
            if not (os.path.isfile(p) if k.endswith("json") else os.path.isdir(p)):
                raise SystemExit(f"data.py: {p} not found (--data_root={cfg['data_root']}, --dataset={cfg['dataset']}) "
                                 f"— fix: put the {cfg['dataset'].upper()} {k} there (layout: data.DATA_LAYOUTS), or "
                                 f"pass --{k}=PATH")
        return paths
    if cfg["train_json"]:
        return given
    try:
        return synthetic.ensure_synthetic(cfg["synthetic_root"], low_contrast_bg=cfg["synthetic_low_contrast"],
                                          min_visible_frac=cfg["synthetic_min_visible"])
    except FileExistsError as e:  # synthetic_root holds something else: bad input, one line (DataError)
        raise DataError(str(e)) from None


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


def save_atomic(obj, path):
    """torch.save through write_atomic: a crash or kill -9 mid-write never loses the previous checkpoint."""
    write_atomic(path, lambda f: torch.save(obj, f))
