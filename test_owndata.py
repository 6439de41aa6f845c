"""Tests of a user's own data: the fill ratio behind the "masks became boxes" guard (hand values), the weight
copy that fine-tunes a checkpoint onto another class count, and a one-class grayscale COCO tree made from
the embedded data going through train.py (--init_from, the guard) and predict.py --boxes as the README's
commands run them."""

import json
import os
import subprocess
import sys

import torch
from PIL import Image

import losses
import synthetic
from model import build_model, copy_matching_weights
from test_model import tiny_cfg

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mask_fill_ratio_hand_values():
    """Stride 2 on a 16 x 16 canvas: grid cells at pixels 1, 3, ..., 15. The box (0, 0, 7, 7) covers the
    rows and columns 0..7 inclusive: cells 1, 3, 5, 7, a 4 x 4 block of 16 cells."""
    logits = torch.full((4, 1, 8, 8), -1.0)
    logits[0, 0, 0:2, 0:4] = 2.0          # 8 of the box's 16 cells
    logits[1] = 5.0                       # everything, also outside the box: 16 of 16
    logits[2, 0, 0:4, 0:4] = 0.0          # probability exactly 0.5 is not > 0.5: 0 of 16
    logits[3] = 5.0                       # a box off the canvas has no cell: 0, not a division by zero
    boxes = torch.tensor([[0.0, 0.0, 7.0, 7.0], [0.0, 0.0, 7.9, 7.9], [0.0, 0.0, 7.0, 7.0], [40.0, 40.0, 50.0, 50.0]])
    fill = losses.mask_fill_ratio(logits, boxes, (16, 16), stride=2)
    assert fill.tolist() == [0.5, 1.0, 0.0, 0.0]
    # a box of 2 x 3 cells (rows 2..5 -> cells 3, 5; columns 0..5 -> cells 1, 3, 5), one cell on: 1/6
    logits = torch.full((1, 1, 8, 8), -3.0)
    logits[0, 0, 2, 1] = 1.0              # the cell at pixel (y 5, x 3)
    fill = losses.mask_fill_ratio(logits, torch.tensor([[0.0, 2.0, 5.0, 5.0]]), (16, 16), stride=2)
    assert abs(fill.item() - 1 / 6) < 1e-7


def test_copy_matching_weights_keeps_a_fresh_classifier():
    """A 3-class network's weights onto a 1-class one: everything but FCOS's classifier is copied, the
    classifier keeps its fresh init (the prior-probability bias), and the left-out list names it."""
    torch.manual_seed(0)
    src = build_model(tiny_cfg(num_classes=3))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))  # unlike any fresh init
    dst = build_model(tiny_cfg(num_classes=1))
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    copied, left = copy_matching_weights(dst, src.state_dict())
    assert left == ["head.cls_logits.weight (1, 32, 3, 3) vs (3, 32, 3, 3)", "head.cls_logits.bias (1,) vs (3,)"]
    s, d = src.state_dict(), dst.state_dict()
    assert set(copied) == set(d) - {"head.cls_logits.weight", "head.cls_logits.bias"}
    assert all(torch.equal(d[k], s[k]) for k in copied)
    assert torch.equal(d["head.cls_logits.weight"], fresh["head.cls_logits.weight"])
    assert torch.allclose(d["head.cls_logits.bias"], torch.full((1,), -torch.log(torch.tensor(99.0))))


TINY = ["--batch_size=2", "--min_size_train=(96,)", "--min_size_test=96", "--max_size_test=128", "--fpn_channels=32",
        "--head_convs=1", "--mask_branch_channels=16", "--mask_branch_convs=1", "--warmup_iters=1",
        "--pairwise_warmup_iters=1", "--log_interval=2", "--n_overlays=0", "--viz_interval=0", "--num_workers=0",
        "--device=cpu"]
COLLAPSE = "the masks have become boxes"


