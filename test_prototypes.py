"""Tests for prototypes.py: hand-computed values for Eq. (1)-(7) on tiny inputs, plus invariants."""

import datetime
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import prototypes
from prototypes import (PrototypeMemory, cluster_centroids, ema_update, instance_map,
                        normalize_features, object_semantic_maps, positive_weights, pseudo_labels,
                        pseudo_labels_adaptive, rectified_map, semantic_map, sinkhorn)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- features

def test_normalize_features_shape_norm_and_grid():
    # channel 0 = column index j of the stride-8 map, channel 1 = 1: bilinear is linear per channel,
    # so after normalisation z0 / z1 is the interpolated column position
    W8 = 5
    x = torch.stack([torch.arange(W8, dtype=torch.float32).expand(3, W8), torch.ones(3, W8)])[None]  # (1, 2, 3, 5)
    z = normalize_features(x)
    assert z.shape == (1, 2, 6, 10)
    assert torch.allclose(z.norm(dim=1), torch.ones(1, 6, 10))
    pos = z[0, 0, 1] / z[0, 1, 1]                                        # (10,)
    # output i sits at stride-8 position i/2 - 1/4 (pixel 4i+2 when cell j is at 8j+4); borders clamp
    expected = (torch.arange(10.0) / 2 - 0.25).clamp(0, W8 - 1)
    assert torch.allclose(pos, expected, atol=1e-6)


# ----------------------------------------------------------------------------- Sinkhorn, Eq. (2)-(3)

def test_sinkhorn_marginals_random():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(50, 5, generator=g) * 2 - 1
    q = sinkhorn(s, eps=0.05, n_iters=300)                               # converged
    assert torch.allclose(q.sum(1), torch.ones(50), atol=1e-3)           # pixel rows sum to 1 (N * 1/N)
    assert torch.allclose(q.sum(0), torch.full((5,), 50 / 5), atol=1e-3 * 50 / 5)  # columns N/L (N * 1/L)
    q3 = sinkhorn(s)                                                     # default 3 iterations: rows exact
    assert torch.allclose(q3.sum(1), torch.ones(50), atol=1e-5)
    assert (q3 >= 0).all()


def test_sinkhorn_permutation_tiny_eps():
    perm = torch.tensor([2, 0, 3, 1])
    s = torch.full((4, 4), -0.5)
    s[torch.arange(4), perm] = 0.9                                       # each point nearest a distinct centre
    q = sinkhorn(s, eps=1e-3)
    assert torch.allclose(q, F.one_hot(perm, 4).float(), atol=1e-4)


def test_sinkhorn_equipartition_overrides_argmax():
    # both pixels prefer centre 0; the equal partition sends the weaker one (pixel 1) to centre 1
    s = torch.tensor([[1.0, 0.0], [0.9, 0.5]])
    q = sinkhorn(s, eps=0.01)
    assert q.argmax(1).tolist() == [0, 1]
    assert q[0, 0] > 0.999 and q[1, 1] > 0.999


@pytest.mark.parametrize("eps", [0.05, 1e-4])
def test_sinkhorn_finite_extremes(eps):
    s = torch.tensor([[1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])
    q = sinkhorn(s, eps=eps)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-5)
    q = sinkhorn(torch.rand(1000, 10) * 2 - 1, eps=eps)
    assert torch.isfinite(q).all()


def test_sinkhorn_groups_equal_separate_calls():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(7, 3, generator=g) * 2 - 1, torch.rand(4, 3, generator=g) * 2 - 1
    groups = torch.tensor([2] * 7 + [0] * 4)                             # group 1 empty
    q = sinkhorn(torch.cat([a, b]), groups=groups, n_groups=3)
    assert torch.allclose(q[:7], sinkhorn(a), atol=1e-6)
    assert torch.allclose(q[7:], sinkhorn(b), atol=1e-6)
    assert sinkhorn(torch.zeros(0, 3)).shape == (0, 3)


# ----------------------------------------------------------------------------- Eq. (4)-(5)

