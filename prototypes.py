"""SIM's semantic-aware pseudo masks (CVPR 2023, Sec. 3.2), Eq. (1)-(7): the multi-prototype memory
(C classes x L sub-centres x D), the semantic map (Eq. 1), the Sinkhorn equipartition (Eq. 2-3), the
moving-average update (Eq. 4-5), IoU-weighted self-correction (Eq. 6), the rectified map (Eq. 7) and
the pseudo labels with their ignore band (Eq. 8's targets); nanoSIM's departures beside them
(the colour evidence is in colormap.py).
Pure functions, and PrototypeMemory holding the sub-centres as buffers. The authors' code: docs/official_code.md §4-§5.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# features


def normalize_features(mask_feats, scale=2):
    """Stride-8 mask-branch output (B, D, H8, W8) -> unit pixel features z_i (B, D, 2*H8, 2*W8).

    z_i = z_i / ||z_i||_2 (Sec. 3.2.1), float32. Bilinear x2 with align_corners=False puts output i at
    pixel 4i + 2: the [2::4] grid of BoxInst's box masks (model.aligned_bilinear would land 2 px off).
    scale: the upsampling factor (Mask2Former's stride-4 embeddings: 4 / mask_out_stride; 1 = none).
    """
    z = mask_feats.float()
    if scale != 1:
        z = F.interpolate(z, scale_factor=scale, mode="bilinear", align_corners=False)  # (B, D, H4, W4)
    # F.normalize(z, dim=1) up to rounding: its norm over the channel dim is 25x slower on CPU than this sum
    return z / (z * z).sum(1, keepdim=True).sqrt().clamp_min(1e-12)                          # (B, D, H4, W4)


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

    Why: Eq. (1) has no background reference; in-box background has positive cosine to its class too,
    so sigmoid(cos / tau) >= 0.5 there at any tau (BENCHMARKS.md D11). Against background
    sub-centres b^c, M_S > 0.5 exactly where a pixel is closer to its class than to its in-box
    background. Shapes as semantic_map; bg_protos like protos.
    """
    H, W = feats.shape[-2:]
    z = feats.flatten(-2)                                  # (..., D, H*W)
    fg = (protos @ z).amax(dim=-2)                         # (..., H*W) best class sub-centre
    bg = (bg_protos @ z).amax(dim=-2)                      # (..., H*W) best background sub-centre
    return torch.sigmoid((fg - bg) / tau).unflatten(-1, (H, W))  # (..., H, W)


# -----------------------------------------------------------------------------
# Eq. (2)-(5): prototype update


def sinkhorn(scores, eps=0.05, n_iters=3, groups=None, n_groups=1):
    """Eq. (3): Q* = diag(u) exp(S / eps) diag(v), the Sinkhorn-Knopp solution of Eq. (2).

    Eq. (2): max_Q Tr(Q^T S) + eps H(Q) with every sub-centre (column) summing to 1/L and every
    pixel (row) to 1/N. scores S (N, L): cosine similarities of N pixels to L sub-centres.
    Each iteration normalises columns, then rows (as SwAV). Returns Q (N, L) scaled by N so rows sum
    to 1. Log space, float32: exp(S / eps) spans e^40 at eps = 0.05. groups (N,) in [0, n_groups)
    packs one independent problem per class into the call (sums and N per group).
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


def cluster_centroids(feats, assign, L, normalize=True):
    """Eq. (5): p_l = sum_i z_i 1(Q_il = 1) / sum_i 1(Q_il = 1), the mean of the assigned features
    (normalize=False: as the paper writes it), or that mean l2-normalised (normalize=True: the official
    code, docs/official_code.md §4.5; nanoSIM keeps it: a unit centroid moves a unit sub-centre by the
    same angle whatever the spread of its pixels). Normalising the sum equals normalising the mean.

    feats (N, D); assign (N,) long in [0, L) (hard assignment); returns centroids (L, D) (zero rows
    for empty clusters) and counts (L,) long. L may be C*L flattened (class-major) to do all classes
    in one call.
    """
    sums = torch.zeros(L, feats.shape[1], device=feats.device, dtype=feats.dtype)
    sums = sums.index_add_(0, assign, feats)                                           # (L, D)
    counts = torch.zeros(L, dtype=torch.long, device=feats.device)
    counts = counts.scatter_add_(0, assign, torch.ones_like(assign))                   # (L,)
    if normalize:
        return F.normalize(sums, dim=-1), counts
    return sums / counts.clamp(min=1)[:, None].to(sums.dtype), counts


def ema_update(protos, centroids, counts, gamma=0.999, norm_dim=-1):
    """Eq. (4): p_l <- gamma * p_l + (1 - gamma) * c_l, then l2-normalised, only where count_l > 0.

    protos, centroids (..., L, D); counts (..., L). norm_dim -1 (the paper: unit sub-centres):
    sub-centres that received no pixel are returned bit-identical (no renormalisation either).
    norm_dim -2 reproduces the official code's normalisation along L (docs/official_code.md §4.2): the
    moved rows are mixed in, then every (class, channel) column over L is scaled to unit norm.
    """
    has = (counts > 0)[..., None]                                                      # (..., L, 1)
    mixed = torch.where(has, gamma * protos + (1.0 - gamma) * centroids, protos)       # (..., L, D)
    if norm_dim == -1:
        return torch.where(has, F.normalize(mixed, dim=-1), protos)                    # (..., L, D)
    return F.normalize(mixed, dim=norm_dim)                                            # (..., L, D)


class PrototypeMemory(nn.Module):
    """C x L x D unit prototypes (sub-centres), a buffer updated by Eq. (2)-(5); no trained parameters.

    Beside the class sub-centres `protos`: C x L background sub-centres `bg_protos`, learnt the same
    way from the confident in-box background (calibrated_semantic_map's reference; Eq. 1 never reads
    them). One Sinkhorn + EMA step per class per call, on the pixels of the whole local batch, then the
    rank average: the rate of change does not depend on the per-GPU batch (official: image by image).
    """

    def __init__(self, num_classes, L=10, D=16, gamma=0.999, tau=0.1, eps=0.05, sinkhorn_iters=3,
                 assign="argmax", norm="D", centroid_norm=True):
        super().__init__()
        assert assign in ("argmax", "gumbel") and norm in ("D", "L")
        self.gamma = gamma            # Eq. (4) momentum
        self.centroid_norm = centroid_norm  # Eq. (5)'s centroid unit (official) or the plain mean (the paper)
        self.tau = tau                # Eq. (1) temperature (official code: 1.0)
        self.eps = eps                # Eq. (2) entropy weight
        self.sinkhorn_iters = sinkhorn_iters
        self.assign = assign          # "argmax" (paper) or "gumbel" (official: hard Gumbel draw)
        # "D": unit sub-centres (the paper); "L": the official code's normalisation along L (a bug,
        # for the official preset only: sub-centres are then not unit vectors, docs/official_code.md §4.2)
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
        a tenth of the map, so it gathers those pixels instead of K copies of the feature maps, and
        scores each object's pixels against its class's sub-centres in one matmul (not a copy of the
        sub-centres per pixel: 10^5 pixels x L x D at COCO scale); the same sums up to rounding."""
        if region is None:
            if not calibrated:
                return object_semantic_maps(feats_norm, self.protos, obj_img, obj_cls, self.tau)
            return calibrated_semantic_map(feats_norm[obj_img], self.protos[obj_cls], self.bg_protos[obj_cls], self.tau)
        k, y, x = region.nonzero(as_tuple=True)                                        # (M,) each, by object
        z = feats_norm[obj_img[k], :, y, x]                                            # (M, D)
        counts, cls = torch.stack([torch.bincount(k, minlength=len(obj_cls)), obj_cls]).tolist()  # one host read
        per_obj = z.split(counts)                                                      # (M_k, D) each
        best = lambda protos: torch.cat([zk @ protos[c].T for zk, c in zip(per_obj, cls)]
                                        ).amax(1) if len(z) else z.new_zeros(0)        # (M,) best sub-centre
        if calibrated:
            m = torch.sigmoid((best(self.protos) - best(self.bg_protos)) / self.tau)   # (M,)
        else:
            m = torch.sigmoid(best(self.protos) / self.tau)                            # (M,)
        return feats_norm.new_zeros(region.shape).index_put_((k, y, x), m)            # (K, H, W)

    def _updated(self, protos, z_all, obj_img, obj_cls, sel, B, H, W):
        """Eq. (2)-(5) for one set of sub-centres (C, L, D) from the pixels sel (K, H, W) bool, or their
        indices (k, y, x) -> new (C, L, D)."""
        C, L, D = protos.shape
        k, y, x = sel if isinstance(sel, tuple) else sel.nonzero(as_tuple=True)        # (M0,) each
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
        centroids, counts = cluster_centroids(z, cls * L + sub, C * L, self.centroid_norm)  # (C*L, D), (C*L,)
        return ema_update(protos, centroids.view(C, L, D), counts.view(C, L), self.gamma, self.norm_dim)

    @torch.no_grad()
    def update(self, feats_norm, obj_img, obj_cls, fg, bg=None):
        """Eq. (2)-(5) on this batch, then the DDP average: every rank ends with identical prototypes.

        feats_norm (B, D, H, W) unit features (the student's, as the official code); obj_img, obj_cls
        (K,) long; fg (K, H, W) bool: the pixels that update object k's class; bg (K, H, W) or None:
        those that update its background sub-centres; either may be given as the indices (k, y, x) of its
        True entries instead (sim.prototype_pixels). A pixel in two objects of one class counts once.
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


def _rank_with_zeros(x, sel, n):
    """The (n_k + 1)-th largest value of each row of x * sel (x, sel (K, N), n (K,) long < N) -> (K,), from
    a sort of the selected values alone: the unselected count as zeros. Two sorts of the
    selected values (by value descending, then stably by row); one host read (the number selected)."""
    k, p = sel.nonzero(as_tuple=True)                                                  # (M,) each, by row
    v = x[k, p]                                                                        # (M,)
    o = v.argsort(descending=True)
    o = o[k[o].argsort(stable=True)]                                                   # by row, values descending
    k, v = k[o], v[o]
    count = torch.bincount(k, minlength=sel.shape[0])                                  # (K,) selected per row
    if len(v) == 0:  # nothing selected: every row all zeros
        return x.new_zeros(len(n))
    start = torch.cumsum(count, 0) - count                                             # (K,) each row's first
    outside = sel.shape[1] - count                                                     # (K,) zeros not sorted
    above = torch.zeros_like(count).index_add_(0, k, (v > 0).long())                   # (K,) positive values
    zeros = torch.zeros_like(count).index_add_(0, k, (v == 0).long()) + outside        # (K,)
    # a row in full, descending: `above` positives, `zeros` zeros, then its negative selected values
    at = lambda i: v[(start + i).clamp(0, len(v) - 1)]                                 # (K,)
    return torch.where(n < above, at(n), torch.where(n < above + zeros, x.new_zeros(()), at(n - outside)))


def pseudo_labels_adaptive(m_prob, m_i, box_mask, conf=0.7, t_min=0.7, t_max=0.8, bg=0.4,
                           supervise_outside=False):
    """Official variant of the targets: an area-matched foreground threshold per object.

    n = #in-box pixels with M_I > conf; t = the (n+1)-th largest in-box M_prob (outside counts 0),
    clamped to [t_min, t_max]; M_hat = [M_prob > t] in the box; W = [M_prob > t or M_prob < bg] in
    the box, 0 outside (or 1 outside with supervise_outside, as pseudo_labels). m_prob, m_i,
    box_mask (K, H, W) -> (M_hat, W) float in {0, 1}.
    The ranking sorts the in-box values alone (a tenth of the maps; the outside's zeros are counted, not
    sorted): the same t as sorting the whole masked maps.
    """
    inside = box_mask.bool()                                                           # (K, H, W)
    n = ((m_i > conf) & inside).flatten(1).sum(1).clamp(max=inside[0].numel() - 1)     # (K,)
    t = _rank_with_zeros(m_prob.flatten(1), inside.flatten(1), n).clamp(t_min, t_max)  # (K,)
    t = t.view(-1, *[1] * (m_prob.dim() - 1))                                          # (K, 1, 1)
    fg = (m_prob > t) & inside                                                         # (K, H, W)
    sure = (m_prob > t) | (m_prob < bg)                                                # (K, H, W)
    weight = (sure & inside) | (~inside if supervise_outside else torch.zeros_like(inside))
    return fg.to(m_prob.dtype), weight.to(m_prob.dtype)
