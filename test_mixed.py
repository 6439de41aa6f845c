"""Some masks plus many boxes (--mask_fraction): which annotations keep their mask, the losses of a batch
that mixes both kinds of object, SIM's exact pseudo labels, and copy-paste keeping the flags aligned."""

import json

import numpy as np
import torch

import copypaste
import data
import losses
import sim
from model import build_model
from test_model import scene, tiny_cfg

torch.set_num_threads(1)


def test_keep_masks_is_a_seeded_nested_fraction():
    """A fraction F of the annotations with a segmentation, one draw per json annotation: the masks kept at
    0.1 are among those kept at 0.3 (one seed); box-only annotations never keep one; another seed draws others."""
    anns = [{"segmentation": [[0, 0, 1, 0, 1, 1]]} if k % 5 else {"segmentation": []} for k in range(2000)]
    sel = np.arange(0, 2000, 2)  # the boxes the index kept
    with_seg = np.array([bool(anns[k]["segmentation"]) for k in sel])
    kept = {f: data.keep_masks(anns, sel, f, seed=0) for f in (0.0, 0.1, 0.3, 1.0)}
    assert not kept[0.0].any() and (kept[1.0] == with_seg).all()
    assert not (kept[0.3] & ~with_seg).any()
    assert (kept[0.1] <= kept[0.3]).all() and (kept[0.3] <= kept[1.0]).all()  # nested
    for f in (0.1, 0.3):
        assert abs(kept[f].sum() / with_seg.sum() - f) < 0.04
    assert not (data.keep_masks(anns, sel, 0.3, seed=1) == kept[0.3]).all()


def test_dataset_targets_carry_has_mask_and_only_kept_masks(tmp_path):
    """mask_fraction > 0: every target has 'has_mask' (N,) and 'masks' (N, h, w), zero for the objects that
    train from their box; an annotation without a segmentation is a box (no error, unlike with_masks)."""
    from PIL import Image
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 0}]
    js = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 40}], "annotations": anns,
          "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(js))
    ds = data.CocoBoxDataset(tmp_path / "a.json", tmp_path, train=False, min_sizes=(40,), max_size=40,
                             mask_fraction=1.0)
    _, t = ds[0]
    assert t["has_mask"].tolist() == [True, False]
    assert t["masks"].shape == (2, 40, 40) and t["masks"][0].sum() == 100 and t["masks"][1].sum() == 0
    _, t = data.CocoBoxDataset(tmp_path / "a.json", tmp_path, train=False, min_sizes=(40,), max_size=40)[0]
    assert "has_mask" not in t and "masks" not in t  # the default: boxes only, as before


