"""Tests of sim.py, SIM's training-step wiring: the batch's objects, the pseudo masks of Eq. (1), (6),
(7) and their thresholds (including a constructed Eq. 6 example with hand-computed IoU weights), the
L_pseudo / L_paste split, the after-step updates (prototypes, memory bank, teacher EMA), the state
round trip, the pictures, and 2 gloo processes ending with identical prototypes."""

import io
import math
import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

torch.set_num_threads(1)  # 2 cores, shared with other work

import box_ops
import colormap
import copypaste
import losses
import prototypes
import sim
import step
from model import build_model, compute_locations
from test_model import scene, tiny_cfg


def sim_cfg(variant="paper", **kw):
    """config.py's SIM defaults on the tiny network of test_model, with the knobs of one preset."""
    cfg = tiny_cfg(method="sim", seed=0, num_classes=3, sim_variant=variant)
    sim.apply_preset(cfg)
    cfg.update(kw)
    return cfg


# the paper's equations where the box bounds them (the official code's regions and bank): what the tests
# of the box machinery (windows, in-box maps, the teacher-mask bank) run; the paper's own reading of
# those places (the whole image, M_hat's pixels and bank) has tests of its own below
IN_BOX = dict(pseudo_region="box", proto_pixels="teacher", bank_masks="teacher", bank_score_plus_one=True,
              centroid_norm=True, paste_reduction="mean", paste_prob=0.5)


def box_cfg(**kw):
    return sim_cfg("paper", **dict(IN_BOX, **kw))


