"""Tests for copypaste.py: Eq. (11), the FIFO bank, importance sampling and pasting, on tiny images."""

import io

import pytest
import torch

from box_ops import box_masks_exclusive, masks_to_boxes
from copypaste import (MemoryBank, bank_entry_from_teacher, box_quality_gate, copy_paste_batch, crops_to_masks,
                       masks_to_crops, object_scores, paste, sample_objects, with_paste_fields)


def rect(h, w, y0, y1, x0, x1):
    """bool (h, w) mask with rows y0..y1-1 and cols x0..x1-1 set."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def make_entry(image, masks, labels=None, scores=None):
    """A bank entry (the bank's layout: each mask a crop of its tight box at mask_xy) of full-size masks."""
    n = len(masks)
    crops, xy = masks_to_crops(masks)
    return dict(image=image, boxes=masks_to_boxes(masks), masks=crops, mask_xy=xy,
                labels=torch.arange(10, 10 + n) if labels is None else labels,
                scores=torch.ones(n) if scores is None else scores)


def make_target(boxes, labels, size):
    return dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                labels=torch.tensor(labels, dtype=torch.int64),
                image_id=7, size=size, orig_size=(2 * size[0], 2 * size[1]))

# -----------------------------------------------------------------------------
# Eq. (11) and box/mask helpers

def test_object_scores_hand_example():
    probs = torch.tensor([[[0.9, 0.8], [0.2, 0.6]],
                          [[0.9, 0.8], [0.2, 0.6]],
                          [[0.5, 0.5], [0.5, 0.5]]])
    masks = torch.tensor([[[1, 1], [0, 0]],
                          [[0, 0], [0, 0]],
                          [[1, 1], [1, 1]]], dtype=torch.bool)
    s = object_scores(probs, masks)
    torch.testing.assert_close(s, torch.tensor([1.7 / 3, 0.0, 2.0 / 5]))


# -----------------------------------------------------------------------------
# memory bank

def push_const(bank, value, n_obj=1):
    masks = torch.zeros(n_obj, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True
    bank.push(torch.full((3, 2, 2), value, dtype=torch.uint8), torch.zeros(n_obj, 4),
              torch.zeros(n_obj, dtype=torch.long), masks, torch.ones(n_obj))


def test_bank_fifo_order_and_capacity():
    bank = MemoryBank(capacity=3)
    for v in range(5):
        assert not bank.full or v >= 3
        push_const(bank, v)
    assert len(bank) == 3 and bank.full
    assert [int(e['image'][0, 0, 0]) for e in bank.entries] == [2, 3, 4]
    # an image whose objects all have empty masks, or that has no objects, is not stored
    bank.push(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long),
              torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1))
    push_const(bank, 9, n_obj=0)
    assert [int(e['image'][0, 0, 0]) for e in bank.entries] == [2, 3, 4]
    # objects with empty masks are dropped from a stored entry; the bank keeps copies on the CPU
    image = torch.full((3, 2, 2), 5, dtype=torch.uint8)
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    bank.push(image, torch.tensor([[0., 0., 1., 1.], [0., 0., 2., 2.]]), torch.tensor([3, 4]), masks,
              torch.tensor([0.8, 0.0]))
    image.fill_(0)
    e = bank.entries[-1]
    assert [int(x['image'][0, 0, 0]) for x in bank.entries] == [3, 4, 5]
    assert e['labels'].tolist() == [3] and e['scores'].tolist() == [pytest.approx(0.8)]
    # the mask kept as the crop of its tight box (pixel (0, 0)) at mask_xy
    assert len(e['masks']) == 1 and e['masks'][0].tolist() == [[True]] and e['mask_xy'].tolist() == [[0, 0]]
    assert torch.equal(crops_to_masks(e['masks'], e['mask_xy'], 2, 2), masks[:1])
    assert e['image'].dtype == torch.uint8 and e['masks'][0].dtype == torch.bool and e['image'].device.type == 'cpu'


def test_bank_sample_uniform():
    bank = MemoryBank(capacity=4)
    for v in range(4):
        push_const(bank, v)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([int(bank.sample(g)['image'][0, 0, 0]) for _ in range(4000)]), minlength=4)
    assert ((counts - 1000).abs() < 120).all(), counts  # std ~27


