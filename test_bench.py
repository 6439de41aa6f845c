"""bench.py runs both methods on tiny data and prints the ratio line, with and without copy-paste."""

import re

import pytest
import torch

torch.set_num_threads(1)

import bench
import synthetic


@pytest.mark.parametrize("paste_prob", ["0.0", "0.5"])
def test_bench_prints_the_ratio(tmp_path, capsys, paste_prob):
    p = synthetic.ensure_synthetic(tmp_path / "syn", n_train=8, n_val=1, size=128)
    bench.main([f"--train_json={p['train_json']}", f"--train_images={p['train_images']}", "--backbone=resnet18",
                "--fpn_channels=32", "--head_convs=1", "--mask_branch_channels=16",
                "--mask_branch_convs=1", "--min_size_train=(128,)", "--max_size_train=128", "--batch_size=2",
                "--steps=1", "--rounds=2", "--warmup=1", f"--paste_prob={paste_prob}", "--device=cpu",
                f"--profile={paste_prob == '0.5'}"])
    out = capsys.readouterr().out
    assert re.search(r"^SIM / BoxInst step time: \d+\.\d\dx$", out, re.M), out
    if paste_prob == "0.5":  # --profile=True: the operator table follows the ratio line
        assert "Self CPU" in out.split("SIM / BoxInst step time")[1]


def test_compare_arch_times_condinst_against_mask2former(tmp_path, capsys):
    """--compare=arch: both architectures' SIM steps (teacher, pseudo masks, paste) on the same batches."""
    p = synthetic.ensure_synthetic(tmp_path / "syn", n_train=8, n_val=1, size=128)
    bench.main(["--compare=arch", f"--train_json={p['train_json']}", f"--train_images={p['train_images']}",
                "--min_size_train=(96,)", "--max_size_train=96", "--batch_size=2", "--steps=1", "--rounds=1",
                "--warmup=1", "--device=cpu"])
    out = capsys.readouterr().out
    assert re.search(r"^condinst +median step", out, re.M) and re.search(r"^mask2former +median step", out, re.M), out
    assert re.search(r"^Mask2Former / CondInst \(sim\) step time: \d+\.\d\dx$", out, re.M), out


def test_compare_torchvision_prints_every_variant_and_the_ratios(capsys, monkeypatch):
    """The torchvision comparison at 128 px (512 in the real run): a table row per variant, the ratios last."""
    monkeypatch.setattr(bench, "TV_SIZE", 128)
    bench.main(["--compare=torchvision", "--steps=1", "--rounds=1", "--warmup=1", "--device=cpu", "--profile=True"])
    out = capsys.readouterr().out
    out, prof = out.split("| operator, self ms per call |")
    assert "| aten::convolution_backward |" in prof, prof
    conv, total = [list(map(float, re.findall(r"\| ([\d.]+)", l))) for l in prof.strip().splitlines()[-2:]]
    assert len(conv) == len(total) == 4 and all(0 < c < t for c, t in zip(conv, total)), prof
    for name in ("torchvision FCOS", "nanoSIM BoxInst", "nanoSIM SIM", "nanoSIM full"):
        assert re.search(rf"^\| {name} \| \d+ \| \d+ \| \d+ \| \d+\.\d, \d+\.\d \| \d+, \d+ \|$", out, re.M), out
    last = out.strip().splitlines()[-3:]
    assert [l.split(" /")[0] for l in last] == ["nanoSIM BoxInst", "nanoSIM SIM", "nanoSIM full"]
    assert all(re.search(r"train step \d+\.\d\dx, inference \d+\.\d\dx$", l) for l in last)


def test_paired_ratio_per_round():
    # rounds at 2x and 1x the reference: the median of the per-round ratios is 1.5; the pooled medians
    # (3 / 2.5 = 1.2) would hide that the machine sped up between the rounds
    assert bench.paired_ratio([[2.0, 2.0], [4.0, 4.0]], [[1.0, 1.0], [4.0, 4.0]]) == 1.5
    assert bench.paired_ratio([[3.0, 1.0, 2.0]], [[1.0, 1.0, 1.0]]) == 2.0


