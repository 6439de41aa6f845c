"""Tests for eval.py, and for viz.py's overlay and heat-map pictures, on a hand-made 2-image COCO set;
they need no model.py."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

import eval as ev
import viz

H, W = 120, 160
CAT_IDS = [3, 7]  # non-contiguous on purpose: label 0 <-> 3, label 1 <-> 7
# (image_id, category_id, x, y) of 20x20 objects; all small (area 400 < 32^2)
OBJECTS = [(11, 3, 10, 10), (11, 7, 36, 30), (12, 7, 20, 24)]


def rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def rect_rle(x, y, w, h):
    m = np.zeros((H, W), dtype=np.uint8)
    m[y:y + h, x:x + w] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("utf-8")}


class FakeDataset:
    """The attributes eval.py reads from a data.CocoBoxDataset, backed by files in a tmp folder."""

    def __init__(self, root):
        anns = []
        for i, (image_id, cat, x, y) in enumerate(OBJECTS):
            # image 11 uses polygons, image 12 a compressed RLE: both GT formats go through annToMask
            seg = rect_polygon(x, y, 20, 20) if image_id == 11 else rect_rle(x, y, 20, 20)
            anns.append({"id": i + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, 20, 20],
                         "area": 400, "iscrowd": 0, "segmentation": seg})
        gt = {"images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (11, 12)],
              "annotations": anns,
              "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
        path = os.path.join(root, "gt.json")
        with open(path, "w") as f:
            json.dump(gt, f)
        self.coco = COCO(path)
        self.cat_ids = CAT_IDS
        self.class_names = ["cat", "dog"]
        self.ids = [11, 12]
        self.image_dir = root
        for image_id in self.ids:
            img = np.full((H, W, 3), 90, dtype=np.uint8)
            for iid, cat, x, y in OBJECTS:
                if iid == image_id:
                    img[y:y + 20, x:x + 20] = (200, 60, 60) if cat == 3 else (60, 60, 200)
            Image.fromarray(img).save(os.path.join(root, f"{image_id}.png"))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        image_id = self.ids[i]
        img = Image.open(os.path.join(self.image_dir, f"{image_id}.png")).convert("RGB")
        image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W): no resize here
        return image, {"image_id": image_id, "orig_size": (H, W), "size": (H, W)}


class FakeModel(torch.nn.Module):
    """predict returns fixed detections per image id and records the mode it was called in."""

    def __init__(self, preds_by_id):
        super().__init__()
        self.preds_by_id = preds_by_id
        self.training_during_predict = []

    def predict(self, images, targets):
        assert images.dtype == torch.uint8 and images.shape[0] == len(targets)
        self.training_during_predict.append(self.training)
        return [self.preds_by_id[t["image_id"]] for t in targets]


def gt_preds(ds, shift=0):
    """Detections equal to the GT (optionally moved right by shift px), in model.predict's format."""
    preds = {}
    for image_id in ds.ids:
        gt = viz.gt_instances(ds.coco, image_id, ds.cat_ids)
        masks = torch.zeros_like(gt["masks"])  # (N, H, W)
        masks[:, :, shift:] = gt["masks"][:, :, :W - shift]
        n = len(gt["labels"])
        preds[image_id] = {"boxes": gt["boxes"] + torch.tensor([shift, 0, shift, 0]),
                           "scores": torch.linspace(0.9, 0.8, n), "labels": gt["labels"], "masks": masks}
    return preds


def loader_of(ds, ids=None):
    """A list of (images, targets) batches of one image each: all evaluate() does is iterate it."""
    batches = []
    for image_id in ids or ds.ids:
        image, target = ds[ds.ids.index(image_id)]
        batches.append((image[None], [target]))
    return batches


@pytest.fixture
def ds(tmp_path):
    return FakeDataset(str(tmp_path))


def test_perfect_predictions_give_ap_100(ds, tmp_path):
    model = FakeModel(gt_preds(ds))
    model.train()
    out = str(tmp_path / "out")
    stats = ev.evaluate(model, loader_of(ds), ds, torch.device("cpu"), out_dir=out)
    for iou_type in ("bbox", "segm"):
        s = stats[iou_type]
        assert list(s) == ev.STAT_NAMES
        for name in ("AP", "AP50", "AP75", "APs", "AR100"):
            assert s[name] == pytest.approx(100.0)
        assert s["APm"] == -1.0 and s["APl"] == -1.0  # no medium or large GT: undefined, not -100
    assert model.training_during_predict == [False, False] and model.training  # eval inside, mode restored
    bbox = json.load(open(os.path.join(out, "results_bbox.json")))
    segm = json.load(open(os.path.join(out, "results_segm.json")))
    assert len(bbox) == len(segm) == 3
    assert all("segmentation" not in r for r in bbox) and all("bbox" not in r for r in segm)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_shift_of_4px_gives_hand_computed_ap(ds):
    # a 20 px wide object moved 4 px: IoU = 16*20 / (24*20) = 0.667 (masks: 16/24 to 18/26, all in [0.65, 0.70)),
    # a hit at thresholds 0.50..0.65 (4 of 10) and a miss at 0.70..0.95, so AP = 40, AP50 = 100, AP75 = 0
    model = FakeModel(gt_preds(ds, shift=4))
    stats = ev.evaluate(model, loader_of(ds), ds, torch.device("cpu"))
    for iou_type in ("bbox", "segm"):
        assert stats[iou_type]["AP"] == pytest.approx(40.0)
        assert stats[iou_type]["AP50"] == pytest.approx(100.0)
        assert stats[iou_type]["AP75"] == pytest.approx(0.0)


