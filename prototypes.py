"""SIM's semantic-aware pseudo masks (CVPR 2023, Sec. 3.2), Eq. (1)-(7), and nothing else.

Multi-prototype memory (C classes x L sub-centres x D channels), the semantic map M_S of Eq. (1),
the Sinkhorn-Knopp equipartition of Eq. (2)-(3), the moving-average update of Eq. (4)-(5),
self-correction with IoU-weighted positives (Eq. 6), the rectified map (Eq. 7) and the two-threshold
pseudo labels with their ignore band (used by Eq. 8 in losses.py).

All maths are pure functions of tensors; PrototypeMemory is the one nn.Module, holding the
prototypes as a buffer (state, not a trained parameter). Everything runs on the inputs' device.
Spec: /work/shared/spec/sim.md Sec. 2-3; official-code differences are options, named as such.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# features


def normalize_features(mask_feats):
    """Stride-8 mask-branch output (B, D, H8, W8) -> unit pixel features z_i (B, D, 2*H8, 2*W8).

    z_i = z_i / ||z_i||_2 (Sec. 3.2.1) on the stride-4 grid.
    Choice: plain bilinear x2 with align_corners=False. The model puts stride-8 cell j at pixel
    8j + 4 (compute_locations), so output i samples input i/2 - 1/4, i.e. pixel 4i + 2: exactly the
    [2::4] grid on which BoxInst's stride-4 box masks are sampled (border rows are replicated).
    model.aligned_bilinear would land on pixel 4i instead, 2 px off that grid. The same holds one
    octave down (mask_out_stride 2: stride-4 features -> the [1::2] grid). Returned in float32
    because the prototypes are a float32 buffer (no dtype mixing outside autocast).
    """
    z = F.interpolate(mask_feats.float(), scale_factor=2, mode="bilinear", align_corners=False)  # (B, D, H4, W4)
    return F.normalize(z, dim=1)                                                               # (B, D, H4, W4)


# -----------------------------------------------------------------------------
# Eq. (1): semantic map


def semantic_map(feats, protos, tau=0.1):
    """Eq. (1): M_S(i) = sigmoid( max_l <z_i, p_l> / tau ).

    feats (..., D, H, W) unit vectors; protos (..., L, D) unit vectors of one class (per leading
    index); leading dims broadcast: (D,H,W) with (L,D) -> (H,W); (K,D,H,W) with (K,L,D) -> (K,H,W);
    (B,D,H,W) with (L,D) -> (B,H,W). The max is taken before the sigmoid (monotone, same result).
    """
    H, W = feats.shape[-2:]
    sims = protos @ feats.flatten(-2)                      # (..., L, H*W) cosine similarities
    best = sims.amax(dim=-2)                               # (..., H*W) best sub-centre per pixel
    return torch.sigmoid(best / tau).unflatten(-1, (H, W))  # (..., H, W)


def object_semantic_maps(feats, protos, obj_img, obj_cls, tau=0.1):
    """Eq. (1) per object: M_S of object k uses its image's features and its class's sub-centres.

    feats (B, D, H, W) unit; protos (C, L, D); obj_img (K,) long; obj_cls (K,) long -> (K, H, W).
    Maps are over the whole (padded) image; callers keep them inside the box (Eq. 7).
    """
    return semantic_map(feats[obj_img], protos[obj_cls], tau)  # (K, D, H, W) x (K, L, D) -> (K, H, W)


def calibrated_semantic_map(feats, protos, bg_protos, tau=0.1):
    """nanoSIM's departure from Eq. (1): M_S(i) = sigmoid( (max_l <z_i, p_l^c> - max_l <z_i, b_l^c>) / tau ).

    Why: Eq. (1) has no background reference. On features that rank object above in-box background
    but keep both at positive cosine to the class prototypes (every pixel of a box looks somewhat
    like its class), sigmoid(cos / tau) >= 0.5 for all of them at any tau, so M_S cannot call any
    in-box pixel background (BENCHMARKS.md: 100% of in-box background > 0.7 at tau = 0.1). Scoring
    against background sub-centres b^c (learnt from the confident background inside boxes of class
    c) puts the decision at the midpoint between the two sets: M_S > 0.5 exactly where the pixel
    is closer to the class than to its in-box background. Shapes as semantic_map; bg_protos like protos.
    """
    H, W = feats.shape[-2:]
    z = feats.flatten(-2)                                  # (..., D, H*W)
    fg = (protos @ z).amax(dim=-2)                         # (..., H*W) best class sub-centre
    bg = (bg_protos @ z).amax(dim=-2)                      # (..., H*W) best background sub-centre
    return torch.sigmoid((fg - bg) / tau).unflatten(-1, (H, W))  # (..., H, W)


def _spread_pick(seed, k):
    """Up to k pixel indices per row of seed (G, N) bool, spread over the row by a fixed hash order
    (Knuth's multiplicative hash: no RNG, the same on every rank) -> indices (G, k'), valid (G, k')."""
    N = seed.shape[1]
    order = (torch.arange(N, device=seed.device) * 2654435761) % 4294967296                 # (N,) distinct
    score = torch.where(seed, order.to(torch.float64)[None], -1.0)                          # (G, N)
    top = score.topk(min(k, N), dim=1)                                                      # (G, k')
    return top.indices, top.values >= 0


def _seed_colours(c, seed, k):
    """Up to k seed colours per object: c (G, 3, N) colours, seed (G, N) bool -> (G, k', 3), valid (G, k')."""
    idx, ok = _spread_pick(seed, k)                                                         # (G, k'), (G, k')
    return c.gather(2, idx[:, None].expand(-1, 3, -1)).transpose(1, 2), ok                 # (G, k', 3)


def _nearest_colour(pix, g, ref, ok):
    """Distance from each pixel colour pix (M, 3) to the nearest valid colour of its object g (M,) among
    ref (G, k, 3), ok (G, k) -> (M,); inf where the object has none."""
    d = (pix[:, None] - ref[g]).pow(2).sum(-1).sqrt()                                       # (M, k)
    return d.masked_fill(~ok[g], math.inf).amin(1)                                          # (M,)


def color_map(lab, fg_seed, bg_seed, region=None, n_seeds=64, t=2.0, ring_seed=None, min_contrast=0.0):
    """nanoSIM's colour evidence for Eq. (7): M_C(i) = sigmoid( (min_k ||c_i - b_k|| - min_k ||c_i - f_k||) / t ).

    lab (G, 3, H, W): each object's image in CIE-Lab on the mask grid; fg_seed, bg_seed (G, H, W) bool:
    pixels whose colours stand for the object (the teacher's confident foreground) and for what is not
    the object (a ring just outside its box, and the teacher's confident in-box background). f_k, b_k:
    up to n_seeds seed colours of each set (_spread_pick). M_C > 0.5 where a pixel's colour is closer to
    the object's than to its surroundings'; 0.5 (no evidence) for objects lacking either set and
    outside `region` (G, H, W) bool (None: everywhere; the caller passes the box: only in-box pixels are
    computed, ~20x fewer than the whole map). -> (G, H, W).
    ring_seed (G, H, W) bool, min_contrast (Lab units): foreground seeds whose colour lies within
    min_contrast of a colour of the ring (outside the box: evidence the teacher had no part in) are
    dropped. Why: the teacher's confident area spills into background (a concave bay); with those
    pixels as object colours every background pixel has an object seed of its own colour and M_C ties
    at 0.5 exactly where it should say background.
    Why a colour map at all: the semantic maps read the same network features as M_I, and where the
    teacher is unsure they are near chance (BENCHMARKS.md, ablate.py --ms_stats); the colours at the
    box's rim are evidence the network never produced. The paper has no such term; it is the
    multi-prototype idea of Eq. (1) applied to colour, with per-object "sub-centres" that are colour samples.
    """
    G, _, H, W = lab.shape
    c = lab.flatten(2).float()                                                              # (G, 3, N)
    fg_seed, bg_seed = fg_seed.flatten(1), bg_seed.flatten(1)                               # (G, N) each
    if ring_seed is not None and min_contrast > 0:
        ring_ref, ring_ok = _seed_colours(c, ring_seed.flatten(1), n_seeds)                 # (G, k, 3)
        g, n = fg_seed.nonzero(as_tuple=True)                                               # (M_f,) each
        keep = _nearest_colour(c[g, :, n], g, ring_ref, ring_ok) >= min_contrast           # (M_f,)
        fg_seed = torch.zeros_like(fg_seed).index_put_((g[keep], n[keep]), keep[keep])   # all True
    region = torch.ones_like(fg_seed) if region is None else region.flatten(1).bool()
    g, n = region.nonzero(as_tuple=True)                                                    # (M,) each
    pix = c[g, :, n]                                                                        # (M, 3)
    (f_ref, f_ok), (b_ref, b_ok) = _seed_colours(c, fg_seed, n_seeds), _seed_colours(c, bg_seed, n_seeds)
    m = torch.sigmoid((_nearest_colour(pix, g, b_ref, b_ok) - _nearest_colour(pix, g, f_ref, f_ok)) / t)  # (M,)
    m = torch.where((f_ok.any(1) & b_ok.any(1))[g], m, torch.full_like(m, 0.5))
    return torch.full((G, H * W), 0.5, device=lab.device).index_put_((g, n), m).view(G, H, W)


def _dilate(mask, r):
    """Binary dilation of mask (..., H, W) bool by a (2r+1) x (2r+1) square: shifted ORs along rows,
    then along columns (5x faster on CPU than max_pool2d, which has no bool path)."""
    rows = mask.clone()
    for s in range(1, r + 1):
        rows[..., s:] |= mask[..., :-s]
        rows[..., :-s] |= mask[..., s:]
    out = rows.clone()
    for s in range(1, r + 1):
        out[..., s:, :] |= rows[..., :-s, :]
        out[..., :-s, :] |= rows[..., s:, :]
    return out


def color_seeds(box_mask, m_i, valid, conf=0.7, ring=3):
    """The seed pixels of color_map: fg = in the box where M_I > conf; bg = a ring of `ring` cells
    around the box (on the image, not padding) or in the box where M_I < 1 - conf.
    box_mask, m_i (G, H, W), valid (G, H, W) -> (fg, bg, ring) bool (G, H, W)."""
    inside = box_mask > 0                                                                   # (G, H, W)
    grown = _dilate(inside, ring)                                                           # (G, H, W)
    fg = inside & (m_i > conf)
    around = grown & ~inside & (valid > 0)
    return fg, around | (inside & (m_i < 1 - conf)), around


# -----------------------------------------------------------------------------
# Eq. (2)-(5): prototype update


def sinkhorn(scores, eps=0.05, n_iters=3, groups=None, n_groups=1):
    """Eq. (3): Q* = diag(u) exp(S / eps) diag(v), the Sinkhorn-Knopp solution of Eq. (2).

    Eq. (2): max_Q Tr(Q^T S) + eps H(Q) with every sub-centre (column) summing to 1/L and every
    pixel (row) to 1/N. scores S (N, L): cosine similarities of N pixels to L sub-centres.
    Each of n_iters iterations normalises the columns, then the rows (as SwAV). Returns Q (N, L)
    scaled by N so each row sums to 1 (a pixel's soft assignment); columns then sum to ~N/L.
    Computed in log space (logsumexp subtracts the max), in float32: exp(S / eps) with eps = 0.05
    spans e^40 and would underflow to 0/0 for smaller eps; the log form never gives NaN/inf.
    groups (N,) long in [0, n_groups) packs independent problems (one per class) into one call:
    column sums and N are taken per group, so no Python loop over classes is needed.
    """
    N, L = scores.shape
    if groups is None:
        groups = torch.zeros(N, dtype=torch.long, device=scores.device)               # (N,)
    log_q = scores.float() / eps                                                       # (N, L)
    n_per_group = torch.zeros(n_groups, device=scores.device).index_add_(
        0, groups, torch.ones(N, device=scores.device))                                # (G,)
    log_n = n_per_group.clamp(min=1).log()[groups]                                     # (N,)
    for _ in range(n_iters):
        # columns: sub-centre l of group g receives total mass 1/L
        log_q = log_q - _group_logsumexp(log_q, groups, n_groups)[groups] - math.log(L)  # (N, L)
        # rows: pixel i receives total mass 1/N_g
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True) - log_n[:, None]           # (N, L)
    return (log_q + log_n[:, None]).exp()                                               # (N, L) rows sum to 1


