"""ablate.py's diagnostics on tiny data: --ms_stats scores every variant's pseudo labels against the GT masks."""

import torch

torch.set_num_threads(1)

import ablate
import config
import sim
import synthetic
from model import build_model
from test_model import tiny_cfg


def test_ms_stats_scores_every_variant(tmp_path, capsys, monkeypatch):
    import prototypes
    built = []  # each row's prototype memory is built with its preset's settings (the paper's: centroid_norm off)
    monkeypatch.setattr(prototypes.PrototypeMemory, "__init__", lambda self, *a, _i=prototypes.PrototypeMemory.__init__:
                        (built.append(a[-1]), _i(self, *a))[1])
    paths = synthetic.ensure_synthetic(tmp_path / "syn", n_train=8, n_val=4, size=128)
    cfg = tiny_cfg(method="boxinst", num_classes=5, mask_out_stride=2, min_size_test=128, max_size_test=128,
                   sizes_of_interest=(16, 32, 64, 128), **paths)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg, "sim": None}, tmp_path / "ckpt.pt")
    ablate.ms_stats(str(tmp_path / "ckpt.pt"), n_build=8, n_images=4)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "variant" not in l]
    assert [l.split(" | ")[0][2:] for l in lines] == [v[0] for v in ablate.STATS_VARIANTS]
    for label, line in zip([v for v in ablate.STATS_VARIANTS], lines):  # 12 columns; AUCs in [0, 1], shares in [0, 100] %
        cells = line.strip("| ").split(" | ")
        assert len(cells) == 12, line
        aucs = [float(cells[i].split()[0]) for i in (1, 2, 4)]
        shares = [float(c.rstrip("%")) for c in cells[5:11]]
        assert all(0 <= a <= 1 for a in aucs) and all(0 <= s <= 100 for s in shares), line
        # M_C's AUC exactly for the variants with the colour map
        beta = dict(config.defaults(), **sim.PRESETS[label[1]], **label[2])["color_weight"]
        assert (cells[3] == "-") == (beta == 0), line
    # the paper's Eq. (1) map and nanosim's calibrated one score differently
    assert lines[0].split(" | ")[1:] != lines[2].split(" | ")[1:]
    assert built == [dict(config.defaults(), **sim.PRESETS[v[1]], **v[2])["centroid_norm"] for v in ablate.STATS_VARIANTS]
    assert built[0] is False and built[2] is True


def test_ms_stats_scores_a_mask2former_checkpoint_by_its_instance_map(tmp_path, capsys):
    # a BoxInst-dagger checkpoint: M_I from the teacher's queries (mask2former.pseudo_masks), both forms
    from test_mask2former import tiny_cfg as m2f_cfg
    paths = synthetic.ensure_synthetic(tmp_path / "syn", n_train=8, n_val=4, size=128)
    cfg = m2f_cfg(method="boxinst", num_classes=5, mask_out_stride=2, min_size_test=128, max_size_test=128, **paths)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg, "sim": None}, tmp_path / "ckpt.pt")
    ablate.ms_stats(str(tmp_path / "ckpt.pt"), n_build=8, n_images=4)
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("| ") and "variant" not in l]
    assert [l.split(" | ")[0][2:] for l in lines] == [v[0] for v in ablate.STATS_VARIANTS_M2F]
    for label, line in zip(ablate.STATS_VARIANTS_M2F, lines):
        cells = line.strip("| ").split(" | ")
        assert len(cells) == 12 and all(0 <= float(cells[i].split()[0]) <= 1 for i in (1, 2, 4)), line
        beta = dict(config.defaults(), **sim.PRESETS[label[1]], **label[2])["color_weight"]
        assert (cells[3] == "-") == (beta == 0), line


def test_cli_checks_its_options_and_train_options_before_any_run():
    import pytest
    with pytest.raises(SystemExit, match=r"ablate.py: --runs=nope: \['nope'\] not a row"):
        ablate.cli(["--runs=nope"])
    with pytest.raises(SystemExit, match="train.py: unknown option --lrr"):
        ablate.cli(["--runs=baseline", "--lrr=3"])
    with pytest.raises(SystemExit, match="ablate.py: --jobs='x' should be a int"):
        ablate.cli(["--jobs=x"])
