"""Tests for data.py: COCO loading and its error messages, resize/flip, collate, loaders."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import data


def write_coco(tmp_path, images, anns, cats=((1, "a"),), name="ann.json"):
    """Write a tiny COCO dataset. images: [(id, uint8 array (H, W, 3) or (H, W) shape tuple for a missing file)]."""
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    entries = []
    for img_id, arr in images:
        H, W = arr if isinstance(arr, tuple) else arr.shape[:2]
        if not isinstance(arr, tuple):
            Image.fromarray(arr).save(img_dir / f"{img_id}.png")
        entries.append(dict(id=img_id, file_name=f"{img_id}.png", height=H, width=W))
    anns = [dict(dict(iscrowd=0, area=1.0, segmentation=[]), **a) for a in anns]
    path = tmp_path / name
    path.write_text(json.dumps(dict(images=entries, annotations=anns,
                                    categories=[dict(id=c, name=n) for c, n in cats])))
    return str(path), str(img_dir)


def noise_image(H, W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


# -----------------------------------------------------------------------------
# resize, flip, masks

def test_resize_shape_matches_detectron2():
    assert data.resize_shape(100, 200, 50, 80) == (40, 80)  # short 50 -> 50x100, long capped at 80
    assert data.resize_shape(100, 203, 50, 80) == (39, 80)  # 39.41 -> 39
    assert data.resize_shape(200, 100, 50, 80) == (80, 40)
    assert data.resize_shape(480, 640, 800, 1333) == (800, 1067)  # 1066.67 -> 1067, no cap
    assert data.resize_shape(1000, 1000, 800, 1333) == (800, 800)


def test_dataset_resizes_image_and_boxes(tmp_path):
    anns = [dict(id=1, image_id=1, category_id=7, bbox=[20.3, 10, 40, 50]),
            dict(id=2, image_id=1, category_id=3, bbox=[0, 0, 203, 100])]
    jp, d = write_coco(tmp_path, [(1, noise_image(100, 203))], anns, cats=((7, "seven"), (3, "three")))
    ds = data.CocoBoxDataset(jp, d, train=False, min_sizes=(50,), max_size=80)
    assert ds.cat_ids == [3, 7] and ds.class_names == ["three", "seven"] and ds.num_classes == 2
    assert ds.ids == [1] and ds.aspect_ratios == [2.03]
    img, t = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 39, 80)
    assert t["size"] == (39, 80) and t["orig_size"] == (100, 203) and t["image_id"] == 1
    sx, sy = 80 / 203, 39 / 100
    expected = torch.tensor([[20.3 * sx, 10 * sy, 60.3 * sx, 60 * sy], [0, 0, 80, 39]])
    assert t["boxes"].dtype == torch.float32 and torch.allclose(t["boxes"], expected)
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [1, 0]
    assert "masks" not in t


def test_hflip_moves_boxes_image_and_masks(tmp_path):
    seg = [[10, 20, 50, 20, 50, 60, 10, 60]]
    anns = [dict(id=1, image_id=1, category_id=1, bbox=[10, 20, 40, 40], segmentation=seg)]
    jp, d = write_coco(tmp_path, [(1, noise_image(100, 200))], anns)
    kw = dict(train=True, min_sizes=(100,), max_size=1000, with_masks=True)
    img0, t0 = data.CocoBoxDataset(jp, d, hflip_prob=0.0, **kw)[0]
    img1, t1 = data.CocoBoxDataset(jp, d, hflip_prob=1.0, **kw)[0]
    assert t0["boxes"].tolist() == [[10, 20, 50, 60]]
    assert t1["boxes"].tolist() == [[150, 20, 190, 60]]
    assert torch.equal(img1, img0.flip(-1)) and not torch.equal(img1, img0)
    assert t0["masks"][0, 20:60, 10:50].all() and t0["masks"].sum() == 40 * 40
    assert torch.equal(t1["masks"], t0["masks"].flip(-1))


def test_polygon_and_rle_masks_decode_and_resize(tmp_path):
    rle_mask = np.zeros((12, 12), np.uint8)
    rle_mask[1:4, 7:11] = 1
    rle_mask[9, 0] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    anns = [dict(id=1, image_id=1, category_id=1, bbox=[2, 2, 6, 6], segmentation=[[2, 2, 8, 2, 8, 8, 2, 8]]),
            dict(id=2, image_id=1, category_id=1, bbox=[0, 1, 11, 9],
                 segmentation=dict(size=[12, 12], counts=rle["counts"].decode("ascii")))]
    jp, d = write_coco(tmp_path, [(1, noise_image(12, 12))], anns)
    poly_mask = np.zeros((12, 12), np.uint8)
    poly_mask[2:8, 2:8] = 1  # pixels whose centres lie inside the square (2,2)-(8,8)
    _, t = data.CocoBoxDataset(jp, d, train=False, min_sizes=(12,), with_masks=True)[0]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, 12, 12)
    assert np.array_equal(t["masks"][0].numpy(), poly_mask)
    assert np.array_equal(t["masks"][1].numpy(), rle_mask)
    _, t2 = data.CocoBoxDataset(jp, d, train=False, min_sizes=(24,), with_masks=True)[0]  # x2, nearest
    up = lambda m: np.kron(m, np.ones((2, 2), np.uint8))
    assert np.array_equal(t2["masks"].numpy(), np.stack([up(poly_mask), up(rle_mask)]))
    # x2/3: nearest samples at pixel centres, source index floor((i + 0.5) * 1.5), as PIL NEAREST
    _, t3 = data.CocoBoxDataset(jp, d, train=False, min_sizes=(8,), with_masks=True)[0]
    idx = np.floor((np.arange(8) + 0.5) * 1.5).astype(int)
    assert np.array_equal(t3["masks"][0].numpy(), poly_mask[np.ix_(idx, idx)])


# -----------------------------------------------------------------------------
# the compact index

def test_index_holds_the_kept_boxes_labels_sizes_and_files_in_arrays(tmp_path, monkeypatch):
    """Images in id order (the json lists them unsorted, one in a subfolder), boxes per image in json
    order, crowd and bad boxes dropped; the attributes other files read keep their meaning."""
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.fromarray(noise_image(20, 10)).save(tmp_path / "img" / "sub" / "b.png")
    Image.fromarray(noise_image(10, 30)).save(tmp_path / "img" / "a.png")
    images = [dict(id=9, file_name="a.png", height=10, width=30), dict(id=4, file_name="sub/b.png", height=20, width=10)]
    anns = [dict(id=1, image_id=9, category_id=8, bbox=[1, 2, 3, 4]),
            dict(id=2, image_id=4, category_id=3, bbox=[-2, 5, 6, 30]),      # clipped to (0, 5, 4, 20)
            dict(id=3, image_id=9, category_id=3, bbox=[28, 0, 5, 10]),      # clipped to (28, 0, 30, 10)
            dict(id=4, image_id=9, category_id=8, bbox=[1, 1, 2, 2], iscrowd=1),
            dict(id=5, image_id=4, category_id=8, bbox=[3, 3, 0, 2]),        # zero width
            dict(id=6, image_id=9, category_id=8, bbox=[5, 6, 0.5, 1.25])]
    cats = [dict(id=8, name="eight", supercategory="x"), dict(id=3, name="three", supercategory="y")]
    jp = tmp_path / "ann.json"
    jp.write_text(json.dumps(dict(images=images, annotations=[dict(a, iscrowd=a.get("iscrowd", 0)) for a in anns],
                                  categories=cats)))
    built = []
    monkeypatch.setattr(data, "COCO", lambda path: built.append(path) or COCO(path))
    ds = data.CocoBoxDataset(str(jp), str(tmp_path / "img"), train=True)
    assert ds.ids == [4, 9] and ds.aspect_ratios == [0.5, 3.0] and len(ds) == 2
    assert ds.cat_ids == [3, 8] and ds.class_names == ["three", "eight"] and ds.num_classes == 2
    assert ds.categories == [cats[1], cats[0]]
    assert ds.skipped == dict(missing_files=0, no_box_images=0, bad_boxes=1, crowd=1)
    r0, r1 = ds.record(0), ds.record(1)
    assert r0["path"] == str(tmp_path / "img" / "sub" / "b.png") and r0["size"] == (20, 10)
    assert r0["boxes"].dtype == np.float32 and r0["boxes"].tolist() == [[0, 5, 4, 20]] and r0["labels"].tolist() == [0]
    assert r1["path"] == str(tmp_path / "img" / "a.png") and r1["size"] == (10, 30)
    assert r1["boxes"].tolist() == [[1, 2, 4, 6], [28, 0, 30, 10], [5, 6, 5.5, 7.25]] and r1["labels"].tolist() == [1, 0, 1]
    # one array for all boxes, with offsets per image: no Python object per image or box
    assert ds._boxes.shape == (4, 4) and ds._box_off.tolist() == [0, 1, 4] and ds._labels.dtype == np.int64
    assert not hasattr(ds, "records") and built == []  # pycocotools' COCO is not built for training
    # `coco` is built on first access, once; annotations(i) are its dicts behind image i's boxes
    assert [a["id"] for a in ds.annotations(1)] == [1, 3, 6] and ds.annotations(0) == [dict(anns[1], iscrowd=0)]
    assert ds.coco is ds.coco and built == [str(jp)] and sorted(ds.coco.imgs) == [4, 9]


def test_json_shapes_pycocotools_cannot_index_are_one_line_errors(tmp_path):
    def check(js, match):
        path = tmp_path / "x.json"
        path.write_text(json.dumps(js))
        with pytest.raises(data.DataError, match=match) as e:
            data.CocoBoxDataset(str(path), str(tmp_path))
        assert "\n" not in str(e.value) and "fix:" in str(e.value)

    cats = [dict(id=1, name="a")]
    image = dict(id=1, file_name="a.png", height=5, width=5)
    check([1, 2], r"not a COCO annotation file \(the top level is a list\)")
    check(dict(images=[image], categories=[dict(id=1)]), r"category entry lacks id/name \(entry 0 of 'categories'\)")
    check(dict(images=[dict(image, id="1")], categories=cats), r"image entry lacks an integer id \(entry 0 of 'images'\)")
    check(dict(images=[image], categories=cats, annotations=[dict(image_id=1, category_id=1, bbox=[0, 0, 1, 1])]),
          r"annotation lacks an id \(entry 0 of 'annotations'\)")
    check(dict(images=[image], categories=cats, annotations=[dict(id=3, image_id=1, category_id=1, bbox=[0, "x", 1, 1])]),
          r"bbox is not \[x, y, w, h\] \(annotation id 3\)")
    Image.fromarray(noise_image(5, 5)).save(tmp_path / "a.png")
    path = tmp_path / "y.json"
    path.write_text(json.dumps(dict(images=[image], categories=cats,
                                    annotations=[dict(id=4, image_id=1, category_id=1, bbox=[0, 0, 2, 2])])))
    with pytest.raises(data.DataError, match=r"annotation has no segmentation \(annotation id 4\)"):
        data.CocoBoxDataset(str(path), str(tmp_path), with_masks=True)


# -----------------------------------------------------------------------------
# bad input

def test_unknown_category_names_file_and_annotation(tmp_path):
    anns = [dict(id=17, image_id=1, category_id=99, bbox=[0, 0, 5, 5])]
    jp, d = write_coco(tmp_path, [(1, noise_image(10, 10))], anns, name="bad_cats.json")
    with pytest.raises(data.DataError) as e:
        data.CocoBoxDataset(jp, d)
    msg = str(e.value)
    assert "bad_cats.json" in msg and "annotation id 17" in msg and "99" in msg and "fix:" in msg
    assert "\n" not in msg


def test_missing_json_raises(tmp_path):
    with pytest.raises(data.DataError, match="nope.json: annotation file not found"):
        data.CocoBoxDataset(str(tmp_path / "nope.json"), str(tmp_path))


def test_missing_image_file_is_skipped_and_counted(tmp_path, capsys):
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 5, 5]) for i in (1, 2, 3)]
    jp, d = write_coco(tmp_path, [(1, noise_image(10, 10)), (2, (10, 10)), (3, noise_image(10, 10))], anns)
    ds = data.CocoBoxDataset(jp, d, train=False)
    assert ds.ids == [1, 3] and len(ds) == 2 and ds.skipped["missing_files"] == 1
    out = capsys.readouterr().out
    assert "skipped 1 images: missing files, e.g." in out and "2.png" in out


def test_bad_boxes_and_crowd_are_skipped(tmp_path, capsys):
    anns = [dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 4, 4]),       # valid
            dict(id=2, image_id=1, category_id=1, bbox=[3, 3, 0, 5]),       # zero width
            dict(id=3, image_id=1, category_id=1, bbox=[20, 2, 5, 5]),      # right of the image
            dict(id=4, image_id=1, category_id=1, bbox=[1, 1, 3, 3], iscrowd=1),
            dict(id=5, image_id=2, category_id=1, bbox=[2, 2, 4, -1])]      # negative height
    jp, d = write_coco(tmp_path, [(1, noise_image(10, 10)), (2, noise_image(10, 10))], anns)
    train = data.CocoBoxDataset(jp, d, train=True, min_sizes=(10,), hflip_prob=0.0)
    assert train.ids == [1]
    assert train.skipped == dict(missing_files=0, no_box_images=1, bad_boxes=3, crowd=1)
    assert train[0][1]["boxes"].tolist() == [[1, 1, 5, 5]]
    assert "1 images: no valid box; 3 boxes: empty or outside the image; 1 crowd" in capsys.readouterr().out
    val = data.CocoBoxDataset(jp, d, train=False, min_sizes=(10,), with_masks=True)
    assert val.ids == [1, 2]
    _, t = val[1]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 10, 10)


def write_garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x89PNG not really an image")


def test_unreadable_eval_image_gives_a_placeholder_naming_the_file(tmp_path, capsys):
    anns = [dict(id=1, image_id=5, category_id=1, bbox=[1, 1, 4, 4]), dict(id=2, image_id=6, category_id=1, bbox=[1, 1, 4, 4]),
            dict(id=3, image_id=7, category_id=1, bbox=[1, 1, 4, 4])]
    jp, d = write_coco(tmp_path, [(5, (10, 10)), (6, noise_image(10, 12)), (7, noise_image(10, 10))], anns)
    write_garbage(os.path.join(d, "5.png"))
    Image.fromarray(noise_image(9, 12)).save(os.path.join(d, "6.png"))  # the json says 10x12
    ds = data.CocoBoxDataset(jp, d, train=False, min_sizes=(20,), with_masks=True)
    os.remove(os.path.join(d, "7.png"))  # gone after the dataset was built
    p5, p6, p7 = (os.path.join(d, f"{k}.png") for k in (5, 6, 7))
    reasons = [f"{p5}: cannot read image: UnidentifiedImageError: cannot identify image file '{p5}'",
               f"{p6}: image is 9x12 but the json says 10x12", f"{p7}: file missing"]
    for i, (image_id, orig, reason) in enumerate(zip((5, 6, 7), ((10, 10), (10, 12), (10, 10)), reasons)):
        image, t = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and image.sum() == 0
        assert t["unreadable"] == reason and t["image_id"] == image_id and t["orig_size"] == orig and t["size"] == (32, 32)
        assert t["boxes"].shape == (0, 4) and t["labels"].dtype == torch.int64 and t["labels"].shape == (0,)
        assert t["masks"].shape == (0, 32, 32)
    assert capsys.readouterr().out == ""
    # the error that training raises when nothing can be read still names the file
    with pytest.raises(data.DataError) as e:
        ds._load_image(0)
    assert str(e.value).startswith(f"{p5}: cannot read image") and "image id 5" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(data.DataError, match="no training image can be read"):
        data.CocoBoxDataset(jp, d, train=True)[0]


def test_unreadable_training_image_is_replaced_by_the_next_and_reported(tmp_path, capsys, monkeypatch):
    """The corrupt file is in target['skipped'] each time its index is drawn, nothing is printed, and
    this process opens it once (it is remembered as unreadable)."""
    anns = [dict(id=1, image_id=5, category_id=1, bbox=[1, 1, 4, 4]), dict(id=2, image_id=6, category_id=1, bbox=[2, 2, 5, 5])]
    jp, d = write_coco(tmp_path, [(5, (10, 10)), (6, np.full((10, 12, 3), 7, np.uint8))], anns)
    write_garbage(os.path.join(d, "5.png"))
    ds = data.CocoBoxDataset(jp, d, train=True, min_sizes=(10,), hflip_prob=0.0)
    opened, real_open = [], Image.open
    monkeypatch.setattr(data.Image, "open", lambda path, *a, **k: opened.append(os.path.basename(path)) or real_open(path, *a, **k))
    for _ in range(3):
        image, target = ds[0]
        assert target["image_id"] == 6 and target["skipped"] == [os.path.join(d, "5.png")] and image.shape == (3, 10, 12)
    assert opened.count("5.png") == 1 and opened.count("6.png") == 3
    assert "skipped" not in ds[1][1]
    assert capsys.readouterr() == ("", "")


def test_check_images_names_exactly_the_files_that_cannot_be_opened(tmp_path):
    ids = range(1, 7)
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 4, 4]) for i in ids]
    jp, d = write_coco(tmp_path, [(i, noise_image(10, 12, seed=i)) for i in ids], anns)
    path = lambda i: os.path.join(d, f"{i}.png")
    png = open(path(2), "rb").read()
    write_garbage(path(2))                                         # not an image
    open(path(3), "wb").write(png[:20])                            # cut inside the header
    Image.fromarray(noise_image(12, 10)).save(path(4))             # 12x10, the json says 10x12
    open(path(5), "wb").write(png[:len(png) // 2])                 # header intact, data cut: found when decoded
    ds = data.CocoBoxDataset(jp, d, train=True)
    os.remove(path(6))                                             # gone since the dataset was built
    assert ds.check_images(max_workers=3) == [
        f"{path(2)}: cannot read image: UnidentifiedImageError: cannot identify image file '{path(2)}'",
        f"{path(3)}: cannot read image: OSError: Truncated File Read",
        f"{path(4)}: image is 12x10 but the json says 10x12",
        f"{path(6)}: file missing"]
    assert ds[4][1]["skipped"] == [path(5), path(6)]  # index 4 (image 5) fails to decode; 6 is gone: image 1 stands in


# -----------------------------------------------------------------------------
# collate and loaders

def test_collate_pads_to_multiple_of_32_with_zeros():
    a = torch.randint(1, 256, (3, 40, 80), dtype=torch.uint8)
    b = torch.randint(1, 256, (3, 50, 33), dtype=torch.uint8)
    images, targets = data.collate([(a, {"size": (40, 80)}), (b, {"size": (50, 33)})])
    assert images.shape == (2, 3, 64, 96) and images.dtype == torch.uint8
    assert torch.equal(images[0, :, :40, :80], a) and torch.equal(images[1, :, :50, :33], b)
    assert images[0, :, 40:].sum() == 0 and images[0, :, :, 80:].sum() == 0
    assert images[1, :, 50:].sum() == 0 and images[1, :, :, 33:].sum() == 0
    assert [t["size"] for t in targets] == [(40, 80), (50, 33)]
    assert data.collate([(a, {})])[0].shape == (1, 3, 64, 96)


def test_loaders_are_seeded_per_worker_and_infinite(tmp_path):
    n = 16
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 4, 4]) for i in range(1, n + 1)]
    jp, d = write_coco(tmp_path, [(i, noise_image(10, 10)) for i in range(1, n + 1)], anns)
    ds = data.CocoBoxDataset(jp, d, train=True, min_sizes=(10,), hflip_prob=0.5)

    def epoch(seed):
        loader = data.make_loader(ds, batch_size=1, train=True, num_workers=2, seed=seed)
        return [(t[0]["image_id"], t[0]["boxes"][0, 0].item() > 3) for _, (_, t) in zip(range(n), loader)]

    e0 = epoch(0)
    assert e0 == epoch(0) and e0 != epoch(1)
    assert sorted(i for i, _ in e0) == list(range(1, n + 1))
    # the two workers take alternate batches; forked workers with one python random state would flip alike
    assert [f for _, f in e0[0::2]] != [f for _, f in e0[1::2]]
    # drop_last + infinite: 16 images, batch 3 -> 5 batches per epoch, and it keeps going
    loader = data.make_loader(ds, batch_size=3, train=True, num_workers=0)
    assert len(loader) == 5
    batches = [b for _, b in zip(range(12), data.infinite(loader))]
    assert all(b[0].shape == (3, 3, 32, 32) for b in batches)
    evl = data.make_loader(data.CocoBoxDataset(jp, d, train=False, min_sizes=(10,)), batch_size=5,
                           train=False, num_workers=0)
    assert [t["image_id"] for _, ts in evl for t in ts] == list(range(1, n + 1))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        data.make_loader(ds, batch_size=32, train=True, num_workers=0)


def test_scale_per_batch_gives_one_scale_per_batch_and_reshuffles(tmp_path):
    n = 16
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 4, 4]) for i in range(1, n + 1)]
    jp, d = write_coco(tmp_path, [(i, noise_image(10, 20)) for i in range(1, n + 1)], anns)
    ds = data.CocoBoxDataset(jp, d, train=True, min_sizes=(10, 20, 30), max_size=100)
    loader = data.make_loader(ds, batch_size=4, train=True, num_workers=1, seed=0, scale_per_batch=True)
    assert len(loader) == 4
    batches = [b for _, b in zip(range(12), data.infinite(loader))]  # 3 epochs
    shorts = []
    for images, targets in batches:
        sizes = {t["size"] for t in targets}
        assert len(sizes) == 1  # one scale for the whole batch: no padding between its images
        (h, w), = sizes
        assert w == 2 * h and images.shape[-2:] == (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)
        shorts.append(h)
    assert set(shorts) == {10, 20, 30}
    epochs = [[t["image_id"] for _, ts in batches[k:k + 4] for t in ts] for k in (0, 4, 8)]
    assert all(sorted(e) == list(range(1, n + 1)) for e in epochs) and epochs[0] != epochs[1]
    again = data.make_loader(ds, batch_size=4, train=True, num_workers=1, seed=0, scale_per_batch=True)
    assert [b[1][0]["size"] for _, b in zip(range(4), again)] == [b[1][0]["size"] for b in batches[:4]]


def test_infinite_from_any_iteration_replays_the_same_batches(tmp_path):
    """Exact resume's data half: batches k, k+1, ... of a fresh loader started at k are those the
    uninterrupted loader gave at k, k+1, ... (image, scale and flip), also across an epoch's end."""
    n = 10
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 4 + i % 3, 4]) for i in range(1, n + 1)]
    jp, d = write_coco(tmp_path, [(i, noise_image(10, 20)) for i in range(1, n + 1)], anns)
    ds = data.CocoBoxDataset(jp, d, train=True, min_sizes=(10, 20, 30), max_size=100)
    key = lambda b: [(t["image_id"], t["size"], t["boxes"][0, 0].item()) for t in b[1]]
    for per_batch in (True, False):
        mk = lambda: data.make_loader(ds, batch_size=3, train=True, num_workers=1, seed=4, scale_per_batch=per_batch)
        straight = [key(b) for _, b in zip(range(8), data.infinite(mk()))]   # 3 batches per epoch: 2+ epochs
        assert len({str(s) for s in straight}) > 1 and sorted(i for s in straight[:3] for i, _, _ in s) != list(range(1, 10))
        for k in (2, 3, 5):
            assert [key(b) for _, b in zip(range(8 - k), data.infinite(mk(), start_iter=k))] == straight[k:]
        flips = {x0 for s in straight for _, _, x0 in s}
        assert len(flips) > 3   # boxes at x0 = 1 (unflipped) and mirrored ones