def setup(cfg, n_images=2):
    """Tiny student, its SIM state with a teacher, and scene(n_images)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    state = sim.SIMState(cfg, torch.device("cpu"))
    state.start_teacher(model)
    images, targets = scene(n_images)
    return model, state, images, targets


def forward_pm(model, state, images, targets, cfg):
    out = model(images, targets)
    t_out = state.teacher.features(images)
    obj = sim.objects(targets, images.shape[-2:], images=images)
    return out, t_out, obj, sim.pseudo_masks(out, t_out, state.teacher, state.protos, obj, cfg)


# -----------------------------------------------------------------------------
# objects


def test_objects_hand_targets():
    # image 0: 32 x 28 (4 padded columns), two boxes; image 1: 24 x 32 (8 padded rows), one box
    t0 = dict(boxes=torch.tensor([[4.0, 4.0, 12.0, 8.0], [0.0, 0.0, 27.5, 31.0]]), labels=torch.tensor([2, 0]),
              size=(32, 28), orig_size=(32, 28))
    t1 = dict(boxes=torch.tensor([[16.0, 8.0, 30.0, 20.0]]), labels=torch.tensor([1]), size=(24, 32),
              orig_size=(48, 64))
    obj = sim.objects([t0, t1], (32, 32))
    assert torch.equal(obj["boxes"], torch.cat([t0["boxes"], t1["boxes"]]))
    assert obj["cls"].tolist() == [2, 0, 1]
    assert obj["img"].tolist() == [0, 0, 1]
    assert obj["pasted"].dtype == torch.bool and obj["pasted"].tolist() == [False, False, False]
    assert obj["box_mask"].shape == (3, 8, 8)
    # box [4, 4, 12, 8]: rows 4..8, cols 4..12 (inclusive); the stride-4 grid samples pixels 2, 6, 10, ...
    expect = torch.zeros(8, 8)
    expect[1, 1:3] = 1
    assert torch.equal(obj["box_mask"][0], expect)
    # box [16, 8, 30, 20]: rows 8..20 -> grid rows 10, 14, 18 (2..4); cols 16..30 -> grid 18..30 (4..7)
    expect = torch.zeros(8, 8)
    expect[2:5, 4:8] = 1
    assert torch.equal(obj["box_mask"][2], expect)
    assert obj["paste_mask"] is None  # targets without 'paste_masks'
    # valid: image 0 has 7 real columns on the grid (2..26 < 28), image 1 has 6 real rows (2..22 < 24)
    assert obj["valid"].shape == (2, 8, 8)
    expect = torch.zeros(2, 8, 8)
    expect[0, :, :7] = 1
    expect[1, :6, :] = 1
    assert torch.equal(obj["valid"], expect)


def test_objects_paste_fields():
    t0 = dict(boxes=torch.tensor([[4.0, 4.0, 12.0, 8.0], [0.0, 0.0, 20.0, 20.0]]), labels=torch.tensor([2, 0]),
              size=(32, 28), orig_size=(32, 28), pasted=torch.tensor([False, True]))
    t1 = dict(boxes=torch.tensor([[16.0, 8.0, 30.0, 20.0]]), labels=torch.tensor([1]), size=(24, 32),
              orig_size=(24, 32), pasted=torch.tensor([True]))
    # one bool row per pasted object (object 1 of image 0, object 0 of image 1)
    t0["paste_masks"] = torch.zeros(1, 32, 28, dtype=torch.bool)
    t0["paste_masks"][0, 6, 10] = True    # on the grid: (6 - 2) / 4 = 1, (10 - 2) / 4 = 2
    t0["paste_masks"][0, 5, 10] = True    # between grid rows: never sampled
    t1["paste_masks"] = torch.zeros(1, 24, 32, dtype=torch.bool)
    t1["paste_masks"][0, 22, 30] = True   # last real grid row and column
    obj = sim.objects([t0, t1], (32, 32))
    assert obj["pasted"].tolist() == [False, True, True]
    pm = obj["paste_mask"]
    assert pm.shape == (3, 8, 8) and pm.dtype == torch.float32
    assert pm.sum() == 2 and pm[1, 1, 2] == 1 and pm[2, 5, 7] == 1
    # one target without paste masks: no paste masks for the batch
    del t1["paste_masks"]
    assert sim.objects([t0, t1], (32, 32))["paste_mask"] is None


def test_paste_layout_gives_the_old_full_layouts_inputs_and_losses():
    """A hand-made batch with pastes, in the layout copypaste writes ('paste_masks': a bool row per pasted
    object), against the former layout (a float row per object, zeros for the others) written out here:
    the same box masks (occlusion-aware) and paste masks for the pseudo masks, and the same L_paste
    (both forms) and L_pseudo, computed here by their formulas on the former layout."""
    # padded 16 x 16, stride 4: grid pixels 2, 6, 10, 14. Image 0 (16 x 12): A plain, B and C pasted;
    # image 1 (12 x 16): D pasted, E plain
    t0 = dict(boxes=torch.tensor([[0.0, 0, 11, 15], [4, 4, 12, 12], [1, 9, 8, 16]]), labels=torch.tensor([0, 1, 2]),
              size=(16, 12), orig_size=(16, 12), pasted=torch.tensor([False, True, True]))
    t1 = dict(boxes=torch.tensor([[2.0, 1, 15, 11], [0, 0, 16, 12]]), labels=torch.tensor([1, 0]),
              size=(12, 16), orig_size=(12, 16), pasted=torch.tensor([True, False]))
    old0, old1 = torch.zeros(3, 16, 12), torch.zeros(2, 12, 16)  # the former layout: a row per object
    old0[1, 5:11, 4:12] = 1                    # B, partly covered by C below
    old0[2, 9:16, 1:8] = 1                     # C
    old0[1, 9:11, 4:8] = 0
    old1[0, 1:11, 6:15] = 1                    # D
    t0["paste_masks"], t1["paste_masks"] = old0[1:].bool(), old1[:1].bool()   # the layout: pasted rows only
    t0["paste_area"], t1["paste_area"] = old0.sum(0) > 0, old1.sum(0) > 0
    obj = sim.objects([t0, t1], (16, 16))

    def grid(m):  # a full-size (h, w) map -> the stride-4 grid of the padded 16 x 16 canvas
        full = torch.zeros(16, 16)
        full[:m.shape[0], :m.shape[1]] = m
        return full[2::4, 2::4]
    want_box, want_paste = [], []
    for t, old in ((t0, old0), (t1, old1)):
        for k, (x0, y0, x1, y1) in enumerate(t["boxes"].floor().long().tolist()):
            box = torch.zeros(16, 16)
            box[y0:y1 + 1, x0:x1 + 1] = 1                          # BoxInst's inclusive box mask
            other = (t["paste_area"] & (old[k] == 0)).float()      # pasted pixels of another object
            want_box.append(box[2::4, 2::4] * (1 - grid(other)))
            want_paste.append(grid(old[k]))
    assert torch.equal(obj["box_mask"], torch.stack(want_box))
    assert torch.equal(obj["paste_mask"], torch.stack(want_paste))
    assert obj["box_mask"][0].sum() < 16 and obj["paste_mask"][1].sum() > 0  # A lost pixels to B and C

    # L_paste and L_pseudo on positives of every object, against the former layout's formulas
    g = torch.Generator().manual_seed(0)
    gi = torch.tensor([0, 1, 1, 2, 3, 4, 4])
    im = obj["img"][gi]
    logits = (2 * torch.randn(len(gi), 1, 4, 4, generator=g)).requires_grad_(True)
    out = dict(inst=dict(gt_inds=gi, im_inds=im), mask_logits=logits)
    pm = dict(M_hat=(torch.rand(5, 4, 4, generator=g) > 0.5).float(),
              W=(torch.rand(5, 4, 4, generator=g) > 0.3).float())
    x, is_p = logits[:, 0], obj["pasted"][gi]
    t = torch.stack(want_paste)[gi]                                                   # (K, 4, 4) the former rows
    w = is_p[:, None, None].float() * obj["valid"][im]
    p = x.sigmoid()
    sums = lambda x: x.flatten(1).sum(1)                                              # (K,)
    dice = 1 - 2 * sums(p * w * t * w) / (sums((p * w).pow(2)) + sums((t * w).pow(2)) + 1e-5)
    bce = lambda z, y: z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))    # BCE with logits z
    p_t = p * t + (1 - p) * (1 - t)
    focal = (w * (0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * bce(p, t)).sum() / (w.sum() + 1)
    want_official = focal + dice.mean()                                               # dice over ALL positives
    per = (w * bce(x, t)).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1) + dice
    want_eq9 = per[is_p].mean()                                                       # Eq. 9: the pasted ones
    m, wt = pm["M_hat"][gi], pm["W"][gi]
    q = x.sigmoid() * wt
    per = (wt * bce(x, m)).flatten(1).sum(1) / wt.flatten(1).sum(1).clamp(min=1) \
        + 1 - 2 * sums(q * m * wt) / (sums(q.pow(2)) + sums((m * wt).pow(2)) + 1e-5)
    want_pseudo = per[~is_p].mean()
    for form, want in (("official", want_official), ("bce_dice", want_eq9)):
        got = sim.sim_losses(out, pm, obj, dict(pseudo_loss="bce_dice", paste_loss=form, paste_reduction="mean"))
        torch.testing.assert_close(got["loss_paste"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["loss_pseudo"], want_pseudo, rtol=1e-5, atol=1e-6)
        g_got, = torch.autograd.grad(got["loss_paste"], logits)
        g_want, = torch.autograd.grad(want, logits, retain_graph=True)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


# -----------------------------------------------------------------------------
# pseudo masks (Eq. 1, 6, 7 and the thresholds)


def test_pseudo_masks_shapes_box_and_positives():
    cfg = box_cfg()
    model, state, images, targets = setup(cfg)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    G, H4, W4 = 4, 16, 16
    for k in ("M_S", "M_I", "M_prob", "M_hat", "W", "M_mean"):
        assert pm[k].shape == (G, H4, W4), k
    outside = obj["box_mask"] == 0
    assert outside.any() and (obj["box_mask"] == 1).any()
    for k in ("M_S", "M_prob", "M_hat", "W"):
        assert (pm[k][outside] == 0).all(), k
    gi = out["inst"]["gt_inds"]
    assert torch.equal(pm["has_pos"], torch.bincount(gi, minlength=G) > 0)
    assert pm["has_pos"].all()  # scene(): every object gets positives


def test_pseudo_masks_M_S_from_teacher_features():
    """Eq. (1) on the teacher's features (which differ from the student's here), inside the box."""
    cfg = box_cfg()
    model, state, images, targets = setup(cfg)
    with torch.no_grad():
        for p in state.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)

    def m_s(mask_feats):
        z = F.normalize(F.interpolate(mask_feats, scale_factor=2, mode="bilinear", align_corners=False), dim=1)
        sims = torch.einsum("gdhw,gld->glhw", z[obj["img"]], state.protos.protos[obj["cls"]])  # (G, L, H4, W4)
        return torch.sigmoid(sims.amax(1) / cfg["tau"]) * obj["box_mask"]                      # (G, H4, W4)

    assert torch.allclose(pm["M_S"], m_s(t_out["mask_feats"]), atol=1e-5)
    assert not torch.allclose(pm["M_S"], m_s(out["mask_feats"].detach()), atol=1e-3)


def test_pseudo_masks_thresholds(monkeypatch):
    """pseudo_masks hands Eq. (7)'s M_prob, the box masks and the configured tau_low / tau_high to
    prototypes.pseudo_labels (whose hand-made values are in test_prototypes) and returns its M_hat, and
    its W times the image-valid mask: recorded, not recomputed."""
    cfg = box_cfg(tau_low=0.25, tau_high=0.75)
    model, state, images, targets = setup(cfg)
    seen = []

    def recording(m_prob, box_mask, tau_low, tau_high, supervise_outside):
        seen.append((tau_low, tau_high, supervise_outside, m_prob.clone(), box_mask.clone()))
        return torch.full_like(m_prob, 3.0), torch.full_like(m_prob, 5.0)   # marks no real label has
    monkeypatch.setattr(prototypes, "pseudo_labels", recording)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    assert seen and all(s[:3] == (0.25, 0.75, False) for s in seen)
    inside = obj["box_mask"] > 0
    assert (pm["M_hat"][inside] == 3.0).all()                                      # its M_hat, in every box
    valid = obj["valid"][obj["img"]]
    assert torch.equal(pm["W"][inside], (5.0 * valid)[inside])                     # its W, times valid
    expected = prototypes.rectified_map(pm["M_S"], pm["M_I"], cfg["alpha"], obj["box_mask"])
    torch.testing.assert_close(pm["M_prob"], expected)


def test_pseudo_masks_alpha_mu_and_convexity():
    cfg = box_cfg()
    model, state, images, targets = setup(cfg)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    box = obj["box_mask"]
    pm0 = sim.pseudo_masks(out, t_out, state.teacher, state.protos, obj, dict(cfg, alpha=0.0))
    pm1 = sim.pseudo_masks(out, t_out, state.teacher, state.protos, obj, dict(cfg, alpha=1.0))
    assert torch.equal(pm0["M_prob"], pm0["M_S"])
    assert torch.equal(pm1["M_prob"], pm1["M_I"] * box)
    assert torch.allclose(pm["M_prob"], 0.5 * pm["M_S"] + 0.5 * pm["M_I"] * box, atol=1e-6)
    # mu = 0: Eq. (6) is the plain mean over the positives
    pmu = sim.pseudo_masks(out, t_out, state.teacher, state.protos, obj, dict(cfg, mu=0.0))
    assert torch.equal(pmu["M_I"], pmu["M_mean"])
    assert not torch.allclose(pm["M_I"], pm["M_mean"], atol=1e-7)  # mu = 5 weighs the positives unequally
    # M_I is a convex combination of the teacher's probabilities at the object's positives
    gi = out["inst"]["gt_inds"]
    probs = state.teacher.mask_logits(t_out, out["inst"])[:, 0].sigmoid()  # (K, H4, W4)
    for g in range(len(obj["boxes"])):
        p = probs[gi == g]
        assert len(p) >= 2
        assert (pm["M_I"][g] >= p.amin(0) - 1e-6).all() and (pm["M_I"][g] <= p.amax(0) + 1e-6).all()
        assert torch.allclose(pm["M_mean"][g], p.mean(0), atol=1e-6)


def test_pseudo_masks_color_map_mix():
    # color_weight beta mixes M_C into Eq. (7)'s map inside the box; beta = 0 leaves Eq. (7) and no M_C
    cfg = sim_cfg("nanosim", color_weight=0.0)
    model, state, images, targets = setup(cfg)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    assert pm["M_C"] is None
    pmc = sim.pseudo_masks(out, t_out, state.teacher, state.protos, obj, dict(cfg, color_weight=0.25))
    box = obj["box_mask"]
    assert torch.allclose(pmc["M_prob"], (0.75 * pm["M_prob"] + 0.25 * pmc["M_C"]) * box, atol=1e-6)
    fg, bg, ring = colormap.color_seeds(box, pm["M_I"], obj["valid"][obj["img"]], cfg["proto_conf_thresh"],
                                          cfg["color_ring"])
    assert torch.equal(pmc["M_C"], colormap.color_map(obj["lab"][obj["img"]], fg, bg, box > 0, cfg["color_seeds"],
                                                        cfg["color_temp"], ring, cfg["color_min_contrast"]))
    assert obj["lab"].shape == (2, 3, *box.shape[-2:])


def test_pseudo_masks_eq6_constructed():
    """One 32 x 32 image, object 0 (box [0,0,16,16]) with two positives whose decoded teacher boxes
    have IoU 1 and 0.5, object 1 (box [16,16,32,32]) with one positive. Known teacher masks and
    prototypes give M_S, M_I, M_prob by hand."""
    target = dict(boxes=torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0]]),
                  labels=torch.tensor([0, 1]), size=(32, 32), orig_size=(32, 32))
    obj = sim.objects([target], (32, 32))
    locations, loc_level = compute_locations([(4, 4)], (8,), "cpu")  # P3 only: (4, 4), (12, 4), ...
    reg = torch.zeros(1, 16, 4)
    reg[0, 0] = torch.tensor([0.5, 0.5, 1.5, 1.5])   # at (4, 4):   box [0, 0, 16, 16], IoU 1
    reg[0, 1] = torch.tensor([1.5, 0.5, 0.5, 0.5])   # at (12, 4):  box [0, 0, 16, 8],  IoU 0.5
    reg[0, 10] = torch.tensor([0.5, 0.5, 1.5, 1.5])  # at (20, 20): box [16, 16, 32, 32], IoU 1
    mask_feats = torch.zeros(1, 16, 4, 4)
    mask_feats[0, 0] = 3.0                            # every unit pixel feature is e_0
    t_out = dict(locations=locations, loc_level=loc_level, reg=reg, mask_feats=mask_feats)
    inst = dict(im_inds=torch.tensor([0, 0, 0]), loc_inds=torch.tensor([0, 1, 10]), gt_inds=torch.tensor([0, 0, 1]))
    # object 1's positive: logit by row; in the box (rows 4..7) -4, -1, 0, 2
    rows = torch.tensor([-4.0, -4, -4, -4, -4, -1, 0, 2])[:, None].expand(8, 8)

    def mask_logits(t, i):
        assert i is inst and t is t_out  # the student's positives on the teacher's outputs
        return torch.stack([torch.full((8, 8), math.log(4)), torch.full((8, 8), -math.log(4)), rows])[:, None]

    teacher = types.SimpleNamespace(strides=(8, 16, 32, 64, 128), mask_logits=mask_logits)
    protos = prototypes.PrototypeMemory(3, L=2, D=16)
    p = torch.zeros(3, 2, 16)
    p[0, :, 1] = 1.0                  # class 0 orthogonal to e_0: M_S = sigmoid(0) = 0.5
    p[1, 0, 0], p[1, 1, 0] = -1, 1    # class 1: best sub-centre is e_0: M_S = sigmoid(1 / 0.1)
    p[2, :, 2] = 1.0
    protos.protos.copy_(p)
    cfg = dict(mu=5.0, alpha=0.5, tau_low=0.55, tau_high=0.7, semantic_map="paper", pseudo_thresh="fixed",
               supervise_outside=False, color_weight=0.0, pseudo_region="box")
    pm = sim.pseudo_masks(dict(inst=inst), t_out, teacher, protos, obj, cfg)

    box0 = torch.zeros(8, 8)
    box0[:4, :4] = 1      # [0, 16] sampled at 2, 6, 10, 14
    box1 = torch.zeros(8, 8)
    box1[4:, 4:] = 1      # [16, 32] sampled at 18, 22, 26, 30
    # Eq. (6): weights exp(5 * 1), exp(5 * 0.5), normalised -> sigmoid(2.5), sigmoid(-2.5)
    w_a = 1 / (1 + math.exp(-2.5))
    m_i0 = w_a * 0.8 + (1 - w_a) * 0.2  # = 0.75449
    assert torch.allclose(pm["M_I"][0], torch.full((8, 8), m_i0), atol=1e-6)
    assert torch.allclose(pm["M_mean"][0], torch.full((8, 8), 0.5), atol=1e-6)
    assert torch.allclose(pm["M_I"][1], rows.sigmoid(), atol=1e-6)  # one positive: weight 1
    assert torch.allclose(pm["M_S"][0], 0.5 * box0, atol=1e-6)
    ms1 = 1 / (1 + math.exp(-10))
    assert torch.allclose(pm["M_S"][1], ms1 * box1, atol=1e-6)
    # Eq. (7), alpha = 0.5: object 0 sits at 0.25 + 0.5 * 0.7545 = 0.6272, inside the band (0.55, 0.7)
    assert torch.allclose(pm["M_prob"][0], (0.25 + 0.5 * m_i0) * box0, atol=1e-6)
    assert pm["M_hat"][0].sum() == 0 and pm["W"][0].sum() == 0
    assert torch.allclose(pm["M_prob"][1], (0.5 * ms1 + 0.5 * rows.sigmoid()) * box1, atol=1e-6)
    # object 1's box rows: 0.5 + 0.5 sigmoid(logit) = 0.509 (bg), 0.634 (band), 0.75, 0.94 (fg)
    m_hat1, w1 = torch.zeros(8, 8), torch.zeros(8, 8)
    m_hat1[6:, 4:] = 1
    w1[4, 4:] = w1[6:, 4:] = 1
    assert torch.equal(pm["M_hat"][1], m_hat1) and torch.equal(pm["W"][1], w1)
    assert pm["has_pos"].tolist() == [True, True]


@pytest.mark.parametrize("variant", ["nanosim", "box"])
def test_pseudo_masks_in_box_windows_equal_the_whole_maps(variant):
    """pseudo_masks computes Eq. (7), the colour term and the thresholds in windows around the boxes: the
    same maps as those functions on the whole maps (with pasted pixels cut out of a box, a box on the
    image's edge, and image 1's padding): the same colour seeds, so M_C to the last bit but where
    torch.sigmoid rounds differently (its vectorised body and its scalar tail differ by an ulp, and
    the pixels fall elsewhere in a shorter vector: M_C of one object alone differs so too)."""
    knobs = dict(color_ring=2, proto_conf_thresh=0.45)  # the untrained teacher's M_I: 0.4-0.6
    cfg = sim_cfg("nanosim", **knobs) if variant == "nanosim" else box_cfg(**knobs)
    model, state, images, targets = setup(cfg)
    targets[1]["size"] = (52, 64)
    targets[1]["boxes"][1] = torch.tensor([40.0, 30, 64, 52])                       # on the right and bottom edges
    targets = [copypaste.with_paste_fields(t, t["size"]) for t in targets]
    targets[0]["paste_area"] = torch.zeros(64, 64, dtype=torch.bool)
    targets[0]["paste_area"][14:24, 12:20] = True                                  # cut out of object 0's box
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    box, valid = obj["box_mask"], obj["valid"][obj["img"]]
    assert (box[0] == 0).any() and box[0].sum() > 0
    m_prob = prototypes.rectified_map(pm["M_S"], pm["M_I"], cfg["alpha"], box)
    if variant == "nanosim":
        fg, bg, ring = colormap.color_seeds(box, pm["M_I"], valid, cfg["proto_conf_thresh"], cfg["color_ring"])
        m_c = colormap.color_map(obj["lab"][obj["img"]], fg, bg, box > 0, cfg["color_seeds"], cfg["color_temp"], ring,
                                 cfg["color_min_contrast"])
        torch.testing.assert_close(pm["M_C"], m_c, rtol=1e-6, atol=1e-9)
        assert (m_c != 0.5).any()
        m_prob = prototypes.rectified_map(m_prob, m_c, cfg["color_weight"], box)
        m_hat, w = prototypes.pseudo_labels_adaptive(m_prob, pm["M_I"], box, cfg["proto_conf_thresh"], cfg["tau_high"],
                                                     cfg["area_t_max"], cfg["tau_low"], cfg["supervise_outside"])
    else:
        assert pm["M_C"] is None
        m_hat, w = prototypes.pseudo_labels(m_prob, box, cfg["tau_low"], cfg["tau_high"], cfg["supervise_outside"])
    torch.testing.assert_close(pm["M_prob"], m_prob, rtol=1e-6, atol=1e-9)
    assert torch.equal(pm["M_hat"], m_hat) and m_hat.sum() > 0
    assert torch.equal(pm["W"], w * valid)


def test_prototype_pixels_as_indices():
    """The in-box cell list that after_step hands to the prototype update: the True entries of the maps."""
    g = torch.Generator().manual_seed(0)
    obj = dict(box_mask=(torch.rand(3, 5, 6, generator=g) > 0.4).float())
    pm = dict(M_mean=torch.rand(3, 5, 6, generator=g), M_S=torch.rand(3, 5, 6, generator=g),
              has_pos=torch.tensor([True, False, True]))
    for cfg in (dict(proto_conf_thresh=0.6, semantic_map="calibrated", proto_filter=True, proto_pixels="teacher"),
                dict(proto_conf_thresh=0.6, semantic_map="paper", proto_filter=False, proto_pixels="teacher")):
        dense, idx = sim.prototype_pixels(pm, obj, cfg), sim.prototype_pixels(pm, obj, cfg, as_indices=True)
        for d, i in zip(dense, idx):
            assert (d is None) == (i is None)
            if d is not None:
                assert all(torch.equal(a, b) for a, b in zip(d.nonzero(as_tuple=True), i)) and len(i[0]) > 0


# -----------------------------------------------------------------------------
# L_pseudo (Eq. 8) and L_paste (Eq. 9)


def loss_setup(pasted):
    """scene(2) with image 1 only 60 px wide (its last stride-4 column is padding); pasted objects
    carry their GT masks as paste masks. W = the box (tau_low = tau_high) so every positive learns."""
    cfg = box_cfg(tau_low=0.5, tau_high=0.5)
    model, state, images, targets = setup(cfg)
    targets[1]["size"] = targets[1]["orig_size"] = (64, 60)
    for t, flags in zip(targets, pasted):
        t["pasted"] = torch.tensor(flags)
        w = t["size"][1]
        t["paste_masks"] = t["masks"][t["pasted"]][:, :, :w].bool()  # a row per pasted object
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    return model, targets, out, obj, pm


def test_sim_losses_split_between_pseudo_and_paste():
    model, _, out, obj, pm = loss_setup([[True, False], [False, True]])
    gi, im = out["inst"]["gt_inds"], out["inst"]["im_inds"]
    logits = out["mask_logits"]
    is_pasted = obj["pasted"][gi]                                                     # (K,)
    assert is_pasted.any() and (~is_pasted).any()
    terms = sim.sim_losses(out, pm, obj, box_cfg())
    assert set(terms) == {"loss_pseudo", "loss_paste"}
    ref_pseudo = losses.weighted_bce_dice(logits[~is_pasted, 0], pm["M_hat"][gi][~is_pasted],
                                          pm["W"][gi][~is_pasted]).mean()
    assert torch.allclose(terms["loss_pseudo"], ref_pseudo, atol=1e-6)
    # L_paste by hand: BCE over the image's real pixels + dice, averaged over the pasted positives
    per = []
    for k in is_pasted.nonzero().squeeze(1).tolist():
        x, t, v = logits[k, 0], obj["paste_mask"][gi[k]], obj["valid"][im[k]]
        bce = (F.binary_cross_entropy_with_logits(x, t, reduction="none") * v).sum() / v.sum()
        s, tv = x.sigmoid() * v, t * v
        per.append(bce + 1 - 2 * (s * tv).sum() / ((s * s).sum() + (tv * tv).sum() + 1e-5))
    assert torch.allclose(terms["loss_paste"], torch.stack(per).mean(), atol=1e-5)

    # gradients: L_pseudo reaches only ordinary positives, L_paste only pasted ones (and not the padding)
    g_pseudo, = torch.autograd.grad(terms["loss_pseudo"], logits, retain_graph=True)
    g_paste, = torch.autograd.grad(terms["loss_paste"], logits, retain_graph=True)
    nz = lambda g: g.flatten(1).ne(0).any(1)                                          # (K,)
    assert torch.equal(nz(g_pseudo), ~is_pasted)
    assert torch.equal(nz(g_paste), is_pasted)
    in_img1 = is_pasted & (im == 1)
    assert in_img1.any()
    assert (g_paste[in_img1, 0, :, 15] == 0).all() and (g_paste[in_img1, 0, :, 14] != 0).any()
    # ... and on to the student's parameters (controller and mask branch)
    params = [next(model.mask_branch.parameters()), *model.head.parameters()]
    for name in ("loss_pseudo", "loss_paste"):
        grads = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0, name
        assert any(g is not None and g.abs().sum() > 0 for g in grads[1:]), name


def test_sim_losses_all_or_none_pasted():
    _, _, out, obj, pm = loss_setup([[True, True], [True, True]])
    terms = sim.sim_losses(out, pm, obj, box_cfg())
    assert terms["loss_pseudo"].item() == 0 and terms["loss_pseudo"].requires_grad  # the empty case
    assert terms["loss_paste"].item() > 0
    _, targets, out, obj, pm = loss_setup([[False, False], [False, False]])
    terms = sim.sim_losses(out, pm, obj, box_cfg())
    assert terms["loss_paste"].item() == 0 and terms["loss_pseudo"].item() > 0
    # before copy-paste starts (targets without paste masks) there is no L_paste term
    obj = sim.objects([{k: v for k, v in t.items() if k != "paste_masks"} for t in targets], (64, 64))
    assert set(sim.sim_losses(out, pm, obj, box_cfg())) == {"loss_pseudo"}


# -----------------------------------------------------------------------------
# after the step: prototypes, memory bank, teacher EMA


def test_after_step_prototypes_bank_teacher():
    cfg = box_cfg(proto_conf_thresh=-1.0, bank_thresh=-1.0, teacher_momentum=0.9)
    model, state, images, targets = setup(cfg)
    targets[1]["pasted"] = torch.tensor([True, True])  # image 1's objects were pasted: not for the bank
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    # the class-2 objects (one per image) and image 0's class-0 object lose their positives
    pm["has_pos"] = torch.tensor([False, False, True, False])
    before = state.protos.protos.clone()
    ref = prototypes.PrototypeMemory(3, cfg["num_subcenters"], 16, cfg["proto_momentum"], cfg["tau"],
                                     cfg["sinkhorn_eps"], cfg["sinkhorn_iters"])
    ref.protos.copy_(before)
    ref.update(prototypes.normalize_features(out["mask_feats"].detach()), obj["img"], obj["cls"],
               (obj["box_mask"] > 0) & pm["has_pos"][:, None, None])
    # the student takes a (pretend) optimizer step
    teacher_before = {k: v.clone() for k, v in state.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    sim.after_step(state, model, out, pm, obj, images, targets)

    # prototypes: Eq. (2)-(5) from the student's features at the in-box pixels of objects with positives;
    # only class 0 (image 1's object) had such pixels
    after = state.protos.protos
    assert torch.equal(after, ref.protos)
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])
    # bank: image 1 had only pasted objects, image 0 only its class-0 object without positives
    assert len(state.bank) == 0
    # teacher: theta_t <- 0.9 theta_t + 0.1 theta_s; buffers copied
    student = model.state_dict()
    params = dict(state.teacher.named_parameters())
    for k, v in state.teacher.state_dict().items():
        if k in params:
            assert torch.allclose(v, 0.9 * teacher_before[k] + 0.1 * student[k], atol=1e-6), k
            assert not torch.equal(v, teacher_before[k]), k
        else:
            assert torch.equal(v, student[k]), k


def test_after_step_bank_entries():
    cfg = box_cfg(proto_conf_thresh=-1.0, bank_thresh=-1.0)
    model, state, images, targets = setup(cfg)
    targets[0]["size"] = (64, 60)   # the bank keeps the unpadded image
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    pm["has_pos"] = torch.tensor([True, True, False, True])
    targets[0]["pasted"] = torch.tensor([False, True])
    obj = sim.objects(targets, images.shape[-2:])
    sim.after_step(state, model, out, pm, obj, images, targets)
    # one entry per image with ordinary objects that have positives, each with an all-box pseudo mask
    assert len(state.bank) == 2
    e0, e1 = state.bank.entries
    assert torch.equal(e0["image"], images[0, :, :, :60])
    assert torch.equal(e0["boxes"], targets[0]["boxes"][:1]) and e0["labels"].tolist() == [0]
    full = lambda e, h, w: copypaste.crops_to_masks(e["masks"], e["mask_xy"], h, w)     # the crops at full size
    assert torch.equal(full(e0, 64, 60), box_ops.box_masks_exclusive(e0["boxes"], 64, 60))
    assert torch.equal(e1["image"], images[1])
    assert torch.equal(e1["boxes"], targets[1]["boxes"][1:]) and e1["labels"].tolist() == [2]
    assert torch.equal(full(e1, 64, 64), box_ops.box_masks_exclusive(e1["boxes"], 64, 64))
    assert ((e0["scores"] > 0) & (e0["scores"] < 1)).all()


def test_image_without_objects():
    """A batch image with no GT object: the other image's objects get everything, nothing breaks."""
    cfg = box_cfg(proto_conf_thresh=-1.0, bank_thresh=-1.0)
    model, state, images, targets = setup(cfg)
    t = targets[0]
    t["boxes"], t["labels"], t["masks"] = t["boxes"][:0], t["labels"][:0], t["masks"][:0]
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    assert obj["img"].tolist() == [1, 1] and pm["M_prob"].shape == (2, 16, 16) and pm["has_pos"].all()
    terms = sim.sim_losses(out, pm, obj, box_cfg())
    assert torch.isfinite(terms["loss_pseudo"]) and terms["loss_pseudo"] > 0
    sim.after_step(state, model, out, pm, obj, images, targets)
    assert len(state.bank) == 1 and torch.equal(state.bank.entries[0]["image"], images[1])