def test_per_class_ap_is_printed(ds, capsys):
    # the cat is found exactly (AP 100), the two dogs 4 px off (AP 40, as in the test above);
    # the overall AP is the mean of the two classes' APs: 70
    preds = gt_preds(ds)
    shifted = gt_preds(ds, shift=4)
    for image_id, p in preds.items():
        dog = p["labels"] == 1
        for key in ("boxes", "masks"):
            p[key][dog] = shifted[image_id][key][dog]
    stats = ev.evaluate(FakeModel(preds), loader_of(ds), ds, torch.device("cpu"))
    out = capsys.readouterr().out
    for iou_type in ("bbox", "segm"):
        assert f"{iou_type} AP per class: cat 100.0 | dog 40.0\n" in out
        assert stats[iou_type]["AP"] == pytest.approx(70.0)


def test_empty_predictions_give_zeros(ds, tmp_path):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, H, W, dtype=torch.bool)}
    model = FakeModel({11: empty, 12: empty})
    out = str(tmp_path / "out")
    stats = ev.evaluate(model, loader_of(ds), ds, torch.device("cpu"), out_dir=out)
    assert stats == {"bbox": {n: 0.0 for n in ev.STAT_NAMES}, "segm": {n: 0.0 for n in ev.STAT_NAMES}}
    assert json.load(open(os.path.join(out, "results_segm.json"))) == []


def test_category_mapping_and_xywh():
    pred = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 3.0, 4.0]]), "scores": torch.tensor([0.5, 0.25]),
            "labels": torch.tensor([1, 0])}
    res = ev.to_coco_results([pred], [42], CAT_IDS)
    assert [r["category_id"] for r in res] == [7, 3]
    assert [r["bbox"] for r in res] == [[1.0, 2.0, 10.0, 5.0], [0.0, 0.0, 3.0, 4.0]]
    assert [r["score"] for r in res] == [0.5, 0.25] and all(r["image_id"] == 42 for r in res)
    assert all("segmentation" not in r for r in res)  # no masks predicted -> box results only


def test_rle_round_trip():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 13, 17, generator=g) > 0.5  # (3, 13, 17), odd sizes catch a C/Fortran order mix-up
    pred = {"boxes": torch.zeros(3, 4), "scores": torch.ones(3), "labels": torch.zeros(3, dtype=torch.int64),
            "masks": masks}
    res = ev.to_coco_results([pred], [1], CAT_IDS)
    json.dumps(res)  # counts are str, not bytes
    for k, r in enumerate(res):
        assert isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [13, 17]
        assert np.array_equal(mask_util.decode(r["segmentation"]), masks[k].numpy().astype(np.uint8))


def test_distributed_gather_keeps_each_image_once(ds, tmp_path):
    # one process as a world of 1 (gloo): exercises all_gather_object; image 11 comes twice, as a
    # DistributedSampler's padding would repeat it, and must be counted once
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = FakeModel(gt_preds(ds))
        out = str(tmp_path / "out")
        stats = ev.evaluate(model, loader_of(ds, [11, 12, 11]), ds, torch.device("cpu"), out_dir=out,
                            distributed=True)
    finally:
        dist.destroy_process_group()
    assert stats["segm"]["AP"] == pytest.approx(100.0)
    assert len(json.load(open(os.path.join(out, "results_bbox.json")))) == 3


def test_draw_predictions_draws_kept_masks_only():
    image = torch.zeros(3, 40, 50, dtype=torch.uint8)
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 10:30, 5:25] = True   # kept (score 0.9)
    masks[1, 10:30, 30:48] = True  # below score_thresh (0.1): not drawn
    pred = {"boxes": torch.tensor([[5.0, 10.0, 24.0, 29.0], [30.0, 10.0, 47.0, 29.0]]),
            "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([0, 1]), "masks": masks}
    img = viz.draw_predictions(image, pred, ["cat", "dog"], score_thresh=0.3)
    assert img.size == (50, 40)
    a = np.asarray(img)
    expected = np.round(viz.MASK_ALPHA * np.array(viz.palette(0)))
    assert np.array_equal(a[20, 15], expected)  # mask interior: half of palette(0) over black
    assert a[20, 40].sum() == 0 and a[35, 15].sum() == 0  # dropped instance and background untouched


def test_heat_colormap_hand_values():
    t = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 0.5, 2.0])
    expected = [[0, 0, 0], [255, 0, 0], [255, 255, 0], [255, 255, 255], [255, 128, 0], [255, 255, 255]]
    assert viz.heat_colormap(t).tolist() == expected


