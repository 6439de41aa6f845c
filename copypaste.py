"""
Online weakly-supervised copy-paste (SIM, Sec. 3.3 and supplement, Eq. 9 and 11).

A FIFO bank keeps recent training images with the teacher's pseudo masks and Eq. (11) scores. Once
it is full, with probability `prob` per image one entry is drawn, a few of its objects by importance
sampling (score^3), and their pixels pasted at their original positions (no scaling or blending).
Covered objects shrink or vanish; pasted ones are appended with 'pasted' = True and their pseudo
masks as 'paste_masks' (Eq. 9's targets). The bank lives on the CPU, one per DDP rank (as official).

Boxes and masks follow box_ops.py's end-exclusive convention (box -> mask -> box is the identity
for integer boxes).
"""

import collections

import torch
import torch.nn.functional as F

from box_ops import box_iou_pairs, box_masks_exclusive, masks_to_boxes

# Deliberate storage placement: bank entries are kept in host memory, not on the accelerator.
BANK_DEVICE = torch.device('cpu')
# Per-object fields of a target dict; all are filtered together when objects are removed.
PER_OBJECT_KEYS = ('boxes', 'labels', 'masks', 'pasted', 'paste_masks')

# -----------------------------------------------------------------------------
# the Eq. (11) score and what enters the bank

def object_scores(mask_probs, pseudo_masks):
    """Eq. (11): s_k = sum_i M_k(i) * M̂_k(i) / (sum_i M̂_k(i) + 1).

    mask_probs (N, H, W) teacher mask probability M_k, pseudo_masks (N, H, W) binary M̂_k.
    The mean probability inside the pseudo mask, shrunk towards 0 for tiny masks; 0 if empty.
    """
    m = pseudo_masks.float()  # (N, H, W)
    return (mask_probs.float() * m).flatten(1).sum(1) / (m.flatten(1).sum(1) + 1)  # (N,)


def bank_entry_from_teacher(image, boxes, labels, mask_probs, size, thresh=0.7, stride=4, min_box_iou=0.0):
    """Bank entry of one image from the teacher: dict(image, boxes, labels, masks, scores).

    image uint8 (3, h, w) unpadded; boxes (N, 4); labels (N,); mask_probs (N, Hp/s, Wp/s) the
    teacher's mask probability per object at the mask-out stride s; size (h, w). Pseudo mask =
    [prob upsampled x s > thresh] in the box; Eq. (11) score; empty masks dropped. For bank.push(**entry).
    min_box_iou > 0: nanoSIM's quality gate (box_quality_gate).
    """
    h, w = size
    # bilinear (align_corners=False) then threshold, as the official code: a smooth outline rather
    # than the s x s blocks of nearest up-sampling; the stride-s cell i covers pixels s*i..s*i+s-1
    probs = F.interpolate(mask_probs[:, None].float(), scale_factor=stride, mode='bilinear',
                          align_corners=False)[:, 0, :h, :w]  # (N, h, w)
    masks = (probs > thresh) & box_masks_exclusive(boxes, h, w)  # (N, h, w)
    scores = object_scores(probs, masks)  # (N,)
    keep = masks.flatten(1).any(1)  # (N,)
    if min_box_iou > 0:
        scores, ok = box_quality_gate(masks, boxes, scores, min_box_iou)
        keep = keep & ok
    return dict(image=image, boxes=boxes[keep], labels=labels[keep], masks=masks[keep],
                scores=scores[keep])


def box_quality_gate(masks, boxes, scores, min_iou=0.8):
    """nanoSIM's gate on what enters the bank: IoU of each pseudo mask's tight box with the object's GT
    box (pixel-aligned outwards) -> (scores * IoU, IoU >= min_iou). Why: a pasted object's box is its
    mask's tight box and trains the detector as a GT box (BENCHMARKS.md, Decisions)."""
    gt = torch.cat([boxes[:, :2].floor(), boxes[:, 2:].ceil()], 1).clamp(min=0)  # (N, 4) pixel-aligned
    iou = box_iou_pairs(masks_to_boxes(masks), gt)  # (N,)
    return scores * iou, iou >= min_iou


# -----------------------------------------------------------------------------
# the memory bank