def test_after_step_nothing_confident():
    cfg = box_cfg(proto_conf_thresh=2.0, bank_thresh=2.0)  # probabilities never exceed 1
    model, state, images, targets = setup(cfg)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    before = state.protos.protos.clone()
    sim.after_step(state, model, out, pm, obj, images, targets)
    assert torch.equal(state.protos.protos, before)
    assert len(state.bank) == 0


# -----------------------------------------------------------------------------
# state


def test_sim_state_same_prototypes_whatever_the_global_rng():
    cfg = box_cfg()
    torch.manual_seed(1)
    a = sim.SIMState(cfg, torch.device("cpu"))
    x = torch.rand(3)
    torch.manual_seed(2)
    b = sim.SIMState(cfg, torch.device("cpu"))
    assert torch.equal(a.protos.protos, b.protos.protos)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), x)  # the global RNG is left as it was
    c = sim.SIMState(dict(cfg, seed=1), torch.device("cpu"))
    assert not torch.equal(a.protos.protos, c.protos.protos)
    norms = a.protos.protos.norm(dim=-1)
    assert a.protos.protos.shape == (3, cfg["num_subcenters"], 16)
    assert torch.allclose(norms, torch.ones_like(norms))


def test_folded_teacher_equals_the_teacher_through_ema_and_load():
    """The twin the SIM step runs gives the teacher's outputs, and still does after the EMA and a
    checkpoint load (the BNs carry statistics, not their initial 0/1, so folding changes the weights)."""
    cfg = box_cfg(proto_conf_thresh=-1.0, bank_thresh=-1.0, teacher_momentum=0.5)
    torch.manual_seed(0)
    model = build_model(cfg)
    images, targets = scene(2)
    model.train()
    with torch.no_grad():
        model.features(images)  # BN running statistics away from (0, 1)
    state = sim.SIMState(cfg, torch.device("cpu"))
    state.start_teacher(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in state.teacher.modules())
    assert len(state.fold_pairs) == n_bn > 20  # every BN of the ResNet and the mask branch follows a conv
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in state.teacher_fwd.modules())
    assert state.teacher_fwd.fpn.output[0].weight is state.teacher.fpn.output[0].weight

    def same(a, b):
        with torch.no_grad():
            x, y = a.features(images, classify=False), b.features(images, classify=False)
        for k in ("reg", "ctr_logits", "mask_feats"):
            assert torch.allclose(x[k], y[k], atol=1e-4, rtol=1e-4), k
        return y["mask_feats"]

    before = same(state.teacher, state.teacher_fwd)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.features(images)  # new BN statistics for the teacher to copy
    sim.after_step(state, model, out, pm, obj, images, targets)
    after = same(state.teacher, state.teacher_fwd)
    assert not torch.allclose(before, after, atol=1e-3)
    new = sim.SIMState(cfg, torch.device("cpu"))
    new.load_state_dict(state.state_dict(), model)
    assert torch.allclose(same(state.teacher, new.teacher_fwd), after, atol=1e-4, rtol=1e-4)
    off = sim.SIMState(dict(cfg, teacher_fold_bn=False), torch.device("cpu"))
    off.start_teacher(model)
    assert off.teacher_fwd is off.teacher and off.fold_pairs == []