def test_conv_gmacs_hand_counts():
    """3 -> 4 channels, 3 x 3, on 5 x 5: 4 * 25 outputs of 3 * 9 MACs = 2700; a 2-group 1 x 1 conv 4 -> 6 on
    the same map: 6 * 25 outputs of 2 MACs = 300; run twice, counted twice; other layers not at all."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 1, groups=2),
                              torch.nn.Flatten(), torch.nn.Linear(150, 2))
    x = torch.randn(1, 3, 5, 5)
    assert bench.conv_gmacs(lambda: net(x)) * 1e9 == pytest.approx(3000)
    assert bench.conv_gmacs(lambda: (net(x), net(x))) * 1e9 == pytest.approx(6000)
    hooks = torch.nn.modules.module._global_forward_hooks
    with pytest.raises(ZeroDivisionError):
        bench.conv_gmacs(lambda: 1 / 0)
    assert len(hooks) == 0  # removed, also when fn raised


def test_compare_host_prints_old_and_new(capsys, monkeypatch):
    """--compare=host at 64 x 96 px, 3 objects per image, one rep, with this tree standing in for the old
    commit (the real run adds a git worktree of it): a row per setting with both ratios, then the stages."""
    import os
    here = os.path.dirname(os.path.abspath(bench.__file__))
    for k, v in dict(HOST_SIZE=(64, 96), HOST_OBJECTS=(3,), HOST_REPS=1, HOST_OLD_TREE=here).items():
        monkeypatch.setattr(bench, k, v)
    bench.main(["--compare=host"])
    out = capsys.readouterr().out
    for paste in ("on", "off"):
        ratio = r"\d+ \| \d+ \| \d+\.\d\dx"  # old | new | old / new
        assert re.search(rf"^\| 3 \| {paste} \| {ratio} \| {ratio} \|$", out, re.M), out
        stages = " \\| ".join([r"\d+ -> \d+"] * len(bench.HOST_STAGES))
        assert re.search(rf"^\| 3, {paste} \| {stages} \|$", out, re.M), out


def test_sync_points_counts_the_calls_that_wait_for_a_gpu():
    """On the CPU, the proxy counts each host read, data-dependent shape and host-to-device copy once, at
    the line that made it; arithmetic is not counted."""
    x = torch.arange(6.0)

    def fn():
        y = x * 2 + 1                             # not a sync
        idx = (y > 4).nonzero()                   # 1: a data-dependent shape
        n = int(y.sum().item())                   # 2: a host read (int() of a float is plain Python)
        z = y[y > 6]                              # 3: boolean-mask indexing
        w = torch.tensor([1.0, 2.0], device="cpu")  # 4: host data to the device
        return idx, n, z, w, y.tolist()           # 5

    total, top = bench.sync_points(fn)
    assert total == 5
    kinds = sorted(where.split()[0] for where, _ in top)
    assert kinds == ["bool-index", "host-to-device", "item", "nonzero", "tolist"]
    assert all(where.split()[1].startswith("test_bench.py:") for where, _ in top)


def test_sync_points_leave_out_host_only_functions_and_count_new_tensor():
    """Reads inside the HOST_ONLY functions (the bank and the paste generator live on the CPU) are not
    syncs on a GPU; new_tensor copies host data to the tensor's device; box_ops.host_to_device does
    not wait (pinned, non-blocking on CUDA; torch.tensor on the CPU)."""
    import box_ops
    import copypaste
    x = torch.arange(4.0)
    entry = dict(masks=[torch.ones(1, 1, dtype=torch.bool)] * 2, mask_xy=torch.tensor([[0, 0], [1, 1]]))

    def fn():
        copypaste.drawn_crops(entry, torch.tensor([1]))   # host only: tolist x 2, not counted
        copypaste.sample_objects(torch.tensor([0.5, 1.0]))  # host only
        box_ops.host_to_device([1, 2], x.device)          # not a sync
        return x.new_tensor([1.0])                        # 1: host data to the device
    total, top = bench.sync_points(fn)
    assert total == 1 and top[0][0].startswith("host-to-device test_bench.py:"), top


def test_a_sim_step_has_few_sync_points(tmp_path, capsys):
    """One SIM step (teacher, pseudo masks, copy-paste from a full bank, bank push) on 2 demo-sized
    images: at most 30 sync points on the CPU proxy. 3983ddd made 52 on the same step (60 counted, of
    which 8 in a paste that then ran on the CPU): a bound that fails if per-object reads come back."""
    p = synthetic.ensure_synthetic(tmp_path / "syn", n_train=4, n_val=1, size=160)
    n = bench.main(["--compare=syncs", f"--train_json={p['train_json']}", f"--train_images={p['train_images']}",
                    "--device=cpu"])
    out = capsys.readouterr().out
    assert re.search(r"host-device sync points in one SIM step \(cpu, \d+ objects\): \d+", out), out
    assert 0 < n <= 30, out
