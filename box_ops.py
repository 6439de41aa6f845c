"""
Boxes and their masks: the helpers every other file shares, in one place.

Two pixel conventions for the mask of a float box (x0, y0, x1, y1), and both are needed:
  - end-exclusive (box_masks_exclusive): columns floor(x0) .. ceil(x1) - 1, i.e. every pixel the box
    overlaps; a mask's tight box is (first col, first row, last col + 1, last row + 1)
    (masks_to_boxes), so box -> mask -> box is the identity for integer boxes. Copy-paste uses it.
  - end-inclusive (box_masks_inclusive): columns floor(x0) .. floor(x1), the pixel holding x1 included:
    BoxInst's `gt_bitmasks_full`, read by its losses and its centre sampling (box_mask_centers).
"""

import torch


def host_to_device(values, device, dtype=None):
    """Host values (a list, nested lists, numbers) as a tensor on `device`, without making the host wait
    for the GPU. Why: torch.tensor(values, device="cuda") copies from pageable memory, and a copy from
    pageable memory starts with a stream synchronisation (the CUDA runtime's rule): the host waits for
    every kernel already queued. Staged in pinned memory, the copy is queued like a kernel (torch's
    pinned allocator keeps the staging buffer until the copy is done). On the CPU: torch.tensor."""
    t = torch.tensor(values, dtype=dtype)
    if device is None or torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def decode_boxes(locations, ltrb):
    """FCOS boxes from locations (N, 2) (x, y) and distances ltrb (N, 4) in pixels -> (N, 4) xyxy."""
    return torch.cat([locations - ltrb[:, :2], locations + ltrb[:, 2:]], 1)


def size_groups(hw, extra=0, waste=2.0):
    """Indices of boxes grouped for batched windows: hw a list of (h, w) sizes -> lists of indices, by area,
    each group's common window (its largest h and w, plus `extra` on each) at most `waste` times the
    cells its members need (the first of a group always fits). Why: one window for all pads every small
    box of a COCO image to its largest (600 px); per-box windows cost a few kernels each."""
    order = sorted(range(len(hw)), key=lambda k: hw[k][0] * hw[k][1])
    groups, cur, mh, mw, need = [], [], 0, 0, 0
    for k in order:
        h, w = hw[k][0] + extra, hw[k][1] + extra
        if cur and (len(cur) + 1) * max(mh, h) * max(mw, w) > waste * (need + h * w):
            groups.append(cur)
            cur, mh, mw, need = [], 0, 0, 0
        cur.append(k)
        mh, mw, need = max(mh, h), max(mw, w), need + h * w
    return groups + [cur] if cur else groups


def box_iou_pairs(a, b):
    """IoU of matched pairs of xyxy boxes: a (K, 4), b (K, 4) -> (K,); 0 for empty unions."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)  # (K, 2)
    inter = wh[:, 0] * wh[:, 1]                                                        # (K,)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)       # (K,)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)       # (K,)
    union = area_a + area_b - inter                                                    # (K,)
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)                     # (K,)


# -----------------------------------------------------------------------------
# end-exclusive masks (copy-paste, the memory bank)


def box_masks_exclusive(boxes, h, w):
    """Filled-rectangle masks (N, h, w) bool of xyxy boxes: rows floor(y0) .. ceil(y1) - 1 and columns
    floor(x0) .. ceil(x1) - 1, at least one of each (a zero-width box keeps one pixel line)."""
    rows = torch.arange(h, device=boxes.device)  # (h,)
    cols = torch.arange(w, device=boxes.device)  # (w,)
    x0, y0 = boxes[:, 0].floor(), boxes[:, 1].floor()  # (N,), (N,)
    x1 = torch.maximum(boxes[:, 2].ceil(), x0 + 1)  # (N,)
    y1 = torch.maximum(boxes[:, 3].ceil(), y0 + 1)  # (N,)
    in_rows = (rows[None] >= y0[:, None]) & (rows[None] < y1[:, None])  # (N, h)
    in_cols = (cols[None] >= x0[:, None]) & (cols[None] < x1[:, None])  # (N, w)
    return in_rows[:, :, None] & in_cols[:, None, :]  # (N, h, w)


def masks_to_boxes(masks):
    """Tight end-exclusive xyxy boxes (N, 4) float of bool masks (N, h, w): x1 = last col + 1; zeros if empty."""
    n, h, w = masks.shape
    rows = masks.any(2).to(torch.uint8)  # (N, h)
    cols = masks.any(1).to(torch.uint8)  # (N, w)
    # argmax returns the first maximal index: first occupied row/col, and from the flipped side the last
    y0 = rows.argmax(1)  # (N,)
    y1 = h - rows.flip(1).argmax(1)  # (N,)
    x0 = cols.argmax(1)  # (N,)
    x1 = w - cols.flip(1).argmax(1)  # (N,)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()  # (N, 4)
    return boxes * masks.flatten(1).any(1)[:, None]  # (N, 4)


# -----------------------------------------------------------------------------
# end-inclusive masks (BoxInst's losses), sampled on the mask-out stride grid


def stride_grid(n_full, stride, device):
    """Full-resolution pixel indices of the stride grid, i.e. arange(n_full)[stride//2::stride]."""
    return torch.arange(stride // 2, n_full, stride, device=device)


def box_masks_inclusive(boxes, padded_hw, stride=4):
    """BoxInst box masks at the mask-out stride: the full-resolution mask with rows floor(y0)..floor(y1)
    and cols floor(x0)..floor(x1) (inclusive), sampled at [stride//2::stride, stride//2::stride], built
    directly on the sampled grid. boxes (N, 4) xyxy -> float (N, Hp//stride, Wp//stride)."""
    hp, wp = padded_hw
    ys = stride_grid(hp, stride, boxes.device).to(boxes.dtype)  # (h,)
    xs = stride_grid(wp, stride, boxes.device).to(boxes.dtype)  # (w,)
    b = boxes.floor()  # (N, 4)
    in_y = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])  # (N, h)
    in_x = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])  # (N, w)
    return (in_y[:, :, None] & in_x[:, None, :]).to(boxes.dtype)  # (N, h, w)


def box_mask_centers(boxes, padded_hw=None):
    """Centroid (x, y) of each box's end-inclusive mask, which the reference centre sampling reads from
    `gt_bitmasks_full`: the index runs floor(x0)..floor(x1) are arithmetic, so the mean is the midpoint
    of the first and last index. padded_hw (Hp, Wp) clips the last index to the padded canvas as the
    reference slicing does (a box ending exactly on the border of a full-height image)."""
    lo = boxes[:, :2].floor()  # (N, 2) first col, first row
    hi = boxes[:, 2:].floor()  # (N, 2) last col, last row
    if padded_hw is not None:
        hp, wp = padded_hw
        hi = torch.stack([hi[:, 0].clamp(max=wp - 1), hi[:, 1].clamp(max=hp - 1)], 1)  # (N, 2)
    return (lo + hi) / 2  # (N, 2)


def mask_centers(masks):
    """Centre of mass (x, y) of each GT mask (N, h, w), in pixel indices (CondInst's centre sampling)."""
    m = masks.float()                                                                        # (N, h, w)
    area = m.sum((1, 2)).clamp(min=1)
    ys = torch.arange(m.shape[1], device=m.device, dtype=m.dtype)
    xs = torch.arange(m.shape[2], device=m.device, dtype=m.dtype)
    cx = (m.sum(1) * xs).sum(1) / area
    cy = (m.sum(2) * ys).sum(1) / area
    return torch.stack([cx, cy], 1)                                                          # (N, 2)