def test_float32_outputs_hand():
    out = dict(reg=torch.tensor([[0.5, 1.25]], dtype=torch.bfloat16), loc_level=torch.tensor([0, 1]),
               box_feats=[torch.tensor([3.0], dtype=torch.bfloat16), torch.tensor([-2.0])], cls_logits=None)
    f = sim.float32_outputs(out)
    assert f["reg"].dtype == torch.float32 and f["reg"].tolist() == [[0.5, 1.25]]
    assert f["loc_level"] is out["loc_level"]  # integers untouched
    assert [t.dtype for t in f["box_feats"]] == [torch.float32] * 2 and f["box_feats"][0].item() == 3.0
    assert f["box_feats"][1] is out["box_feats"][1] and f["cls_logits"] is None  # already float32: no copy


def test_teacher_autocast_only_where_bf16_is_native(monkeypatch):
    x = torch.randn(4, 8)
    cpu = torch.device("cpu")
    with sim.teacher_autocast(cpu, enabled=False):
        assert (x @ x.T).dtype == torch.float32
    monkeypatch.setattr(sim, "bf16_kernels", lambda device: False)  # e.g. a CPU without AVX512-BF16
    with sim.teacher_autocast(cpu, enabled=True):
        assert (x @ x.T).dtype == torch.float32
    monkeypatch.setattr(sim, "bf16_kernels", lambda device: True)
    with sim.teacher_autocast(cpu, enabled=True):
        assert (x @ x.T).dtype == torch.bfloat16
    assert (x @ x.T).dtype == torch.float32  # only inside