def test_ema_update_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    centroids = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = ema_update(protos, centroids, torch.tensor([3, 0]), gamma=0.5)
    assert torch.allclose(out[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.equal(out[1], protos[1])                                # no pixel: unchanged
    out = ema_update(protos[None].repeat(2, 1, 1), centroids[None].repeat(2, 1, 1),
                     torch.tensor([[0, 0], [1, 0]]), gamma=0.5)          # (C, L, D) form
    assert torch.equal(out[0], protos) and torch.allclose(out[1, 0], torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_cluster_centroids_normalised_mean():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    c, n = cluster_centroids(feats, torch.tensor([0, 0, 2, 2]), 3)
    assert n.tolist() == [2, 0, 2]
    assert torch.allclose(c[0], torch.tensor([3.0, 1.0]) / math.sqrt(10))  # mean (1.5, .5) normalised
    assert torch.allclose(c[2], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.equal(c[1], torch.zeros(2))


# ----------------------------------------------------------------------------- Eq. (1)

def test_semantic_map_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                      # L = 2, D = 2
    feats = torch.tensor([[1.0, 0.6, -1.0], [0.0, 0.8, 0.0]]).view(2, 1, 3)  # 3 pixels (D, 1, 3)
    m = semantic_map(feats, protos, tau=0.1)
    assert torch.allclose(m[0], torch.tensor([sig(10.0), sig(8.0), 0.5]))  # max(0.6, 0.8) = 0.8; max(-1, 0) = 0
    m = semantic_map(feats, protos, tau=1.0)
    assert torch.allclose(m[0], torch.tensor([0.7310586, 0.6899745, 0.5]))
    m = semantic_map(feats, protos[:1], tau=1.0)                         # only sub-centre (1, 0)
    assert torch.allclose(m[0], torch.tensor([sig(1.0), sig(0.6), sig(-1.0)]))


def test_object_semantic_maps_match_per_image():
    g = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(2, 4, 3, 5, generator=g), dim=1)
    protos = F.normalize(torch.randn(3, 6, 4, generator=g), dim=-1)
    obj_img, obj_cls = torch.tensor([1, 0, 1]), torch.tensor([2, 2, 0])
    m = object_semantic_maps(feats, protos, obj_img, obj_cls, tau=0.1)
    assert m.shape == (3, 3, 5)
    for k in range(3):
        assert torch.allclose(m[k], semantic_map(feats[obj_img[k]], protos[obj_cls[k]], 0.1))


# ----------------------------------------------------------------------------- Eq. (6)-(7)


def test_positive_weights_hand():
    ious, obj = torch.tensor([1.0, 0.8, 0.5]), torch.tensor([0, 0, 1])
    w = positive_weights(ious, obj, 2, mu=5.0)
    e5, e4 = math.exp(5), math.exp(4)
    assert torch.allclose(w, torch.tensor([e5 / (e5 + e4), e4 / (e5 + e4), 1.0]))
    assert torch.allclose(positive_weights(ious, obj, 2, mu=0.0), torch.tensor([0.5, 0.5, 1.0]))


def test_instance_map_weighted_sum():
    probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]], [[0.2, 0.4]]])    # (3, 1, 2)
    w = torch.tensor([0.75, 0.25, 1.0])
    m = instance_map(probs, w, torch.tensor([1, 1, 2]), 3)
    assert torch.allclose(m, torch.tensor([[[0.0, 0.0]], [[0.875, 0.125]], [[0.2, 0.4]]]))


