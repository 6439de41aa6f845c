"""Tests of a training run: config.py's defaults through the configurator, the COCO config files, the
lr schedule, weight-decay groups, the linear scaling rule, a step's non-finite and accumulated gradients
(step.py), atomic checkpoints, and train.py itself: bad input reported as one clear line, data_root's
layouts, SIGTERM, exact resume, DDP."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import configurator
import data
import step
from model import build_model
from test_model import tiny_cfg

HERE = os.path.dirname(os.path.abspath(__file__))


def test_configure_types_and_errors(tmp_path):
    cfg = dict(config.defaults())
    configurator.configure_run(["--lr=0.5", "--max_iters=7", "--min_size_train=(100,120)", "--resume",
                                "--device=cpu", "--pretrained=''", "--lr_steps=3"], cfg)
    assert cfg["lr"] == 0.5 and cfg["max_iters"] == 7 and cfg["min_size_train"] == (100, 120)
    assert cfg["resume"] is True and cfg["device"] == "cpu" and cfg["pretrained"] == "" and cfg["lr_steps"] == (3,)
    configurator.configure_run(["--lr=1"], cfg)  # an int where a float is expected is fine
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    with pytest.raises(SystemExit, match="unknown option --lrr"):
        configurator.configure_run(["--lrr=1"], cfg)
    with pytest.raises(SystemExit, match="should be a int"):
        configurator.configure_run(["--max_iters=abc"], cfg)
    with pytest.raises(SystemExit, match="not found"):
        configurator.configure_run([str(tmp_path / "nope.py")], cfg)
    f = tmp_path / "c.py"
    f.write_text("max_iters = 11\nmethod = 'boxinst'\n")
    configurator.configure_run([str(f), "--max_iters=12"], cfg)  # later arguments win
    assert cfg["max_iters"] == 12 and cfg["method"] == "boxinst"


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(HERE, "configs", "*.py"))
                                        if not os.path.basename(p).startswith("demo_")))
def test_config_files_load(path, monkeypatch):
    monkeypatch.chdir(HERE)  # configs exec each other by relative path, as train.py is run from the repo
    cfg = dict(config.defaults())
    configurator.configure_run([path], cfg)
    assert set(cfg) == set(config.defaults())
    assert (cfg["data_root"], cfg["dataset"]) in (("datasets/coco", "coco"), ("datasets/voc", "voc"))
    assert os.path.basename(path).startswith(cfg["dataset"]) and cfg["pretrained"] == "imagenet"
    assert cfg["method"] in ("boxinst", "full", "sim") and cfg["max_iters"] > max(cfg["lr_steps"])
    # the reference's solver (the paper's AdamW for Swin; the supplement's AdamW + poly for Mask2Former) and
    # FPN size ranges, not the CPU demo's
    if cfg["arch"] == "mask2former":
        assert (cfg["solver"], cfg["lr"], cfg["weight_decay"], cfg["lr_schedule"], cfg["backbone_lr_mult"],
                cfg["clip_grad"]) == ("adamw", 1e-4, 0.05, "poly", 0.1, 0.01)
        assert (cfg["num_queries"], cfg["hidden_dim"], cfg["enc_layers"], cfg["dec_layers"]) == (100, 256, 6, 9)
    elif cfg["backbone"] == "swin_b":
        assert (cfg["solver"], cfg["lr"], cfg["weight_decay"]) == ("adamw", 1e-4, 0.05)
    else:
        assert (cfg["solver"], cfg["momentum"], cfg["weight_decay"]) == ("sgd", 0.9, 1e-4)
    if cfg["arch"] == "condinst":
        assert cfg["sizes_of_interest"] == (64, 128, 256, 512)
    assert cfg["backbone"] in ("resnet50", "resnet101", "resnet101_dcn", "swin_b")
    if cfg["method"] == "sim":
        assert cfg["teacher_start_iter"] < cfg["sim_start_iter"] < cfg["lr_steps"][0]
    assert cfg["mask_out_stride"] == 4  # the reference's, not the small-image demo's 2
    if "sim_r50_1x" in path:
        assert (cfg["sim_start_iter"], cfg["teacher_momentum"], cfg["proto_momentum"]) == (10000, 0.9999, 0.999)
        assert (cfg["lambda1"], cfg["lambda2"], cfg["alpha"], cfg["mu"], cfg["tau"]) == (0.5, 1.0, 0.5, 5.0, 0.1)


def test_demo_configs_train_on_the_embedded_data(monkeypatch):
    """configs/demo_*.py: the embedded data (no data_root), the CPU demo's mask stride; demo_m2f.py is Mask2Former."""
    monkeypatch.chdir(HERE)
    paths = sorted(glob.glob(os.path.join(HERE, "configs", "demo_*.py")))
    assert any(p.endswith("demo_m2f.py") for p in paths)
    for path in paths:
        cfg = dict(config.defaults())
        configurator.configure_run([path], cfg)
        assert cfg["data_root"] == "" and cfg["mask_out_stride"] == 2
        assert cfg["arch"] == ("mask2former" if path.endswith("demo_m2f.py") else "condinst")