class MemoryBank:
    """FIFO of the `capacity` most recent images with pseudo masks and Eq. (11) scores.

    One entry per image (the official code's shared-dict bug, which stores the last image of a
    batch repeatedly, is not reproduced). Contents stay on the CPU; one bank per DDP rank.
    """

    def __init__(self, capacity=100):
        self.capacity = capacity
        self.entries = collections.deque(maxlen=capacity)  # appending to a full deque drops the oldest

    def __len__(self):
        return len(self.entries)

    @property
    def full(self):
        return len(self.entries) == self.capacity

    def push(self, image, boxes, labels, masks, scores):
        """Store one image: uint8 (3, h, w) unpadded, boxes (N, 4), labels (N,), masks bool
        (N, h, w) full-resolution pseudo masks, scores (N,). Objects with an empty mask are
        dropped; an image with no object left is not stored."""
        assert masks.shape[1:] == image.shape[1:], 'pseudo masks must match the unpadded image'
        keep = masks.flatten(1).any(1).to(BANK_DEVICE)  # (N,)
        if not keep.any():
            return
        # copy=True: the bank must not alias tensors the caller may modify in place later
        store = lambda t, dtype: t.detach().to(BANK_DEVICE, dtype, copy=True)
        self.entries.append(dict(
            image=store(image, torch.uint8),  # (3, h, w)
            boxes=store(boxes, torch.float32)[keep],  # (N, 4)
            labels=store(labels, torch.int64)[keep],  # (N,)
            masks=store(masks, torch.bool)[keep],  # (N, h, w)
            scores=store(scores, torch.float32)[keep],  # (N,)
        ))

    def sample(self, generator=None):
        """One entry (dict of CPU tensors), chosen uniformly; `generator` is a CPU generator."""
        i = torch.randint(len(self.entries), (), generator=generator).item()
        return self.entries[i]

    def state_dict(self):
        # saved with the checkpoint so a resumed run sees the same bank (per rank: each rank's bank differs)
        return {'capacity': self.capacity, 'entries': list(self.entries)}

    def load_state_dict(self, state):
        # the configured capacity wins; if it shrank, the most recent entries are kept
        entries = [{k: v.to(BANK_DEVICE) for k, v in e.items()} for e in state['entries']]
        self.entries = collections.deque(entries, maxlen=self.capacity)

# -----------------------------------------------------------------------------
# importance sampling and pasting

