"""
Online weakly-supervised copy-paste (SIM, Sec. 3.3 and supplement, Eq. 9 and 11).

A FIFO bank keeps recent training images with the teacher's pseudo masks and Eq. (11) scores. Once
it is full, with probability `prob` per image one entry is drawn, a few of its objects by importance
sampling (score^3), and their pixels pasted at their original positions (no scaling or blending).
Covered objects shrink or vanish; pasted ones are appended with 'pasted' = True and their pseudo
masks as 'paste_masks' (Eq. 9's targets). The bank lives on the CPU, one per DDP rank (as official).

Cost at COCO scale (800 x 1333, up to 60 objects): nothing here builds a full-size map per object.
The bank keeps each pseudo mask as a crop (its tight box), the teacher's entry is upsampled inside each
box only, 'paste_masks' holds rows for the pasted objects only (bool), and paste() works in the window
the pasted crops reach, updating the other objects' boxes from row and column counts of that window.

Boxes and masks follow box_ops.py's end-exclusive convention (box -> mask -> box is the identity
for integer boxes).
"""

import collections
import math

import torch
import torch.nn.functional as F

from box_ops import box_iou_pairs, host_to_device, masks_to_boxes, size_groups
from losses import box_windows

# Deliberate storage placement: bank entries are kept in host memory, not on the accelerator.
BANK_DEVICE = torch.device('cpu')
# Per-object fields of a target dict; all are filtered together when objects are removed. 'paste_masks'
# has a row per PASTED object only (with_paste_fields) and is filtered with those rows (paste).
PER_OBJECT_KEYS = ('boxes', 'labels', 'masks', 'pasted', 'has_mask')

# -----------------------------------------------------------------------------
# the Eq. (11) score and what enters the bank

def object_scores(mask_probs, pseudo_masks, plus_one=True):
    """Eq. (11): s_k = sum_i M_k(i) * M̂_k(i) / sum_i M̂_k(i), the mean probability inside the pseudo
    mask (the supplement: "the averaged mask score"; plus_one=False), or with plus_one (the official
    code, docs/official_code.md §7.2) / (sum_i M̂_k(i) + 1), which shrinks tiny masks' scores towards 0.
    mask_probs (N, H, W) mask probability M_k, pseudo_masks (N, H, W) binary M̂_k -> (N,); 0 if empty.
    """
    m = pseudo_masks.float()  # (N, H, W)
    n = m.flatten(1).sum(1)  # (N,)
    return (mask_probs.float() * m).flatten(1).sum(1) / (n + 1 if plus_one else n.clamp(min=1))  # (N,)


def box_pixel_windows(boxes, h, w):
    """The pixels of each box's end-exclusive mask (box_masks_exclusive) within an (h, w) image, as windows:
    long (N, 4) x0, y0, x1, y1, end-exclusive; x1 <= x0 or y1 <= y0 for a box that misses the image."""
    x0, y0 = boxes[:, 0].floor(), boxes[:, 1].floor()  # (N,), (N,)
    x1 = torch.maximum(boxes[:, 2].ceil(), x0 + 1)  # (N,)
    y1 = torch.maximum(boxes[:, 3].ceil(), y0 + 1)  # (N,)
    lim = host_to_device([w, h, w, h], boxes.device, boxes.dtype)  # (4,)
    return torch.minimum(torch.stack([x0, y0, x1, y1], 1).clamp(min=0), lim).long()  # (N, 4)


def source_cells(a, b, n, stride):
    """The cells [lo, hi) of an n-cell map that bilinear upsampling by `stride` (align_corners=False) reads
    for output pixels a .. b-1: pixel i reads cell floor(max((i + 0.5) / s - 0.5, 0)) and the next."""
    lo = max(math.floor((a + 0.5) / stride - 0.5), 0)
    return lo, min(max(math.floor((b - 0.5) / stride - 0.5), 0) + 2, n)