def _group_logsumexp(x, groups, n_groups):
    """log sum_{i in group g} exp(x_i) for x (N, L), groups (N,) -> (G, L); -inf for empty groups."""
    idx = groups[:, None].expand_as(x)                                                 # (N, L)
    m = torch.full((n_groups, x.shape[1]), -math.inf, device=x.device, dtype=x.dtype)
    m = m.scatter_reduce(0, idx, x, reduce="amax")                                     # (G, L) per-group max
    s = torch.zeros_like(m).index_add_(0, groups, (x - m[groups]).exp())               # (G, L), >= 1 if non-empty
    return m + s.log()                                                                 # (G, L)


def cluster_centroids(feats, assign, L):
    """Eq. (5): p_l = sum_i z_i 1(Q_il = 1) / sum_i 1(Q_il = 1), then l2-normalised.

    feats (N, D); assign (N,) long in [0, L) (hard assignment); returns centroids (L, D), unit
    (zero rows for empty clusters), and counts (L,) long. Normalising the sum equals normalising
    the mean. L may be C*L flattened (class-major) to do all classes in one call.
    """
    sums = torch.zeros(L, feats.shape[1], device=feats.device, dtype=feats.dtype)
    sums = sums.index_add_(0, assign, feats)                                           # (L, D)
    counts = torch.zeros(L, dtype=torch.long, device=feats.device)
    counts = counts.scatter_add_(0, assign, torch.ones_like(assign))                   # (L,)
    return F.normalize(sums, dim=-1), counts