def test_bank_state_dict_round_trip():
    bank = MemoryBank(capacity=3)
    for v in range(4):
        push_const(bank, v, n_obj=v % 2 + 1)
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    other = MemoryBank(capacity=3)
    other.load_state_dict(torch.load(buf))
    assert len(other) == 3 and other.full
    for a, b in zip(bank.entries, other.entries):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != 'masks')
        assert len(a['masks']) == len(b['masks']) and all(torch.equal(u, v) for u, v in zip(a['masks'], b['masks']))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(5):
        assert torch.equal(bank.sample(g1)['image'], other.sample(g2)['image'])
    small = MemoryBank(capacity=2)
    small.load_state_dict(bank.state_dict())
    assert [int(e['image'][0, 0, 0]) for e in small.entries] == [2, 3]  # the most recent survive
    # a bank saved with full-size masks (N, h, w) loads as crops
    old = {'capacity': 3, 'entries': [{**{k: v for k, v in e.items() if k != 'mask_xy'},
                                      'masks': crops_to_masks(e['masks'], e['mask_xy'], 2, 2)} for e in bank.entries]}
    other.load_state_dict(old)
    for a, b in zip(bank.entries, other.entries):
        assert torch.equal(a['mask_xy'], b['mask_xy'])
        assert all(torch.equal(u, v) for u, v in zip(a['masks'], b['masks']))

# -----------------------------------------------------------------------------
# importance sampling

def test_sample_objects_count_official():
    """The official count, floor(N / 2) in [1, 3] (the defaults; the paper's quarter: test_presets)."""
    g = torch.Generator().manual_seed(0)
    for n_obj, n in [(1, 1), (2, 1), (5, 2), (9, 3)]:
        for _ in range(20):
            idx = sample_objects(torch.rand(n_obj, generator=g) + 0.1, g)
            assert len(idx) == n and len(set(idx.tolist())) == n  # without replacement: distinct
    assert len(sample_objects(torch.ones(9), g, max_n=2)) == 2


def test_sample_objects_probability_cubed_official():
    """The official draw, ~ score^3 (the defaults; the paper's ~ score: test_presets)."""
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_objects(torch.tensor([1.0, 0.5]), g) for _ in range(9000)])
    assert abs((draws == 0).float().mean().item() - 8 / 9) < 0.015  # 1^3 / (1^3 + 0.5^3); std 0.0033
    # N = 4, n = 2 without replacement: P(first = 0) = 1 / (1 + 3 * 0.125) = 8/11
    firsts = torch.stack([sample_objects(torch.tensor([1.0, 0.5, 0.5, 0.5]), g)[0] for _ in range(9000)])
    assert abs((firsts == 0).float().mean().item() - 8 / 11) < 0.015
    # all-zero scores: uniform
    draws = torch.cat([sample_objects(torch.zeros(2), g) for _ in range(4000)])
    assert abs((draws == 0).float().mean().item() - 0.5) < 0.03


def test_sample_objects_replacement_and_zero_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([1.0, 0, 0, 0, 0, 0])  # N = 6 -> n = 3, only object 0 can be drawn
    assert sample_objects(scores, g, replacement=True).tolist() == [0, 0, 0]  # official: duplicates
    assert sample_objects(scores, g).tolist() == [0]  # paper: distinct objects, n capped

# -----------------------------------------------------------------------------
# pasting