def to_host_at_once(parts):
    """[(tensor, dtype)] -> the tensors as those dtypes in new memory on the bank's device (the CPU), in
    one transfer: their bytes packed into one buffer on their device (widest types first, so each view
    back is aligned), then copied apart on the host. Why: a copy to the host waits for the GPU, once per copy."""
    flat = [t.detach().reshape(-1).to(dtype) for t, dtype in parts]
    order = sorted(range(len(flat)), key=lambda i: -flat[i].element_size())
    raw = torch.cat([flat[i].view(torch.uint8) for i in order]).to(BANK_DEVICE)  # (bytes,) new memory
    out, at = [None] * len(parts), 0
    for i in order:
        n = flat[i].numel() * flat[i].element_size()
        out[i] = raw[at:at + n].view(flat[i].dtype).view(parts[i][0].shape).clone()  # torch.save refuses one
        at += n                                                                            # storage seen as 2 dtypes
    return out


def host_windows(boxes, dtype, h, w):
    """box_pixel_windows of boxes given as host lists (N x 4 numbers of `dtype`) -> N host tuples
    (x0, y0, x1, y1), empty (x1 = x0 or y1 = y0) for a box off the image. All on the host."""
    win = box_pixel_windows(torch.tensor(boxes, dtype=dtype).view(-1, 4), h, w)  # (N, 4)
    return [(x0, y0, max(x1, x0), max(y1, y0)) for x0, y0, x1, y1 in win.tolist()]


