"""The SIM presets: what --sim_variant sets on every config, and the paper's reading of each place where
it departs from the official code, each on hand-made inputs."""
import glob
import math
import os

import pytest
import torch

import config
import configurator
import copypaste
import losses
import prototypes
import sim

HERE = os.path.dirname(os.path.abspath(__file__))
SIM_CONFIGS = sorted(glob.glob(os.path.join(HERE, "configs", "*sim*.py")))

# the paper's values (Sec. 3, 4.1 and the supplement), written out here rather than read from sim.PRESETS
PAPER = dict(tau=0.1, mu=5.0, alpha=0.5, tau_low=0.3, tau_high=0.7, lambda1=0.5, lambda1_ramp_iters=0, lambda2=1.0,
             bank_size=100, paste_prob=1.0, paste_fraction=0.25, paste_max_objects=3, paste_score_power=1,
             teacher_momentum=0.9999, proto_momentum=0.999, num_subcenters=10, semantic_map="paper",
             pseudo_thresh="fixed", pseudo_region="image", proto_pixels="pseudo", centroid_norm=False,
             bank_masks="pseudo", bank_score_plus_one=False, paste_reduction="sum", pseudo_loss="bce_dice",
             paste_loss="bce_dice", proto_assign="argmax", proto_norm="D", color_weight=0.0, teacher_bf16=False,
             sinkhorn_eps=0.05, sinkhorn_iters=3)


def configured(argv):
    cfg = config.defaults()
    configurator.configure_run(argv, cfg)
    return cfg


@pytest.mark.parametrize("path", SIM_CONFIGS)
def test_paper_preset_on_every_sim_config_is_the_paper(path, monkeypatch):
    """--sim_variant=paper on a COCO/VOC config: every one of the paper's values, whatever the config
    file sets (a config's schedule knobs, e.g. the EMA momenta, never override the preset's choice)."""
    monkeypatch.chdir(HERE)
    cfg = configured([path, "--sim_variant=paper"])
    assert {k: cfg[k] for k in PAPER} == PAPER
    assert losses.lambda1_ramp_length(cfg) == 0  # Eq. (10): a step at sim_start_iter


@pytest.mark.parametrize("path", SIM_CONFIGS)
def test_official_ramp_spans_270k_on_coco_1x_and_3x(path, monkeypatch):
    monkeypatch.chdir(HERE)
    cfg = configured([path, "--sim_variant=official"])
    expected = 60000 if os.path.basename(path).startswith("voc") else 270000  # 3x the 1x schedule
    assert cfg["lambda1_ramp_iters"] == expected and cfg["lambda1_ramp_origin"] == 0 and cfg["tau"] == 1.0


@pytest.mark.parametrize("path", SIM_CONFIGS)
def test_nanosim_ramp_is_the_teachers_head_start(path, monkeypatch):
    monkeypatch.chdir(HERE)
    cfg = configured([path])
    assert cfg["sim_variant"] == "nanosim"
    assert losses.lambda1_ramp_length(cfg) == cfg["sim_start_iter"] - cfg["teacher_start_iter"]
    assert losses.lambda1_ramp_length(cfg) == (1100 if os.path.basename(path).startswith("voc") else 5000)


