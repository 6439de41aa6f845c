"""Tests for synthetic.py: the embedded dataset is deterministic, cached, annotated with its rendered visible
masks, free of enclosed holes, and has the occlusion, low-contrast and colour properties the demo relies on."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import synthetic


def test_synthetic_is_deterministic_and_cached(tmp_path):
    kw = dict(seed=3, n_train=3, n_val=2, size=96)
    a = synthetic.ensure_synthetic(tmp_path / "a", **kw)
    b = synthetic.ensure_synthetic(tmp_path / "b", **kw)
    c = synthetic.ensure_synthetic(tmp_path / "c", **dict(kw, seed=4))
    for split in ("train", "val"):
        assert json.load(open(a[f"{split}_json"])) == json.load(open(b[f"{split}_json"]))
    first = json.load(open(a["train_json"]))["images"][0]["file_name"]
    read = lambda p: open(os.path.join(p["train_images"], first), "rb").read()
    assert read(a) == read(b)
    assert read(a) != read(c)
    assert json.load(open(a["train_json"])) != json.load(open(c["train_json"]))
    # reuse: same stamp, nothing rewritten; no temp folders left behind
    mtime = os.path.getmtime(a["train_json"])
    assert synthetic.ensure_synthetic(tmp_path / "a", **kw) == a
    assert os.path.getmtime(a["train_json"]) == mtime
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]
    # other parameters replace the cached copy
    d = synthetic.ensure_synthetic(tmp_path / "a", **dict(kw, n_train=2))
    assert len(json.load(open(d["train_json"]))["images"]) == 2
    synthetic.ensure_synthetic(tmp_path / "a", **dict(kw, n_train=2, low_contrast_bg=0.8))  # the generator's knobs too
    assert json.load(open(os.path.join(tmp_path, "a", "stamp.json")))["low_contrast_bg"] == 0.8


CACHED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic")


@pytest.mark.skipif(not os.path.isfile(os.path.join(CACHED, "stamp.json")), reason="no data/synthetic here")
def test_cached_dataset_is_what_the_generator_makes(tmp_path):
    """data/synthetic, kept as long as its stamp matches, holds what the current code renders: image 0 of
    each split byte for byte and its annotations (a generator change must bump SYNTH_VERSION)."""
    stamp = json.load(open(os.path.join(CACHED, "stamp.json")))
    if stamp.get("version") != synthetic.SYNTH_VERSION:
        pytest.skip(f"data/synthetic is generator version {stamp.get('version')}")
    kw = dict(low_contrast_bg=stamp["low_contrast_bg"], min_visible_frac=stamp["min_visible_frac"])
    for split in ("train", "val"):
        synthetic._write_split(str(tmp_path), split, 1, stamp["seed"], stamp["size"], **kw)
        read = lambda root: open(os.path.join(root, split, "000000.jpg"), "rb").read()
        assert read(str(tmp_path)) == read(CACHED)
        anns = lambda root: [a for a in json.load(open(os.path.join(root, f"{split}.json")))["annotations"]
                             if a["image_id"] == 1]
        assert anns(str(tmp_path)) == anns(CACHED)


def test_synthetic_annotations_are_the_rendered_visible_masks(tmp_path):
    seed, size = 5, 160
    p = synthetic.ensure_synthetic(tmp_path / "s", seed=seed, n_train=4, n_val=1, size=size)
    coco = COCO(p["train_json"])
    assert [coco.cats[c]["name"] for c in sorted(coco.cats)] == list(synthetic.SHAPES)
    for k, img_id in enumerate(sorted(coco.imgs)):
        info = coco.imgs[img_id]
        rng = np.random.default_rng([seed, 0, k])  # the generator's per-image stream
        H, W = size, size + int(rng.integers(0, size // 4 + 1))
        image, masks, labels, attrs = synthetic.render_synthetic_image(rng, H, W, size=size)
        assert (info["height"], info["width"]) == (H, W) and size <= W <= 1.25 * size
        anns = coco.imgToAnns[img_id]
        assert 2 <= len(anns) <= 6 * 2
        assert [a["category_id"] - 1 for a in anns] == labels.tolist()
        decoded = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        assert np.array_equal(decoded, masks)
        assert decoded.sum(0).max() == 1  # visible parts do not overlap
        for a, m in zip(anns, decoded):
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["area"] == m.sum() >= 20 and a["iscrowd"] == 0
        assert [a["low_contrast"] for a in anns] == [at["low_contrast"] for at in attrs]
        assert [a["visible_frac"] for a in anns] == [round(at["visible_frac"], 3) for at in attrs]
        on_disk = np.asarray(Image.open(os.path.join(p["train_images"], info["file_name"])), np.float32)
        assert np.abs(on_disk - image).mean() < 4.0  # JPEG q95 of the rendered image (another image: ~50)


def _enclosed_background(m):
    """Pixels outside the mask m (H, W) that no path of outside pixels links to the frame's border."""
    out = ~m
    reach = np.zeros_like(m)
    reach[0], reach[-1], reach[:, 0], reach[:, -1] = out[0], out[-1], out[:, 0], out[:, -1]
    while True:  # grow the border region through outside pixels (4-neighbours) until it stops
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= out
        if (grown == reach).all():
            return out & ~reach
        reach = grown


def test_enclosed_background_helper():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert _enclosed_background(ring).sum() == 1
    ring[4, 2] = False  # a notch in the ring's left side: (4, 3) still closes the hole
    assert _enclosed_background(ring).sum() == 1
    ring[4, 3] = False  # now a channel joins the hole to the outside
    assert _enclosed_background(ring).sum() == 0