def bank_entry_from_teacher(image, boxes, labels, mask_probs, size, thresh=0.7, stride=4, min_box_iou=0.0,
                            score_probs=None, plus_one=True, boxes_host=None):
    """Bank entry of one image from the teacher: dict(image, boxes, labels, masks, mask_xy, scores).

    image uint8 (3, h, w) unpadded; boxes (N, 4); labels (N,); mask_probs (N, Hp/s, Wp/s) the
    teacher's mask probability per object at the mask-out stride s; size (h, w). Pseudo mask =
    [prob upsampled x s > thresh] in the box; Eq. (11) score; empty masks dropped. For bank.push(**entry):
    masks a list of bool crops, each its mask's tight box, mask_xy (N, 2) their top-left (x, y).
    min_box_iou > 0: nanoSIM's quality gate (box_quality_gate). score_probs (N, Hp/s, Wp/s): the
    probabilities Eq. (11) averages over each mask (default mask_probs; the paper's bank masks are M_hat,
    scored by the instance map); plus_one: object_scores' official denominator. boxes_host: the
    boxes as host lists when the caller has read them already (the windows need them on the host).
    Each object is upsampled inside its box only, objects of similar size together in one window size
    (box_ops.size_groups): the cost of the boxes' pixels, not of N full-resolution maps; one host read
    of the boxes. The same numbers as upsampling whole maps for a power-of-2 stride (2, 4:
    test_copypaste): a window of cells that starts at cell c0 at or before the box's first source cell
    and ends after its last (or at the map's edge) gives its pixel i - c0 * s the source coordinate of
    pixel i minus c0, exactly in binary, and reads the same two cells.
    """
    h, w = size
    H, W = mask_probs.shape[-2:]
    # bilinear (align_corners=False) then threshold, as the official code: a smooth outline rather
    # than the s x s blocks of nearest up-sampling; the stride-s cell i covers pixels s*i..s*i+s-1
    wins = host_windows(boxes.tolist() if boxes_host is None else boxes_host, boxes.dtype, h, w)  # (N,) (x0, y0, x1, y1)
    cells = [(source_cells(y0, y1, H, stride), source_cells(x0, x1, W, stride)) for x0, y0, x1, y1 in wins]
    where = [None] * len(wins)  # object -> (its group's window masks, its row there, the window's (x, y))
    scores, tight = boxes.new_zeros(len(wins)), boxes.new_zeros(len(wins), 4)
    probs = mask_probs[:, None].float()  # (N, 1, Hp/s, Wp/s)
    if score_probs is not None:  # a second channel, cut and upsampled with the first
        probs = torch.cat([probs, score_probs[:, None].float()], 1)  # (N, 2, Hp/s, Wp/s)
    # a group pads its boxes to a common window: up to 4x their cells, few groups (each a dozen kernels)
    for group in size_groups([(r1 - r0, c1 - c0) for (r0, r1), (c0, c1) in cells], waste=4.0):
        hc = max(cells[k][0][1] - cells[k][0][0] for k in group)  # the group's window, in cells
        wc = max(cells[k][1][1] - cells[k][1][0] for k in group)
        top = [min(cells[k][0][0], H - hc) for k in group]  # inside the map, from each box's first cell or before
        left = [min(cells[k][1][0], W - wc) for k in group]
        g, top_t, left_t = (host_to_device(v, probs.device) for v in (group, top, left))  # (n,) each
        both = F.interpolate(box_windows(probs, top_t, left_t, hc, wc, g), scale_factor=stride, mode='bilinear',
                             align_corners=False)  # (n, 1 or 2, hc s, wc s)
        up = both[:, 0]  # (n, hc s, wc s)
        # each object's box in its window
        o = host_to_device([[wins[k][0] - lk * stride, wins[k][1] - tk * stride, wins[k][2] - lk * stride,
                             wins[k][3] - tk * stride] for k, tk, lk in zip(group, top, left)], probs.device)  # (n, 4)
        rows = torch.arange(up.shape[1], device=up.device)[None]  # (1, hc s)
        cols = torch.arange(up.shape[2], device=up.device)[None]  # (1, wc s)
        inbox = (((rows >= o[:, 1:2]) & (rows < o[:, 3:4]))[:, :, None]
                 & ((cols >= o[:, 0:1]) & (cols < o[:, 2:3]))[:, None, :])  # (n, hc s, wc s)
        m = (up > thresh) & inbox  # (n, hc s, wc s)
        scores[g] = object_scores(both[:, -1], m, plus_one)
        shift = torch.stack([left_t, top_t, left_t, top_t], 1).to(tight.dtype) * stride  # (n, 4)
        rows, cols = m.any(2), m.any(1)  # (n, hc s), (n, wc s): the tight boxes from these, as masks_to_boxes
        (ty0, ty1), (tx0, tx1) = _first_last(rows), _first_last(cols)
        tight[g] = (torch.stack([tx0, ty0, tx1, ty1], 1).to(tight.dtype) + shift) * rows.any(1)[:, None]
        for j, (k, tk, lk) in enumerate(zip(group, top, left)):
            where[k] = (m, j, lk * stride, tk * stride)
    keep = tight[:, 2] > tight[:, 0]  # (N,) # non-empty masks
    if min_box_iou > 0:
        scores, ok = box_quality_gate_boxes(tight, boxes, scores, min_box_iou)
        keep = keep & ok
    # each kept mask cut to its tight box: one host read of which are kept and of their boxes
    rows = torch.cat([keep[:, None].to(tight.dtype), tight], 1).long().tolist()  # (N, 5)
    sel = [k for k, r in enumerate(rows) if r[0]]
    crops = []
    for k in sel:
        (x0, y0, x1, y1), (m, j, dx, dy) = rows[k][1:], where[k]
        crops.append(m[j, y0 - dy:y1 - dy, x0 - dx:x1 - dx])
    sel_t = host_to_device(sel, boxes.device, torch.long)  # (n,)
    return dict(image=image, boxes=boxes[sel_t], labels=labels[sel_t], masks=crops, scores=scores[sel_t],
                mask_xy=torch.tensor([rows[k][1:3] for k in sel], dtype=torch.long).view(-1, 2))  # on the host


def box_quality_gate(masks, boxes, scores, min_iou=0.8):
    """nanoSIM's gate on what enters the bank: IoU of each pseudo mask's tight box with the object's GT
    box (pixel-aligned outwards) -> (scores * IoU, IoU >= min_iou). Why: a pasted object's box is its
    mask's tight box and trains the detector as a GT box (BENCHMARKS.md, Decisions). masks (N, h, w)."""
    return box_quality_gate_boxes(masks_to_boxes(masks), boxes, scores, min_iou)


def box_quality_gate_boxes(tight, boxes, scores, min_iou=0.8):
    """box_quality_gate from the masks' tight boxes tight (N, 4) (zeros for an empty mask)."""
    gt = torch.cat([boxes[:, :2].floor(), boxes[:, 2:].ceil()], 1).clamp(min=0)  # (N, 4) pixel-aligned
    iou = box_iou_pairs(tight, gt)  # (N,)
    return scores * iou, iou >= min_iou