def test_rectified_map_alpha_and_box():
    ms, mi = torch.tensor([[0.2, 0.6, 0.9]]), torch.tensor([[1.0, 0.0, 0.9]])
    box = torch.tensor([[True, True, False]])
    assert torch.allclose(rectified_map(ms, mi, 0.0, box), torch.tensor([[0.2, 0.6, 0.0]]))
    assert torch.allclose(rectified_map(ms, mi, 0.5, box), torch.tensor([[0.6, 0.3, 0.0]]))
    assert torch.allclose(rectified_map(ms, mi, 1.0, box), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(rectified_map(ms, mi, 0.5), torch.tensor([[0.6, 0.3, 0.9]]))


def test_pseudo_labels_band_and_outside():
    m = torch.tensor([[0.2, 0.5, 0.9, 0.3, 0.7, 0.9, 0.1]])
    box = torch.tensor([[1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    mh, w = pseudo_labels(m, box)
    assert mh.tolist() == [[0, 0, 1, 0, 1, 0, 0]]                        # thresholds inclusive
    assert w.tolist() == [[1, 0, 1, 1, 1, 0, 0]]
    mh, w = pseudo_labels(m, box, supervise_outside=True)
    assert mh.tolist() == [[0, 0, 1, 0, 1, 0, 0]]
    assert w.tolist() == [[1, 0, 1, 1, 1, 1, 1]]


def test_pseudo_labels_adaptive_official_example():
    # docs/official_code.md §5.3: 6 in-box pixels then 4 outside
    mi = torch.tensor([[0.9, 0.8, 0.75, 0.6, 0.3, 0.1, 0.95, 0, 0, 0]])
    ms = torch.tensor([[0.7, 0.75, 0.3, 0.7, 0.6, 0.25, 0.7, 0.5, 0.5, 0.5]])
    box = torch.tensor([[1] * 6 + [0] * 4], dtype=torch.bool)
    mh, w = pseudo_labels_adaptive(rectified_map(ms, mi, 0.5), mi, box)  # n = 3, t_raw = .525 -> t = .7
    assert mh.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert w.tolist() == [[1, 1, 0, 0, 0, 1, 0, 0, 0, 0]]
    # n = 2 -> t_raw = 0.85 (third largest), capped at 0.8, so 0.82 is foreground too
    m = torch.tensor([[0.95, 0.9, 0.85, 0.82]])
    mh, _ = pseudo_labels_adaptive(m, torch.tensor([[0.9, 0.9, 0.1, 0.1]]), torch.ones(1, 4, dtype=torch.bool))
    assert mh.tolist() == [[1, 1, 1, 1]]


# ----------------------------------------------------------------------------- PrototypeMemory

def _hand_batch():
    # 2 images of 2x2 pixels, D = 2; class 1 has pixel u1 = (.8, .6) in image 0, u2 = (.6, .8) in image 1
    feats = torch.zeros(2, 2, 2, 2)
    feats[:, 0], feats[:, 1] = 1.0, 0.0                                  # filler pixels (1, 0)
    feats[0, :, 0, 1] = torch.tensor([0.8, 0.6])
    feats[1, :, 1, 0] = torch.tensor([0.6, 0.8])
    obj_img, obj_cls = torch.tensor([0, 1, 0]), torch.tensor([1, 1, 1])
    fg = torch.zeros(3, 2, 2, dtype=torch.bool)
    fg[0, 0, 1] = fg[2, 0, 1] = True                                     # same pixel in two boxes: counted once
    fg[1, 1, 0] = True
    return feats, obj_img, obj_cls, fg


def test_memory_init_buffer():
    torch.manual_seed(0)
    mem = PrototypeMemory(5, L=10, D=16)
    assert mem.protos.shape == (5, 10, 16)
    assert torch.allclose(mem.protos.norm(dim=-1), torch.ones(5, 10))
    assert len(list(mem.parameters())) == 0 and "protos" in mem.state_dict()
    torch.manual_seed(0)
    assert torch.equal(PrototypeMemory(5, L=10, D=16).protos, mem.protos)


def test_memory_update_hand():
    mem = PrototypeMemory(3, L=2, D=2, gamma=0.5)
    start = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(3, 1, 1)       # every class: (1,0), (0,1)
    mem.protos.copy_(start)
    feats, obj_img, obj_cls, fg = _hand_batch()
    mem.update(feats, obj_img, obj_cls, fg)
    # u1 -> sub-centre 0, u2 -> sub-centre 1: normalise(.5 (1,0) + .5 (.8,.6)) = (3,1)/sqrt(10), and mirrored
    expected = torch.tensor([[3.0, 1.0], [1.0, 3.0]]) / math.sqrt(10)
    assert torch.allclose(mem.protos[1], expected)
    assert torch.equal(mem.protos[0], start[0]) and torch.equal(mem.protos[2], start[2])
    assert torch.allclose(mem.protos.norm(dim=-1), torch.ones(3, 2))
    ms = mem.semantic_maps(feats, obj_img, obj_cls)                      # Eq. (1) with the new prototypes
    assert ms.shape == (3, 2, 2)
    assert torch.allclose(ms[0, 0, 1], torch.tensor(sig((0.8 * 3 + 0.6) / math.sqrt(10) / 0.1)))


def test_memory_update_only_present_classes_random():
    torch.manual_seed(3)
    mem = PrototypeMemory(6, L=4, D=8, gamma=0.9)
    before = mem.protos.clone()
    feats = normalize_features(torch.randn(2, 8, 4, 4))                  # (2, 8, 8, 8)
    obj_img, obj_cls = torch.tensor([0, 1, 1]), torch.tensor([4, 1, 4])
    fg = torch.rand(3, 8, 8) > 0.5
    for assign in ("argmax", "gumbel"):
        mem.assign = assign
        mem.update(feats, obj_img, obj_cls, fg)
        changed = (mem.protos != before).any(dim=-1).any(dim=-1)         # (C,)
        assert changed.tolist() == [False, True, False, False, True, False]
        assert torch.allclose(mem.protos.norm(dim=-1), torch.ones(6, 4))
    protos = mem.protos.clone()
    mem.update(feats, obj_img, obj_cls, torch.zeros(3, 8, 8, dtype=torch.bool))  # nothing confident
    mem.update(feats, obj_img[:0], obj_cls[:0], fg[:0])                  # no objects
    assert torch.equal(mem.protos, protos)


@pytest.mark.parametrize("assign", ["argmax", "gumbel"])
def test_memory_update_draws_randomness_only_with_gumbel(assign):
    """The argmax assignment (the paper) is a function of its inputs: two memories updated from the same
    pixels under different global RNG states end equal; the official Gumbel draw reads the RNG, so
    there they differ (which shows the comparison can see a random draw)."""
    torch.manual_seed(8)
    feats = normalize_features(torch.randn(2, 8, 3, 3))
    obj_img, obj_cls, fg = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.rand(2, 3, 3) > 0.3
    mems = []
    for rng_seed in (1, 2):
        torch.manual_seed(7)
        m = PrototypeMemory(4, L=3, D=8, gamma=0.5, assign=assign)
        torch.manual_seed(rng_seed)
        m.update(feats, obj_img, obj_cls, fg)
        mems.append(m)
    torch.manual_seed(7)
    init = PrototypeMemory(4, L=3, D=8).protos
    assert torch.equal(mems[0].protos[:2], init[:2]) and not torch.equal(mems[0].protos[2:], init[2:])  # 2, 3 moved
    assert torch.equal(mems[0].protos, mems[1].protos) == (assign == "argmax")


def _ddp_worker(rank, init_file, inputs, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)                                                 # identical start on all ranks
    mem = PrototypeMemory(4, L=3, D=8, gamma=0.8)
    mem.update(*inputs[rank])
    torch.save(mem.protos, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_memory_ddp_average():
    torch.manual_seed(9)
    inputs = []
    for _ in range(2):                                                   # different batches per rank
        feats = normalize_features(torch.randn(1, 8, 3, 3))
        inputs.append((feats, torch.tensor([0]), torch.tensor([1]), torch.rand(1, 6, 6) > 0.3))
    inputs[1] = (inputs[1][0], torch.tensor([0]), torch.tensor([2]), inputs[1][3])  # rank 1: class 2 only
    expected = []
    for inp in inputs:
        torch.manual_seed(0)
        mem = PrototypeMemory(4, L=3, D=8, gamma=0.8)
        mem.update(*inp)
        expected.append(mem.protos)
    expected = F.normalize((expected[0] + expected[1]) / 2, dim=-1)
    with tempfile.TemporaryDirectory() as d:
        # fork, not spawn: a spawned child re-imports torch (~10 s per process)
        mp.start_processes(_ddp_worker, args=(os.path.join(d, "init"), inputs, d), nprocs=2, start_method="fork")
        got = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(2)]
    assert torch.equal(got[0], got[1])
    assert torch.allclose(got[0], expected, atol=1e-6)
    torch.manual_seed(0)
    start = PrototypeMemory(4, L=3, D=8).protos
    assert torch.allclose(got[0][[0, 3]], start[[0, 3]], atol=1e-6)      # absent classes stay put
    assert not torch.allclose(got[0][1], start[1]) and not torch.allclose(got[0][2], start[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_cuda_matches_cpu():
    torch.manual_seed(4)
    feats = normalize_features(torch.randn(2, 16, 6, 6))
    obj_img, obj_cls, fg = torch.tensor([0, 1, 1]), torch.tensor([3, 3, 5]), torch.rand(3, 12, 12) > 0.4
    torch.manual_seed(5)
    cpu = PrototypeMemory(8)
    torch.manual_seed(5)
    gpu = PrototypeMemory(8).cuda()
    cpu.update(feats, obj_img, obj_cls, fg)
    gpu.update(feats.cuda(), obj_img.cuda(), obj_cls.cuda(), fg.cuda())
    assert torch.allclose(gpu.protos.cpu(), cpu.protos, atol=1e-5)
    ms = gpu.semantic_maps(feats.cuda(), obj_img.cuda(), obj_cls.cuda())
    assert torch.allclose(ms.cpu(), cpu.semantic_maps(feats, obj_img, obj_cls), atol=1e-5)


# ----------------------------------------------------------------------------- nanoSIM's departures


def test_calibrated_semantic_map_two_pixels():
    # class sub-centres e_0, e_1; background sub-centre e_2 (D = 3)
    protos = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    bg = torch.tensor([[0.0, 0.0, 1.0]])
    s = 1 / math.sqrt(2)
    # pixel 0 = (s, 0, s): cos 0.707 to both sides -> 0.5; pixel 1 = (0.6, 0, 0.8): 0.6 vs 0.8 -> sigmoid(-2)
    feats = torch.tensor([[s, 0.6], [0.0, 0.0], [s, 0.8]]).view(3, 1, 2)
    m = prototypes.calibrated_semantic_map(feats, protos, bg, tau=0.1)
    assert torch.allclose(m, torch.tensor([[0.5, 1 / (1 + math.exp(2.0))]]), atol=1e-6)
    # Eq. (1) on the same pixels calls both foreground (cos > 0): the calibrated map is what can say background
    assert (semantic_map(feats, protos, tau=0.1) > 0.99).all()


def test_ema_update_official_norm_over_L():
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])                    # (C=1, L=2, D=2)
    centroids = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    out = ema_update(protos, centroids, torch.tensor([[1, 0]]), gamma=0.5, norm_dim=-2)
    # row 0 mixes to (0.5, 0.5), row 1 stays (0, 1); then each column over L has unit norm
    assert torch.allclose(out, torch.tensor([[[1.0, 0.5 / math.sqrt(1.25)], [0.0, 1 / math.sqrt(1.25)]]]))
    assert torch.allclose(out.norm(dim=-2), torch.ones(1, 2))


def test_prototype_memory_updates_background_subcentres():
    torch.manual_seed(0)
    mem = PrototypeMemory(2, L=1, D=2, gamma=0.5)
    mem.protos.copy_(torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]))
    mem.bg_protos.copy_(torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]))
    feats = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 2, 1, 2)      # pixel 0 = e_1, pixel 1 = e_0
    fg = torch.tensor([[[False, True]]])
    bg = torch.tensor([[[True, False]]])
    mem.update(feats, torch.tensor([0]), torch.tensor([1]), fg, bg)
    assert torch.allclose(mem.protos[1, 0], torch.tensor([1.0, 0.0]))                    # centroid e_0
    assert torch.allclose(mem.bg_protos[1, 0], torch.tensor([1.0, 1.0]) / math.sqrt(2))  # 0.5 e_0 + 0.5 e_1
    assert torch.equal(mem.bg_protos[0], torch.tensor([[1.0, 0.0]]))                    # class 0 untouched
    before = mem.bg_protos.clone()
    mem.update(feats, torch.tensor([0]), torch.tensor([1]), fg)                          # bg=None: stays
    assert torch.equal(mem.bg_protos, before)


