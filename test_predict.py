"""predict.py: detection on a val image and on a user's PNG, box-conditioned masks from a box-only
json, and the box-conditioned mask itself on hand-made boxes."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

torch.set_num_threads(1)

import predict
import synthetic
from model import build_model
from test_model import scene, tiny_cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-image embedded val split and a checkpoint of an untrained tiny model whose class bias is 0
    (so it detects something everywhere)."""
    root = tmp_path_factory.mktemp("predict")
    paths = synthetic.ensure_synthetic(str(root / "synthetic"), n_train=1, n_val=3)
    cfg = tiny_cfg(num_classes=5)
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.nn.init.zeros_(model.head.cls_logits.bias)
    with open(paths["val_json"]) as f:
        cats = json.load(f)["categories"]
    ckpt = root / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": cfg, "categories": cats}, ckpt)
    return dict(root=root, ckpt=str(ckpt), **paths)


def load_quiet(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def test_predict_val_image_and_user_png(setup, tmp_path):
    """A val image and a user's PNG (RGBA) and JPEG (grey) given by path; an unreadable file is a counted skip.
    results.json loads with loadRes against predictions.json; one picture per readable image."""
    user = tmp_path / "mine.png"
    Image.new("RGBA", (90, 70), (200, 40, 40, 255)).save(user)
    grey = tmp_path / "grey.jpg"
    Image.new("L", (50, 80), 128).save(grey)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    val_img = os.path.join(setup["val_images"], sorted(os.listdir(setup["val_images"]))[0])
    out = tmp_path / "out"
    assert predict.main([f"--ckpt={setup['ckpt']}", f"--images={val_img},{user},{grey},{broken}", f"--out={out}"]) == 0
    gt = load_quiet(str(out / "predictions.json"))
    assert [(i["file_name"], i["height"], i["width"]) for i in gt.dataset["images"]][1:] == [("mine.png", 70, 90),
                                                                                            ("grey.jpg", 80, 50)]
    results = json.load(open(out / "results.json"))
    assert len(results) > 0 and {r["image_id"] for r in results} <= {1, 2, 3}
    dt = gt.loadRes(str(out / "results.json"))
    for r in dt.dataset["annotations"][:20]:
        m = mask_util.decode(r["segmentation"])
        img = gt.imgs[r["image_id"]]
        assert m.shape == (img["height"], img["width"])
    assert sorted(os.listdir(out)) == ["pred_000000.png", "pred_grey.png", "pred_mine.png", "predictions.json",
                                       "results.json"]


def test_predict_folder(setup, tmp_path):
    out = tmp_path / "out"
    assert predict.main([f"--ckpt={setup['ckpt']}", f"--images={setup['val_images']}", f"--out={out}",
                         "--n_overlays=1"]) == 0
    assert len(load_quiet(str(out / "predictions.json")).imgs) == 3
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 1


def test_predict_boxes_on_val_json_without_masks(setup, tmp_path):
    """--boxes with the val json stripped of its masks: a copy with one RLE mask per annotation, each
    inside its box, the rest of the json unchanged; no AP (there is nothing to score against)."""
    js = json.load(open(setup["val_json"]))
    for a in js["annotations"]:
        a.pop("segmentation", None)
    stripped = tmp_path / "boxes.json"
    stripped.write_text(json.dumps(js))
    out = tmp_path / "out"
    assert predict.main([f"--ckpt={setup['ckpt']}", f"--boxes={stripped}", f"--images={setup['val_images']}",
                         f"--out={out}"]) == 0
    res = load_quiet(str(out / "masks.json"))
    assert len(res.anns) == len(js["annotations"]) > 0 and not os.path.exists(out / "metrics.json")
    for a in res.anns.values():
        img = res.imgs[a["image_id"]]
        m = mask_util.decode(a["segmentation"])
        assert m.shape == (img["height"], img["width"]) and a["area"] == int(m.sum())
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs + 0.5 > x).all() and (xs + 0.5 < x + w).all() and (ys + 0.5 > y).all() and (ys + 0.5 < y + h).all()
    assert res.dataset["categories"] == js["categories"] and len(res.imgs) == len(js["images"])
    assert any(f.startswith("masks_") and f.endswith(".png") for f in os.listdir(out))


def test_predict_boxes_scores_against_masks_when_the_json_has_them(setup, tmp_path):
    out = tmp_path / "out"
    assert predict.main([f"--ckpt={setup['ckpt']}", f"--boxes={setup['val_json']}", f"--images={setup['val_images']}",
                         f"--out={out}", "--combine=best", "--n_overlays=0"]) == 0
    m = json.load(open(out / "metrics.json"))
    assert m["combine"] == "best" and 0.0 <= m["segm"]["AP"] <= 100.0