def test_teacher_outputs_bf16_near_fp32_and_fp32_exact(monkeypatch):
    """teacher_outputs in float32 whatever the teacher ran in; with --teacher_bf16=False exactly the
    folded twin's forward; in bf16 within bf16's rounding of it (a relative 2^-8 per op)."""
    cfg = box_cfg()
    model, state, images, targets = setup(cfg)
    monkeypatch.setattr(sim, "bf16_kernels", lambda device: True)  # run the bf16 path on any CPU
    state.cfg = dict(cfg, teacher_bf16=False)
    ref = sim.teacher_outputs(state, images)
    with torch.no_grad():
        direct = state.teacher_fwd.features(images, classify=False)
    for k in ("reg", "ctr_logits", "mask_feats"):
        assert torch.equal(ref[k], direct[k]), k
    state.cfg = dict(cfg, teacher_bf16=True)
    low = sim.teacher_outputs(state, images)
    assert low["cls_logits"] is None
    for k in ("reg", "ctr_logits", "mask_feats"):
        assert low[k].dtype == torch.float32 and not low[k].is_inference(), k
        assert not torch.equal(low[k], ref[k]), k  # it did run in bf16
        scale = ref[k].abs().max()
        assert (low[k] - ref[k]).abs().max() < 0.05 * scale, k
    scale = max(b.abs().max() for b in ref["box_feats"])  # one scale: a 1 x 1 level's GroupNorm output is ~0
    assert all(a.dtype == torch.float32 and (a - b).abs().max() < 0.05 * scale
               for a, b in zip(low["box_feats"], ref["box_feats"]))


