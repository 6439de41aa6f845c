"""Tests for copypaste.py: Eq. (11), the FIFO bank, importance sampling and pasting, on tiny images."""

import io

import pytest
import torch

from box_ops import box_masks_exclusive, masks_to_boxes
from copypaste import (MemoryBank, bank_entry_from_teacher, box_quality_gate, copy_paste_batch,
                       object_scores, paste, sample_objects, with_paste_fields)


def rect(h, w, y0, y1, x0, x1):
    """bool (h, w) mask with rows y0..y1-1 and cols x0..x1-1 set."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def make_entry(image, masks, labels=None, scores=None):
    n = len(masks)
    return dict(image=image, boxes=masks_to_boxes(masks), masks=masks,
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
    assert e['labels'].tolist() == [3] and e['masks'].shape == (1, 2, 2) and e['scores'].tolist() == [pytest.approx(0.8)]
    assert e['image'].dtype == torch.uint8 and e['masks'].dtype == torch.bool and e['image'].device.type == 'cpu'


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
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(5):
        assert torch.equal(bank.sample(g1)['image'], other.sample(g2)['image'])
    small = MemoryBank(capacity=2)
    small.load_state_dict(bank.state_dict())
    assert [int(e['image'][0, 0, 0]) for e in small.entries] == [2, 3]  # the most recent survive

# -----------------------------------------------------------------------------
# importance sampling

def test_sample_objects_count():
    g = torch.Generator().manual_seed(0)
    for n_obj, n in [(1, 1), (2, 1), (5, 2), (9, 3)]:
        for _ in range(20):
            idx = sample_objects(torch.rand(n_obj, generator=g) + 0.1, g)
            assert len(idx) == n and len(set(idx.tolist())) == n  # without replacement: distinct
    assert len(sample_objects(torch.ones(9), g, max_n=2)) == 2


def test_sample_objects_probability_cubed():
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
    assert t['paste_masks'].dtype == torch.float32 and t['paste_masks'].shape == (5, h, w)
    assert torch.equal(t['paste_masks'][:4], torch.zeros(4, h, w))
    assert torch.equal(t['paste_masks'][4], band.float())
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
    assert torch.equal(t['paste_masks'][-2], vis0.float())
    assert torch.equal(t['paste_masks'][-1], m2[:8, :12].float())
    assert t['paste_masks'].shape[1:] == (8, 12)


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
        assert torch.equal(o['paste_masks'], torch.zeros(len(t['boxes']), *t['size']))
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
    assert e['labels'].tolist() == [1, 3] and e['masks'].shape == (2, 6, 7) and e['masks'].dtype == torch.bool
    assert torch.equal(e['masks'][0], rect(6, 7, 0, 4, 0, 4))
    # bilinear x4 of [[1, 0], [0, 0]]: rows/cols 0, 1 -> 1, 2 -> 0.875, 3 -> 0.625 (< 0.7 even alone)
    assert torch.equal(e['masks'][1], rect(6, 7, 0, 3, 0, 3))
    torch.testing.assert_close(e['scores'], torch.tensor([0.9 * 16 / 17, 2.875 ** 2 / 10]))
    bank = MemoryBank(1)
    bank.push(**e)
    assert bank.full and bank.entries[0]['labels'].tolist() == [1, 3]


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