def test_lr_schedule():
    cfg = dict(config.defaults(), lr=0.01, warmup_iters=1000, warmup_factor=0.001, lr_steps=(60000, 80000))
    assert step.get_lr(0, cfg) == pytest.approx(1e-5)
    assert step.get_lr(500, cfg) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert step.get_lr(1000, cfg) == pytest.approx(0.01)
    assert step.get_lr(60000, cfg) == pytest.approx(0.001)
    assert step.get_lr(89999, cfg) == pytest.approx(0.0001)


def test_no_weight_decay_on_norm_layers():
    model = build_model(tiny_cfg())
    decay, no_decay = step.param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    gn = model.head.cls_tower[1]
    assert any(p is gn.weight for p in no_decay["params"]) and not any(p is gn.weight for p in decay["params"])
    assert any(p is model.head.scales[0].scale for p in decay["params"])  # FCOS scales: decayed, as the reference
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_save_atomic_keeps_old_checkpoint_on_failure(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    data.save_atomic({"iter": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        data.save_atomic({"iter": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["iter"] == 1  # the previous checkpoint survived


def run_train(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def write_coco(tmp_path, annotations, categories=({"id": 1, "name": "a"},), make_image=True):
    from PIL import Image
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if make_image:
        Image.new("RGB", (64, 48), (90, 90, 90)).save(img_dir / "a.jpg")
    js = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
          "annotations": annotations, "categories": list(categories)}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(js))
    return str(path), str(img_dir)


def test_bad_input_is_one_clear_line(tmp_path):
    """An unknown category id and a missing json: exit non-zero with one line naming the file and the fix."""
    ann = [{"id": 17, "image_id": 1, "category_id": 9, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}]
    js, img = write_coco(tmp_path, ann)
    r = run_train(f"--train_json={js}", f"--train_images={img}", f"--val_json={js}", f"--val_images={img}",
                  f"--out_dir={tmp_path / 'out'}", "--max_iters=1", "--device=cpu", cwd=tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "train.json" in last and "17" in last and "fix" in last and "Traceback" not in r.stderr
    r = run_train(f"--train_json={tmp_path / 'missing.json'}", f"--train_images={img}", f"--val_json={js}",
                  f"--val_images={img}", "--max_iters=1", cwd=tmp_path)
    assert r.returncode != 0 and "missing.json" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    # a valid dataset of one image: batch_size 4 has no full batch; then an unknown solver
    ann = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}]
    js, img = write_coco(tmp_path, ann)
    args = [f"--train_json={js}", f"--train_images={img}", f"--val_json={js}", f"--val_images={img}",
            f"--out_dir={tmp_path / 'out'}", "--max_iters=1", "--device=cpu"]
    r = run_train(*args, "--batch_size=4", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "train.json" in last and "batch_size 4" in last and "fix" in last
    assert "Traceback" not in r.stderr
    r = run_train(*args, "--batch_size=1", "--solver=adam", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "--solver='adam'" in last and "fix" in last and "Traceback" not in r.stderr


def fake_tree(tmp_path, layout):
    """A COCO 2017 or VOC (COCO-format) tree under tmp_path/layout made from a tiny synthetic set."""
    import shutil
    import synthetic
    syn = synthetic.ensure_synthetic(str(tmp_path / "syn"), n_train=4, n_val=2)
    root = tmp_path / layout
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        js = json.load(open(syn[f"{split}_json"]))
        folder = root / ({"coco": f"{split}2017", "voc": "JPEGImages"}[layout])
        folder.mkdir(exist_ok=True)
        for im in js["images"]:  # VOC's splits share one folder: names made unique
            name = f"{split}_{im['file_name']}" if layout == "voc" else im["file_name"]
            shutil.copy(os.path.join(syn[f"{split}_images"], im["file_name"]), folder / name)
            im["file_name"] = name
        name = {"coco": f"instances_{split}2017.json", "voc": f"voc_2012_{'train_aug' if split == 'train' else 'val'}_cocostyle.json"}
        (root / "annotations" / name[layout]).write_text(json.dumps(js))
    return root


@pytest.mark.parametrize("layout", ["coco", "voc"])
def test_data_root_alone_trains_and_evaluates(tmp_path, layout):
    root = fake_tree(tmp_path, layout)
    r = run_train(f"--data_root={root}", f"--dataset={layout}", "--max_iters=2", "--batch_size=2", "--n_overlays=1",
                  "--device=cpu", f"--out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "out" / "metrics.json"))
    assert "AP" in m["bbox"] and "AP" in m["segm"]
    assert f"{root}" in r.stdout  # the config printed at start names data_root's files
    # eval.py on that checkpoint finds the same val json through the layout (not the embedded data)
    r = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}",
                        "--device=cpu", "--n_overlays=0", f"--out_dir={tmp_path / 'ev'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and str(root) in r.stdout, r.stderr[-2000:]
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["segm"] == m["segm"]


def test_data_root_missing_file_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_train(f"--data_root={tmp_path / 'empty'}", "--max_iters=1", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "instances_train2017.json not found" in last and "fix" in last
    assert "Traceback" not in r.stderr


def broken_dataset(tmp_path):
    """One good image per kind of damage: a missing file, a truncated JPEG, an RGBA PNG, a grey PNG, an
    image without boxes, a zero-area and an out-of-image box; plus good images to fill the batches."""
    from PIL import Image
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    images, anns = [], []

    def add(name, boxes, make=True, mode="RGB"):
        i = len(images) + 1
        if make:
            arr = (torch.rand(96, 128, 3, generator=g) * 60 + 80).to(torch.uint8)
            arr[20:60, 30:80] = torch.tensor([230, 40, 40], dtype=torch.uint8)
            im = Image.fromarray(arr.numpy()).convert(mode)
            im.save(img_dir / name)
        images.append({"id": i, "file_name": name, "width": 128, "height": 96})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3],
                         "iscrowd": 0})

    good = [30, 20, 50, 40]
    for k in range(4):
        add(f"good{k}.png", [good])
    add("missing.png", [good], make=False)
    add("truncated.jpg", [good])
    data_bytes = (img_dir / "truncated.jpg").read_bytes()
    (img_dir / "truncated.jpg").write_bytes(data_bytes[:len(data_bytes) // 3])
    add("rgba.png", [good], mode="RGBA")
    add("grey.png", [good], mode="L")
    add("nobox.png", [])
    add("zero.png", [good, [10, 10, 0, 5]])
    add("outside.png", [good, [500, 500, 20, 20]])
    js = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(js))
    return str(path), str(img_dir)


def test_broken_dataset_trains_to_the_end_with_counts(tmp_path):
    js, img = broken_dataset(tmp_path)
    # val: the good images (an unreadable val image stops the run before training: the next test)
    val = json.load(open(js))
    val["images"] = [i for i in val["images"] if i["file_name"].startswith("good")]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] <= 4]
    (tmp_path / "val.json").write_text(json.dumps(val))
    r = run_train(f"--train_json={js}", f"--train_images={img}", f"--val_json={tmp_path / 'val.json'}", f"--val_images={img}",
                  "--method=boxinst", "--max_iters=12", "--batch_size=2", "--log_interval=4", "--n_overlays=0", "--viz_interval=12",
                  "--num_workers=0", "--min_size_train=(96,)", "--device=cpu", f"--out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 0 and "training done" in r.stdout, r.stderr[-3000:]
    # the truncated file is drawn in every epoch (~3 here): warned about once, every skip counted
    assert "warning:" in r.stderr and r.stderr.count("truncated.jpg") == 1, r.stderr
    final = [l for l in r.stdout.splitlines() if l.startswith("skipped:")][-1]
    n = int(final.split(" unreadable")[0].split()[-1])
    assert n >= 2 and "truncated.jpg" in final and "0 non-finite" in final
    assert "1 missing files, 1 images without a valid box, 2 empty or out-of-image boxes" in final
    assert os.path.isfile(tmp_path / "out" / "viz" / "it12_0.png")  # the viz.py grid of val image 0


def test_unreadable_val_image_stops_the_run_before_training(tmp_path):
    """A val image that cannot be opened is found before the first iteration (not after training, hours
    later on COCO): one line naming the file and the fix, no iteration run."""
    js, img = broken_dataset(tmp_path)
    val = json.load(open(js))
    val["images"] = [i for i in val["images"] if i["file_name"] in ("good0.png", "truncated.jpg", "good1.png")]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in {i["id"] for i in val["images"]}]
    (tmp_path / "val.json").write_text(json.dumps(val))
    (tmp_path / "images" / "truncated.jpg").write_bytes(b"not an image")
    r = run_train(f"--train_json={js}", f"--train_images={img}", f"--val_json={tmp_path / 'val.json'}",
                  f"--val_images={img}", "--method=boxinst", "--max_iters=4", "--batch_size=2", "--num_workers=0",
                  "--device=cpu", f"--out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 1 and "iter " not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: 1 val image(s) cannot be read") and "truncated.jpg" in last and "fix:" in last


def test_nonfinite_loss_is_skipped_and_named(monkeypatch, capsys):
    import losses
    cfg = tiny_cfg(method="boxinst")
    torch.manual_seed(0)
    model = build_model(cfg)
    from test_model import scene
    images, targets = scene(2)
    real = losses.compute_losses

    def poisoned(*a, **k):
        loss, logs = real(*a, **k)
        logs["loss_prj"] = logs["loss_prj"] * float("nan")
        return loss + logs["loss_prj"], logs
    monkeypatch.setattr(losses, "compute_losses", poisoned)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    run = lambda c: step.train_step(model, model, opt, torch.amp.GradScaler("cpu", enabled=False), None, images,
                                    targets, 6, c, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    loss, _ = run(cfg)
    assert not torch.isfinite(loss)
    assert "iteration 7: non-finite loss_prj; step skipped" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(FloatingPointError, match="iteration 7: non-finite loss_prj"):
        run(dict(cfg, skip_nonfinite=False))


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path):
    import signal
    import time
    js, img = broken_dataset(tmp_path)
    out = tmp_path / "out"
    args = [os.path.join(HERE, "train.py"), f"--train_json={js}", f"--train_images={img}", f"--val_json={js}",
            f"--val_images={img}", "--method=boxinst", "--max_iters=100000", "--batch_size=2", "--log_interval=1",
            "--n_overlays=0", "--num_workers=0", "--min_size_train=(96,)", "--device=cpu", "--ckpt_interval=0",
            f"--out_dir={out}"]
    p = subprocess.Popen([sys.executable, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait for the first iterations
        if line.startswith("iter 3/"):
            break
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 143 and "SIGTERM: checkpoint at iteration" in stdout
    it = torch.load(out / "ckpt.pt", weights_only=False)["iter"]
    assert 3 <= it < 100000
    r = subprocess.run([sys.executable, *args[:-1], f"--max_iters={it + 2}", f"--out_dir={out}", "--resume"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert f"resumed from {out / 'ckpt.pt'} at iteration {it}" in r.stdout and "training done" in r.stdout


@pytest.mark.parametrize("method", ["boxinst", "sim"])
def test_resume_continues_exactly(tmp_path, method):
    """2N iterations straight, and N, stop, --resume, N more: the same weights (and for SIM the same
    teacher, prototypes and bank). SIM with its teacher, prototypes and copy-paste on from the start.
    Two threads: a kernel whose rounding depends on the thread schedule shows up here (the controller
    gather's backward did, BENCHMARKS.md section 8)."""
    import synthetic
    syn = synthetic.ensure_synthetic(str(tmp_path / "syn"), n_train=6, n_val=2)
    args = [f"--train_json={syn['train_json']}", f"--train_images={syn['train_images']}", f"--val_json={syn['val_json']}",
            f"--val_images={syn['val_images']}", f"--method={method}", "--batch_size=2", "--n_overlays=0",
            "--device=cpu", "--teacher_start_iter=1", "--sim_start_iter=2", "--bank_size=2", "--paste_prob=1.0",
            "--bank_thresh=-1.0", "--warmup_iters=2", "--log_interval=1"]
    # 3 batches per epoch: the stop at 4 falls mid-epoch
    run_train = lambda *a, cwd: subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *a], cwd=cwd,
                                               capture_output=True, text=True, timeout=300,
                                               env=dict(os.environ, OMP_NUM_THREADS="2"))
    r = run_train(*args, "--max_iters=8", f"--out_dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_train(*args, "--max_iters=4", f"--out_dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_train(*args, "--max_iters=8", f"--out_dir={tmp_path / 'resumed'}", "--resume", cwd=tmp_path)
    assert r.returncode == 0 and "resumed from" in r.stdout and "not an exact" not in r.stdout, r.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == 8
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    if method == "sim":
        sa, sb = a["sim"], b["sim"]
        for k in sa["teacher"]:
            assert torch.allclose(sa["teacher"][k].float(), sb["teacher"][k].float(), atol=1e-6), k
        for k in sa["prototypes"]:
            assert torch.allclose(sa["prototypes"][k].float(), sb["prototypes"][k].float(), atol=1e-6), k
        assert len(sa["bank"]["entries"]) == len(sb["bank"]["entries"]) > 0
        assert "loss_paste" in r.stdout  # copy-paste ran after the resume


def test_ddp_two_ranks_uneven_val_and_identical_sim_state(tmp_path):
    """torchrun, 2 gloo processes, 3 val images (an uneven split: the sampler pads rank 1 with a repeat):
    every val image scored once, as a single-process eval.py scores the same checkpoint; the teacher and
    the prototypes are the same on both ranks after SIM steps (each rank's file beside the checkpoint)."""
    import socket
    import synthetic
    syn = synthetic.ensure_synthetic(str(tmp_path / "syn"), n_train=8, n_val=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        os.path.join(HERE, "train.py"), f"--train_json={syn['train_json']}",
                        f"--train_images={syn['train_images']}", f"--val_json={syn['val_json']}",
                        f"--val_images={syn['val_images']}", "--batch_size=2", "--max_iters=3", "--n_overlays=0",
                        "--device=cpu", "--teacher_start_iter=0", "--sim_start_iter=1", "--num_workers=0",
                        f"--out_dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp_results = json.load(open(out / "results_segm.json"))
    r1 = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), f"--ckpt={out / 'ckpt.pt'}", "--device=cpu",
                         f"--out_dir={tmp_path / 'single'}", "--n_overlays=0"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    single = json.load(open(tmp_path / "single" / "results_segm.json"))
    count = lambda res: sorted((d["image_id"], d["category_id"]) for d in res)
    assert count(ddp_results) == count(single) and {d["image_id"] for d in single} <= {1, 2, 3}
    m0 = json.load(open(out / "metrics.json"))
    m1 = json.load(open(tmp_path / "single" / "metrics.json"))
    assert m0["segm"]["AP"] == pytest.approx(m1["segm"]["AP"], abs=1e-6)
    a = torch.load(out / "ckpt.pt", weights_only=False)["rank_state"]["sim"]
    b = torch.load(out / "ckpt.rank1.pt", weights_only=False)["rank_state"]["sim"]
    for part in ("teacher", "prototypes"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.fixture(scope="module")
def imagenet_cache(tmp_path_factory):
    """$TORCH_HOME with random weights under the file names of the enums the configs ask for."""
    import torchvision
    home = tmp_path_factory.mktemp("torch_home")
    d = home / "hub" / "checkpoints"
    d.mkdir(parents=True)
    for builder, enum in [(torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
                          (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
                          (torchvision.models.swin_b, torchvision.models.Swin_B_Weights)]:
        torch.save(builder().state_dict(), d / os.path.basename(enum.IMAGENET1K_V1.url))
    return home


CONFIG_DDP = r"""
import json, os, sys, traceback
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, os.environ["NANOSIM_DIR"])
import config, configurator, data, sim, step
from model import build_model
dist.init_process_group("gloo")
rank, dev, results = dist.get_rank(), torch.device("cpu"), {}
for path, root in json.loads(os.environ["CONFIGS"]):
    try:
        cfg = dict(config.defaults())
        configurator.configure_run([path, f"--data_root={root}", "--min_size_train=(64,)", "--max_size_train=96",
                                    "--teacher_start_iter=0", "--sim_start_iter=1", "--bank_size=1", "--device=cpu"],
                                   cfg)
        paths = data.dataset_paths(cfg)
        ds = data.CocoBoxDataset(paths["train_json"], paths["train_images"], train=True, min_sizes=cfg["min_size_train"],
                                 max_size=cfg["max_size_train"], with_masks=cfg["method"] == "full")
        cfg["num_classes"] = ds.num_classes
        loader = data.make_loader(ds, 1, train=True, num_workers=0, distributed=True, seed=0,
                                  scale_per_batch=cfg["scale_per_batch"], group_by_aspect=cfg["group_by_aspect"])
        model = build_model(cfg).to(dev)
        net = DDP(model, find_unused_parameters=False)  # as train.py wraps it
        opt = torch.optim.SGD(step.param_groups(model, cfg["weight_decay"]), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        state = sim.SIMState(cfg, dev, rank) if cfg["method"] == "sim" else None
        batches, logs = data.infinite(loader), []
        for it in range(3):  # iteration 1: the BoxInst phase (the teacher on), 2-3: the SIM phase
            images, targets = next(batches)
            loss, terms = step.train_step(net, model, opt, scaler, state, images, targets, it, cfg, dev,
                                          lambda: torch.autocast("cpu", enabled=False))
            logs.append(sorted(terms))
        results[path] = {"backbone": cfg["backbone"], "method": cfg["method"], "terms": logs}
    except Exception:
        results[path] = {"error": traceback.format_exc()[-3000:]}
        break  # a DDP failure leaves the process group unusable
json.dump(results, open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def test_every_config_runs_ddp_steps_on_2_processes(tmp_path, imagenet_cache, monkeypatch):
    """Each config as it is (its network: ResNet-50/101, R101-DCN, Swin-B; ImageNet weights from
    $TORCH_HOME; its method and SIM settings) runs 3 DDP steps on 2 gloo processes with
    find_unused_parameters=False, on a fake tree of its layout at 64 px: a trainable parameter that a
    config's network leaves unused stops DDP at the second step. Step 1 is in the BoxInst phase (the
    teacher on), steps 2-3 in the SIM phase (L_pseudo). One torchrun for all configs (starting one per
    config would triple the time)."""
    import socket
    monkeypatch.chdir(HERE)  # the configs exec their base config by a relative path
    roots = {layout: str(fake_tree(tmp_path / layout, layout)) for layout in ("coco", "voc")}
    configs = sorted(glob.glob(os.path.join(HERE, "configs", "*.py")))
    work = [(p, roots["voc" if os.path.basename(p).startswith("voc") else "coco"]) for p in configs]
    script = tmp_path / "config_ddp.py"
    script.write_text(CONFIG_DDP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(script)], cwd=HERE, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, TORCH_HOME=str(imagenet_cache), OMP_NUM_THREADS="1", NANOSIM_DIR=HERE,
                                CONFIGS=json.dumps(work), OUT=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        res = json.load(open(tmp_path / f"rank{rank}.json"))
        for path in configs:
            assert path in res and "error" not in res[path], (rank, path, res.get(path, {}).get("error"))
            cfg = dict(config.defaults())
            configurator.configure_run([path], cfg)
            assert res[path]["backbone"] == cfg["backbone"]
            terms = res[path]["terms"]
            assert "loss_prj" in terms[0] or "loss_mask" in terms[0]
            assert ("loss_pseudo" in terms[2]) == (cfg["method"] == "sim") and "loss_pseudo" not in terms[0]


def test_linear_scaling_rule_hand_values():
    """Recipe batch 16 on 2 processes x 2 images: G/R = 1/4: lr / 4, iterations x 4, EMA m -> m^(1/4)."""
    cfg = dict(config.defaults(), batch_size=2, accum_steps=1, reference_batch=16, lr=0.01, max_iters=90000,
               lr_steps=(60000, 80000), warmup_iters=1000, teacher_momentum=0.9999, proto_momentum=0.999)
    s = step.scale_schedule(cfg, world_size=2)
    assert s["lr"] == pytest.approx(0.0025) and s["max_iters"] == 360000 and s["lr_steps"] == (240000, 320000)
    assert s["warmup_iters"] == 4000 and s["teacher_momentum"] == pytest.approx(0.9999 ** 0.25)
    assert s["proto_momentum"] == pytest.approx(0.999 ** 0.25)
    # 8 processes x 2 images: the recipe itself, nothing moves
    s = step.scale_schedule(cfg, world_size=8)
    assert s["lr"] == 0.01 and s["max_iters"] == 90000 and s["teacher_momentum"] == 0.9999
    # accumulation counts in the global batch: 2 x 2 x 4 = 16
    assert step.scale_schedule(dict(cfg, accum_steps=4), world_size=2)["max_iters"] == 90000


def test_gradient_accumulation_steps_once_with_the_mean_gradient():
    """Two micro-batches: no step after the first; after the second the SGD step of the mean of the two
    micro-batches' gradients (each measured alone by a one-micro-batch step from the same start)."""
    import copy
    from test_model import scene
    cfg = tiny_cfg(method="boxinst")
    torch.manual_seed(0)
    base = build_model(cfg)
    images, targets = scene(4)
    halves = [(images[:2], targets[:2]), (images[2:], targets[2:])]
    run = lambda model, batch, micro: step.train_step(
        model, model, opt_of(model), torch.amp.GradScaler("cpu", enabled=False), None, *batch, 5, cfg,
        torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False), micro)
    opts = {}
    opt_of = lambda model: opts.setdefault(id(model), torch.optim.SGD(model.parameters(), lr=0.1))
    p0 = [p.detach().clone() for p in base.parameters()]
    single = []
    for batch in halves:
        m = copy.deepcopy(base)
        run(m, batch, (0, 1))
        single.append([(a - p.detach()) / 0.1 for a, p in zip(p0, m.parameters())])   # its gradient
    acc = copy.deepcopy(base)
    run(acc, halves[0], (0, 2))
    assert all(torch.equal(a, p) for a, p in zip(p0, acc.parameters()))           # no step yet
    run(acc, halves[1], (1, 2))
    for a, p, g1, g2 in zip(p0, acc.parameters(), *single):
        assert torch.allclose(p.detach(), a - 0.1 * (g1 + g2) / 2, atol=1e-5)