def masks_to_crops(masks):
    """Full-size bool masks (N, h, w) -> (list of N crops, each its mask's tight box (0 x 0 if empty),
    mask_xy long (N, 2) their top-left (x, y)): the bank's layout."""
    boxes = masks_to_boxes(masks).long()  # (N, 4)
    crops = [m[y0:y1, x0:x1] for m, (x0, y0, x1, y1) in zip(masks, boxes.tolist())]
    return crops, boxes[:, :2]


def crops_to_masks(crops, mask_xy, h, w):
    """The inverse of masks_to_crops: crops placed at mask_xy (N, 2) in zeros of (h, w) -> bool (N, h, w)."""
    out = torch.zeros(len(crops), h, w, dtype=torch.bool, device=mask_xy.device)
    for o, c, (x, y) in zip(out, crops, mask_xy.tolist()):
        o[y:y + c.shape[0], x:x + c.shape[1]] = c
    return out


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

    def push(self, image, boxes, labels, masks, scores, mask_xy=None):
        """Store one image: uint8 (3, h, w) unpadded, boxes (N, 4), labels (N,), scores (N,), and its pseudo
        masks, either full-size bool (N, h, w) (mask_xy None) or as crops of their tight boxes: a list of
        N bool crops at mask_xy (N, 2) (x, y) (bank_entry_from_teacher's; an empty mask is a 0-size crop).
        Kept as such crops: a full-size mask per object would cost the bank h * w bytes each (a COCO
        image: 1 MB; 100 images of 7 objects: 0.7 GB per process). Objects with an empty mask are
        dropped; an image with no object left is not stored."""
        if mask_xy is None:
            assert masks.shape[1:] == image.shape[1:], 'pseudo masks must match the unpadded image'
            masks, mask_xy = masks_to_crops(masks)
        h, w = image.shape[1:]
        sizes = [tuple(c.shape) for c in masks]
        keep = [a * b > 0 for a, b in sizes]
        if not any(keep):
            return
        mask_xy = mask_xy.to(BANK_DEVICE)  # the callers' is on the host already: no transfer
        for (a, b), (x, y) in zip(sizes, mask_xy.tolist()):
            assert a * b == 0 or (x >= 0 and y >= 0 and x + b <= w and y + a <= h), 'crop off the image'
        # everything in ONE transfer from the device (each .cpu() would wait for the GPU), into new
        # memory: the bank must not alias tensors the caller may modify in place later
        keep_t = torch.tensor(keep)  # (N,)
        image, boxes, labels, scores, flat = to_host_at_once(
            [(image, torch.uint8), (boxes, torch.float32), (labels, torch.int64), (scores, torch.float32),
             (torch.cat([c.reshape(-1) for c in masks]), torch.bool)])
        crops = [c.view(sz) for c, sz, k in zip(flat.split([a * b for a, b in sizes]), sizes, keep) if k]
        self.entries.append(dict(
            image=image,  # (3, h, w)
            boxes=boxes[keep_t],  # (N, 4)
            labels=labels[keep_t],  # (N,)
            masks=crops,  # N bool crops (h_k, w_k), each its mask's tight box
            mask_xy=mask_xy.to(torch.int64, copy=True)[keep_t],  # (N, 2) top-left (x, y) of each crop
            scores=scores[keep_t],  # (N,)
        ))

    def sample(self, generator=None):
        """One entry (dict of CPU tensors; 'masks' a list of crops), chosen uniformly; `generator`: a CPU one."""
        i = torch.randint(len(self.entries), (), generator=generator).item()
        return self.entries[i]

    def state_dict(self):
        # saved with the checkpoint so a resumed run sees the same bank (per rank: each rank's bank differs)
        return {'capacity': self.capacity, 'entries': list(self.entries)}

    def load_state_dict(self, state):
        # the configured capacity wins; if it shrank, the most recent entries are kept
        self.entries = collections.deque([], maxlen=self.capacity)
        for e in state['entries']:
            e = {k: [c.to(BANK_DEVICE) for c in v] if isinstance(v, list) else v.to(BANK_DEVICE) for k, v in e.items()}
            if 'mask_xy' not in e:  # a bank saved with full-size masks (N, h, w): stored again as crops
                self.push(**e)
                continue
            self.entries.append(e)