def test_paste_hides_one_object_and_shrinks_others():
    h = w = 8
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    target = make_target([[1, 1, 3, 3],              # A: inside the pasted band -> removed
                          [2, 2, 6, 6],              # B: rows 2..5, loses rows 2..3 -> [2, 4, 6, 6]
                          [4.5, 5.25, 7.5, 7.75],    # C: untouched -> exactly unchanged
                          [0.5, 2.5, 1.5, 6.5],      # D: rows 2..6, keeps rows 4..6 -> [0.5, 4, 1.5, 6.5]
                          [6, 5, 6, 8]],             # E: zero width, untouched -> kept unchanged
                         [0, 1, 2, 3, 4], (h, w))
    target['masks'] = box_masks_exclusive(target['boxes'], h, w).to(torch.uint8)
    band = rect(h, w, 0, 4, 0, 8)  # pasted object: rows 0..3, full width
    other = rect(h, w, 6, 8, 0, 2)  # not pasted
    entry = make_entry(torch.full((3, h, w), 200, dtype=torch.uint8), torch.stack([band, other]),
                       labels=torch.tensor([7, 8]))
    out, t = paste(image, target, entry, torch.tensor([0]), (h, w))
    assert t['labels'].tolist() == [1, 2, 3, 4, 7] and t['labels'].dtype == torch.int64
    torch.testing.assert_close(t['boxes'], torch.tensor([[2, 4, 6, 6], [4.5, 5.25, 7.5, 7.75],
                                                         [0.5, 4, 1.5, 6.5], [6, 5, 6, 8], [0, 0, 8, 4]]))
    assert t['pasted'].tolist() == [False, False, False, False, True]
    # one paste-mask row per pasted object (bool), in object order
    assert t['paste_masks'].dtype == torch.bool and t['paste_masks'].shape == (1, h, w)
    assert torch.equal(t['paste_masks'][0], band)
    # GT masks follow: occluded originals, the pasted pseudo mask appended
    assert t['masks'].shape == (5, h, w) and t['masks'].dtype == torch.uint8
    assert torch.equal(t['masks'][0].bool(), rect(h, w, 4, 6, 2, 6))
    assert torch.equal(t['masks'][4].bool(), band)
    assert t['image_id'] == 7 and t['size'] == (h, w)
    assert torch.equal(out[:, :4], torch.full((3, 4, w), 200, dtype=torch.uint8))
    assert torch.equal(out[:, 4:], torch.zeros(3, 4, w, dtype=torch.uint8))
    assert len(target['boxes']) == 5 and 'pasted' not in target  # input untouched


def test_paste_pixels_and_crop_from_larger_entry():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8)
    image[:, 8:] = 0
    image[:, :, 12:] = 0  # valid region (8, 12), zero padding elsewhere
    src = torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8)
    m0 = rect(16, 16, 6, 12, 10, 14)  # crosses the bottom-right corner of the valid region
    m0[7, 11] = False  # a hole, to check pixels stay untouched where the mask is 0
    m1 = rect(16, 16, 12, 16, 0, 4)  # entirely outside the valid region -> not added
    m2 = torch.rand(16, 16, generator=g) > 0.7  # irregular object inside and outside
    entry = make_entry(src, torch.stack([m0, m1, m2]))
    target = make_target([[0, 0, 2, 2]], [0], (8, 12))
    out, t = paste(image, target, entry, torch.tensor([0, 1, 2]), (8, 12))
    alpha = (m0 | m2)[:8, :12]
    assert torch.equal(out[:, :8, :12], torch.where(alpha, src[:, :8, :12], image[:, :8, :12]))
    assert torch.equal(out[:, 8:], image[:, 8:]) and torch.equal(out[:, :, 12:], image[:, :, 12:])
    assert t['labels'].tolist()[-2:] == [10, 12] and t['pasted'].tolist()[-2:] == [True, True]
    vis0 = m0[:8, :12] & ~m2[:8, :12]  # the later object m2 covers the earlier m0
    torch.testing.assert_close(t['boxes'][-2], masks_to_boxes(vis0[None])[0])
    assert t['boxes'][-2, 2] <= 12 and t['boxes'][-2, 3] <= 8
    assert torch.equal(t['paste_masks'][-2], vis0)
    assert torch.equal(t['paste_masks'][-1], m2[:8, :12])
    assert t['paste_masks'].shape == (2, 8, 12)


def test_paste_exact_crop_box():
    src = torch.full((3, 16, 16), 9, dtype=torch.uint8)
    entry = make_entry(src, rect(16, 16, 6, 12, 10, 14)[None])
    out, t = paste(torch.zeros(3, 16, 16, dtype=torch.uint8), make_target([], [], (8, 12)),
                   entry, torch.tensor([0]), (8, 12))
    torch.testing.assert_close(t['boxes'], torch.tensor([[10.0, 6.0, 12.0, 8.0]]))
    assert int(out.sum()) == 9 * 3 * 2 * 2


def test_paste_from_smaller_entry():
    src = torch.full((3, 4, 6), 50, dtype=torch.uint8)
    entry = make_entry(src, rect(4, 6, 2, 4, 3, 6)[None])
    image = torch.ones(3, 8, 8, dtype=torch.uint8)
    out, t = paste(image, make_target([[0, 0, 8, 8]], [1], (8, 8)), entry, torch.tensor([0]), (8, 8))
    expected = image.clone()
    expected[:, 2:4, 3:6] = 50
    assert torch.equal(out, expected)
    torch.testing.assert_close(t['boxes'], torch.tensor([[0.0, 0, 8, 8], [3, 2, 6, 4]]))  # a hole, same box