def test_the_command_line_wins_a_config_file_does_not(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("sim_variant = 'paper'\nalpha = 1.0\ntau = 0.7\n")
    cfg = configured([str(f), "--tau=0.5"])
    assert cfg["tau"] == 0.5          # named on the command line: wins over the preset
    assert cfg["alpha"] == 0.5        # set by the file: the preset's
    assert configured([str(f)])["tau"] == 0.1


def test_nanosim_is_the_defaults_written_once():
    assert sim.PRESETS["nanosim"] == {}
    assert configured([]) == config.defaults()
    assert configured(["--sim_variant=paper", "--sim_variant=nanosim"]) == config.defaults()


def test_presets_reject_unknown_values():
    with pytest.raises(SystemExit, match="not a preset"):
        configured(["--sim_variant=nope"])
    with pytest.raises(SystemExit, match="--semantic_map='calibrate' is not an option"):
        configured(["--semantic_map=calibrate"])
    with pytest.raises(SystemExit, match="color_weight"):
        configured(["--pseudo_region=image"])  # nanosim's colour term reads the ring around the box


# ----------------------------------------------------------------------------- the paper's readings, by hand

def test_eq5_centroid_is_the_plain_mean_in_the_paper():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    c, n = prototypes.cluster_centroids(feats, torch.tensor([0, 0, 2, 2]), 3, normalize=False)
    assert n.tolist() == [2, 0, 2]
    assert c.tolist() == [[1.5, 0.5], [0.0, 0.0], [1.5, 1.5]]
    c, _ = prototypes.cluster_centroids(feats, torch.tensor([0, 0, 2, 2]), 3)  # official: unit
    assert torch.allclose(c[2], torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_eq11_score_is_the_mean_in_the_paper():
    probs = torch.tensor([[[0.9, 0.8], [0.2, 0.6]], [[0.5, 0.5], [0.5, 0.5]]])
    masks = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    torch.testing.assert_close(copypaste.object_scores(probs, masks, plus_one=False), torch.tensor([0.85, 0.0]))
    torch.testing.assert_close(copypaste.object_scores(probs, masks), torch.tensor([1.7 / 3, 0.0]))


def test_eq9_paste_loss_sums_in_the_paper():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 4, 4, generator=g), torch.rand(3, 4, 4, generator=g) > 0.5
    pasted = torch.tensor([True, False, True])
    per = losses.weighted_bce_dice(logits, target, torch.ones(3, 4, 4))  # l_mask of each positive
    torch.testing.assert_close(losses.paste_loss(logits, target, pasted, reduction="sum"), per[0] + per[2])
    torch.testing.assert_close(losses.paste_loss(logits, target, pasted), (per[0] + per[2]) / 2)


def test_paste_count_a_quarter_and_score_proportional_in_the_paper():
    g = torch.Generator().manual_seed(0)
    for n_obj, paper, official in [(1, 1, 1), (4, 1, 2), (8, 2, 3), (9, 2, 3), (20, 3, 3)]:
        s = torch.rand(n_obj, generator=g) + 0.1
        assert len(copypaste.sample_objects(s, g, 3, 1, False, 0.25)) == paper
        assert len(copypaste.sample_objects(s, g)) == official
    # probability ~ score (power 1): object 0 first with 1 / (1 + 3) = 0.25; official (cubed): 1 / 28
    firsts = torch.stack([copypaste.sample_objects(torch.tensor([1.0, 3.0]), g, 3, 1, False, 0.5)[0]
                          for _ in range(6000)])
    assert abs((firsts == 0).float().mean().item() - 0.25) < 0.02  # std 0.006


def test_prototypes_learn_from_the_pseudo_labels_in_the_paper():
    """proto_pixels="pseudo": the pixels M_hat labels foreground (W > 0) of objects with positives, in
    the box or not; "teacher" (official): the teacher's confident in-box pixels."""
    pm = dict(M_hat=torch.tensor([[[1.0, 1, 0, 1, 1]], [[1.0, 1, 1, 1, 1]]]),
              W=torch.tensor([[[1.0, 0, 1, 1, 1]], [[1.0, 1, 1, 1, 1]]]),
              M_mean=torch.tensor([[[0.9, 0.9, 0.9, 0.1, 0.9]], [[0.9, 0.9, 0.9, 0.9, 0.9]]]),
              M_S=torch.full((2, 1, 5), 0.6), has_pos=torch.tensor([True, False]))
    obj = dict(box_mask=torch.tensor([[[1.0, 1, 1, 1, 0]], [[1.0, 1, 1, 1, 1]]]))
    cfg = dict(proto_pixels="pseudo", semantic_map="paper", proto_filter=False, proto_conf_thresh=0.7)
    fg, bg = sim.prototype_pixels(pm, obj, cfg)
    assert fg.tolist() == [[[True, False, False, True, True]], [[False] * 5]] and bg is None
    fg, _ = sim.prototype_pixels(pm, obj, dict(cfg, proto_pixels="teacher"))
    assert fg.tolist() == [[[True, True, True, False, False]], [[False] * 5]]
    k, y, x = sim.prototype_pixels(pm, obj, cfg, as_indices=True)[0]
    assert k.tolist() == [0, 0, 0] and x.tolist() == [0, 3, 4]


def test_bank_keeps_the_pseudo_mask_scored_by_the_instance_map():
    """bank_masks="pseudo" (Fig. 4's M-hat'): the bank's mask is M_hat (upsampled, in the box), its Eq. 11
    score the mean of M_I over it (no +1)."""
    m_hat = torch.zeros(1, 4, 4)
    m_hat[0, 1:3, 1:3] = 1.0                                     # 2 x 2 cells = pixels 4..11 at stride 4
    m_i = torch.full((1, 4, 4), 0.8)
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    e = copypaste.bank_entry_from_teacher(image, torch.tensor([[2.0, 2.0, 14.0, 14.0]]), torch.tensor([0]), m_hat,
                                          (16, 16), 0.5, 4, 0.0, m_i, False)
    # bilinear x4 of the 2 x 2 block: 0.625 at its outer pixel rows and columns, so the 4 corners fall
    # below 0.5 (0.625^2) and the rest of pixels 4..11 stay above (0.625 x 0.875)
    m = e["masks"][0]
    assert tuple(m.shape) == (8, 8) and e["mask_xy"].tolist() == [[4, 4]] and m.sum() == 60
    assert not (m[0, 0] or m[0, 7] or m[7, 0] or m[7, 7])
    torch.testing.assert_close(e["scores"], torch.tensor([0.8]))


def test_pseudo_labels_on_the_whole_image_in_the_paper():
    """pseudo_region="image": Eq. 7 and the thresholds on every pixel of the image (padding excluded), as
    the paper writes them: a confident pixel outside the box is a label too; "box" leaves it out."""
    import test_sim
    cfg = test_sim.sim_cfg("paper")
    model, state, images, targets = test_sim.setup(cfg)
    targets[1]["size"] = (48, 64)                                # image 1's last 4 grid rows: padding
    out, t_out, obj, pm = test_sim.forward_pm(model, state, images, targets, cfg)
    valid, box = obj["valid"][obj["img"]] > 0, obj["box_mask"] > 0
    expected = (1 - cfg["alpha"]) * pm["M_S"] + cfg["alpha"] * pm["M_I"]
    torch.testing.assert_close(pm["M_prob"][valid], expected[valid])
    assert (pm["M_S"][valid & ~box] > 0).all() and (pm["M_prob"][~valid] == 0).all()
    m = pm["M_prob"]
    assert torch.equal(pm["W"] > 0, valid & ((m >= 0.7) | (m <= 0.3)))
    assert torch.equal(pm["M_hat"] > 0, valid & (m >= 0.7))
    inbox = sim.pseudo_masks(out, t_out, state.teacher, state.protos, obj, dict(cfg, pseudo_region="box"))
    assert (inbox["W"][~box] == 0).all() and (pm["W"][~box] > 0).any()