def ema_update(protos, centroids, counts, gamma=0.999, norm_dim=-1):
    """Eq. (4): p_l <- gamma * p_l + (1 - gamma) * c_l, then l2-normalised, only where count_l > 0.

    protos, centroids (..., L, D); counts (..., L). norm_dim -1 (the paper: unit sub-centres):
    sub-centres that received no pixel are returned bit-identical (no renormalisation either).
    norm_dim -2 reproduces the official code's normalisation along L (sim_official.md 4.2): the
    moved rows are mixed in, then every (class, channel) column over L is scaled to unit norm.
    """
    has = (counts > 0)[..., None]                                                      # (..., L, 1)
    mixed = torch.where(has, gamma * protos + (1.0 - gamma) * centroids, protos)       # (..., L, D)
    if norm_dim == -1:
        return torch.where(has, F.normalize(mixed, dim=-1), protos)                    # (..., L, D)
    return F.normalize(mixed, dim=norm_dim)                                            # (..., L, D)


class PrototypeMemory(nn.Module):
    """C x L x D unit prototypes (sub-centres), a buffer updated by Eq. (2)-(5); no trained parameters.

    Beside the class sub-centres `protos` it keeps C x L background sub-centres `bg_protos`, learnt
    the same way from the confident background inside each class's boxes: the reference of
    calibrated_semantic_map (nanoSIM's default map). Eq. (1) never reads them.

    Update granularity (the paper's Eq. 5 is a per-image centroid; the official code updates image
    by image): we pool each class's pixels over the whole local batch of this rank and make one
    Sinkhorn + one EMA step per class per call, then average over ranks. Reason: the prototypes'
    rate of change then does not depend on the per-GPU batch size or on how many images of it show
    the class; with the official 2 images/GPU this differs by at most one extra EMA step.
    """

    def __init__(self, num_classes, L=10, D=16, gamma=0.999, tau=0.1, eps=0.05, sinkhorn_iters=3,
                 assign="argmax", norm="D"):
        super().__init__()
        assert assign in ("argmax", "gumbel") and norm in ("D", "L")
        self.gamma = gamma            # Eq. (4) momentum
        self.tau = tau                # Eq. (1) temperature (official code: 1.0)
        self.eps = eps                # Eq. (2) entropy weight
        self.sinkhorn_iters = sinkhorn_iters
        self.assign = assign          # "argmax" (paper) or "gumbel" (official: hard Gumbel draw)
        # "D": unit sub-centres (the paper); "L": the official code's normalisation along L (a bug,
        # for the official preset only: sub-centres are then not unit vectors, sim_official.md 4.2)
        self.norm_dim = -1 if norm == "D" else -2
        protos = torch.empty(2, num_classes, L, D)
        # timm-style trunc_normal_ (bounds +-2 absolute, i.e. ~100 std: effectively normal), then
        # normalised. Drawn from the global RNG: callers seed identically on all ranks so every rank
        # starts equal. Class sub-centres first, so they do not depend on the background ones.
        nn.init.trunc_normal_(protos, std=0.02)
        protos = F.normalize(protos, dim=self.norm_dim)
        self.register_buffer("protos", protos[0].clone())                              # (C, L, D)
        self.register_buffer("bg_protos", protos[1].clone())                           # (C, L, D)

    def semantic_maps(self, feats_norm, obj_img, obj_cls, calibrated=False, region=None):
        """M_S for K objects: feats_norm (B, D, H, W), obj_img (K,), obj_cls (K,) -> (K, H, W).
        Eq. (1), or with calibrated=True calibrated_semantic_map against the class's background sub-centres.
        region (K, H, W) bool: computed there only (0 elsewhere): SIM reads M_S inside the box alone,
        a tenth of the map, so it gathers those pixels instead of K copies of the feature maps."""
        if region is None:
            if not calibrated:
                return object_semantic_maps(feats_norm, self.protos, obj_img, obj_cls, self.tau)
            return calibrated_semantic_map(feats_norm[obj_img], self.protos[obj_cls], self.bg_protos[obj_cls], self.tau)
        k, y, x = region.nonzero(as_tuple=True)                                        # (M,) each
        z = feats_norm[obj_img[k], :, y, x][:, :, None, None]                           # (M, D, 1, 1): a 1x1 map per pixel
        cls = obj_cls[k]                                                               # (M,)
        if calibrated:
            m = calibrated_semantic_map(z, self.protos[cls], self.bg_protos[cls], self.tau)  # (M, 1, 1)
        else:
            m = semantic_map(z, self.protos[cls], self.tau)                            # (M, 1, 1)
        return feats_norm.new_zeros(region.shape).index_put_((k, y, x), m.view(-1))   # (K, H, W)

    def _updated(self, protos, z_all, obj_img, obj_cls, sel, B, H, W):
        """Eq. (2)-(5) for one set of sub-centres (C, L, D) from the pixels sel (K, H, W) -> new (C, L, D)."""
        C, L, D = protos.shape
        k, y, x = sel.nonzero(as_tuple=True)                                           # (M0,) each
        # one key per (class, image, pixel), class-major, deduplicated
        key = torch.unique((obj_cls[k] * B + obj_img[k]) * (H * W) + y * W + x)         # (M,)
        cls = key // (B * H * W)                                                       # (M,) class
        z = z_all[key % (B * H * W)]                                                   # (M, D)
        scores = torch.einsum("md,mld->ml", z, protos[cls])                           # (M, L)
        q = sinkhorn(scores, self.eps, self.sinkhorn_iters, groups=cls, n_groups=C)   # (M, L)
        if self.assign == "argmax":
            sub = q.argmax(dim=1)                                                      # (M,)
        else:
            # official: F.gumbel_softmax(Q, tau=0.5, hard=True) with Q taken as logits; the hard
            # draw is argmax(Q + Gumbel noise) whatever the temperature
            gumbel = -torch.empty_like(q).exponential_().log()                         # (M, L)
            sub = (q + gumbel).argmax(dim=1)                                           # (M,)
        centroids, counts = cluster_centroids(z, cls * L + sub, C * L)                # (C*L, D), (C*L,)
        return ema_update(protos, centroids.view(C, L, D), counts.view(C, L), self.gamma, self.norm_dim)

    @torch.no_grad()
    def update(self, feats_norm, obj_img, obj_cls, fg, bg=None):
        """Eq. (2)-(5) on this batch, then the DDP average: every rank ends with identical prototypes.

        feats_norm (B, D, H, W) unit features (the student's, as the official code; detached here);
        obj_img, obj_cls (K,) long; fg (K, H, W) bool: the pixels that update object k's class
        (inside its box and confident); bg (K, H, W) bool or None: the pixels that update the
        class's background sub-centres the same way (None: they stay). A pixel inside two selected
        objects of the same class in one image counts once. All classes are solved together
        (sinkhorn's groups), so there is no Python loop over classes.
        Collective under torch.distributed: call on every rank every time, even with K = 0.
        """
        B, D, H, W = feats_norm.shape
        z_all = feats_norm.float().permute(0, 2, 3, 1).reshape(B * H * W, D)           # (B*H*W, D)
        protos = self._updated(self.protos, z_all, obj_img, obj_cls, fg, B, H, W)      # (C, L, D)
        bg_protos = self.bg_protos if bg is None else self._updated(self.bg_protos, z_all, obj_img, obj_cls, bg, B, H, W)
        both = torch.stack([protos, bg_protos])                                        # (2, C, L, D)
        if dist.is_available() and dist.is_initialized():
            # always all-reduce (a rank that skipped would hang the others), then normalised again
            dist.all_reduce(both)
            both = F.normalize(both / dist.get_world_size(), dim=self.norm_dim)        # (2, C, L, D)
        self.protos.copy_(both[0])
        self.bg_protos.copy_(both[1])