def test_paste_order_occlusion_and_duplicates():
    h = w = 8
    a, b = rect(h, w, 0, 4, 0, 4), rect(h, w, 2, 6, 2, 6)
    entry = make_entry(torch.zeros(3, h, w, dtype=torch.uint8), torch.stack([a, b, a]))
    empty = make_target([], [], (h, w))
    _, t = paste(torch.zeros(3, h, w, dtype=torch.uint8), empty, entry, torch.tensor([0, 1]), (h, w))
    assert torch.equal(t['paste_masks'][0].bool(), a & ~b) and torch.equal(t['paste_masks'][1].bool(), b)
    torch.testing.assert_close(t['boxes'], torch.tensor([[0.0, 0, 4, 4], [2, 2, 6, 6]]))
    # a later object hiding an earlier one entirely removes it; a duplicate draw pastes one object
    _, t = paste(torch.zeros(3, h, w, dtype=torch.uint8), empty, entry, torch.tensor([0, 2]), (h, w))
    assert t['labels'].tolist() == [12] and t['paste_masks'].shape == (1, h, w)
    _, t = paste(torch.zeros(3, h, w, dtype=torch.uint8), empty, entry, torch.tensor([1, 1]), (h, w))
    assert t['labels'].tolist() == [11] and t['pasted'].tolist() == [True]

# -----------------------------------------------------------------------------
# batch level and teacher entry

def batch_and_bank(capacity):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    targets = [make_target([[0, 0, 4, 4]], [0], (8, 8)), make_target([[1, 1, 3, 3], [4, 4, 8, 8]], [1, 2], (6, 8))]
    bank = MemoryBank(capacity)
    bank.push(torch.full((3, 8, 8), 255, dtype=torch.uint8), torch.tensor([[0., 0., 8., 8.]]), torch.tensor([5]),
              rect(8, 8, 0, 8, 0, 8)[None], torch.tensor([0.9]))
    return images, targets, bank


@pytest.mark.parametrize('capacity, prob', [(2, 1.0), (1, 0.0)])  # bank not full / prob 0
def test_copy_paste_batch_unchanged(capacity, prob):
    images, targets, bank = batch_and_bank(capacity)
    out, outt = copy_paste_batch(images, targets, bank, prob=prob, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, images)
    for t, o in zip(targets, outt):
        assert torch.equal(o['boxes'], t['boxes']) and torch.equal(o['labels'], t['labels'])
        assert o['pasted'].tolist() == [False] * len(t['boxes'])
        assert torch.equal(o['paste_masks'], torch.zeros(0, *t['size'], dtype=torch.bool))
        assert 'pasted' not in t


def test_copy_paste_batch_pastes():
    images, targets, bank = batch_and_bank(1)
    before = images.clone()
    out, outt = copy_paste_batch(images, targets, bank, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, before)  # inputs not modified
    assert torch.equal(out[0], torch.full((3, 8, 8), 255, dtype=torch.uint8))
    assert torch.equal(out[1, :, :6], torch.full((3, 6, 8), 255, dtype=torch.uint8))  # valid rows only
    assert torch.equal(out[1, :, 6:], images[1, :, 6:])
    # the whole-image paste hides every original object
    assert outt[0]['labels'].tolist() == [5] and outt[1]['labels'].tolist() == [5]
    torch.testing.assert_close(outt[1]['boxes'], torch.tensor([[0.0, 0, 8, 6]]))
    assert outt[1]['paste_masks'].shape == (1, 6, 8) and outt[1]['pasted'].tolist() == [True]