# -----------------------------------------------------------------------------
# importance sampling and pasting

def sample_objects(scores, generator=None, max_n=3, power=3, replacement=False, fraction=0.5):
    """Indices of the objects to paste, in paste order.

    n = clamp(floor(fraction * N), 1, max_n) drawn with probability ~ score^power: fraction 0.5 and
    power 3 are the official code's; the paper (Sec. 4.1) extracts "a quarter of the instances from
    each image with 1 ~ 3 instances per image" (fraction 0.25) "according to their mask scores" (power
    1). Without replacement by default (the paper's "a subset"); replacement=True is the official code.
    All scores 0: uniform; n never exceeds the objects with a non-zero score.
    """
    weights = scores.float().clamp(min=0) ** power  # (N,)
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)
    n = min(max(int(fraction * len(scores)), 1), max_n)
    if not replacement:
        n = min(n, int((weights > 0).sum()))
    return torch.multinomial(weights, n, replacement=replacement, generator=generator)  # (n,)


def with_paste_fields(target, size):
    """Shallow copy of target with 'pasted' bool (N,) False, 'paste_masks' bool (0, h, w) and 'paste_area'
    bool (h, w) False (every pasted pixel) added where missing, so every target of a batch carries the
    fields. 'paste_masks' has one row per object whose 'pasted' is True, in object order (the visible
    part of the pseudo mask it was pasted with): a row for every object would cost N full-size maps
    of zeros (60 COCO objects: 64 MB per image); losses.object_paste_masks spreads them over the objects."""
    t = dict(target)
    n, dev = len(t['boxes']), t['boxes'].device
    if 'pasted' not in t:
        t['pasted'] = torch.zeros(n, dtype=torch.bool, device=dev)
    if 'paste_masks' not in t:
        t['paste_masks'] = torch.zeros(0, *size, dtype=torch.bool, device=dev)
    if 'paste_area' not in t:
        t['paste_area'] = torch.zeros(*size, dtype=torch.bool, device=dev)
    return t


def _first_last(flags):
    """First index and last index + 1 of the True entries of each row of flags (N, n) bool -> (N,), (N,)
    (0, n for a row without any: callers mask those)."""
    f = flags.to(torch.uint8)
    return f.argmax(1), flags.shape[1] - f.flip(1).argmax(1)


def uncovered_boxes(boxes, alpha, x0, y0, h, w):
    """Tight boxes of what the pasted pixels leave of each box: masks_to_boxes(box_masks_exclusive(boxes, h, w)
    & ~A), A the (h, w) image that is alpha (wh, ww) bool at (x0, y0) and False elsewhere -> (N, 4) float
    (zeros where nothing is left) and (N,) bool (something is left). From the boxes' row and column
    spans and how many pixels of each span the paste covers (prefix sums of alpha): a row of a box stays
    unless all its pixels are covered; no full-size mask per object."""
    bx0, by0, bx1, by1 = box_pixel_windows(boxes, h, w).unbind(1)  # (N,) each
    rows = torch.arange(h, device=boxes.device)[None]  # (1, h)
    cols = torch.arange(w, device=boxes.device)[None]  # (1, w)
    in_rows = (rows >= by0[:, None]) & (rows < by1[:, None])  # (N, h)
    in_cols = (cols >= bx0[:, None]) & (cols < bx1[:, None])  # (N, w)
    wh, ww = alpha.shape
    if wh > 0 and ww > 0 and len(boxes) > 0:
        a = alpha.to(torch.int32)
        row_cum = F.pad(a.cumsum(1), (1, 0))  # (wh, ww + 1) # covered pixels left of each column
        col_cum = F.pad(a.cumsum(0), (0, 0, 1, 0))  # (wh + 1, ww) # covered pixels above each row
        lx0, lx1 = (bx0 - x0).clamp(0, ww), (bx1 - x0).clamp(0, ww)  # (N,) the box's columns in the window
        ly0, ly1 = (by0 - y0).clamp(0, wh), (by1 - y0).clamp(0, wh)  # (N,)
        row_cov = (row_cum[:, lx1] - row_cum[:, lx0]).T  # (N, wh) # covered pixels of the box in each row
        col_cov = col_cum[ly1] - col_cum[ly0]  # (N, ww)
        in_rows[:, y0:y0 + wh] &= row_cov < (bx1 - bx0)[:, None]
        in_cols[:, x0:x0 + ww] &= col_cov < (by1 - by0)[:, None]
    left = in_rows.any(1) & in_cols.any(1)  # (N,)
    ty0, ty1 = _first_last(in_rows)
    tx0, tx1 = _first_last(in_cols)
    return torch.stack([tx0, ty0, tx1, ty1], 1).float() * left[:, None], left


