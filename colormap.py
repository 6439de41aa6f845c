"""
nanoSIM's colour evidence for Eq. (7) (not in the paper): M_C says, from CIE-Lab colours alone, whether
a pixel looks more like its object's confident pixels than like the ring around its box. Eq. (1)'s
multi-prototype idea applied to colour: per-object colour samples act as sub-centres. sim.py mixes
it into M_prob with weight color_weight (BENCHMARKS.md D13).
"""

import math

import torch


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

    lab (G, 3, H, W) each object's image in CIE-Lab on the mask grid; fg_seed, bg_seed (G, H, W) bool:
    pixels whose colours stand for the object and for what is not the object; f_k, b_k up to n_seeds
    colours of each (_spread_pick). 0.5 (no evidence) where a set is empty and outside `region`
    (G, H, W) bool (the box: only in-box pixels are computed). -> (G, H, W).
    ring_seed, min_contrast (Lab units): object seeds within min_contrast of a ring colour are dropped
    (the teacher's confident area spills into background bays; those colours would tie M_C at 0.5).
    Why: where the teacher is unsure, the semantic maps (same features as M_I) are near chance; the box
    rim's colours are evidence the network never produced (BENCHMARKS.md D13). Eq. (1)'s
    multi-prototype idea applied to colour, with per-object colour samples as sub-centres.
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