def test_bank_entry_from_teacher():
    probs = torch.zeros(3, 2, 2)  # padded 8x8 image, stride-4 frame 2x2
    probs[0] = 0.9
    probs[1] = 0.5  # never above 0.7 -> empty mask -> dropped
    probs[2, 0, 0] = 1.0
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 8, 8], [0, 0, 8, 8]])
    image = torch.zeros(3, 6, 7, dtype=torch.uint8)
    e = bank_entry_from_teacher(image, boxes, torch.tensor([1, 2, 3]), probs, (6, 7))
    # each mask a crop of its tight box, at mask_xy
    assert e['labels'].tolist() == [1, 3] and [tuple(c.shape) for c in e['masks']] == [(4, 4), (3, 3)]
    assert e['mask_xy'].tolist() == [[0, 0], [0, 0]] and e['masks'][0].dtype == torch.bool
    masks = crops_to_masks(e['masks'], e['mask_xy'], 6, 7)
    assert torch.equal(masks[0], rect(6, 7, 0, 4, 0, 4))
    # bilinear x4 of [[1, 0], [0, 0]]: rows/cols 0, 1 -> 1, 2 -> 0.875, 3 -> 0.625 (< 0.7 even alone)
    assert torch.equal(masks[1], rect(6, 7, 0, 3, 0, 3))
    torch.testing.assert_close(e['scores'], torch.tensor([0.9 * 16 / 17, 2.875 ** 2 / 10]))
    bank = MemoryBank(1)
    bank.push(**e)
    assert bank.full and bank.entries[0]['labels'].tolist() == [1, 3]
    e = bank.entries[0]
    assert [tuple(c.shape) for c in e['masks']] == [(4, 4), (3, 3)] and e['mask_xy'].tolist() == [[0, 0], [0, 0]]
    assert torch.equal(crops_to_masks(e['masks'], e['mask_xy'], 6, 7), masks)