@pytest.mark.parametrize("calibrated", [False, True])
def test_semantic_maps_in_a_region_equal_the_full_maps_there(calibrated):
    torch.manual_seed(0)
    mem = PrototypeMemory(3, L=4, D=8)
    mem.bg_protos.copy_(F.normalize(torch.randn(3, 4, 8), dim=-1))
    feats = F.normalize(torch.randn(2, 8, 5, 6), dim=1)
    obj_img, obj_cls = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 2])
    region = torch.rand(3, 5, 6) > 0.5
    full = mem.semantic_maps(feats, obj_img, obj_cls, calibrated)
    part = mem.semantic_maps(feats, obj_img, obj_cls, calibrated, region)
    assert torch.allclose(part, full * region, atol=1e-6)


def test_rank_with_zeros_equals_sorting_the_masked_rows():
    """pseudo_labels_adaptive's threshold: the (n+1)-th largest of x * sel per row, from the selected values
    alone; with ties, zeros, negative values, empty and full selections."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        K, N = int(torch.randint(1, 6, (), generator=g)), int(torch.randint(1, 40, (), generator=g))
        x = torch.randn(K, N, generator=g)
        x = x.abs() if trial % 3 == 0 else x.round() if trial % 3 == 1 else x  # nonnegative (as SIM's), ties
        sel = torch.rand(K, N, generator=g) < [0.0, 0.3, 1.0, 0.7][trial % 4]
        n = torch.randint(N, (K,), generator=g)
        want = (x * sel).sort(1, descending=True).values.gather(1, n[:, None])[:, 0]
        assert torch.equal(prototypes._rank_with_zeros(x, sel, n), want), trial