def test_predict_boxes_prints_and_saves_miou(setup, tmp_path, capsys):
    """With GT masks in the json, --boxes prints the mIoU next to the AP and saves it in metrics.json:
    the mean over the boxes of the IoU of masks.json's mask with that annotation's GT mask (recomputed
    here from the two files), with the refinement switches it ran with (predict.py's defaults)."""
    out = tmp_path / "out"
    assert predict.main([f"--ckpt={setup['ckpt']}", f"--boxes={setup['val_json']}", f"--images={setup['val_images']}",
                         f"--out={out}", "--n_overlays=0"]) == 0
    m = json.load(open(out / "metrics.json"))
    gt, res = load_quiet(setup["val_json"]), load_quiet(str(out / "masks.json"))
    ious = []
    for a in gt.anns.values():
        g, p = gt.annToMask(a).astype(bool), mask_util.decode(res.anns[a["id"]]["segmentation"]).astype(bool)
        ious.append((g & p).sum() / (g | p).sum())
    assert m["n_iou"] == len(ious) > 0 and abs(m["mIoU"] - 100 * np.mean(ious)) < 1e-6
    assert m["switches"]["box_crf"] is predict.box_crf and m["switches"]["box_flip"] is predict.box_flip
    assert f"mIoU {m['mIoU']:.1f} over {len(ious)} boxes" in capsys.readouterr().out


def test_predict_errors_are_one_line(setup, tmp_path):
    with pytest.raises(SystemExit, match="nope.pt not found — fix"):
        predict.main([f"--ckpt={tmp_path / 'nope.pt'}", "--images=x"])
    with pytest.raises(SystemExit, match="holds no image files"):
        predict.main([f"--ckpt={setup['ckpt']}", f"--images={tmp_path}"])
    js = json.load(open(setup["val_json"]))
    for c in js["categories"]:
        c["id"] += 10
    for a in js["annotations"]:
        a["category_id"] += 10
    other = tmp_path / "other.json"
    other.write_text(json.dumps(js))
    with pytest.raises(SystemExit, match="are not the checkpoint's"):
        predict.main([f"--ckpt={setup['ckpt']}", f"--boxes={other}", f"--images={setup['val_images']}"])


def test_box_conditioned_masks_every_box_inside_its_box():
    """Hand-made scene: every box gets a mask of its image's size, nothing outside the box; a 2 x 2 px
    box, which FCOS's assignment gives no positive, still gets one (the fallback location)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    images, targets = scene(2)
    targets[1]["boxes"] = torch.cat([targets[1]["boxes"], torch.tensor([[40.0, 4.0, 42.0, 6.0]])])
    targets[1]["labels"] = torch.cat([targets[1]["labels"], torch.tensor([1])])
    with torch.no_grad():
        out = model(images, targets)
    assert 4 not in out["inst"]["gt_inds"].tolist()       # the tiny box has no positive
    for combine in ("mean", "best"):
        res = predict.box_conditioned_masks(model, images, targets, combine)
        assert [r["masks"].shape for r in res] == [(2, 64, 64), (3, 64, 64)]
        assert all(((r["scores"] > 0) & (r["scores"] <= 1)).all() for r in res)
        for r, t in zip(res, targets):
            for m, (x0, y0, x1, y1) in zip(r["masks"], t["boxes"].tolist()):
                ys, xs = m.nonzero(as_tuple=True)
                assert ((xs + 0.5 > x0) & (xs + 0.5 < x1) & (ys + 0.5 > y0) & (ys + 0.5 < y1)).all()


def test_box_conditioned_best_is_one_positive_and_mean_with_mu_0_the_plain_mean():
    """combine='best' is the mask of the best-scored positive; 'mean' with mu = 0 is the plain mean of
    the positives' mask probabilities (both thresholded at 0.5 and cut to the box)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    images, targets = scene(2)  # (a batch of one 64-px image has a 1 x 1 P7, which GroupNorm refuses)
    with torch.no_grad():
        out = model(images, targets)
        inst = out["inst"]
        probs = out["mask_logits"][:, 0].sigmoid()
        labels = torch.cat([t["labels"] for t in targets])
        score = (out["cls_logits"][inst["im_inds"], inst["loc_inds"], labels[inst["gt_inds"]]].sigmoid()
                 * out["ctr_logits"][inst["im_inds"], inst["loc_inds"]].sigmoid())
    best = predict.box_conditioned_masks(model, images, targets, "best")[0]
    mean = predict.box_conditioned_masks(model, images, targets, "mean", mu=0.0)[0]
    for g in range(2):
        k = (inst["gt_inds"] == g).nonzero().squeeze(1)
        x0, y0, x1, y1 = targets[0]["boxes"][g].tolist()
        c = torch.arange(64) + 0.5
        box = ((c[None] > x0) & (c[None] < x1) & (c[:, None] > y0) & (c[:, None] < y1))
        up = lambda p: model.masks_at_original_size(p[None, None], targets[0])[0]
        assert torch.equal(best["masks"][g], up(probs[k[score[k].argmax()]]) & box)
        assert torch.equal(mean["masks"][g], up(probs[k].mean(0)) & box)
        assert torch.isclose(best["scores"][g], score[k].max().sqrt())