def test_titled_row_and_heat_colormap(tmp_path):
    """Two heat maps side by side: each under a title strip, a gap between; 1 -> white, 0 -> black."""
    ones = Image.fromarray(viz.heat_colormap(torch.ones(40, 40)).numpy())
    zeros = Image.fromarray(viz.heat_colormap(torch.zeros(40, 40)).numpy())
    row = viz.titled_row([("M_S", ones), ("M_I", zeros)])
    assert row.size == (2 * 40 + viz.PANEL_GAP, 40 + viz.TITLE_H)
    path = str(tmp_path / "row.png")
    viz.save_png_atomic(row, path)
    a = np.asarray(Image.open(path).convert("RGB"))
    assert a[viz.TITLE_H + 30, 30].tolist() == [255, 255, 255]
    assert a[viz.TITLE_H + 30, 40 + viz.PANEL_GAP + 30].tolist() == [0, 0, 0]
    assert not os.path.exists(path + ".tmp")


def test_save_overlays_writes_three_panels(ds, tmp_path):
    model = FakeModel(gt_preds(ds))
    out = str(tmp_path / "overlays")
    paths = viz.save_overlays(model, ds, torch.device("cpu"), out, n=8)
    assert paths == [os.path.join(out, "pred_11.png"), os.path.join(out, "pred_12.png")]
    s = viz.upscale_factor(H, W)
    assert s == 3 and Image.open(paths[0]).size == (3 * W * s + 2 * viz.PANEL_GAP, H * s + viz.TITLE_H)


def test_eval_options_through_the_shared_configurator():
    """eval.py's own options, typed by their defaults; a bad one stops with one line naming it."""
    import configurator
    d = {"ckpt": "", "batch_size": 8, "amp": False}
    cfg = dict(d)
    assert configurator.configure(["--ckpt=a/b=c.pt", "--batch_size=2", "--amp"], cfg, "eval.py") == {"ckpt", "batch_size", "amp"}
    assert cfg == {"ckpt": "a/b=c.pt", "batch_size": 2, "amp": True}
    for bad, why in ((["--nope=1"], "unknown option --nope — fix: use one of --ckpt, --batch_size, --amp"),
                     (["--batch_size=two"], "should be a int"), (["--amp=yes"], "should be a bool"),
                     (["batch_size=2"], "config file batch_size=2 not found")):
        with pytest.raises(SystemExit, match=why) as e:
            configurator.configure(bad, dict(d), "eval.py")
        assert str(e.value).startswith("eval.py: ") and "\n" not in str(e.value)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert ev.main([f"--ckpt={tmp_path}/missing.pt", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval.py: {tmp_path}/missing.pt not found — fix:") and err.count("\n") == 1
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": {}, "config": {"min_size_test": 800}, "iter": 0}, path)
    assert ev.main([f"--ckpt={path}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "lacks keys ['max_size_test', 'val_json', 'val_images']" in err and err.count("\n") == 1


def test_subset_ap_ignores_the_objects_outside_the_subset():
    # two objects of one class, one detected exactly: AP 100 on the found one, 0 on the other,
    # and over both: precision 1 up to recall 0.5, COCO's 101-point average gives 51/101
    import ablate
    gt = {"images": [{"id": 1, "height": 50, "width": 50}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                           "iscrowd": 0, "tag": "found"},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 12, 12], "area": 144,
                           "iscrowd": 0, "tag": "missed"}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}]
    assert ablate.subset_ap(gt, dets, lambda a: a["tag"] == "found", "bbox") == pytest.approx(100.0)
    assert ablate.subset_ap(gt, dets, lambda a: a["tag"] == "missed", "bbox") == pytest.approx(0.0)
    assert ablate.subset_ap(gt, dets, lambda a: True, "bbox") == pytest.approx(100 * 51 / 101)
    assert gt["annotations"][1]["iscrowd"] == 0 and dets[0]["bbox"] == [2, 2, 10, 10]  # inputs untouched
    assert ablate.subset_ap(gt, [], lambda a: True, "segm") == 0.0  # a run that detected nothing: 0, no crash


def test_unreadable_image_is_left_out_counted_and_named(ds, capsys):
    """A val image the dataset could not read (its target says so) is left out of the scores and named:
    the other image, predicted perfectly, scores AP 100 (it would be lower if the unreadable image
    counted with its GT and no detections)."""
    preds = gt_preds(ds)
    preds[12] = {k: v[:0] for k, v in preds[12].items()}  # the placeholder image gets no detections
    batches = loader_of(ds)
    batches[1][1][0]["unreadable"] = "12.png: cannot identify image file"
    stats = ev.evaluate(FakeModel(preds), batches, ds, torch.device("cpu"))
    assert stats["segm"]["AP"] == pytest.approx(100.0) and stats["bbox"]["AP"] == pytest.approx(100.0)
    out = capsys.readouterr().out
    assert "eval: 1 unreadable image(s) left out of the scores, e.g. 12.png: cannot identify image file" in out
    assert "eval: 1 images," in out