def _losses(cfg, images, targets, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    out = model(images, targets)
    _, logs = losses.compute_losses(out, images, targets, cfg, it=100)
    return out, logs


def test_objects_with_a_mask_train_from_it_the_others_from_their_box():
    """With every object's mask: the dice term is full supervision's (mean dice over the positives) and the
    box terms are empty (0);
    with none: the box terms equal BoxInst's and the dice term is 0; mixed: each term is its definition on
    its own positives (projection_loss on the box objects', dice on the mask objects') times its share of
    the positives."""
    images, targets = scene()
    cfg = tiny_cfg(mask_fraction=1.0)
    with_all = [dict(t, has_mask=torch.ones(2, dtype=torch.bool)) for t in targets]
    with_none = [dict(t, has_mask=torch.zeros(2, dtype=torch.bool)) for t in targets]
    mixed = [dict(t, has_mask=torch.tensor([True, False])) for t in targets]
    out, a = _losses(cfg, images, with_all)
    gt = torch.cat([losses.gt_mask_targets(t["masks"], images.shape[-2:], 4) for t in targets])  # (G, h, w)
    gi = out["inst"]["gt_inds"]
    want = losses.dice_loss(out["mask_logits"].float().sigmoid(), gt[gi][:, None]).mean()  # full supervision's
    assert torch.allclose(a["loss_mask"], want, rtol=1e-6) and a["loss_mask"] > 0
    assert a["loss_prj"] == 0 and a["loss_pairwise"] == 0
    _, box = _losses(tiny_cfg(), images, targets)
    _, n = _losses(cfg, images, with_none)
    assert n["loss_mask"] == 0
    assert torch.equal(n["loss_prj"], box["loss_prj"]) and torch.equal(n["loss_pairwise"], box["loss_pairwise"])
    for w in (1.0, 4.0):
        out, m = _losses(dict(cfg, gt_mask_weight=w), images, mixed)
        gi = out["inst"]["gt_inds"]
        is_box = gi % 2 == 1  # object 1 of each image has no mask
        assert is_box.any() and (~is_box).any()
        bmask = losses.object_box_masks(targets, images.shape[-2:], 4)[gi][:, None]
        # each term weighs its share of the positives, a mask positive counting w box positives
        n_box, n_mask = is_box.sum().item(), (~is_box).sum().item()
        share = n_box / (n_box + w * n_mask)
        want_prj = share * losses.projection_loss(out["mask_logits"][is_box], bmask[is_box])
        assert torch.allclose(m["loss_prj"], want_prj, rtol=1e-6)
        logits = out["mask_logits"][~is_box].float().sigmoid()
        want_mask = (1 - share) * losses.dice_loss(logits, gt[gi][~is_box][:, None]).sum() / n_mask
        assert torch.allclose(m["loss_mask"], want_mask, rtol=1e-6)


def test_mask_shares_hand_values():
    """9 box positives and 1 with a mask: 9/10 and 1/10 when each positive weighs the same; 9/13 and 4/13
    when a mask positive weighs 4; no positives: no weight (not NaN)."""
    assert torch.allclose(losses.mask_shares(torch.tensor([9.0, 1.0])), torch.tensor([0.9, 0.1]))
    assert torch.allclose(losses.mask_shares(torch.tensor([9.0, 1.0]), 4.0), torch.tensor([9 / 13, 4 / 13]))
    assert torch.allclose(losses.mask_shares(torch.tensor([0.0, 3.0]), 4.0), torch.tensor([0.0, 1.0]))
    assert torch.equal(losses.mask_shares(torch.zeros(2), 4.0), torch.zeros(2))


def test_exact_labels_replace_the_pseudo_labels_of_objects_with_a_mask():
    """An object with a GT mask: M_hat, the teacher's mean mask and M_prob are its mask, W its image's
    valid area; an object without keeps SIM's maps."""
    G, H, W = 2, 3, 4
    pm = {k: torch.full((G, H, W), v) for k, v in (("M_hat", 0.0), ("M_mean", 0.6), ("M_prob", 0.4), ("W", 0.5),
                                                   ("M_S", 0.3))}
    gt = torch.zeros(G, H, W)
    gt[0, 1, 1:3] = 1
    gt[1] = 1  # a mask the object does not keep: unused
    valid = torch.ones(1, H, W)
    valid[0, :, 3] = 0  # padding
    obj = dict(has_mask=torch.tensor([True, False]), gt_mask=gt, valid=valid, img=torch.zeros(G, dtype=torch.long))
    out = sim.exact_labels(pm, obj)
    for k in ("M_hat", "M_mean", "M_prob"):
        assert torch.equal(out[k][0], gt[0]) and torch.equal(out[k][1], pm[k][1])
    assert torch.equal(out["W"][0], valid[0]) and torch.equal(out["W"][1], pm["W"][1])
    assert out["M_S"] is pm["M_S"]
    assert sim.exact_labels(pm, dict(obj, has_mask=None)) is pm  # boxes only: untouched


def test_paste_keeps_has_mask_aligned_with_the_objects():
    """A pasted object trains from its pseudo mask (has_mask False); an object the paste hides entirely
    leaves with its flag."""
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    target = dict(boxes=torch.tensor([[0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 8.0, 8.0]]), labels=torch.tensor([0, 1]),
                  masks=torch.ones(2, 8, 8, dtype=torch.uint8), has_mask=torch.tensor([True, False]), size=(8, 8))
    crop = torch.ones(3, 3, dtype=torch.bool)
    entry = dict(image=torch.full((3, 8, 8), 9, dtype=torch.uint8), boxes=torch.tensor([[0.0, 0.0, 3.0, 3.0]]),
                 labels=torch.tensor([2]), masks=[crop], mask_xy=torch.tensor([[0, 0]]), scores=torch.ones(1))
    _, t = copypaste.paste(image, target, entry, torch.tensor([0]), (8, 8))
    # object 0 (box 0..2) is covered by the pasted 3x3 crop and leaves; object 1 stays; the pasted one comes last
    assert t["labels"].tolist() == [1, 2]
    assert t["has_mask"].tolist() == [False, False] and t["pasted"].tolist() == [False, True]
    assert len(t["masks"]) == len(t["boxes"]) == 2
