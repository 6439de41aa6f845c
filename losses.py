"""
All losses, as pure functions, in the order a training step meets them: FCOS target assignment, the
FCOS losses, BoxInst's projection and colour-pairwise terms (and CondInst's dice), SIM's Eq. (8)-(10).
Batched (no Python loop over objects or locations), on the inputs' device; one host read per step
(the pairwise windows). Behaviours follow AdelaiDet (docs/official_code.md Part B) and the paper.
"""

import torch
import torch.nn.functional as F
import torch.distributed as dist

from box_ops import box_masks_inclusive, host_to_device, masks_to_boxes, size_groups, stride_grid

# -----------------------------------------------------------------------------
# FCOS target assignment

INF = 1e8  # upper end of the last FCOS size range (P7), as the reference


def fcos_targets(locations, loc_level, strides, gt_boxes, gt_labels, num_classes,
                 sizes_of_interest=(64, 128, 256, 512), radius=1.5, gt_centers=None):
    """FCOS assignment of every location of every image to at most one GT box.

    A location (x, y) of level l is a candidate for box (x0, y0, x1, y1) when
      - it lies strictly inside the centre sub-box [c - radius*s_l, c + radius*s_l] clipped
        to the GT box (c = gt_centers, or the box centre when gt_centers is None), and
      - lo_l <= max(l, t, r, b) <= hi_l (both ends inclusive), with the ranges
        [-1, 64], [64, 128], [128, 256], [256, 512], [512, 1e8] from sizes_of_interest.
    Among candidates the box of smallest area wins (the first one on ties); a location
    without candidates is background.

    locations (L, 2) float (x, y) pixels; loc_level (L,) long; strides one per level;
    gt_boxes / gt_labels: per-image lists of (N_i, 4) xyxy and (N_i,) long.
    Returns dict:
      labels (B, L) long, num_classes for background;
      reg_targets (B, L, 4) (l, t, r, b) divided by the location's stride, 0 for background;
      gt_inds (B, L) long, index of the GT in the batch-wide concatenation of gt_boxes, -1 for
      background.
    """
    device = locations.device
    B, L = len(gt_boxes), locations.shape[0]
    n_per_im = [b.shape[0] for b in gt_boxes]  # shapes are host-side: no sync
    n_max = max(n_per_im, default=0)
    if n_max == 0:
        return {
            'labels': torch.full((B, L), num_classes, dtype=torch.long, device=device),
            'reg_targets': locations.new_zeros(B, L, 4),
            'gt_inds': torch.full((B, L), -1, dtype=torch.long, device=device),
        }

    # pad the per-image GT lists to (B, n_max); padded slots can never be chosen
    boxes = torch.nn.utils.rnn.pad_sequence(
        [b.to(locations.dtype) for b in gt_boxes], batch_first=True)  # (B, G, 4)
    labels = torch.nn.utils.rnn.pad_sequence(list(gt_labels), batch_first=True)  # (B, G)
    n_t = host_to_device(n_per_im, device)  # (B,)
    real = torch.arange(n_max, device=device)[None] < n_t[:, None]  # (B, G)
    offsets = torch.cumsum(n_t, 0) - n_t  # (B,) first global GT index of each image
    if gt_centers is None:
        centers = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, G, 2)
    else:
        centers = torch.nn.utils.rnn.pad_sequence(
            [c.to(locations.dtype) for c in gt_centers], batch_first=True)  # (B, G, 2)

    # per-location stride and size range
    strides_t = host_to_device(strides, device, locations.dtype)  # (nL,)
    bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [INF]
    lo_t, hi_t = host_to_device([bounds[:-1], bounds[1:]], device, locations.dtype)[:, loc_level]  # (L,) each
    s = strides_t[loc_level]  # (L,)

    xs = locations[None, :, None, 0]  # (1, L, 1)
    ys = locations[None, :, None, 1]  # (1, L, 1)
    x0, y0, x1, y1 = (boxes[:, None, :, k] for k in range(4))  # each (B, 1, G)
    # the four distances as separate (B, L, G) maps, not stacked: at COCO scale (60 boxes) each is 2.7M
    reg = (xs - x0, ys - y0, x1 - xs, y1 - ys)  # (l, t, r, b), each (B, L, G)

    # centre sampling: the sub-box of half-size radius*stride around the centre, clipped; strictly
    # inside it (a > b, the same test as a - b > 0 for finite floats)
    rad = (radius * s)[None, :, None]  # (1, L, 1)
    cx, cy = centers[:, None, :, 0], centers[:, None, :, 1]  # (B, 1, G)
    in_centre = (xs > torch.maximum(cx - rad, x0)) & (ys > torch.maximum(cy - rad, y0))  # (B, L, G)
    in_centre &= (torch.minimum(cx + rad, x1) > xs) & (torch.minimum(cy + rad, y1) > ys)

    max_reg = torch.maximum(torch.maximum(reg[0], reg[1]), torch.maximum(reg[2], reg[3]))  # (B, L, G)
    cared = (max_reg >= lo_t[None, :, None]) & (max_reg <= hi_t[None, :, None])  # (B, L, G)
    cand = in_centre & cared & real[:, None, :]  # (B, L, G)

    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, G)
    area = torch.where(cand, area[:, None, :], torch.full_like(max_reg, float('inf')))  # (B, L, G)
    min_area, idx = area.min(dim=-1)  # (B, L); ties -> first minimum
    pos = torch.isfinite(min_area)  # (B, L)

    reg_t = torch.cat([d.gather(2, idx[:, :, None]) for d in reg], 2)  # (B, L, 4) # the chosen box's
    reg_t = torch.where(pos[..., None], reg_t / s[None, :, None], torch.zeros_like(reg_t))  # (B, L, 4)
    lab = torch.where(pos, labels.gather(1, idx), torch.full_like(idx, num_classes))  # (B, L)
    gt_inds = torch.where(pos, offsets[:, None] + idx, torch.full_like(idx, -1))  # (B, L)
    return {'labels': lab, 'reg_targets': reg_t, 'gt_inds': gt_inds}