def test_synthetic_shapes_have_no_holes_and_crescents_are_concave():
    """Every class is a shape without an enclosed hole (box supervision cannot see one: no colour pair
    links it to the outside of the box); the crescent's bite makes it concave; the disc is filled."""
    rng = np.random.default_rng(0)
    fill = {c: [] for c in synthetic.SHAPES}
    for _ in range(100):
        o = synthetic._sample_object(rng, 96, 96, 160, [])
        o["cx"] = o["cy"] = 48.0  # the whole object inside the frame, with a margin
        u, v, sl = synthetic._object_frame(o, 96, 96)
        m = np.zeros((96, 96), bool)
        m[sl] = synthetic._shape_mask(o, u, v)
        assert m.sum() > 0 and _enclosed_background(m).sum() == 0, o["cls"]
        ys, xs = np.nonzero(m)
        # share of the mask's bounding box that the mask fills
        fill[o["cls"]].append(m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    assert all(len(f) >= 8 for f in fill.values())
    assert np.mean(fill["disc"]) > 0.7  # an ellipse fills pi/4 of its axis-aligned box, less when rotated
    assert np.mean(fill["crescent"]) < np.mean(fill["disc"]) - 0.2


def test_synthetic_occlusion_and_low_contrast_attributes():
    """Each object keeps >= 30% of its in-image outline visible (version 6 kept 20-pixel slivers, which
    no detector found), occluded objects remain common, and about a fifth of the objects are
    low-contrast: their colour is much closer to the background around them than the others' is."""
    fracs, all_fracs, contrast = [], [], {True: [], False: []}
    for i in range(80):
        _, _, _, loose = synthetic.render_synthetic_image(np.random.default_rng([0, 0, i]), 160, 192, min_visible_frac=0.0)
        image, masks, labels, attrs = synthetic.render_synthetic_image(np.random.default_rng([0, 0, i]), 160, 192)
        all_fracs += [a["visible_frac"] for a in loose]
        fracs += [a["visible_frac"] for a in attrs]
        img = image.astype(np.float32)
        for m, a in zip(masks, attrs):
            near = torch.nn.functional.max_pool2d(torch.from_numpy(m)[None, None].float(), 7, 1, 3)[0, 0].numpy() > 0
            ring = near & ~masks.any(0)  # background pixels within 3 px of the object
            if a["visible_frac"] > 0.9 and ring.sum() > 20:
                contrast[a["low_contrast"]].append(np.abs(img[m].mean(0) - img[ring].mean(0)).sum())
    assert min(fracs) >= 0.3 and min(all_fracs) < 0.3  # the rule removes objects
    assert 0.1 < np.mean([f < 0.9 for f in fracs]) < 0.5  # occlusion stays common
    n_lc, n = len(contrast[True]), len(contrast[True]) + len(contrast[False])
    assert n > 100 and 0.1 < n_lc / n < 0.3
    assert np.median(contrast[True]) < 0.5 * np.median(contrast[False])


def test_synthetic_objects_are_mostly_colour_connected_and_class_coloured():
    """The generator's properties the demo relies on: most neighbour pairs inside an object pass
    BoxInst's colour threshold (as on real objects at stride 4; the inner two-tone edges and the
    low-contrast objects are the exceptions), almost none across an object's boundary; a good part of
    the background pairs pass too, as on a natural image's locally smooth background (BoxInst learns
    in-box background from them); and each class has its own hue family (measured on the
    non-low-contrast objects: mean hue distance to the class hue < 25 degrees)."""
    import colorsys
    import losses
    inside, across, background, hue_err = [], [], [], []
    in_img = losses.unfold_wo_center(torch.ones(1, 1, 40, 48), 3, 2)[0, 0] > 0  # (8, 40, 48): neighbour in the image
    for i in range(20):
        image, masks, labels, _ = synthetic.render_synthetic_image(np.random.default_rng([0, 0, i]), 160, 192)
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        sim = losses.color_similarity(x, torch.ones(1, 40, 48))[0]  # (8, 40, 48)
        m = torch.from_numpy(masks).float()[:, 2::4, 2::4]  # (K, 40, 48) on the stride-4 grid
        nb = losses.unfold_wo_center(m[:, None], 3, 2)[:, 0]  # (K, 8, 40, 48): the neighbour's mask
        bg = m.sum(0) == 0  # (40, 48)
        bg_nb = losses.unfold_wo_center(bg[None, None].float(), 3, 2)[0, 0] > 0  # (8, 40, 48)
        background.append(sim[bg & bg_nb & in_img])
        for k in range(len(m)):
            inside.append(sim[(m[k] > 0) & (nb[k] > 0)])
            across.append(sim[(m[k] > 0) & (nb[k] == 0) & in_img])
            rgb = image[masks[k]].astype(float).mean(0) / 255
            h, s, v = colorsys.rgb_to_hsv(*rgb)
            if s > 0.35:  # the low-contrast objects take most of their colour from the background
                d = abs(h * 360 - synthetic.CLASS_HUES[labels[k]]) % 360
                hue_err.append(min(d, 360 - d))
    assert (torch.cat(inside) >= 0.3).float().mean() > 0.55
    assert (torch.cat(across) >= 0.3).float().mean() < 0.02
    assert (torch.cat(background) >= 0.3).float().mean() > 0.15  # version 5: 0.24, version 4: 0.06
    assert len(hue_err) > 40 and np.median(hue_err) < 25