def test_sim_state_round_trip():
    cfg = box_cfg(proto_conf_thresh=-1.0, bank_thresh=-1.0)
    model, state, images, targets = setup(cfg)
    with torch.no_grad():
        for p in state.teacher.parameters():
            p.mul_(0.5)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    sim.after_step(state, model, out, pm, obj, images, targets)
    torch.rand(7, generator=state.generator)  # the copy-paste draws have advanced
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)  # as in the checkpoint
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)

    new = sim.SIMState(cfg, torch.device("cpu"))
    assert new.teacher is None and len(new.bank) == 0
    assert not torch.equal(new.protos.protos, state.protos.protos)
    new.load_state_dict(sd, model)
    a, b = state.teacher.state_dict(), new.teacher.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(b[k], v) for k, v in model.state_dict().items())  # the teacher, not the student
    assert not new.teacher.training and not any(p.requires_grad for p in new.teacher.parameters())
    assert torch.equal(new.protos.protos, state.protos.protos)
    assert len(new.bank) == len(state.bank) == 2
    for e, f in zip(state.bank.entries, new.bank.entries):
        assert e.keys() == f.keys() and all(torch.equal(e[k], f[k]) for k in e if k != "masks")
        assert len(e["masks"]) == len(f["masks"]) and all(torch.equal(u, v) for u, v in zip(e["masks"], f["masks"]))
    assert torch.equal(torch.rand(5, generator=new.generator), torch.rand(5, generator=state.generator))
    # before the teacher starts, the state has none and loading keeps it so
    fresh = sim.SIMState(cfg, torch.device("cpu"))
    other = sim.SIMState(cfg, torch.device("cpu"))
    other.load_state_dict(fresh.state_dict(), model)
    assert other.teacher is None