# -----------------------------------------------------------------------------
# FCOS losses


def reduce_mean(x):
    """Average of tensor x over all ranks (all-reduce sum / world size); x itself, detached,
    when not distributed. Used for loss normalisers, so no gradient flows through it."""
    x = x.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / dist.get_world_size()
    return x


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, weight=None):
    """Sigmoid focal loss, summed over all elements (fvcore form):
    CE(p, t) * (1 - p_t)^gamma * alpha_t with p_t = p t + (1-p)(1-t),
    alpha_t = alpha t + (1-alpha)(1-t); weight (broadcastable) scales each element."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = alpha_t * ce * (1 - p_t) ** gamma
    return (loss if weight is None else loss * weight).sum()


def giou_loss(pred, target):
    """1 - GIoU per row of (N, 4) (l, t, r, b) distances from a shared location, with the
    reference's +1 smoothing: IoU = (I + 1) / (U + 1), GIoU = IoU - (C - U) / C, C the
    enclosing box area. Returns (N,)."""
    pl, pt, pr, pb = pred.unbind(-1)  # each (N,)
    tl, tt, tr, tb = target.unbind(-1)  # each (N,)
    area_p = (pl + pr) * (pt + pb)  # (N,)
    area_t = (tl + tr) * (tt + tb)  # (N,)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * \
            (torch.minimum(pt, tt) + torch.minimum(pb, tb))  # (N,)
    enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * \
              (torch.maximum(pt, tt) + torch.maximum(pb, tb))  # (N,)
    union = area_p + area_t - inter  # (N,)
    iou = (inter + 1) / (union + 1)  # (N,)
    giou = iou - (enclose - union) / enclose  # (N,)
    return 1 - giou


def centerness_target(reg_targets):
    """sqrt( min(l, r)/max(l, r) * min(t, b)/max(t, b) ) for (N, 4) positive targets -> (N,)."""
    lr = reg_targets[:, [0, 2]]  # (N, 2)
    tb = reg_targets[:, [1, 3]]  # (N, 2)
    return torch.sqrt((lr.amin(-1) / lr.amax(-1)) * (tb.amin(-1) / tb.amax(-1)))


def fcos_losses(cls_logits, reg, ctr_logits, targets, image_weights=None):
    """FCOS losses over a batch.

    cls_logits (B, L, C), reg (B, L, 4) in stride units, ctr_logits (B, L); targets from
    fcos_targets; image_weights (B,) or None: each image's weight (0 leaves an image out of the
    detector's losses and of their normalisers). Returns dict:
      loss_fcos_cls = focal(all locations, all classes) / num_pos,
      loss_fcos_loc = sum_pos (1 - GIoU) * c* / sum_pos c*,
      loss_fcos_ctr = sum_pos BCE(ctr_logit, c*) / num_pos,
    with num_pos averaged over ranks (min 1) and sum c* averaged over ranks (min 1e-6). Positives
    are masked, not indexed (no host sync); with none, loc/ctr are 0 and still attached to the graph.
    """
    # losses in fp32 even when the network ran under autocast
    cls_logits, reg, ctr_logits = cls_logits.float(), reg.float(), ctr_logits.float()
    C = cls_logits.shape[-1]
    labels = targets['labels'].reshape(-1)  # (BL,)
    pos = labels != C  # (BL,)
    w = None
    if image_weights is not None:
        w = image_weights.to(cls_logits.dtype)[:, None].expand(cls_logits.shape[:2]).reshape(-1)  # (BL,)
        pos = pos & (w > 0)
    posf = pos.to(cls_logits.dtype)  # (BL,)
    num_pos = reduce_mean(posf.sum()).clamp(min=1.0)

    cls_t = F.one_hot(labels, C + 1)[:, :C].to(cls_logits.dtype)  # (BL, C), background rows 0
    loss_cls = sigmoid_focal_loss(cls_logits.reshape(-1, C), cls_t, weight=None if w is None else w[:, None]) / num_pos

    # background rows get a dummy all-ones target so that GIoU and centerness stay finite
    # there (0/0 would give NaN, and NaN * 0 is still NaN, also in the backward pass)
    reg_t = targets['reg_targets'].reshape(-1, 4)  # (BL, 4)
    reg_t = torch.where(pos[:, None], reg_t, torch.ones_like(reg_t))  # (BL, 4)
    ctr_t = centerness_target(reg_t) * posf  # (BL,)
    ctr_norm = reduce_mean(ctr_t.sum()).clamp(min=1e-6)

    loss_loc = (giou_loss(reg.reshape(-1, 4), reg_t) * ctr_t).sum() / ctr_norm
    ctr_bce = F.binary_cross_entropy_with_logits(ctr_logits.reshape(-1), ctr_t, reduction='none')  # (BL,)
    loss_ctr = (ctr_bce * posf).sum() / num_pos
    return {'loss_fcos_cls': loss_cls, 'loss_fcos_loc': loss_loc, 'loss_fcos_ctr': loss_ctr}

# -----------------------------------------------------------------------------
# BoxInst (and CondInst's fully supervised dice)


def dice_loss(x, y, eps=1e-5):
    """1 - 2 sum(x y) / (sum(x^2) + sum(y^2) + eps) per instance of (N, ...) tensors -> (N,)."""
    x, y = x.flatten(1), y.flatten(1)  # (N, P)
    return 1 - 2 * (x * y).sum(1) / ((x * x).sum(1) + (y * y).sum(1) + eps)


def image_valid_masks(sizes, orig_sizes, padded_hw, stride=4, bottom_pixels_removed=10, device=None):
    """Image-valid masks for BoxInst's colour similarity: 1 over the real (resized) image,
    0 on the padding, and the last floor(bottom_pixels_removed * h / H0) rows of the resized
    image set to 0 (COCO boxes at the bottom border are unreliable; 10 px in the original
    frame). Sampled at [stride//2::stride] like box_ops.box_masks_inclusive.
    sizes: per-image (h, w); orig_sizes: per-image (H0, W0); device: where to build it (the
    inputs are host-side ints) -> float (B, Hp//s, Wp//s)."""
    hp, wp = padded_hw
    # int() of the same float expression as the reference: truncation, done on the host
    removed = [int(bottom_pixels_removed * float(h) / float(h0)) for (h, _), (h0, _) in zip(sizes, orig_sizes)]
    rows, cols = host_to_device([[h - r for (h, _), r in zip(sizes, removed)], [w for _, w in sizes]], device)  # (B,) each: valid rows, cols
    ys = stride_grid(hp, stride, device)  # (h,)
    xs = stride_grid(wp, stride, device)  # (w,)
    valid = (ys[None, :, None] < rows[:, None, None]) & (xs[None, None, :] < cols[:, None, None])  # (B, h, w)
    return valid.float()


def projection_loss(mask_logits, box_masks):
    """BoxInst projection term: mean over instances of dice(max_y p, max_y B) +
    dice(max_x p, max_x B), p = sigmoid(mask_logits), on the whole padded map.
    mask_logits, box_masks (N, 1, H, W) -> scalar (0, attached to the graph, when N = 0).
    Collective under torch.distributed: N = 0 takes the same path (empty sums), so a rank without
    positives still joins the instance-count all-reduce the other ranks make."""
    p = mask_logits.float().sigmoid()  # (N, 1, H, W)
    loss_y = dice_loss(p.amax(dim=2), box_masks.amax(dim=2))  # (N,) profiles along W
    loss_x = dice_loss(p.amax(dim=3), box_masks.amax(dim=3))  # (N,) profiles along H
    # mean over the instances of all ranks (the reference: of this rank): with DDP's gradient
    # averaging, N processes with batch b then train exactly like one process with batch N*b
    n_inst = reduce_mean(p.new_full((), float(p.shape[0])))  # a fill on the device: no host-to-device copy
    return (loss_x + loss_y).sum() / n_inst.clamp(min=1.0)


# skimage's sRGB (D65) -> XYZ matrix and D65 2-degree reference white
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(images):
    """CIE-Lab of RGB images in 0-255, the formulas of skimage.color.rgb2lab:
    sRGB gamma (x > 0.04045: ((x + 0.055)/1.055)^2.4, else x/12.92) -> XYZ -> / D65 white ->
    f(t) = t^(1/3) if t > 0.008856 else 7.787 t + 16/116 -> L = 116 f(Y) - 16,
    a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z)). images (B, 3, H, W) float -> (B, 3, H, W)."""
    rgb = images / 255.0  # (B, 3, H, W)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp(min=0) ** 2.4, rgb / 12.92)  # (B, 3, H, W)
    m = host_to_device(_XYZ_FROM_RGB, lin.device, lin.dtype)  # (3, 3)
    # an elementwise product-sum rather than a matmul: autocast would run a matmul in fp16
    xyz = (m[None, :, :, None, None] * lin[:, None]).sum(2)  # (B, 3, H, W)
    t = xyz / host_to_device(_WHITE_D65, lin.device, lin.dtype)[None, :, None, None]  # (B, 3, H, W)
    f = torch.where(t > 0.008856, t.clamp(min=0.008856) ** (1 / 3), 7.787 * t + 16 / 116)  # (B, 3, H, W)
    fx, fy, fz = f.unbind(1)  # each (B, H, W)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def unfold_wo_center(x, kernel_size=3, dilation=2):
    """The k*k - 1 neighbours of every pixel on a dilated k x k grid, centre left out, with
    zero padding ("same" size). Neighbour order is row-major over the kernel offsets
    (dy, dx), as F.unfold. x (B, C, H, W) -> (B, C, k*k-1, H, W)."""
    H, W = x.shape[-2:]
    pad = dilation * (kernel_size // 2)
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    centre = kernel_size * kernel_size // 2
    taps = [xp[:, :, i * dilation:i * dilation + H, j * dilation:j * dilation + W]
            for i in range(kernel_size) for j in range(kernel_size) if i * kernel_size + j != centre]
    return torch.stack(taps, dim=2)  # (B, C, k*k-1, H, W)


def color_similarity(images_uint8, valid, stride=4, kernel_size=3, dilation=2):
    """BoxInst colour affinity S_ij = exp(-||Lab_i - Lab_j||_2 / 2) between each pixel i of the
    stride-4 grid and its 8 dilated neighbours j, times the neighbour's image-valid value
    (padding, out-of-image and bottom-removed neighbours give 0; the centre's own validity is
    not applied, as the reference). The Lab image is the raw RGB image average-pooled
    stride x stride and truncated to integers (the reference casts to uint8).
    images_uint8 (B, 3, Hp, Wp), valid (B, Hp//s, Wp//s) -> (B, k*k-1, Hp//s, Wp//s)."""
    pooled = F.avg_pool2d(images_uint8.float(), kernel_size=stride, stride=stride).floor()  # (B, 3, h, w)
    lab = rgb_to_lab(pooled)  # (B, 3, h, w)
    diff = lab[:, :, None] - unfold_wo_center(lab, kernel_size, dilation)  # (B, 3, 8, h, w)
    sim = torch.exp(-diff.pow(2).sum(1).sqrt() * 0.5)  # (B, 8, h, w); = ||diff||_2, faster than .norm on CPU
    nb_valid = unfold_wo_center(valid[:, None].to(sim.dtype), kernel_size, dilation)[:, 0]  # (B, 8, h, w)
    return sim * nb_valid


def box_windows(x, top, left, hc, wc, index):
    """Windows of (hc, wc) cells from the maps x (B, C, H, W): window k starts at row top[k], column
    left[k] (either may be negative) of map index[k]. Cells off the map read the nearest
    map cell (clamped); box_window_valid says which are real. -> (N, C, hc, wc). One gather, by index
    arithmetic on the flattened maps, differentiable (its backward a scatter-add into one map-sized
    buffer); no copy of the N whole maps (at COCO scale 60 objects x 8 similarity channels: 130 MB)."""
    C = x.shape[1]
    return x.reshape(-1).gather(0, box_window_index(x.shape, top, left, hc, wc, index)).view(-1, C, hc, wc)


def box_window_index(shape, top, left, hc, wc, index):
    """box_windows' cells as indices into the flattened maps of `shape` (B, C, H, W) -> (N*C*hc*wc,) long."""
    B, C, H, W = shape
    rows = (top[:, None] + torch.arange(hc, device=top.device)).clamp(0, H - 1)  # (N, hc)
    cols = (left[:, None] + torch.arange(wc, device=top.device)).clamp(0, W - 1)  # (N, wc)
    idx = (rows[:, :, None] * W + cols[:, None, :]).flatten(1)  # (N, hc*wc)
    chan = (index[:, None] * C + torch.arange(C, device=top.device)) * (H * W)  # (N, C) # start of each map
    return (chan[:, :, None] + idx[:, None, :]).reshape(-1)  # (N*C*hc*wc,)


def box_window_valid(top, left, hc, wc, H, W):
    """(N, 1, hc, wc) float: 1 where the window cell lies on the (H, W) map, 0 off it."""
    r = top[:, None] + torch.arange(hc, device=top.device)  # (N, hc)
    c = left[:, None] + torch.arange(wc, device=top.device)  # (N, wc)
    ok = ((r >= 0) & (r < H))[:, :, None] & ((c >= 0) & (c < W))[:, None, :]  # (N, hc, wc)
    return ok[:, None].float()


def pairwise_loss(mask_logits, similarity, box_masks, color_thresh=0.3, kernel_size=3, dilation=2, im_inds=None):
    """BoxInst pairwise term: l_ij = -log( p_i p_j + (1 - p_i)(1 - p_j) ), stably
    -(logsig(m_i) + logsig(m_j) + softplus(-(m_i + m_j))); weights w_ij = [S_ij >= color_thresh] * B(i)
    (box mask at the centre pixel); loss = sum w l / max(sum w, 1) over all instances (sum w averaged
    over ranks). mask_logits (N, 1, H, W); similarity (N, 8, H, W), or the images' (B, 8, H, W) with
    im_inds (N,); box_masks (N, 1, H, W) -> scalar. S is 0 for neighbours off the map.
    Speed: w = 0 outside the box, so the sums run on windows around each box (box_windows), one size
    per group of instances of similar size (box_ops.size_groups: one size for all would pad a COCO batch's
    small boxes to its largest, and each cell costs 8 neighbours x 10 maps, forward and backward): the
    same sums (test_losses checks), 4-30x fewer cells."""
    mask_logits = mask_logits.float()  # fp32 even under autocast
    pad = dilation * (kernel_size // 2)
    H, W = mask_logits.shape[-2:]
    # each box mask's bounding cells (all zeros for an empty mask, so it never widens the windows)
    x0, y0, x1, y1 = masks_to_boxes(box_masks[:, 0] > 0).long().unbind(1)  # (N,) each; x1, y1 exclusive
    hw = torch.stack([y1 - y0, x1 - x0], 1).tolist()  # (N, 2) box sizes in cells, on the host
    total, w_sum = mask_logits.new_zeros(()), mask_logits.new_zeros(())
    plans = []  # per group: its instances (n,), the windows' first rows and columns (n,), their size
    for group in size_groups(hw, 2 * pad):
        g = host_to_device(group, mask_logits.device)  # (n,) instances of this group
        hc, wc = (max(hw[k][d] for k in group) + 2 * pad for d in (0, 1))
        plans.append((g, y0[g] - pad, x0[g] - pad, hc, wc))  # windows reach `pad` cells beyond the box on every side
    # every group's logit windows in ONE gather: its backward is one scatter into one buffer of the
    # logits' size (a gather per group would zero-fill that buffer once per group)
    flat = [box_window_index(mask_logits.shape, top, left, hc, wc, g) for g, top, left, hc, wc in plans]
    m_windows = mask_logits.reshape(-1).gather(0, torch.cat(flat)).split([len(f) for f in flat]) if plans else []
    for (g, top, left, hc, wc), m in zip(plans, m_windows):
        window = lambda x, index: box_windows(x, top, left, hc, wc, index)
        # cells off the map: their S and box mask read 0 (so w = 0), their logits any finite value
        on_map = box_window_valid(top, left, hc, wc, H, W)  # (n, 1, hc, wc)
        m = m.view(-1, 1, hc, wc)  # (n, 1, hc, wc)
        log_fg = F.logsigmoid(m)  # (n, 1, hc, wc)
        nbr_m = unfold_wo_center(m, kernel_size, dilation)[:, 0]  # (n, 8, hc, wc)
        nbr_log_fg = unfold_wo_center(log_fg, kernel_size, dilation)[:, 0]  # (n, 8, hc, wc)
        loss = -(log_fg + nbr_log_fg + F.softplus(-(m + nbr_m)))  # (n, 8, hc, wc)
        s_index = g if im_inds is None else im_inds[g]
        w = (window(similarity, s_index) >= color_thresh).to(loss.dtype) * window(box_masks.to(loss.dtype), g) * on_map
        total = total + (loss * w).sum()
        w_sum = w_sum + w.sum()
    return total / reduce_mean(w_sum).clamp(min=1.0)


def mask_fill_ratio(mask_logits, boxes, padded_hw, stride=4):
    """The share of its box that each predicted mask covers: cells of the box's mask (box_masks_inclusive)
    where sigmoid(logit) > 0.5 (logit > 0), over the box's cells. mask_logits (N, 1, Hp/s, Wp/s), boxes
    (N, 4) xyxy -> (N,), 0 for an empty box. Not a loss: the "masks became boxes" guard of train.py reads
    its mean; box-supervised masks that fill ~1 of their boxes have collapsed to the projection loss's
    trivial solution (the box itself satisfies both projections)."""
    box = box_masks_inclusive(boxes, padded_hw, stride)  # (N, Hp/s, Wp/s)
    inside = ((mask_logits.detach()[:, 0] > 0).to(box.dtype) * box).flatten(1).sum(1)  # (N,)
    return inside / box.flatten(1).sum(1).clamp(min=1)


def pairwise_warmup(it, warmup_iters=10000):
    """Pairwise-loss weight min(it / warmup_iters, 1). `it` is 1-based (the reference bumps
    its counter before use), so the first iteration already weighs 1 / warmup_iters."""
    return min(it / warmup_iters, 1.0)

# -----------------------------------------------------------------------------
# SIM losses (paper Eq. 8-10)


def weighted_bce_dice(mask_logits, target, weight):
    """l_mask of Eq. (8)/(9) per instance: sum(w * bce) / max(sum(w), 1) + dice(sigmoid(m) w, target w).
    Both terms per instance, so every positive counts once in Eq. 8's 1/N_pos whatever its box size;
    ignored pixels (w = 0) drop out. mask_logits, target, weight (N, ...) -> (N,)."""
    m = mask_logits.float().flatten(1)  # (N, P), fp32 even under autocast
    t = target.flatten(1).to(m.dtype)  # (N, P)
    w = weight.flatten(1).to(m.dtype)  # (N, P)
    bce = F.binary_cross_entropy_with_logits(m, t, reduction='none')  # (N, P)
    bce = (w * bce).sum(1) / w.sum(1).clamp(min=1.0)  # (N,)
    return bce + dice_loss(m.sigmoid() * w, t * w)


def pseudo_mask_loss(mask_logits, pseudo_masks, weights):
    """Eq. (8): L_pseudo = 1/N_pos sum_k l_mask(M_pred^k, M_hat_k, W_k), l_mask = weighted
    BCE + dice (weighted_bce_dice), with M_hat_k the pseudo mask of the object that positive k
    belongs to and W_k its ignore weight (0 for ambiguous pixels).
    mask_logits, pseudo_masks, weights (N, ...) -> scalar (0, attached, when N = 0)."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    return weighted_bce_dice(mask_logits, pseudo_masks, weights).mean()


def paste_loss(mask_logits, paste_masks, pasted, weights=None, reduction="mean"):
    """Eq. (9): L_paste = sum_k 1_paste(k) l_mask(M_pred^k, M_hat'^k) over the positives of pasted
    objects, against the mask each was pasted with: summed as Eq. (9) writes it (reduction="sum"), or
    averaged over them as Eq. (8) averages L_pseudo ("mean": then the term's scale does not grow with the
    number of pasted positives). weights default to 1 everywhere: a pasted object's mask is fully
    known. mask_logits, paste_masks (N, ...), pasted (N,) bool, weights (N, ...) or None -> scalar
    (0, attached, when nothing is pasted)."""
    if weights is None:
        weights = torch.ones_like(mask_logits)
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    ind = pasted.to(mask_logits.dtype)  # (N,)
    per_inst = weighted_bce_dice(mask_logits, paste_masks, weights)  # (N,)
    return (per_inst * ind).sum() / (ind.sum().clamp(min=1.0) if reduction == "mean" else 1.0)


def official_focal_loss(mask_logits, target, weight):
    """The official code's pseudo-mask loss (docs/official_code.md §6.3), for the `official` preset only:
    FQ = sum w * a_t * (1 - p_t)^2 * BCEwithLogits(p, t) / (sum w + 1), p = sigmoid(logits),
    p_t = p t + (1 - p)(1 - t), a_t = 0.25 t + 0.75 (1 - t). Its quirk is kept: the BCE receives the
    probability p as its logit (a double sigmoid), so the CE part is bounded. Normalised by the
    total weight of all instances (pixel level). mask_logits, target, weight (N, ...) -> scalar."""
    p = mask_logits.float().sigmoid()  # (N, ...)
    t = target.to(p.dtype)
    w = weight.to(p.dtype)
    ce = F.binary_cross_entropy_with_logits(p, t, reduction='none')  # the quirk: p, not the logits
    p_t = p * t + (1 - p) * (1 - t)
    a_t = 0.25 * t + 0.75 * (1 - t)
    return (w * a_t * (1 - p_t) ** 2 * ce).sum() / (w.sum() + 1)


def official_paste_loss(mask_logits, paste_masks, pasted, weights=None, n_pos=None):
    """The official code's paste loss (docs/official_code.md §6.4), for the `official` preset only:
    official_focal_loss under W_p (1 on every pixel of pasted positives, 0 for the others; times
    `weights`, e.g. the image-valid mask) plus dice(p W_p, t W_p) averaged over ALL positives (a
    non-pasted positive adds a constant 1, no gradient). Arguments as paste_loss -> scalar.
    n_pos: the number of positives when only some are passed (sim_losses passes the pasted ones: the
    others add exactly 0 to the focal term and 1 to the dice sum); None: all are passed."""
    n = mask_logits.shape[0] if n_pos is None else n_pos
    if n == 0:
        return mask_logits.sum() * 0
    w = pasted.to(mask_logits.dtype).view(-1, *[1] * (mask_logits.dim() - 1)).expand_as(mask_logits)
    if weights is not None:
        w = w * weights.to(w.dtype)
    p = mask_logits.float().sigmoid()
    dice = dice_loss(p * w, paste_masks.to(p.dtype) * w)  # (N,)
    return official_focal_loss(mask_logits, paste_masks, w) + (dice.sum() + (n - mask_logits.shape[0])) / n


def pseudo_loss_weight(it, lambda1=0.5, sim_start_iter=10000, ramp_iters=0, ramp_origin=-1):
    """Eq. (10)'s weight of L_pseudo at 1-based iteration it: 0 until sim_start_iter, then lambda1,
    or with ramp_iters > 0 lambda1 * min((it - origin) / ramp_iters, 1), origin = sim_start_iter
    when ramp_origin < 0. The paper steps; nanoSIM ramps (a young teacher's labels would arrive at
    peak lr at full strength: BENCHMARKS.md, Decisions); the official code ramps from 0 over 270k."""
    if it <= sim_start_iter:
        return 0.0
    if ramp_iters <= 0:
        return lambda1
    origin = sim_start_iter if ramp_origin < 0 else ramp_origin
    return lambda1 * min(max(it - origin, 0) / ramp_iters, 1.0)


LOSS_KEYS = ('loss_fcos_cls', 'loss_fcos_loc', 'loss_fcos_ctr',  # FCOS
             'loss_mask',  # CondInst full supervision (dice)
             'loss_prj', 'loss_pairwise',  # BoxInst
             'loss_pseudo', 'loss_paste')  # SIM, Eq. 8 and 9


def total_loss(losses, it, lambda1=0.5, lambda2=1.0, sim_start_iter=10000, pair_warmup_iters=10000,
               lambda1_ramp_iters=0, lambda1_ramp_origin=-1):
    """Eq. (10): L = L_fcos + L_proj + w_pair(it) L_pair + lambda1 L_pseudo + lambda2 L_paste, `it`
    1-based; the SIM terms count after sim_start_iter (the BoxInst warm-up). Absent keys are absent
    terms (BoxInst, full supervision); an unknown key is an error. -> (total, weighted terms detached)."""
    unknown = set(losses) - set(LOSS_KEYS)
    if unknown:
        raise KeyError(f'unknown loss terms {sorted(unknown)}')
    sim_on = 1.0 if it > sim_start_iter else 0.0
    weight = {'loss_pairwise': pairwise_warmup(it, pair_warmup_iters),
              'loss_pseudo': pseudo_loss_weight(it, lambda1, sim_start_iter, lambda1_ramp_iters, lambda1_ramp_origin),
              'loss_paste': lambda2 * sim_on}
    weighted = {k: v * weight.get(k, 1.0) for k, v in losses.items()}
    total = sum(weighted.values())
    return total, {k: v.detach() for k, v in weighted.items()}


# -----------------------------------------------------------------------------
# Putting it together: the losses of one training step


def gt_mask_targets(masks, padded_hw, stride=4):
    """CondInst's full-supervision targets: GT masks (N, h, w) of one image, zero-padded to the
    batch's padded size and sampled at [stride//2::stride] -> float (N, Hp//stride, Wp//stride)."""
    hp, wp = padded_hw[0] // stride, padded_hw[1] // stride
    m = masks[:, stride // 2::stride, stride // 2::stride].float()  # (N, <=hp, <=wp)
    return F.pad(m, (0, wp - m.shape[2], 0, hp - m.shape[1]))  # (N, hp, wp)


def object_paste_masks(target, padded_hw, stride=4):
    """One image's pasted pseudo masks, object by object, on the mask-out grid -> bool (N, Hp/s, Wp/s), False
    for objects that were not pasted. target['paste_masks'] (P, h, w) holds a row for each object whose
    'pasted' is True, in object order (copypaste.with_paste_fields); sampled as gt_mask_targets."""
    hp, wp = padded_hw[0] // stride, padded_hw[1] // stride
    rows = target['paste_masks'][:, stride // 2::stride, stride // 2::stride]  # (P, <=hp, <=wp)
    rows = F.pad(rows, (0, wp - rows.shape[2], 0, hp - rows.shape[1]))  # (P, hp, wp)
    if rows.shape[0] == 0:  # nothing pasted ('pasted' may be absent then)
        return torch.zeros(len(target['boxes']), hp, wp, dtype=torch.bool, device=rows.device)
    pasted = target['pasted']  # (N,)
    # object k reads row (number of pasted objects before k); no host sync
    row_of = (torch.cumsum(pasted.long(), 0) - 1).clamp(min=0)  # (N,)
    return rows.bool()[row_of] & pasted[:, None, None]  # (N, hp, wp)


def object_box_masks(targets, padded_hw, stride=4, occlusion_aware=True):
    """Every object's box mask on the mask-out grid, batch order -> float (G, Hp/s, Wp/s).

    occlusion_aware: pixels copy-paste covered with ANOTHER object ('paste_area' minus the object's own
    pasted mask, object_paste_masks) leave the box, so an occluded object does not claim its occluder in
    any loss (the official code: box AND NOT pasted, docs/official_code.md §7.4). Built on the grid (sampling
    commutes with the pixelwise AND / NOT), not at full resolution."""
    boxes = torch.cat([t['boxes'] for t in targets])  # (G, 4)
    masks = box_masks_inclusive(boxes, padded_hw, stride)  # (G, Hp/s, Wp/s)
    if occlusion_aware and any('paste_area' in t for t in targets):
        hp, wp = padded_hw[0] // stride, padded_hw[1] // stride
        hidden = [gt_mask_targets(t['paste_area'][None], padded_hw, stride).bool()
                  & ~object_paste_masks(t, padded_hw, stride) if 'paste_area' in t
                  else torch.zeros(len(t['boxes']), hp, wp, dtype=torch.bool, device=boxes.device)
                  for t in targets]  # (N_b, Hp/s, Wp/s) each
        masks = masks.masked_fill(torch.cat(hidden), 0)
    return masks


def gt_mask_loss(mask_logits, targets, gt_inds, padded_hw, stride=4):
    """CondInst's mask loss: dice against the GT masks, mean over the positives of all ranks.
    mask_logits (K, 1, Hp/s, Wp/s) of positives whose objects are gt_inds (K,) -> scalar (0 with K = 0,
    after the same all-reduce: collective on every rank)."""
    gt = torch.cat([gt_mask_targets(t['masks'], padded_hw, stride) for t in targets])[gt_inds]  # (K, Hp/s, Wp/s)
    n_inst = reduce_mean(mask_logits.new_full((), float(mask_logits.shape[0])))
    return dice_loss(mask_logits.float().sigmoid(), gt[:, None]).sum() / n_inst.clamp(min=1.0)


def split_by_mask(targets, gt_inds):
    """Positives (objects gt_inds (K,)) whose object trains from its box, and those whose object has a GT
    mask (targets' 'has_mask', --mask_fraction) -> (indices (K_b,), indices (K_m,)), each in order. One
    host read (the split's size)."""
    has = torch.cat([t['has_mask'] for t in targets])[gt_inds]  # (K,)
    order = torch.argsort(has.to(torch.uint8), stable=True)  # box-only first
    n_box = len(gt_inds) - int(has.sum())
    return order[:n_box], order[n_box:]


def mask_shares(n, gt_mask_weight=1.0):
    """The weights of the box-only and the GT-mask positives' mask terms (each a mean over its own
    positives) from their counts n (2,) = (box, mask): shares of one, a mask positive weighing gt_mask_weight
    box positives -> (2,). gt_mask_weight = 1: every positive weighs the same. Summing to one keeps the mask
    loss as large as without masks against the detector's terms (10% of the objects' dice, each averaged on
    its own, pulling as hard as the other 90% together cost 9 box AP). A mask teaches the exact shape, a box
    only a bound on it: config's default 4 lets the few masks count more than their number."""
    w = n * n.new_tensor([1.0, gt_mask_weight])
    return w / w.sum().clamp(min=1e-12)


def compute_losses(out, images, targets, cfg, it, extra=None, pair_affinity=None):
    """All loss terms of a training step from the model's training output (model.CondInst.forward),
    combined by Eq. (10). it is 1-based. extra: further terms (SIM's loss_pseudo, loss_paste);
    pair_affinity (B, 8, Hp/s, Wp/s): a factor on the colour similarity (sim.feature_affinity).
    Returns (total, dict of the weighted terms for logging)."""
    image_weights = None
    if not cfg['paste_detector'] and any('pasted' in t for t in targets):
        # composites out of the detector's losses: copy-paste trains the masks only
        image_weights = torch.stack([(~t['pasted'].any()).float() if 'pasted' in t else torch.ones(())
                                     for t in targets]).to(images.device)  # (B,)
    terms = fcos_losses(out['cls_logits'], out['reg'], out['ctr_logits'], out['targets'], image_weights)
    inst, logits = out['inst'], out['mask_logits']  # gt_inds (K,), (K, 1, Hp/s, Wp/s)
    padded_hw = images.shape[-2:]
    s = cfg['mask_out_stride']  # the stride of the mask logits
    if cfg['method'] == 'full':  # CondInst: dice against the GT masks
        terms['loss_mask'] = gt_mask_loss(logits, targets, inst['gt_inds'], padded_hw, s)
    else:  # BoxInst: projection + pairwise from the boxes alone
        bmask = object_box_masks(targets, padded_hw, s, cfg['occlusion_aware'])[inst['gt_inds']][:, None]  # (K, 1, Hp/s, Wp/s)
        valid = image_valid_masks([t['size'] for t in targets], [t['orig_size'] for t in targets], padded_hw, s,
                                  bottom_pixels_removed=cfg['bottom_pixels_removed'], device=images.device)
        sim = color_similarity(images, valid, s)  # (B, 8, Hp/s, Wp/s)
        im_inds = inst['im_inds']  # (K,)
        share = None
        if cfg['mask_fraction'] > 0:  # some masks, many boxes: the positives of objects with a mask train from it
            box_pos, mask_pos = split_by_mask(targets, inst['gt_inds'])  # (K_b,), (K_m,)
            # each term is a mean over its own positives; weighted by its share of all positives (of all
            # ranks), every positive weighs the same: 10% of objects with a mask would otherwise pull as hard
            # as the other 90% together (BENCHMARKS.md: box AP 50.2 -> 40.9 at --mask_fraction=0.1 without)
            n = reduce_mean(host_to_device([len(box_pos), len(mask_pos)], logits.device, torch.float32))  # (2,)
            share = mask_shares(n, cfg['gt_mask_weight'])  # (2,) box, mask
            terms['loss_mask'] = share[1] * gt_mask_loss(logits[mask_pos], targets, inst['gt_inds'][mask_pos],
                                                         padded_hw, s)
            logits, bmask, im_inds = logits[box_pos], bmask[box_pos], im_inds[box_pos]  # the rest: from the box
        terms['loss_prj'] = projection_loss(logits, bmask)
        thresh = cfg['color_thresh']
        if pair_affinity is not None:  # the official preset: colour x teacher-feature affinity
            sim, thresh = sim * pair_affinity, cfg['color_feat_thresh']
        terms['loss_pairwise'] = pairwise_loss(logits, sim, bmask, thresh, im_inds=im_inds)
        if share is not None:
            terms['loss_prj'], terms['loss_pairwise'] = share[0] * terms['loss_prj'], share[0] * terms['loss_pairwise']
    terms.update(extra or {})
    return total_loss(terms, it, cfg['lambda1'], cfg['lambda2'], cfg['sim_start_iter'],
                      cfg['pairwise_warmup_iters'], lambda1_ramp_length(cfg), cfg['lambda1_ramp_origin'])


def lambda1_ramp_length(cfg):
    """The iterations L_pseudo's weight ramps over: cfg's lambda1_ramp_iters, or with -1 (nanosim) the
    teacher's head start sim_start_iter - teacher_start_iter (300 on the demo, 5000 on COCO): a young
    teacher's labels grow in weight for as long as the teacher had to mature before they started."""
    n = cfg['lambda1_ramp_iters']
    return cfg['sim_start_iter'] - cfg['teacher_start_iter'] if n < 0 else n
