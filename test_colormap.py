"""Tests for colormap.py: M_C on hand-made colours, the seed pixels, the deterministic seed pick, the dilation."""

import math

import torch
import torch.nn.functional as F

import colormap


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_color_map_hand():
    # one object on a 1 x 4 grid, Lab colours 0, 1, 10, 4 (in L; a, b = 0); fg seed pixel 0, bg seed pixel 2
    lab = torch.zeros(1, 3, 1, 4)
    lab[0, 0, 0] = torch.tensor([0.0, 1.0, 10.0, 4.0])
    fg = torch.tensor([[[True, False, False, False]]])
    bg = torch.tensor([[[False, False, True, False]]])
    m = colormap.color_map(lab, fg, bg, t=2.0)
    # d_fg = 0, 1, 10, 4; d_bg = 10, 9, 0, 6 -> sigmoid((d_bg - d_fg) / 2) = sigmoid(5, 4, -5, 1)
    assert torch.allclose(m, torch.sigmoid(torch.tensor([[[5.0, 4.0, -5.0, 1.0]]])), atol=1e-6)
    # the nearest seed of a set counts (min over its colours): a second bg colour 1 makes pixel 1 background-like
    bg2 = bg.clone()
    bg2[0, 0, 1] = True
    assert colormap.color_map(lab, fg, bg2, t=2.0)[0, 0, 1] < 0.5
    # an object without foreground (or background) seeds gets 0.5 everywhere: no evidence
    assert torch.equal(colormap.color_map(lab, torch.zeros_like(fg), bg), torch.full((1, 1, 4), 0.5))
    # only the region is computed (the rest 0.5), with the same values there
    region = torch.tensor([[[False, True, True, False]]])
    assert torch.allclose(colormap.color_map(lab, fg, bg, region, t=2.0), torch.where(region, m, 0.5))


def test_color_map_seed_subsampling_is_deterministic_and_spread():
    lab = torch.arange(400.0).view(1, 1, 20, 20).expand(1, 3, 20, 20).contiguous()
    fg = torch.zeros(1, 20, 20, dtype=torch.bool)
    fg[0, :10] = True                                          # 200 fg pixels, 8 seeds drawn
    idx, ok = colormap._spread_pick(fg.flatten(1), 8)
    assert ok.all() and (idx < 200).all() and len(set(idx[0].tolist())) == 8
    assert idx.max() - idx.min() > 100                         # spread over the set, not its first pixels
    assert torch.equal(idx, colormap._spread_pick(fg.flatten(1), 8)[0])