def sample_objects(scores, generator=None, max_n=3, power=3, replacement=False):
    """Indices of the objects to paste, in paste order.

    n = clamp(floor(0.5 * N), 1, max_n) (the official code; the paper says a quarter) drawn with
    probability ~ score^power. Without replacement by default (the paper's "a subset"); replacement=True
    is the official code. All scores 0: uniform; n never exceeds the objects with a non-zero score.
    """
    weights = scores.float().clamp(min=0) ** power  # (N,)
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)
    n = min(max(len(scores) // 2, 1), max_n)
    if not replacement:
        n = min(n, int((weights > 0).sum()))
    return torch.multinomial(weights, n, replacement=replacement, generator=generator)  # (n,)


def _fit(t, h, w):
    """Crop or zero-pad the last two dims of t to (h, w), anchored top-left."""
    out = t.new_zeros(*t.shape[:-2], h, w)
    hh, ww = min(h, t.shape[-2]), min(w, t.shape[-1])
    out[..., :hh, :ww] = t[..., :hh, :ww]
    return out


def with_paste_fields(target, size):
    """Shallow copy of target with 'pasted' bool (N,) False, 'paste_masks' float (N, h, w) zeros and
    'paste_area' bool (h, w) False (every pasted pixel) added where missing, so every target of a
    batch carries the fields."""
    t = dict(target)
    n, dev = len(t['boxes']), t['boxes'].device
    if 'pasted' not in t:
        t['pasted'] = torch.zeros(n, dtype=torch.bool, device=dev)
    if 'paste_masks' not in t:
        t['paste_masks'] = torch.zeros(n, *size, device=dev)
    if 'paste_area' not in t:
        t['paste_area'] = torch.zeros(*size, dtype=torch.bool, device=dev)
    return t


def paste(image, target, entry, idx, size):
    """Paste objects `idx` of bank `entry` onto one padded batch slot; returns (image, target).

    image uint8 (3, Hp, Wp), valid region size = (h, w); target dict as the data pipeline makes it;
    entry a bank dict; idx (n,) object indices in paste order (later objects cover earlier ones).
    Objects keep their absolute pixel position; source pixels outside the valid (h, w) region
    are dropped, and the padding of the current slot stays untouched.
    """
    h, w = size
    dev, ann_dev = image.device, target['boxes'].device
    target = with_paste_fields(target, size)

    # pasted objects' masks in the current frame, and the part of each that stays visible
    src_masks = _fit(entry['masks'][idx.to(entry['masks'].device)].to(dev), h, w)  # (n, h, w)
    covers = src_masks.flip(0).int().cumsum(0).flip(0) - src_masks.int()  # (n, h, w) # later objects on each pixel
    visible_new = src_masks & (covers == 0)  # (n, h, w)
    alpha = src_masks.any(0)  # (h, w) # every pasted pixel

    # image: hard copy of the source pixels where alpha, the current image elsewhere
    src = _fit(entry['image'].to(dev), h, w)  # (3, h, w)
    out = image.clone()  # (3, Hp, Wp)
    out[:, :h, :w] = torch.where(alpha, src, image[:, :h, :w])  # (3, h, w)

    # existing objects: their box mask loses the pasted pixels; the new box is the tight box of
    # the remainder intersected with the old box, so sub-pixel edges that were not covered (and
    # every object the paste does not touch) keep their exact float coordinates
    boxes = target['boxes'].to(dev)  # (N, 4)
    remaining = box_masks_exclusive(boxes, h, w) & ~alpha  # (N, h, w)
    tight = masks_to_boxes(remaining)  # (N, 4)
    old_boxes = torch.cat([torch.maximum(boxes[:, :2], tight[:, :2]),
                           torch.minimum(boxes[:, 2:], tight[:, 2:])], 1)  # (N, 4)
    keep_old = remaining.flatten(1).any(1)  # (N,)
    keep_new = visible_new.flatten(1).any(1)  # (n,) # empty after the crop or hidden by a later paste

    out_t = dict(target)
    cat = lambda a, b: torch.cat([a.to(ann_dev), b.to(ann_dev)])
    out_t['boxes'] = cat(old_boxes, masks_to_boxes(visible_new)).to(target['boxes'].dtype)  # (N + n, 4)
    out_t['labels'] = cat(target['labels'], entry['labels'][idx.to(entry['labels'].device)])  # (N + n,)
    out_t['pasted'] = cat(target['pasted'], torch.ones_like(keep_new))  # (N + n,)
    # paste masks are the visible pseudo masks: earlier pasted objects (including any from an
    # earlier paste of this target) lose what a later paste covers
    old_pm = target['paste_masks'].to(dev) * ~alpha  # (N, h, w)
    out_t['paste_masks'] = cat(old_pm, visible_new.float())  # (N + n, h, w)
    # the pixels that now show a pasted object: out of every other object's box in the losses
    out_t['paste_area'] = (target['paste_area'].to(dev) | alpha).to(ann_dev)  # (h, w)
    if 'masks' in target:  # GT masks (method=full): occluded the same way; pasted objects bring their pseudo masks
        old_m = target['masks'].to(dev) * ~alpha  # (N, h, w)
        out_t['masks'] = cat(old_m, visible_new.to(old_m.dtype))  # (N + n, h, w)
    keep = cat(keep_old, keep_new)  # (N + n,)
    for k in PER_OBJECT_KEYS:
        if k in out_t:
            out_t[k] = out_t[k][keep]
    return out, out_t


def copy_paste_batch(images, targets, bank, prob=0.5, generator=None, max_n=3, replacement=False):
    """Online copy-paste over a batch: images uint8 (B, 3, Hp, Wp), targets list of dicts.

    Each image on its own (official: once per batch): if the bank is full and a draw < prob, paste
    sampled objects of a random entry. Every target gets the paste fields; inputs are not modified.
    """
    out_images = images.clone()  # (B, 3, Hp, Wp)
    out_targets = []
    for b, t in enumerate(targets):
        t = with_paste_fields(t, t['size'])
        if bank.full and torch.rand((), generator=generator).item() < prob:
            entry = bank.sample(generator)
            idx = sample_objects(entry['scores'], generator, max_n=max_n, replacement=replacement)
            out_images[b], t = paste(images[b], t, entry, idx, t['size'])
        out_targets.append(t)
    return out_images, out_targets