@pytest.mark.parametrize('stride', [2, 4])
def test_bank_entry_from_teacher_equals_full_maps(stride):
    """The entry of a random teacher map, computed in windows around the boxes, against the definition on
    whole maps (upsample every map, threshold, AND the box, Eq. 11's score, the quality gate): the same
    masks bit for bit, with boxes of many sizes (several window groups), boxes that leave the image,
    touch its edges or are empty."""
    g = torch.Generator().manual_seed(stride)
    h, w = 30, 37  # padded 32 x 40
    corners = torch.rand(24, 2, 2, generator=g) * torch.tensor([50.0, 42]) - 5
    boxes = torch.cat([torch.tensor([[0.0, 0, 37, 30], [30.2, 25.5, 45, 40], [36.5, 29.5, 60, 50], [10, 10, 10, 10]]),
                       torch.cat([corners.amin(1), corners.amax(1)], 1)])  # (28, 4)
    probs = torch.rand(len(boxes), 32 // stride, 40 // stride, generator=g)  # (N, Hp/s, Wp/s)
    labels = torch.arange(len(boxes))
    up = torch.nn.functional.interpolate(probs[:, None], scale_factor=stride, mode='bilinear', align_corners=False)
    up = up[:, 0, :h, :w]  # (N, h, w)
    for min_iou in (0.0, 0.5):
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        e = bank_entry_from_teacher(image, boxes, labels, probs, (h, w), 0.6, stride, min_iou)
        masks = (up > 0.6) & box_masks_exclusive(boxes, h, w)  # (N, h, w)
        scores = (up * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1)
        keep = masks.flatten(1).any(1)
        if min_iou > 0:
            scores, ok = box_quality_gate(masks, boxes, scores, min_iou)
            keep &= ok
        assert e['labels'].tolist() == keep.nonzero().squeeze(1).tolist() and 5 < len(e['labels']) < len(boxes)
        assert torch.equal(crops_to_masks(e['masks'], e['mask_xy'], h, w), masks[keep])
        assert all(c.shape[0] * c.shape[1] > 0 and c[0].any() and c[-1].any() and c[:, 0].any() and c[:, -1].any()
                   for c in e['masks'])  # each crop its mask's tight box
        torch.testing.assert_close(e['scores'], scores[keep])
        torch.testing.assert_close(e['boxes'], boxes[keep])


def full_size_paste(image, target, full, entry_image, idx, size):
    """The definition of a paste with full-size masks (h, w) per object, written out: what paste() computes in
    the window of the drawn crops. full (n_entry, H', W') the entry's masks; 'paste_masks' rows as paste's."""
    h, w = size
    fit = lambda t: torch.nn.functional.pad(t, (0, max(w - t.shape[-1], 0), 0, max(h - t.shape[-2], 0)))[..., :h, :w]
    src = fit(full[idx])  # (n, h, w)
    visible = torch.stack([src[k] & ~src[k + 1:].any(0) for k in range(len(idx))])  # later objects cover earlier
    alpha = src.any(0)
    out = image.clone()
    out[:, :h, :w] = torch.where(alpha, fit(entry_image), image[:, :h, :w])
    remaining = box_masks_exclusive(target['boxes'], h, w) & ~alpha
    tight = masks_to_boxes(remaining)
    b = target['boxes']
    boxes = torch.cat([torch.maximum(b[:, :2], tight[:, :2]), torch.minimum(b[:, 2:], tight[:, 2:])], 1)
    keep = torch.cat([remaining.flatten(1).any(1), visible.flatten(1).any(1)])
    pasted = torch.cat([target.get('pasted', torch.zeros(len(boxes), dtype=torch.bool)),
                        torch.ones(len(idx), dtype=torch.bool)])
    old_rows = target.get('paste_masks', torch.zeros(0, h, w, dtype=torch.bool)) & ~alpha
    rows = torch.cat([old_rows, visible])[keep[pasted]]
    return out, dict(boxes=torch.cat([boxes, masks_to_boxes(visible)])[keep], pasted=pasted[keep], paste_masks=rows,
                     paste_area=target.get('paste_area', torch.zeros(h, w, dtype=torch.bool)) | alpha,
                     masks=torch.cat([target['masks'] * ~alpha, visible.to(torch.uint8)])[keep])


def test_paste_equals_the_full_size_definition():
    """Random entries, boxes that leave the image, a crop that leaves the valid region, duplicate and
    hidden objects, two pastes in a row (the second covering the first's paste masks): paste() in its
    window is the full-size definition (full_size_paste) exactly."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        H, W = 20, 24
        h, w = int(torch.randint(10, 21, (), generator=g)), int(torch.randint(10, 25, (), generator=g))
        corners = torch.rand(5, 2, 2, generator=g) * torch.tensor([30.0, 26]) - 3  # (5, corner, xy): some off the image
        boxes = torch.cat([corners.amin(1), corners.amax(1)], 1)  # (5, 4)
        target = make_target(boxes.tolist(), list(range(5)), (h, w))
        target['masks'] = torch.randint(0, 2, (5, h, w), generator=g, dtype=torch.uint8)
        image = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
        t, img = with_paste_fields(target, (h, w)), image
        for step in range(2):
            full = torch.zeros(4, 22, 26, dtype=torch.bool)
            for m in full:
                x0, y0 = (int(v) for v in torch.randint(0, 18, (2,), generator=g))
                dy, dx = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
                m[y0:y0 + dy, x0:x0 + dx] = True
                m &= torch.rand(22, 26, generator=g) > 0.2  # holes
            entry = make_entry(torch.randint(0, 256, (3, 22, 26), generator=g, dtype=torch.uint8), full)
            idx = torch.randint(0, 4, (int(torch.randint(1, 4, (), generator=g)),), generator=g)
            want_img, want = full_size_paste(img, t, full, entry['image'], idx, (h, w))
            img, t = paste(img, t, entry, idx, (h, w))
            assert torch.equal(img, want_img), trial
            for k in ('boxes', 'pasted', 'paste_masks', 'paste_area', 'masks'):
                assert t[k].dtype == want[k].dtype and torch.equal(t[k], want[k]), (trial, step, k)
            assert len(t['labels']) == len(t['boxes']) == len(t['masks'])
            assert len(t['paste_masks']) == int(t['pasted'].sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_paste_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8)
    masks = torch.rand(2, 12, 12, generator=g) > 0.5
    entry = make_entry(torch.randint(0, 256, (3, 12, 12), generator=g, dtype=torch.uint8), masks)
    target = make_target([[1, 1, 9, 9], [2.5, 0, 14, 6.5]], [0, 1], (14, 15))
    cpu_img, cpu_t = paste(image, target, entry, torch.tensor([1, 0]), (14, 15))
    cuda_t = {k: v.cuda() if torch.is_tensor(v) else v for k, v in target.items()}
    gpu_img, gpu_t = paste(image.cuda(), cuda_t, entry, torch.tensor([1, 0]), (14, 15))
    assert torch.equal(gpu_img.cpu(), cpu_img)
    for k in ('boxes', 'labels', 'pasted', 'paste_masks'):
        assert gpu_t[k].device.type == 'cuda' and torch.equal(gpu_t[k].cpu(), cpu_t[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_bank_entry_cuda_matches_cpu():
    """The teacher's entry computed on the GPU (as after_step does in a real run) and pushed: the CPU's."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 8, 10, generator=g)
    image = torch.randint(0, 256, (3, 30, 37), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0, 37, 30], [3.5, 2.2, 20.1, 17.9], [30.2, 25.5, 45, 40], [10, 10, 10, 10],
                          [5, 2, 9, 29]])
    args = lambda dev: (image.to(dev), boxes.to(dev), torch.arange(5, device=dev), probs.to(dev), (30, 37), 0.6, 4, 0.5)
    cpu, gpu = bank_entry_from_teacher(*args('cpu')), bank_entry_from_teacher(*args('cuda'))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu['masks'], gpu['masks']))
    torch.testing.assert_close(gpu['scores'].cpu(), cpu['scores'])
    bank = MemoryBank(1)
    bank.push(**gpu)
    e = bank.entries[0]
    assert e['mask_xy'].device.type == 'cpu' and torch.equal(e['mask_xy'], cpu['mask_xy'])
    assert all(m.device.type == 'cpu' for m in e['masks'])