# -----------------------------------------------------------------------------
# Eq. (6)-(7): self-correction


def positive_weights(ious, obj_index, n_obj, mu=5.0):
    """Eq. (6): w_pos = exp(mu * IoU), normalised over the positives of the same object.

    ious (K,) IoU of each positive's predicted box with its GT box; obj_index (K,) long in
    [0, n_obj). This is a softmax of mu * IoU within each object (computed with the per-object max
    subtracted); mu = 0 gives the plain mean (the official code).
    """
    logits = mu * ious.float()                                                         # (K,)
    m = torch.full((n_obj,), -math.inf, device=ious.device)
    m = m.scatter_reduce(0, obj_index, logits, reduce="amax")                           # (n_obj,) per-object max
    e = (logits - m[obj_index]).exp()                                                  # (K,)
    total = torch.zeros(n_obj, device=ious.device).index_add_(0, obj_index, e)         # (n_obj,)
    return e / total[obj_index]                                                        # (K,)


def instance_map(mask_probs, weights, obj_index, n_obj):
    """Eq. (6): M_I = sum_pos w_pos * M_pos over each object's positives.

    mask_probs (K, H, W) teacher mask probabilities of the positives; weights (K,) from
    positive_weights; obj_index (K,) long -> (n_obj, H, W); objects without positives get 0.
    """
    out = mask_probs.new_zeros(n_obj, *mask_probs.shape[1:])                           # (n_obj, H, W)
    return out.index_add_(0, obj_index, mask_probs * weights.to(mask_probs.dtype)[:, None, None])