def test_color_seeds_ring_and_confident_pixels():
    box = torch.zeros(1, 9, 9)
    box[0, 3:6, 3:6] = 1
    m_i = torch.zeros(1, 9, 9)
    m_i[0, 4, 4] = 0.9                                          # one confident fg pixel
    m_i[0, 3, 3] = 0.5                                          # unsure: in neither set
    valid = torch.ones(1, 9, 9)
    valid[0, :, 7:] = 0                                         # padding columns
    fg, bg, around = colormap.color_seeds(box, m_i, valid, conf=0.7, ring=2)
    assert fg.sum() == 1 and fg[0, 4, 4]
    ring = torch.zeros(9, 9, dtype=torch.bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    ring[:, 7] = False
    inbox_bg = torch.zeros(9, 9, dtype=torch.bool)
    inbox_bg[3:6, 3:6] = True
    inbox_bg[4, 4] = inbox_bg[3, 3] = False
    assert torch.equal(bg[0], ring | inbox_bg)                  # the ring stops at the padding (column 7)
    assert torch.equal(around[0], ring)


def test_color_map_drops_object_colours_seen_around_the_box():
    # 1 x 5 grid, Lab L = 0, 1, 10, 4, 0.5; fg seeds at pixels 0 and 2, the ring (and only bg seed) at pixel 4
    lab = torch.zeros(1, 3, 1, 5)
    lab[0, 0, 0] = torch.tensor([0.0, 1.0, 10.0, 4.0, 0.5])
    fg = torch.tensor([[[True, False, True, False, False]]])
    ring = torch.tensor([[[False, False, False, False, True]]])
    plain = colormap.color_map(lab, fg, ring, t=2.0)
    # pixel 1: nearest fg colour 0 (d 1), nearest bg colour 0.5 (d 0.5) -> sigmoid(-0.25): nearly a tie
    assert math.isclose(plain[0, 0, 1].item(), sig(-0.25), abs_tol=1e-6)
    # fg colour 0 lies 0.5 from the ring colour: dropped at min_contrast 2, so pixel 1's nearest fg is 10
    pure = colormap.color_map(lab, fg, ring, t=2.0, ring_seed=ring, min_contrast=2.0)
    assert math.isclose(pure[0, 0, 1].item(), sig((0.5 - 9.0) / 2), abs_tol=1e-6)
    assert math.isclose(pure[0, 0, 2].item(), sig((9.5 - 0.0) / 2), abs_tol=1e-6)   # the kept seed itself
    # all fg colours like the ring: no object colour left -> no evidence (0.5)
    assert torch.equal(colormap.color_map(lab, fg, ring, ring_seed=ring, min_contrast=20.0), torch.full((1, 1, 5), 0.5))


def test_dilate_matches_max_pool():
    torch.manual_seed(0)
    m = torch.rand(3, 11, 13) > 0.9
    for r in (1, 3):
        want = F.max_pool2d(m[:, None].float(), 2 * r + 1, stride=1, padding=r)[:, 0] > 0
        assert torch.equal(colormap._dilate(m, r), want)


def test_nearest_colour_and_seed_pick_equal_their_definitions():
    """The fast nearest colour (per object, channel by channel, sqrt after the min) and seed pick (one sort of
    the seeds) give exactly the brute-force values and picks, pixels in or out of object order."""
    g = torch.Generator().manual_seed(0)
    G, k, M = 5, 7, 300
    pix = torch.randn(M, 3, generator=g) * 30
    obj = torch.randint(G, (M,), generator=g)
    ref = torch.randn(G, k, 3, generator=g) * 30
    ok = torch.rand(G, k, generator=g) > 0.3
    ok[2] = False  # an object without colours: inf
    want = (pix[:, None] - ref[obj]).pow(2).sum(-1).sqrt().masked_fill(~ok[obj], math.inf).amin(1)
    assert torch.equal(colormap._nearest_colour(pix, obj, ref, ok, chunk=16), want)
    o = obj.argsort()
    assert torch.equal(colormap._nearest_colour(pix[o], obj[o], ref, ok, chunk=16), want[o])
    # the GPU's form (gathered per pixel, no host read of the counts): the same numbers, in any order
    assert torch.equal(colormap._nearest_colour(pix, obj, ref, ok, chunk=2, per_object=False), want)
    seed = torch.rand(G, 50, generator=g) < torch.tensor([0.0, 0.05, 0.5, 1.0, 0.2])[:, None]
    for n_pick in (4, 64):
        order = (torch.arange(50) * 2654435761) % 4294967296
        top = torch.where(seed, order.double()[None], -1.0).topk(min(n_pick, 50), dim=1)
        idx, valid = colormap._spread_pick(seed, n_pick)
        assert torch.equal(valid, top.values >= 0) and torch.equal(idx[valid], top.indices[valid])
        # ids: the hash of each pixel's index in a larger map (windows of it pick what the map picks)
        ids = torch.arange(50)[None].expand(G, -1) + 1000
        order = ((torch.arange(50) + 1000) * 2654435761) % 4294967296
        top = torch.where(seed, order.double()[None], -1.0).topk(min(n_pick, 50), dim=1)
        idx, valid = colormap._spread_pick(seed, n_pick, ids)
        assert torch.equal(idx[valid], top.indices[valid])


def test_color_map_reads_each_objects_image():
    """color_map with the images' Lab (B, 3, H, W) and img: the same as with a Lab copy per object."""
    g = torch.Generator().manual_seed(1)
    lab = torch.rand(2, 3, 6, 7, generator=g) * 50
    img = torch.tensor([1, 0, 1])
    fg, bg, region = (torch.rand(3, 6, 7, generator=g) > p for p in (0.7, 0.6, 0.3))
    want = colormap.color_map(lab[img], fg, bg, region, 4)
    assert torch.equal(colormap.color_map(lab, fg, bg, region, 4, img=img), want)