def test_aspect_grouping_batches_one_orientation_reproducibly_and_resumes(tmp_path):
    """Hand-made aspect ratios: 6 landscape (w >= h, the square too) and 5 portrait images, batch 2:
    3 + 2 batches per epoch, each of one orientation, no image twice, the same for the same (seed,
    epoch), and set_epoch(e, start) yields exactly the epoch's tail (images, scales and flips)."""
    ars = [1.5, 0.5, 1.0, 0.75, 2.0, 0.6, 1.33, 0.9, 1.2, 0.8, 3.0]
    portrait = {i for i, a in enumerate(ars) if a < 1}

    def sampler(rank=0, world=1, seed=3):
        s = torch.utils.data.DistributedSampler(list(range(len(ars))), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return data.TrainBatchSampler(s, 2, (10, 20, 30), scale_per_batch=False, seed=seed + rank,
                                      group_by_aspect=True, aspect_ratios=ars)

    def epoch(bs, e, start=0):
        bs.set_epoch(e, start)
        return list(bs)

    bs = sampler()
    assert len(bs) == 5
    epochs = [epoch(bs, e) for e in range(4)]
    for batches in epochs:
        assert len(batches) == 5
        images = [j for b in batches for j, _, _ in b]
        assert len(set(images)) == len(images) == 10
        assert all(len({j in portrait for j, _, _ in b}) == 1 for b in batches)
    assert len({str(b) for b in epochs}) == 4                      # a new order every epoch
    assert [epoch(sampler(), e) for e in range(4)] == epochs       # a function of (seed, epoch)
    for e in (0, 2):
        for start in range(6):
            assert epoch(sampler(), e, start) == epochs[e][start:]
    # two ranks: the same number of batches, disjoint images, one orientation per batch
    ranks = [epoch(sampler(rank, 2), 1) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2] and len(sampler(1, 2)) == 2
    flat = [j for r in ranks for b in r for j, _, _ in b]
    assert len(set(flat)) == len(flat) == 8
    assert all(len({j in portrait for j, _, _ in b}) == 1 for r in ranks for b in r)


def test_make_loader_groups_by_aspect_and_pins_memory(tmp_path):
    """Landscape 32x64 and portrait 64x32 images: grouped batches pad to 32x64 or 64x32, never 64x64."""
    shapes = [(32, 64)] * 3 + [(64, 32)] * 3
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 4, 4]) for i in range(1, 7)]
    jp, d = write_coco(tmp_path, [(i, noise_image(*hw, seed=i)) for i, hw in enumerate(shapes, 1)], anns)
    ds = data.CocoBoxDataset(jp, d, train=True, min_sizes=(32,), max_size=64)
    loader = data.make_loader(ds, batch_size=2, train=True, num_workers=0, group_by_aspect=True)
    assert len(loader) == 2 and not loader.pin_memory
    seen = [(tuple(images.shape[-2:]), {t["size"] for t in targets}) for _, (images, targets) in zip(range(6), data.infinite(loader))]
    assert seen == [((32, 64), {(32, 64)}) if s == (32, 64) else ((64, 32), {(64, 32)}) for s, _ in seen]
    assert {s for s, _ in seen} == {(32, 64), (64, 32)}
    assert data.make_loader(ds, batch_size=2, train=True, num_workers=0, pin_memory=True).pin_memory
    (tmp_path / "two").mkdir()
    jp2, d2 = write_coco(tmp_path / "two", [(1, noise_image(32, 64)), (2, noise_image(64, 32))], anns[:2])
    with pytest.raises(data.DataError, match="no batch of 2 images of one orientation for each of 1 ranks"):
        data.make_loader(data.CocoBoxDataset(jp2, d2), batch_size=2, train=True, num_workers=0, group_by_aspect=True)


# -----------------------------------------------------------------------------
# atomic file writing

def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "new" / "m.json")  # the folder is made
    data.write_json_atomic({"a": [1, 2.5], "b": "é"}, path, indent=1)
    assert open(path, "rb").read() == json.dumps({"a": [1, 2.5], "b": "é"}, indent=1).encode("ascii")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        data.write_atomic(path, crash)
    assert json.load(open(path)) == {"a": [1, 2.5], "b": "é"}  # the previous file survived