def run(script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_one_class_grayscale_tree_trains_fine_tunes_and_predicts(tmp_path):
    """The README's own-data path on a tiny tree: a 5-class colour run (silent guard) -> its weights with
    box-filling masks -> --init_from onto a one-class grayscale tree (a fresh classifier; the guard warns
    once) -> predict.py --boxes writes one-class masks for the grey val boxes."""
    src = synthetic.ensure_synthetic(str(tmp_path / "syn"), n_train=4, n_val=2)
    grey = synthetic.write_variant(str(tmp_path / "grey"), src, gray=True, one_class=True, boxes_only=True)
    with Image.open(os.path.join(grey["train_images"], "000000.jpg")) as im:
        assert im.mode == "L"
    train_js, val_js = json.load(open(grey["train_json"])), json.load(open(grey["val_json"]))
    assert train_js["categories"] == val_js["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert all(a["category_id"] == 1 and "segmentation" not in a for a in train_js["annotations"])
    assert all("segmentation" in a for a in val_js["annotations"])  # val keeps its masks: mask AP is measurable

    # a default tiny run on the colour 5-class data: the guard stays silent
    r = run("train.py", f"--train_json={src['train_json']}", f"--train_images={src['train_images']}",
            f"--val_json={src['val_json']}", f"--val_images={src['val_images']}", "--max_iters=4",
            f"--out_dir={tmp_path / 'colour'}", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    fills = [float(l.split("mask fill ")[1].split()[0]) for l in r.stdout.splitlines() if l.startswith("iter ")]
    assert len(fills) == 2 and max(fills) < 0.9 and COLLAPSE not in r.stdout + r.stderr

    # its weights with masks collapsed to boxes: a controller that emits the dynamic head's parameters
    # [W1|W2|W3|b1|b2|b3] as 0 but the last bias, 30: every mask logit is 30
    ck = torch.load(tmp_path / "colour" / "ckpt.pt", weights_only=True)
    assert ck["config"]["num_classes"] == 5
    ck["model"]["head.controller.weight"].zero_()
    ck["model"]["head.controller.bias"].zero_()[-1] = 30.0
    torch.save(ck, tmp_path / "collapsed.pt")

    # fine-tuned on the one-class grey tree (the README's command, --data_root): a fresh classifier, iteration 0,
    # and the guard warns once (two log intervals with masks filling their boxes)
    r = run("train.py", f"--data_root={tmp_path / 'grey'}", f"--init_from={tmp_path / 'collapsed.pt'}", "--lr=1e-6",
            "--max_iters=4", f"--out_dir={tmp_path / 'grey_run'}", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    init = [l for l in r.stdout.splitlines() if l.startswith("init_from")]
    assert len(init) == 1 and "left at their fresh init: head.cls_logits.weight (1, 32, 3, 3) vs (5, 32, 3, 3), " \
                              "head.cls_logits.bias (1,) vs (5,)" in init[0], r.stdout[:3000]
    assert "iter 1/4" not in r.stdout and "iter 2/4" in r.stdout  # from iteration 0, not resumed
    assert r.stdout.count(COLLAPSE) == 1 and "--color_thresh" in r.stdout, r.stdout[-3000:]
    ck = torch.load(tmp_path / "grey_run" / "ckpt.pt", weights_only=True)
    assert ck["config"]["num_classes"] == 1 and len(ck["categories"]) == 1 and ck["iter"] == 4
    assert ck["model"]["head.cls_logits.weight"].shape[0] == 1

    # a val json with boxes alone: box AP, and one line for the mask AP it cannot give (not a KeyError)
    val_boxes = dict(val_js, annotations=[{k: v for k, v in a.items() if k != "segmentation"} for a in val_js["annotations"]])
    json.dump(val_boxes, open(tmp_path / "val_boxes.json", "w"))
    r = run("eval.py", f"--ckpt={tmp_path / 'grey_run' / 'ckpt.pt'}", f"--val_json={tmp_path / 'val_boxes.json'}",
            f"--out_dir={tmp_path / 'ev'}", "--device=cpu", "--n_overlays=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    n = len(val_js["annotations"])
    assert f"mask AP not measured: {n} of {n} annotations in {tmp_path / 'val_boxes.json'} have no segmentation" in r.stdout
    assert "box AP" in r.stdout and "mask AP nan" in r.stdout

    # masks for the grey val boxes
    r = run("predict.py", f"--ckpt={tmp_path / 'grey_run' / 'ckpt.pt'}", f"--boxes={grey['val_json']}",
            f"--images={grey['val_images']}", f"--out={tmp_path / 'masks'}", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.load(open(tmp_path / "masks" / "masks.json"))
    assert out["categories"] == val_js["categories"]
    assert len(out["annotations"]) == len(val_js["annotations"]) > 0
    assert all(a["category_id"] == 1 and "counts" in a["segmentation"] for a in out["annotations"])