def test_paste_area_and_occlusion_aware_box_masks():
    """A paste inside object B's box (no whole row or column covered) leaves B's box as it is, but
    the pasted pixels leave B's box mask in the losses; the pasted object keeps its own pixels."""
    import losses
    h = w = 8
    target = make_target([[2, 2, 6, 6]], [1], (h, w))
    square = rect(h, w, 3, 5, 3, 5)  # rows 3..4, cols 3..4
    entry = make_entry(torch.full((3, h, w), 200, dtype=torch.uint8), square[None], labels=torch.tensor([7]))
    _, t = paste(torch.zeros(3, h, w, dtype=torch.uint8), target, entry, torch.tensor([0]), (h, w))
    torch.testing.assert_close(t['boxes'], torch.tensor([[2.0, 2, 6, 6], [3, 3, 5, 5]]))
    assert torch.equal(t['paste_area'], square)
    m = losses.object_box_masks([t], (h, w), stride=1)  # BoxInst's box masks: rows/cols floor(y0)..floor(y1)
    b = rect(h, w, 2, 7, 2, 7) & ~square
    assert torch.equal(m[0].bool(), b)
    assert torch.equal(m[1].bool(), rect(h, w, 3, 6, 3, 6))  # its own pasted pixels stay in its box
    plain = losses.object_box_masks([t], (h, w), stride=1, occlusion_aware=False)
    assert torch.equal(plain[0].bool(), rect(h, w, 2, 7, 2, 7))
    # a target that saw no paste keeps plain box masks (with_paste_fields adds an empty paste_area)
    t0 = with_paste_fields(make_target([[2, 2, 6, 6]], [1], (h, w)), (h, w))
    assert not t0['paste_area'].any()
    assert torch.equal(losses.object_box_masks([t0], (h, w), stride=1)[0].bool(), rect(h, w, 2, 7, 2, 7))


def test_box_quality_gate_hand_values():
    h = w = 10
    masks = torch.stack([rect(h, w, 0, 4, 0, 4),     # tight box [0, 0, 4, 4] = its GT box: IoU 1
                         rect(h, w, 0, 4, 0, 2)])    # tight box [0, 0, 2, 4] in GT [0, 0, 4, 4]: IoU 0.5
    boxes = torch.tensor([[0.0, 0, 4, 4], [0.2, 0, 3.6, 4]])  # GT boxes, pixel-aligned outwards
    scores, keep = box_quality_gate(masks, boxes, torch.tensor([0.8, 0.9]), min_iou=0.8)
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.45]))
    assert keep.tolist() == [True, False]
    probs = torch.zeros(2, 5, 5)  # stride 2 -> 10 x 10
    probs[0, :2, :2] = probs[1, :2, :1] = 1.0
    entry = bank_entry_from_teacher(torch.zeros(3, h, w, dtype=torch.uint8), boxes, torch.tensor([0, 1]),
                                    probs, (h, w), thresh=0.7, stride=2, min_box_iou=0.8)
    assert entry['labels'].tolist() == [0]  # the half-filled box stays out of the bank