def rectified_map(m_s, m_i, alpha=0.5, box_mask=None):
    """Eq. (7): M_prob = (1 - alpha) * M_S + alpha * M_I inside the box, 0 outside.

    m_s, m_i (K, H, W) (any matching shapes); box_mask (K, H, W) bool/0-1, None = no box limit.
    """
    m_prob = (1.0 - alpha) * m_s + alpha * m_i                                         # (K, H, W)
    return m_prob if box_mask is None else m_prob * box_mask.to(m_prob.dtype)          # (K, H, W)


def pseudo_labels(m_prob, box_mask, tau_low=0.3, tau_high=0.7, supervise_outside=False):
    """Eq. (8)'s targets: M_hat = [M_prob >= tau_high]; W = 0 where tau_low < M_prob < tau_high.

    m_prob, box_mask (K, H, W) -> (M_hat, W), both float in {0, 1}. Inside the box: foreground at or
    above tau_high, background at or below tau_low, ignored in between. Outside the box: default
    M_hat = 0, W = 0 (no pseudo supervision; the projection loss handles it, as the official code);
    supervise_outside=True makes it background (M_hat = 0, W = 1).
    """
    inside = box_mask.bool()                                                           # (K, H, W)
    fg = (m_prob >= tau_high) & inside                                                 # (K, H, W)
    sure = (m_prob >= tau_high) | (m_prob <= tau_low)                                  # (K, H, W)
    weight = (sure & inside) | (~inside if supervise_outside else torch.zeros_like(inside))
    return fg.to(m_prob.dtype), weight.to(m_prob.dtype)


