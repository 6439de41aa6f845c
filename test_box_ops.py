"""Tests for box_ops.py: the two box-mask pixel conventions on hand-made boxes, the centre, IoU, decoding, groups."""

import torch

from box_ops import (box_iou_pairs, box_mask_centers, box_masks_exclusive, box_masks_inclusive, decode_boxes,
                     masks_to_boxes, size_groups, stride_grid)


def rect(h, w, y0, y1, x0, x1):
    """bool (h, w) mask with rows y0..y1-1 and cols x0..x1-1 set."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_exclusive_masks_convention_and_round_trip():
    m = box_masks_exclusive(torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.5, 0.25, 1.5, 1.75]]), 6, 6)
    assert torch.equal(m[0], rect(6, 6, 2, 5, 1, 3))  # integer box: rows 2..4, cols 1..2
    assert torch.equal(m[1], rect(6, 6, 0, 2, 0, 2))  # float box: every touched pixel
    assert torch.equal(box_masks_exclusive(torch.tensor([[3.0, 0, 3, 5]]), 6, 6)[0], rect(6, 6, 0, 5, 3, 4))  # zero width
    g = torch.Generator().manual_seed(0)
    xy0 = torch.randint(0, 8, (50, 2), generator=g)
    xy1 = xy0 + torch.randint(1, 8, (50, 2), generator=g)
    boxes = torch.cat([xy0, xy1], 1).float()  # integer boxes inside a 16x16 image
    assert torch.equal(masks_to_boxes(box_masks_exclusive(boxes, 16, 16)), boxes)
    assert torch.equal(masks_to_boxes(torch.zeros(1, 4, 4, dtype=torch.bool)), torch.zeros(1, 4))


def test_box_mask_centers():
    boxes = torch.tensor([[0.5, 2.7, 10.2, 5.1], [0., 0., 32., 16.]])
    # cols 0..10 -> 5, rows 2..5 -> 3.5; second box: cols 0..32 -> 16, rows 0..16 -> 8
    assert torch.equal(box_mask_centers(boxes), torch.tensor([[5.0, 3.5], [16.0, 8.0]]))
    # on a 32 x 32 canvas col 32 does not exist: cols 0..31 -> 15.5 (what the reference's mask gives)
    c = box_mask_centers(boxes, (32, 32))
    assert torch.equal(c, torch.tensor([[5.0, 3.5], [15.5, 8.0]]))
    full = torch.zeros(2, 32, 32)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        full[k, int(y0):int(y1 + 1), int(x0):int(x1 + 1)] = 1
    ys, xs = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing='ij')
    cen = torch.stack([(full * xs).sum((1, 2)), (full * ys).sum((1, 2))], 1) / full.sum((1, 2))[:, None]
    assert torch.allclose(c, cen)


def naive_inclusive_masks(boxes, hp, wp, stride=4):
    full = torch.zeros(boxes.shape[0], hp, wp)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        full[k, int(y0):int(y1 + 1), int(x0):int(x1 + 1)] = 1
    return full[:, stride // 2::stride, stride // 2::stride]


def test_inclusive_masks_hand_case_and_naive():
    # rows 2..9, cols 2..6 of a 16 x 16 canvas; the grid visits 2, 6, 10, 14
    m = box_masks_inclusive(torch.tensor([[2.0, 2.0, 6.5, 9.0]]), (16, 16))
    expected = torch.zeros(1, 4, 4)
    expected[0, :2, :2] = 1
    assert torch.equal(m, expected)
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([64., 32.])
    wh = torch.rand(40, 2, generator=g) * 30
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([64., 32.]))], 1)  # some end on the border
    boxes = torch.cat([boxes, torch.tensor([[0., 0., 64., 32.], [5.9, 6.0, 6.0, 6.1]])])
    assert torch.equal(box_masks_inclusive(boxes, (32, 64)), naive_inclusive_masks(boxes, 32, 64))


def test_box_iou_pairs():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [2, 2, 3, 3]])
    assert torch.allclose(box_iou_pairs(a, b), torch.tensor([1 / 7, 1.0, 0.0]))


def test_the_conventions_differ_by_the_end_pixel():
    """An integer box (1, 1, 3, 3): end-exclusive covers pixels 1..2, end-inclusive 1..3 (the pixel holding x1)."""
    box = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert torch.equal(box_masks_exclusive(box, 5, 5)[0], rect(5, 5, 1, 3, 1, 3))
    assert torch.equal(box_masks_inclusive(box, (5, 5), stride=1)[0].bool(), rect(5, 5, 1, 4, 1, 4))
    assert torch.equal(stride_grid(10, 4, "cpu"), torch.tensor([2, 6]))


def test_decode_boxes():
    loc = torch.tensor([[10.0, 20.0]])
    assert torch.equal(decode_boxes(loc, torch.tensor([[1.0, 2.0, 3.0, 4.0]])), torch.tensor([[9.0, 18.0, 13.0, 24.0]]))


def test_size_groups_cover_every_box_once_within_the_waste():
    g = torch.Generator().manual_seed(0)
    hw = [tuple(int(v) for v in torch.randint(1, 60, (2,), generator=g)) for _ in range(40)] + [(0, 0), (150, 3)]
    for extra, waste in ((0, 2.0), (4, 4.0)):
        groups = size_groups(hw, extra, waste)
        assert sorted(sum(groups, [])) == list(range(len(hw)))
        for grp in groups:
            h, w = (max(hw[k][d] + extra for k in grp) for d in (0, 1))
            need = sum((hw[k][0] + extra) * (hw[k][1] + extra) for k in grp)
            assert len(grp) == 1 or len(grp) * h * w <= waste * need
    assert size_groups([]) == [] and size_groups([(3, 4)] * 5) == [[0, 1, 2, 3, 4]]
