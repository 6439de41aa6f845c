"""
nanoSIM's colour evidence for Eq. (7) (not in the paper): M_C says, from CIE-Lab colours alone, whether
a pixel looks more like its object's confident pixels than like the ring around its box. Eq. (1)'s
multi-prototype idea applied to colour: per-object colour samples act as sub-centres. sim.py mixes
it into M_prob with weight color_weight (BENCHMARKS.md D13).
"""

import math

import torch


def _spread_pick(seed, k, ids=None):
    """Up to k pixel indices per row of seed (G, N) bool, spread over the row by a fixed hash order
    (Knuth's multiplicative hash of each pixel's index, or of ids (G, N) long, its index in a larger map
    the rows are windows of: no RNG, the same on every rank) -> indices (G, k'), valid (G, k'):
    each row's seeds with the k largest hashes, largest first (invalid slots: index 0).
    A top-k of the hashes over each row (non-seeds below every hash): shapes fixed by (G, N, k), so on a
    GPU nothing waits for the host (a list of the seed pixels would: its length is data)."""
    G, N = seed.shape
    k = min(k, N)
    n = torch.arange(N, device=seed.device).expand(G, N) if ids is None else ids               # (G, N)
    h = torch.where(seed, (n * 2654435761) % 4294967296, -1)                                # (G, N) distinct per row
    top, idx = h.topk(k, dim=1)                                                             # (G, k) largest first
    valid = top >= 0
    return torch.where(valid, idx, 0), valid


def _seed_colours(c, seed, k, img, ids=None):
    """Up to k seed colours per object: c (B, 3, N) colours of each image, seed (G, N) bool, img (G,) each
    object's image, ids as _spread_pick's -> (G, k', 3), valid (G, k')."""
    idx, ok = _spread_pick(seed, k, ids)                                                    # (G, k'), (G, k')
    return c[img[:, None], :, idx], ok                                                      # (G, k', 3)


def _nearest_colour(pix, g, ref, ok, chunk=4096, per_object=None):
    """Distance from each pixel colour pix (M, 3) to the nearest valid colour of its object g (M,) among
    ref (G, k, 3), ok (G, k) -> (M,); inf where the object has none.
    Speed (M is every in-box cell of every object: 10^5-10^6 at COCO scale): pixels come grouped by
    object (nonzero's order; else sorted here), so each object's pixels meet its k colours by
    broadcasting, `chunk` at a time (an (M, k) buffer per step stays in cache), channel by channel,
    invalid colours set to inf beforehand, one sqrt after the min (sqrt is monotone): the same numbers
    as sqrt((p - r)^2 summed over the channels, in order) per pair, 8x faster on one CPU thread.
    per_object (default: on the CPU): that loop, which reads the objects' pixel counts on the host; off
    (the default on a GPU), each chunk of pixels gathers its objects' colours instead: no host read, more
    memory traffic (a GPU has it to spare), the same numbers."""
    ref = torch.where(ok[..., None], ref, math.inf).permute(2, 0, 1)                        # (3, G, k)
    if not (pix.device.type == "cpu" if per_object is None else per_object):
        out = pix.new_empty(len(pix))                                                       # (M,)
        for a in range(0, len(pix), chunk * 16):
            p, r = pix[a:a + chunk * 16], ref[:, g[a:a + chunk * 16]]                       # (c, 3), (3, c, k)
            d2 = (p[:, 0, None] - r[0]).pow(2)                                              # (c, k)
            d2 += (p[:, 1, None] - r[1]).pow(2)
            d2 += (p[:, 2, None] - r[2]).pow(2)
            out[a:a + len(p)] = d2.amin(1)
        return out.sqrt()
    order = None
    if len(g) > 1 and not bool((g[1:] >= g[:-1]).all()):
        g, order = g.sort(stable=True)
        pix = pix[order]
    out = pix.new_empty(len(pix))                                                           # (M,)
    s = 0
    for obj, n in enumerate(torch.bincount(g, minlength=ref.shape[1]).tolist()):
        for a in range(s, s + n, chunk):
            p, r = pix[a:min(a + chunk, s + n)], ref[:, obj]                                # (c, 3), (3, k)
            d2 = (p[:, 0, None] - r[0]).pow(2)                                              # (c, k)
            d2 += (p[:, 1, None] - r[1]).pow(2)
            d2 += (p[:, 2, None] - r[2]).pow(2)
            out[a:a + len(p)] = d2.amin(1)
        s += n
    out = out.sqrt()
    return out if order is None else torch.empty_like(out).index_copy_(0, order, out)    # (M,)


def color_map(lab, fg_seed, bg_seed, region=None, n_seeds=64, t=2.0, ring_seed=None, min_contrast=0.0, img=None,
              ids=None):
    """nanoSIM's colour evidence for Eq. (7): M_C(i) = sigmoid( (min_k ||c_i - b_k|| - min_k ||c_i - f_k||) / t ).

    lab (G, 3, H, W) each object's image in CIE-Lab on the mask grid, or (B, 3, H, W) the images' with img
    (G,) the image of each object (no copy of an image per object); fg_seed, bg_seed (G, H, W) bool:
    pixels whose colours stand for the object and for what is not the object; f_k, b_k up to n_seeds
    colours of each (_spread_pick). 0.5 (no evidence) where a set is empty and outside `region`
    (G, H, W) bool (the box: only in-box pixels are computed). -> (G, H, W).
    ring_seed, min_contrast (Lab units): object seeds within min_contrast of a ring colour are dropped
    (the teacher's confident area spills into background bays; those colours would tie M_C at 0.5).
    ids (G, H, W) long: each pixel's index in the full map when the maps are windows of it (the seed
    pick hashes it: the same seeds, so the same M_C, as on the full maps).
    Why: where the teacher is unsure, the semantic maps (same features as M_I) are near chance; the box
    rim's colours are evidence the network never produced (BENCHMARKS.md D13). Eq. (1)'s
    multi-prototype idea applied to colour, with per-object colour samples as sub-centres.
    """
    G, (H, W) = fg_seed.shape[0], lab.shape[-2:]
    img = torch.arange(G, device=lab.device) if img is None else img                       # (G,)
    c = lab.flatten(2).float()                                                              # (B, 3, N)
    fg_seed, bg_seed = fg_seed.flatten(1), bg_seed.flatten(1)                               # (G, N) each
    ids = None if ids is None else ids.flatten(1)                                           # (G, N)
    if ring_seed is not None and min_contrast > 0:
        ring_ref, ring_ok = _seed_colours(c, ring_seed.flatten(1), n_seeds, img, ids)       # (G, k, 3)
        g, n = fg_seed.nonzero(as_tuple=True)                                               # (M_f,) each
        keep = _nearest_colour(c[img[g], :, n], g, ring_ref, ring_ok) >= min_contrast      # (M_f,)
        fg_seed = torch.zeros_like(fg_seed).index_put_((g, n), keep)                        # (G, N)
    region = torch.ones_like(fg_seed) if region is None else region.flatten(1).bool()
    g, n = region.nonzero(as_tuple=True)                                                    # (M,) each
    pix = c[img[g], :, n]                                                                   # (M, 3)
    f_ref, f_ok = _seed_colours(c, fg_seed, n_seeds, img, ids)                              # (G, k, 3), (G, k)
    b_ref, b_ok = _seed_colours(c, bg_seed, n_seeds, img, ids)
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