def drawn_crops(entry, idx):
    """Objects idx (n,) of a bank entry -> idx as a list, their mask crops, their crops' top-left (x, y)
    as host lists. All on the host (the bank lives there)."""
    idx = idx.tolist()
    return idx, [entry['masks'][i] for i in idx], entry['mask_xy'][idx].tolist()


def paste(image, target, entry, idx, size):
    """Paste objects `idx` of bank `entry` onto one padded batch slot; returns (image, target).

    image uint8 (3, Hp, Wp), valid region size = (h, w); target dict as the data pipeline makes it;
    entry a bank dict (on the CPU; what the drawn crops cover goes to the image's device); idx (n,)
    object indices in paste order (later objects cover earlier ones). Objects keep their absolute pixel
    position; source pixels outside the valid (h, w) region are dropped, and the padding of the current
    slot stays untouched. The work is done in the window the drawn crops reach.
    """
    h, w = size
    dev, ann_dev = image.device, target['boxes'].device
    target = with_paste_fields(target, size)
    idx, crops, xy = drawn_crops(entry, idx)
    # the window [x0, x1) x [y0, y1) of the valid region that the drawn crops reach (empty: nothing shows)
    x0, y0 = min([x for x, _ in xy], default=0), min([y for _, y in xy], default=0)
    x1 = min(max([x + c.shape[1] for c, (x, _) in zip(crops, xy)], default=0), w)
    y1 = min(max([y + c.shape[0] for c, (_, y) in zip(crops, xy)], default=0), h)
    x1, y1 = max(x1, x0), max(y1, y0)

    # pasted objects' masks in the window, and the part of each that stays visible
    src_masks = torch.zeros(len(idx), y1 - y0, x1 - x0, dtype=torch.bool)  # (n, wh, ww)
    for m, c, (x, y) in zip(src_masks, crops, xy):
        c = c[:max(y1 - y, 0), :max(x1 - x, 0)]  # the part inside the valid region
        m[y - y0:y - y0 + c.shape[0], x - x0:x - x0 + c.shape[1]] = c
    src_masks = src_masks.to(dev)
    visible_new = torch.empty_like(src_masks)  # (n, wh, ww) # what no later object covers
    alpha = src_masks.new_zeros(y1 - y0, x1 - x0)  # (wh, ww)
    for k in reversed(range(len(idx))):  # from the last (topmost) object down; alpha: every pasted pixel
        torch.logical_and(src_masks[k], ~alpha, out=visible_new[k])
        alpha |= src_masks[k]

    # image: hard copy of the source pixels where alpha, the current image elsewhere
    out = image.clone()  # (3, Hp, Wp)
    out[:, y0:y1, x0:x1] = torch.where(alpha, entry['image'][:, y0:y1, x0:x1].to(dev), image[:, y0:y1, x0:x1])

    # existing objects: their box mask loses the pasted pixels; the new box is the tight box of
    # the remainder intersected with the old box, so sub-pixel edges that were not covered (and
    # every object the paste does not touch) keep their exact float coordinates
    boxes = target['boxes'].to(dev)  # (N, 4)
    tight, keep_old = uncovered_boxes(boxes, alpha, x0, y0, h, w)  # (N, 4), (N,)
    old_boxes = torch.cat([torch.maximum(boxes[:, :2], tight[:, :2]),
                           torch.minimum(boxes[:, 2:], tight[:, 2:])], 1)  # (N, 4)
    keep_new = visible_new.flatten(1).any(1)  # (n,) # empty after the crop or hidden by a later paste
    new_boxes = (masks_to_boxes(visible_new) if x1 > x0 and y1 > y0 else boxes.new_zeros(len(idx), 4)) \
        + keep_new[:, None] * host_to_device([x0, y0, x0, y0], dev, boxes.dtype)  # (n, 4)

    def full(m, dtype):  # window masks (n, wh, ww) -> (n, h, w) of dtype, zeros outside the window
        o = torch.zeros(len(m), h, w, dtype=dtype, device=dev)
        o[:, y0:y1, x0:x1] = m
        return o

    out_t = dict(target)
    cat = lambda a, b: torch.cat([a.to(ann_dev), b.to(ann_dev)])
    out_t['boxes'] = cat(old_boxes, new_boxes).to(target['boxes'].dtype)  # (N + n, 4)
    out_t['labels'] = cat(target['labels'], entry['labels'][idx])  # (N + n,)
    out_t['pasted'] = cat(target['pasted'], torch.ones_like(keep_new))  # (N + n,)
    # paste masks are the visible pseudo masks: earlier pasted objects (including any from an
    # earlier paste of this target) lose what a later paste covers
    old_pm = target['paste_masks'].to(dev, copy=True)  # (P, h, w)
    old_pm[:, y0:y1, x0:x1] &= ~alpha
    pm = cat(old_pm, full(visible_new, torch.bool))  # (P + n, h, w)
    # the pixels that now show a pasted object: out of every other object's box in the losses
    area = target['paste_area'].to(dev, copy=True)  # (h, w)
    area[y0:y1, x0:x1] |= alpha
    out_t['paste_area'] = area.to(ann_dev)
    if 'masks' in target:  # GT masks (method=full): occluded the same way; pasted objects bring their pseudo masks
        old_m = target['masks'].to(dev, copy=True)  # (N, h, w)
        old_m[:, y0:y1, x0:x1].masked_fill_(alpha, 0)
        out_t['masks'] = cat(old_m, full(visible_new, old_m.dtype))  # (N + n, h, w)
    if 'has_mask' in target:  # some masks, many boxes: a pasted object trains from its pseudo mask (L_paste)
        out_t['has_mask'] = cat(target['has_mask'], torch.zeros_like(keep_new))  # (N + n,)
    # which objects stay (data-dependent: one host read), and the rows of paste_masks that are theirs
    keep, pasted = torch.stack([cat(keep_old, keep_new), out_t['pasted']]).tolist()  # (N + n,) each
    kept = [i for i, k in enumerate(keep) if k]
    rows = [r for r, i in enumerate(i for i, p in enumerate(pasted) if p) if keep[i]]  # row r: the r-th pasted
    kept_t, rows_t = host_to_device(kept, ann_dev, torch.long), host_to_device(rows, dev, torch.long)
    for k in PER_OBJECT_KEYS:
        if k in out_t:
            out_t[k] = out_t[k].index_select(0, kept_t)
    out_t['paste_masks'] = pm.index_select(0, rows_t.to(pm.device))  # the kept pasted objects' rows
    return out, out_t


def copy_paste_batch(images, targets, bank, prob=0.5, generator=None, max_n=3, replacement=False, fraction=0.5,
                     power=3):
    """Online copy-paste over a batch: images uint8 (B, 3, Hp, Wp), targets list of dicts.

    Each image on its own (official: once per batch): if the bank is full and a draw < prob, paste
    sampled objects of a random entry. Every target gets the paste fields; inputs are not modified.
    On whatever device the images are (the draws and the bank stay on the CPU; only what the drawn
    crops cover is moved).
    """
    out_images = images.clone()  # (B, 3, Hp, Wp)
    out_targets = []
    for b, t in enumerate(targets):
        t = with_paste_fields(t, t['size'])
        if bank.full and torch.rand((), generator=generator).item() < prob:
            entry = bank.sample(generator)
            idx = sample_objects(entry['scores'], generator, max_n, power, replacement, fraction)
            out_images[b], t = paste(images[b], t, entry, idx, t['size'])
        out_targets.append(t)
    return out_images, out_targets