def pseudo_labels_adaptive(m_prob, m_i, box_mask, conf=0.7, t_min=0.7, t_max=0.8, bg=0.4,
                           supervise_outside=False):
    """Official variant of the targets: an area-matched foreground threshold per object.

    n = #in-box pixels with M_I > conf; t = the (n+1)-th largest in-box M_prob (outside counts 0),
    clamped to [t_min, t_max]; M_hat = [M_prob > t] in the box; W = [M_prob > t or M_prob < bg] in
    the box, 0 outside (or 1 outside with supervise_outside, as pseudo_labels). m_prob, m_i,
    box_mask (K, H, W) -> (M_hat, W) float in {0, 1}. No host sync: sort + gather.
    """
    inside = box_mask.bool()                                                           # (K, H, W)
    n = ((m_i > conf) & inside).flatten(1).sum(1).clamp(max=inside[0].numel() - 1)     # (K,)
    ranked = (m_prob * inside).flatten(1).sort(dim=1, descending=True).values          # (K, H*W)
    t = ranked.gather(1, n[:, None]).clamp(t_min, t_max)                               # (K, 1)
    t = t.view(-1, *[1] * (m_prob.dim() - 1))                                          # (K, 1, 1)
    fg = (m_prob > t) & inside                                                         # (K, H, W)
    sure = (m_prob > t) | (m_prob < bg)                                                # (K, H, W)
    weight = (sure & inside) | (~inside if supervise_outside else torch.zeros_like(inside))
    return fg.to(m_prob.dtype), weight.to(m_prob.dtype)