# -----------------------------------------------------------------------------
# DDP: 2 gloo processes on different images end with identical prototypes


N_STEPS = 3


def proto_steps(model, state, images, targets, cfg, n):
    """n iterations of student forward -> teacher features -> pseudo masks -> after_step (no optimizer:
    the student, in eval mode, stays fixed, so only the prototypes move)."""
    for it in range(n):
        with torch.no_grad():
            out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
        sim.after_step(state, model, out, pm, obj, images, targets)


def ddp_setup(cfg):
    model, state, images, targets = setup(cfg, n_images=4)
    model.eval()
    return model, state, images, targets


def _ddp_worker(rank, port, cfg, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, state, images, targets = ddp_setup(cfg)
    sl = slice(2 * rank, 2 * rank + 2)  # different images per rank
    proto_steps(model, state, images[sl], targets[sl], cfg, N_STEPS)
    q.put((rank, state.protos.protos.numpy().copy()))  # by value: tensors die with the child
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_prototypes_identical_on_both_ranks():
    cfg = box_cfg(proto_conf_thresh=-1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, cfg, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    p0, p1 = torch.from_numpy(got[0]), torch.from_numpy(got[1])
    assert torch.equal(p0, p1)

    # the same in one process: each step, each half's local update from the shared prototypes, then
    # their average, re-normalised (what the all-reduce does)
    model, state, images, targets = ddp_setup(cfg)
    init = state.protos.protos.clone()
    assert not torch.equal(p0, init)
    protos = init
    for it in range(N_STEPS):
        local = []
        for sl in (slice(0, 2), slice(2, 4)):
            state.protos.protos.copy_(protos)
            proto_steps(model, state, images[sl], targets[sl], cfg, 1)
            local.append(state.protos.protos.clone())
        assert not torch.equal(local[0], local[1])  # the ranks alone would drift apart
        protos = F.normalize((local[0] + local[1]) / 2, dim=-1)
    assert torch.allclose(p0, protos, atol=1e-6)


# -----------------------------------------------------------------------------
# nanoSIM's departures


def test_nanosim_background_outside_the_box_on_pasted_pixels_not_padding():
    cfg = sim_cfg("nanosim")
    model, state, images, targets = setup(cfg)
    targets[1]["size"] = (48, 64)                      # image 1's last 16 rows are padding
    pasted = torch.zeros(64, 64, dtype=torch.bool)
    pasted[12:20, 10:18] = True                        # pixels pasted over object 0 of image 0 (box [8, 10, 28, 30])
    targets = [copypaste.with_paste_fields(t, t["size"]) for t in targets]
    targets[0]["paste_area"] = pasted
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    box = box_ops.box_masks_inclusive(torch.cat([t["boxes"] for t in targets]), (64, 64), 4) > 0  # plain boxes (G, 16, 16)
    valid = obj["valid"][obj["img"]] > 0                                                  # (G, 16, 16)
    on_paste = torch.zeros(4, 16, 16, dtype=torch.bool)
    on_paste[0] = pasted[2::4, 2::4]                   # grid rows 14, 18 and columns 10, 14
    assert on_paste[0].sum() == 4 and (box[0] & on_paste[0]).sum() == 4
    # outside the box and on the pasted pixels: background, weight 1; padding: weight 0
    bg = (~box | on_paste) & valid
    assert (pm["W"][bg] == 1).all() and (pm["M_hat"][bg] == 0).all()
    assert (pm["W"][~valid] == 0).all() and (~valid).sum() == 2 * 4 * 16
    # in-box pseudo labels without supervise_outside (the official rule) on the same batch: nothing outside
    # the box, the pasted pixels ignored
    pp = sim.pseudo_masks(out, t_out, state.teacher, state.protos, obj, box_cfg())
    assert (pp["W"][~box | on_paste] == 0).all()


def test_prototype_pixels_filter_hand():
    # one object, 4 pixels in its box, 1 outside: teacher mean mask and calibrated M_S by hand
    obj = dict(box_mask=torch.tensor([[[1.0, 1, 1, 1, 0]]]))
    pm = dict(M_mean=torch.tensor([[[0.9, 0.9, 0.1, 0.1, 0.9]]]), M_S=torch.tensor([[[0.8, 0.2, 0.2, 0.8, 0.9]]]),
              has_pos=torch.tensor([True]))
    cfg = dict(proto_conf_thresh=0.7, semantic_map="calibrated", proto_filter=True, proto_pixels="teacher")
    fg, bg = sim.prototype_pixels(pm, obj, cfg)
    assert fg.tolist() == [[[True, False, False, False, False]]]      # confident and the map agrees
    assert bg.tolist() == [[[False, False, True, False, False]]]
    fg, bg = sim.prototype_pixels(pm, obj, dict(cfg, proto_filter=False))
    assert fg.tolist() == [[[True, True, False, False, False]]]
    assert bg.tolist() == [[[False, False, True, True, False]]]
    fg, bg = sim.prototype_pixels(pm, obj, dict(cfg, semantic_map="paper"))
    assert fg.tolist() == [[[True, True, False, False, False]]] and bg is None
    pm["has_pos"] = torch.tensor([False])                              # no positive: no pixel
    fg, bg = sim.prototype_pixels(pm, obj, cfg)
    assert not fg.any() and not bg.any()


def test_nanosim_training_step_runs_and_updates_background_subcentres():
    # an untrained teacher says ~0.5 everywhere: threshold 0.5 splits its pixels into fg and bg
    cfg = sim_cfg("nanosim", sim_start_iter=0, teacher_start_iter=0, proto_conf_thresh=0.5)
    model, state, images, targets = setup(cfg)
    before, before_fg = state.protos.bg_protos.clone(), state.protos.protos.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, logs = step.train_step(model, model, opt, torch.amp.GradScaler("cpu", enabled=False), state, images,
                                 targets, 5, cfg, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert torch.isfinite(loss) and "loss_pseudo" in logs
    assert not torch.equal(state.protos.bg_protos, before) and not torch.equal(state.protos.protos, before_fg)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_training_step_runs_with_every_preset(variant):
    # the official preset also reads the teacher's features in the loss (colour x feature affinity):
    # what the step computes from the inference-mode teacher outputs must be usable by autograd
    cfg = sim_cfg(variant, sim_start_iter=0, teacher_start_iter=0)
    model, state, images, targets = setup(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.clone() for p in state.teacher.parameters()]
    loss, logs = step.train_step(model, model, opt, torch.amp.GradScaler("cpu", enabled=False), state, images,
                                 targets, 5, cfg, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert torch.isfinite(loss) and "loss_pseudo" in logs and logs["loss_pairwise"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, state.teacher.parameters()))  # the EMA moved


def test_after_step_bank_masks_from_the_rectified_map():
    # bank_masks="rectified": the bank's pseudo mask is [M_prob (upsampled) > bank_thresh], not the teacher's mean
    cfg = sim_cfg("nanosim", proto_conf_thresh=-1.0, bank_thresh=0.5, bank_masks="rectified", bank_min_box_iou=0.0)
    model, state, images, targets = setup(cfg)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    pm["has_pos"] = torch.ones(len(obj["boxes"]), dtype=torch.bool)
    pm["M_mean"] = torch.ones_like(pm["M_mean"])          # the teacher would fill every box
    pm["M_prob"] = torch.zeros_like(pm["M_prob"])
    pm["M_prob"][0, :4, :4] = 1.0                          # object 0's map: the top-left 16 x 16 px only
    sim.after_step(state, model, out, pm, obj, images, targets)
    e0 = state.bank.entries[0]
    assert len(e0["masks"]) == 1                           # object 1 of image 0: an empty mask, dropped
    # cells 0..3 at stride 4, bilinear x4: along each axis 1 up to pixel 13, then 0.875, 0.625, 0.375,
    # 0.125, 0; the 2-d value is the product; > 0.5 and inside the box [8, 10, 28, 30]
    v = torch.zeros(64)
    v[:14] = 1.0
    v[14:18] = torch.tensor([0.875, 0.625, 0.375, 0.125])
    want = (v[:, None] * v[None, :]) > 0.5
    want[:10], want[:, :8] = False, False
    full = copypaste.crops_to_masks(e0["masks"], e0["mask_xy"], 64, 64)[0]
    assert want.sum() == 6 * 8 - 1 and torch.equal(full, want)   # (15, 15): 0.39


def test_viz_grids_for_sim_and_boxinst(tmp_path):
    """viz.object_grids: one PNG per object with positives, two rows of panels; SIM's grid has the
    prototype and pseudo-label panels (with copy-paste once the bank is full), BoxInst's only its own."""
    from PIL import Image
    import viz
    cfg = sim_cfg("nanosim", proto_conf_thresh=0.5, bank_size=2, bank_thresh=-1.0, bank_min_box_iou=0.0)
    model, state, images, targets = setup(cfg)
    out, t_out, obj, pm = forward_pm(model, state, images, targets, cfg)
    sim.after_step(state, model, out, pm, obj, images, targets)          # fills the bank (2 images)
    assert state.bank.full
    sim_paths = viz.object_grids(model, state, cfg, images, targets, str(tmp_path / "sim"), n=2)
    box_paths = viz.object_grids(model, None, cfg, images, targets, str(tmp_path / "boxinst"), n=5)
    assert len(sim_paths) == 2 and len(box_paths) == int(pm["has_pos"].sum())
    a, b = Image.open(sim_paths[0]), Image.open(box_paths[0])
    assert a.width > 2 * b.width   # rows of 5 panels (SIM) against 2 (BoxInst)
    assert model.training                                          # the mode is restored


def test_feature_similarity_hand():
    f = torch.zeros(1, 2, 1, 3)
    f[0, 0, 0, 2] = 3.0                    # pixel 2 = (3, 4) at distance 5 from pixel 0 = (0, 0)
    f[0, 1, 0, 2] = 4.0
    s = sim.feature_similarity(f)          # (1, 8, 1, 3); neighbours at dilation 2: pixel 0 <-> pixel 2
    right, left = 4, 3                     # row-major offsets: (0, +2) is tap 4, (0, -2) tap 3
    assert s[0, right, 0, 0].item() == pytest.approx(math.exp(-5))
    assert s[0, left, 0, 2].item() == pytest.approx(math.exp(-5))
    assert s[0, right, 0, 1].item() == 0.0  # off the map
    assert s[0, 0, 0, 0].item() == 0.0
