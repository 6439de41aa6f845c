"""Tests for losses.py: hand-computed values on tiny inputs, invariants, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import losses as L
from box_ops import box_mask_centers

STRIDES = (8, 16, 32, 64, 128)


def sig(x):
    return 1 / (1 + math.exp(-x))

# -----------------------------------------------------------------------------
# FCOS target assignment


def grid_locations(img=128, levels=(0, 1)):
    """Level-major, row-major locations (x, y) = (j*s + s//2, i*s + s//2) of a img x img canvas."""
    locs, lv = [], []
    for l in levels:
        s = STRIDES[l]
        n = img // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')
        locs.append(torch.stack([xs.flatten() * s + s // 2, ys.flatten() * s + s // 2], 1).float())
        lv.append(torch.full((n * n,), l, dtype=torch.long))
    return torch.cat(locs), torch.cat(lv)


def loc_index(locs, lv, level, x, y):
    hit = (lv == level) & (locs[:, 0] == x) & (locs[:, 1] == y)
    assert hit.sum() == 1
    return int(hit.nonzero()[0, 0])


def scene():
    # image 0: A (area 1600) and B (area 1024) overlap; image 1: no GT; image 2: E and D of equal
    # area (1024) overlap (tie -> first); image 3: G, max distance exactly 64 at P3 location
    # (60, 60); image 4: H, max distance exactly 64 at P4 location (40, 40)
    boxes = [torch.tensor([[0., 0., 40., 40.], [16., 16., 48., 48.]]),
             torch.zeros(0, 4),
             torch.tensor([[16., 16., 48., 48.], [8., 8., 40., 40.]]),
             torch.tensor([[0., 0., 124., 124.]]),
             torch.tensor([[0., 0., 104., 104.]])]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([0, 3]),
              torch.tensor([4]), torch.tensor([5])]
    return boxes, labels


def test_fcos_targets_hand_scene():
    locs, lv = grid_locations()
    boxes, labels = scene()
    C = 6
    t = L.fcos_targets(locs, lv, STRIDES, boxes, labels, num_classes=C)
    assert t['labels'].shape == (5, locs.shape[0]) and t['reg_targets'].shape == (5, locs.shape[0], 4)
    lab, reg, inds = t['labels'], t['reg_targets'], t['gt_inds']
    i = lambda level, x, y: loc_index(locs, lv, level, x, y)

    # image 0. A's centre region is (8, 32) strictly: P3 x in {12, 20, 28}; B's is (20, 44): {28, 36}
    assert lab[0, i(0, 20, 20)] == 1 and inds[0, i(0, 20, 20)] == 0  # (20, 20) on B's sub-box edge: A only
    assert torch.equal(reg[0, i(0, 20, 20)], torch.tensor([2.5, 2.5, 2.5, 2.5]))  # 20 px / 8
    assert torch.equal(reg[0, i(0, 12, 12)], torch.tensor([1.5, 1.5, 3.5, 3.5]))  # (12, 12, 28, 28) / 8
    assert lab[0, i(0, 28, 28)] == 2 and inds[0, i(0, 28, 28)] == 1  # both qualify, B is smaller
    assert torch.equal(reg[0, i(0, 28, 28)], torch.tensor([1.5, 1.5, 2.5, 2.5]))  # w.r.t. B
    assert lab[0, i(0, 36, 36)] == 2
    assert torch.equal(reg[0, i(0, 36, 36)], torch.tensor([2.5, 2.5, 1.5, 1.5]))
    assert lab[0, i(0, 4, 4)] == C and inds[0, i(0, 4, 4)] == -1  # inside A, outside its centre region
    assert torch.equal(reg[0, i(0, 4, 4)], torch.zeros(4))
    # A's 3x3 and B's 2x2 P3 grid points, (28, 28) shared; none at P4 (max distance < 64)
    assert (lab[0] != C).sum() == 9 + 4 - 1
    # image 1 has no GT: all background
    assert (lab[1] == C).all() and (inds[1] == -1).all()
    # image 2: equal areas at (28, 28) -> the first box, E; global indices continue after image 0
    assert lab[2, i(0, 28, 28)] == 0 and inds[2, i(0, 28, 28)] == 2
    assert lab[2, i(0, 20, 20)] == 3 and inds[2, i(0, 20, 20)] == 3  # D only
    # image 3: G's centre region (50, 74); at (60, 60) max(l,t,r,b) = 64 = P3's upper end (kept),
    # at (68, 68) it is 68 > 64 (P3 rejects it, although it is in the centre region)
    assert lab[3, i(0, 60, 60)] == 4 and inds[3, i(0, 60, 60)] == 4
    assert torch.equal(reg[3, i(0, 60, 60)], torch.tensor([7.5, 7.5, 8.0, 8.0]))
    assert lab[3, i(0, 68, 68)] == C
    # at P4, G's centre region is (38, 86) and (56, 56) has max 68 in [64, 128]: a P4 positive
    assert lab[3, i(1, 56, 56)] == 4
    assert torch.equal(reg[3, i(1, 56, 56)], torch.tensor([3.5, 3.5, 4.25, 4.25]))
    # image 4: H at P4 (40, 40): max = 64 = P4's lower end (kept), in stride-16 units
    assert lab[4, i(1, 40, 40)] == 5 and inds[4, i(1, 40, 40)] == 5
    assert torch.equal(reg[4, i(1, 40, 40)], torch.tensor([2.5, 2.5, 4.0, 4.0]))


def naive_fcos_targets(locs, lv, boxes, labels, centers, C, soi=(64, 128, 256, 512), radius=1.5):
    """Loop-per-location re-statement of the spec, to check the vectorised version."""
    bounds = [-1] + list(soi) + [1e8]
    out_lab, out_reg, out_ind, offset = [], [], [], 0
    for b, lab_b, c_b in zip(boxes, labels, centers):
        lab_im, reg_im, ind_im = [], [], []
        for (x, y), l in zip(locs.tolist(), lv.tolist()):
            s = STRIDES[l]
            best, best_area = -1, float('inf')
            for g, (x0, y0, x1, y1) in enumerate(b.tolist()):
                cx, cy = c_b[g].tolist()
                sx0, sy0 = max(cx - radius * s, x0), max(cy - radius * s, y0)
                sx1, sy1 = min(cx + radius * s, x1), min(cy + radius * s, y1)
                inside = min(x - sx0, y - sy0, sx1 - x, sy1 - y) > 0
                m = max(x - x0, y - y0, x1 - x, y1 - y)
                area = (x1 - x0) * (y1 - y0)
                if inside and bounds[l] <= m <= bounds[l + 1] and area < best_area:
                    best, best_area = g, area
            if best < 0:
                lab_im.append(C), reg_im.append([0.0] * 4), ind_im.append(-1)
            else:
                x0, y0, x1, y1 = b[best].tolist()
                lab_im.append(int(lab_b[best]))
                reg_im.append([(x - x0) / s, (y - y0) / s, (x1 - x) / s, (y1 - y) / s])
                ind_im.append(offset + best)
        offset += b.shape[0]
        out_lab.append(lab_im), out_reg.append(reg_im), out_ind.append(ind_im)
    return torch.tensor(out_lab), torch.tensor(out_reg), torch.tensor(out_ind)


def test_fcos_targets_matches_naive_on_random_scenes():
    g = torch.Generator().manual_seed(0)
    locs, lv = grid_locations(img=256, levels=(0, 1, 2, 3, 4))
    for _ in range(3):
        boxes, labels = [], []
        for n in (3, 0, 6):
            xy = torch.rand(n, 2, generator=g) * 200
            wh = torch.rand(n, 2, generator=g) * 250 + 4
            boxes.append(torch.cat([xy, (xy + wh).clamp(max=256)], 1).floor())  # integer coords: ties happen
            labels.append(torch.randint(0, 4, (n,), generator=g))
        centers = [box_mask_centers(b, (256, 256)) for b in boxes]
        t = L.fcos_targets(locs, lv, STRIDES, boxes, labels, 4, gt_centers=centers)
        lab, reg, ind = naive_fcos_targets(locs, lv, boxes, labels, centers, 4)
        assert (lab != 4).sum() > 10
        assert torch.equal(t['labels'], lab) and torch.equal(t['gt_inds'], ind)
        assert torch.allclose(t['reg_targets'], reg, atol=1e-5)


def test_fcos_targets_uses_given_centers_and_empty_batch():
    locs, lv = grid_locations()
    box = [torch.tensor([[0., 0., 40., 40.]])]
    t = L.fcos_targets(locs, lv, STRIDES, box, [torch.tensor([0])], 2, gt_centers=[torch.tensor([[30., 30.]])])
    i = lambda x, y: loc_index(locs, lv, 0, x, y)
    # centre region (18, 40): (20, 20), (28, 28), (36, 36) positive, (12, 12) no longer
    assert t['labels'][0, i(36, 36)] == 0 and t['labels'][0, i(12, 12)] == 2
    t = L.fcos_targets(locs, lv, STRIDES, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 2)
    assert (t['labels'] == 2).all() and (t['gt_inds'] == -1).all() and (t['reg_targets'] == 0).all()

# -----------------------------------------------------------------------------
# FCOS losses


def test_sigmoid_focal_loss_hand_value():
    # logit 0, target 1: p_t = 0.5 -> 0.25 * 0.5^2 * ln 2
    # logit 2, target 0: p_t = 1 - s(2) -> 0.75 * s(2)^2 * softplus(2)
    s2 = sig(2.0)
    expected = 0.25 * 0.25 * math.log(2) + 0.75 * s2 ** 2 * math.log(1 + math.exp(2))
    got = L.sigmoid_focal_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(1.280880, abs=1e-6)


def test_giou_loss_hand_values():
    pred = torch.tensor([[1., 1., 1., 1.], [0., 0., 2., 2.], [1., 1., 1., 1.]])
    target = torch.tensor([[1., 1., 1., 1.], [2., 2., 0., 0.], [2., 2., 2., 2.]])
    # identical: IoU = (4+1)/(4+1) = 1, C = U -> loss 0
    # no overlap: I = 0, U = 8, IoU = 1/9, C = 16 -> GIoU = 1/9 - 8/16
    # nested: I = 4, U = 16, IoU = 5/17, C = U -> loss 12/17
    expected = torch.tensor([0.0, 1 - (1 / 9 - 0.5), 12 / 17])
    assert torch.allclose(L.giou_loss(pred, target), expected, atol=1e-6)


def test_centerness_target():
    t = torch.tensor([[1., 2., 3., 4.], [2., 2., 2., 2.], [4., 1., 1., 1.]])
    expected = torch.tensor([math.sqrt(1 / 3 * 2 / 4), 1.0, math.sqrt(1 / 4)])
    assert torch.allclose(L.centerness_target(t), expected)


def test_fcos_losses_normalisers():
    C = 2
    labels = torch.tensor([[0, 2, 1, 2]])  # two positives
    reg_t = torch.tensor([[[1., 2., 3., 4.], [0., 0., 0., 0.], [2., 2., 2., 2.], [0., 0., 0., 0.]]])
    cls = torch.tensor([[[0.5, -1.], [0., 0.], [-2., 1.], [3., -3.]]], requires_grad=True)
    reg = torch.tensor([[[1., 1., 1., 1.], [0., 0., 0., 0.], [2., 3., 2., 1.], [1., 0., 0., 1.]]], requires_grad=True)
    ctr = torch.tensor([[0.3, -0.2, 1.0, 2.0]], requires_grad=True)
    out = L.fcos_losses(cls, reg, ctr, {'labels': labels, 'reg_targets': reg_t, 'gt_inds': None})

    onehot = torch.tensor([[1., 0.], [0., 0.], [0., 1.], [0., 0.]])
    c = torch.tensor([math.sqrt(1 / 3 * 2 / 4), 1.0])
    g = L.giou_loss(reg[0, [0, 2]], reg_t[0, [0, 2]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(ctr[0, [0, 2]], c, reduction='none')
    assert out['loss_fcos_cls'].item() == pytest.approx(L.sigmoid_focal_loss(cls[0], onehot).item() / 2, rel=1e-6)
    assert out['loss_fcos_loc'].item() == pytest.approx(((g * c).sum() / c.sum()).item(), rel=1e-6)
    assert out['loss_fcos_ctr'].item() == pytest.approx(bce.sum().item() / 2, rel=1e-6)
    sum(out.values()).backward()
    assert reg.grad[0, [1, 3]].abs().sum() == 0 and reg.grad[0, [0, 2]].abs().sum() > 0
    assert ctr.grad[0, [1, 3]].abs().sum() == 0


def test_fcos_losses_image_weights_leave_an_image_out():
    g = torch.Generator().manual_seed(0)
    C = 3
    labels = torch.tensor([[0, 3, 1, 3], [2, 2, 3, 3]])  # image 1 has two positives of its own
    reg_t = torch.rand(2, 4, 4, generator=g) + 0.5
    cls, reg, ctr = torch.randn(2, 4, C, generator=g), torch.rand(2, 4, 4, generator=g) + 0.5, torch.randn(2, 4, generator=g)
    t = {'labels': labels, 'reg_targets': reg_t, 'gt_inds': None}
    both = L.fcos_losses(cls, reg, ctr, t, torch.tensor([1.0, 0.0]))
    alone = L.fcos_losses(cls[:1], reg[:1], ctr[:1], {'labels': labels[:1], 'reg_targets': reg_t[:1], 'gt_inds': None})
    for k in alone:  # weight 0: image 1 leaves the sums and the normalisers
        assert both[k].item() == pytest.approx(alone[k].item(), rel=1e-6), k
    ones = L.fcos_losses(cls, reg, ctr, t, torch.ones(2))
    plain = L.fcos_losses(cls, reg, ctr, t)
    assert all(ones[k].item() == pytest.approx(plain[k].item(), rel=1e-6) for k in plain)


def test_fcos_losses_without_positives():
    cls = torch.zeros(1, 3, 2, requires_grad=True)
    reg = torch.zeros(1, 3, 4, requires_grad=True)  # all-zero predictions: a NaN trap for GIoU
    ctr = torch.zeros(1, 3, requires_grad=True)
    t = {'labels': torch.full((1, 3), 2), 'reg_targets': torch.zeros(1, 3, 4), 'gt_inds': torch.full((1, 3), -1)}
    out = L.fcos_losses(cls, reg, ctr, t)
    assert out['loss_fcos_loc'].item() == 0 and out['loss_fcos_ctr'].item() == 0
    # num_pos clamps to 1: cls loss = plain focal sum, 6 logits at 0 with target 0: 0.75 * 0.25 * ln 2
    assert out['loss_fcos_cls'].item() == pytest.approx(6 * 0.75 * 0.25 * math.log(2), rel=1e-6)
    assert out['loss_fcos_loc'].requires_grad and out['loss_fcos_ctr'].requires_grad
    sum(out.values()).backward()
    assert torch.isfinite(reg.grad).all() and (reg.grad == 0).all() and (ctr.grad == 0).all()


def test_reduce_mean_is_identity_and_detached_without_ddp():
    x = torch.tensor(3.0, requires_grad=True)
    y = L.reduce_mean(x)
    assert y.item() == 3.0 and not y.requires_grad

# -----------------------------------------------------------------------------
# BoxInst


def test_dice_loss():
    x = torch.tensor([[1., 0., 1., 0.], [1., 1., 0., 0.]])
    y = torch.tensor([[1., 1., 0., 0.], [1., 1., 0., 0.]])
    # sum xy = 1, sum x^2 = sum y^2 = 2 -> 1 - 2/4; identical -> 1 - 4/4 = 0 (up to eps)
    expected = torch.tensor([1 - 2 / (4 + 1e-5), 1 - 4 / (4 + 1e-5)])
    assert torch.allclose(L.dice_loss(x, y), expected)


def test_image_valid_masks_bottom_trick():
    sizes, origs = [(20, 12), (20, 32), (30, 8)], [(40, 24), (20, 32), (70, 20)]
    m = L.image_valid_masks(sizes, origs, (32, 32))
    assert m.shape == (3, 8, 8)
    # 1) 10*20/40 = 5 rows removed: rows < 15 -> grid rows 2, 6, 10, 14; cols < 12 -> 2, 6, 10
    # 2) 10 rows removed: rows < 10 -> 2, 6; all 8 cols
    # 3) int(10*30/70) = int(4.29) = 4 removed: rows < 26 -> 2..22 (6 rows); cols < 8 -> 2, 6
    for k, (nr, nc) in enumerate([(4, 3), (2, 8), (6, 2)]):
        expected = torch.zeros(8, 8)
        expected[:nr, :nc] = 1
        assert torch.equal(m[k], expected)


def test_projection_loss():
    box = torch.zeros(2, 1, 4, 4)
    box[0, 0, 1:3, 0:2] = 1  # a 2x2 box
    box[1] = 1  # the whole map
    perfect = (box * 2 - 1) * 30
    assert L.projection_loss(perfect, box).item() < 1e-5
    # p = 0.5 everywhere. Instance 0: each profile has two 1s among four -> 1 - 2*1/(4*0.25 + 2) = 1/3,
    # twice -> 2/3. Instance 1: profiles all 1 -> 1 - 2*2/(1 + 4) = 0.2, twice -> 0.4. Mean 8/15.
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    loss = L.projection_loss(logits, box)
    assert loss.item() == pytest.approx(8 / 15, abs=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    empty = torch.zeros(0, 1, 4, 4, requires_grad=True)
    z = L.projection_loss(empty, torch.zeros(0, 1, 4, 4))
    assert z.item() == 0 and z.requires_grad


def test_rgb_to_lab_known_values():
    rgb = torch.tensor([[255., 255., 255.], [0., 0., 0.], [255., 0., 0.], [10., 10., 10.]]).T.reshape(1, 3, 2, 2)
    lab = L.rgb_to_lab(rgb).reshape(3, 4).T
    assert torch.allclose(lab[0], torch.tensor([100., 0., 0.]), atol=1e-2)  # white
    assert torch.allclose(lab[1], torch.tensor([0., 0., 0.]), atol=1e-4)  # black
    assert torch.allclose(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=1e-2)  # red
    # (10, 10, 10) is below both knees: Y = (10/255)/12.92, L = 116 (7.787 Y + 16/116) - 16
    y = 10 / 255 / 12.92
    assert lab[3, 0].item() == pytest.approx(116 * (7.787 * y + 16 / 116) - 16, rel=1e-5)


def test_unfold_wo_center_order_and_padding():
    x = torch.arange(25.).reshape(1, 1, 5, 5)
    u = L.unfold_wo_center(x, 3, 2)
    assert u.shape == (1, 1, 8, 5, 5)
    # at (2, 2) the neighbours are (0,0) (0,2) (0,4) (2,0) (2,4) (4,0) (4,2) (4,4), row-major
    assert u[0, 0, :, 2, 2].tolist() == [0., 2., 4., 10., 14., 20., 22., 24.]
    assert u[0, 0, :, 0, 0].tolist() == [0., 0., 0., 0., 2., 0., 10., 12.]  # zero padding


def test_color_similarity_two_colours():
    c1, c2 = (100, 100, 100), (104, 100, 96)
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[0, :, :, :8] = torch.tensor(c1, dtype=torch.uint8)[:, None, None]
    img[0, :, :, 8:] = torch.tensor(c2, dtype=torch.uint8)[:, None, None]
    img[0, 0, ::4, ::4] = 110  # one brighter red pixel per c1 block: 100.625 ... truncated back to 100
    img[0, 0, ::4, 8::4] = 105  # and per c2 block: 104.0625 -> 104
    valid = torch.ones(1, 4, 4)
    valid[0, :, 3] = 0  # last stride-4 column is padding
    S = L.color_similarity(img, valid)
    assert S.shape == (1, 8, 4, 4)
    lab = L.rgb_to_lab(torch.tensor([c1, c2], dtype=torch.float).T.reshape(1, 3, 1, 2))[0, :, 0]
    s12 = math.exp(-(lab[:, 0] - lab[:, 1]).norm().item() / 2)
    assert 0.1 < s12 < 0.9
    # neighbours: 0 (-2,-2) 1 (-2,0) 2 (-2,+2) 3 (0,-2) 4 (0,+2) 5 (+2,-2) 6 (+2,0) 7 (+2,+2)
    assert S[0, :, 0, 0].tolist() == pytest.approx([0, 0, 0, 0, s12, 0, 1, s12], abs=1e-6)
    assert S[0, :, 0, 1].tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 1, 0], abs=1e-6)  # (0,3) is padding
    assert S[0, :, 2, 2].tolist() == pytest.approx([s12, 1, 0, s12, 0, 0, 0, 0], abs=1e-6)
    # a padding pixel keeps its own similarities: only the neighbour's validity counts
    assert S[0, 3, 0, 3].item() == pytest.approx(s12, abs=1e-6)


def test_pairwise_loss_hand_case_and_gradient():
    # W = 3, dilation 2: pixel 0's only in-image neighbour is pixel 2 (slot 4), and pixel 2's is
    # pixel 0 (slot 3)
    logits = torch.tensor([[math.log(4), 0.0, -math.log(3)], [0.0, 0.0, math.log(4)], [0.0, 0.0, 0.0]]).reshape(3, 1, 1, 3)
    logits.requires_grad_(True)
    S = torch.zeros(3, 8, 1, 3)
    S[0, 4, 0, 0] = 0.5  # p = 0.8, 0.25: P(same) = 0.2 + 0.15 = 0.35
    S[0, 3, 0, 2] = 0.9  # pixel 2 is outside instance 0's box: ignored
    S[0, 4, 0, 1] = 0.29  # below the threshold: not even in the normaliser
    S[1, 4, 0, 0] = 0.3  # == threshold counts; p = 0.5, 0.8: P(same) = 0.5
    S[1, 3, 0, 2] = 0.6
    S[2, 4, 0, 0] = 0.9  # centre pixel 0 outside the box, neighbour 2 inside: ignored (box at the centre only)
    S[2, 3, 0, 2] = 0.1  # the reverse pair is below the threshold
    box = torch.tensor([[1., 1., 0.], [1., 1., 1.], [0., 0., 1.]]).reshape(3, 1, 1, 3)
    loss = L.pairwise_loss(logits, S, box)
    # global normalisation: (l_0 + l_1 + l_1') / 3, not the mean of per-instance means
    expected = (-math.log(0.35) + 2 * math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 0, 0] != 0 and logits.grad[0, 0, 0, 2] != 0 and logits.grad[0, 0, 0, 1] == 0
    # nothing weighted: normaliser clamps at 1, loss 0
    assert L.pairwise_loss(logits, torch.zeros_like(S), box).item() == 0


def test_pairwise_loss_on_box_windows_equals_the_whole_map_formula():
    """The windowed computation = the reference's whole-map -logsumexp formula, value and gradient,
    for boxes at the borders, an empty box mask and a non-rectangular mask."""
    g = torch.Generator().manual_seed(0)
    N, H, W = 5, 13, 17
    logits = (3 * torch.randn(N, 1, H, W, generator=g)).requires_grad_(True)
    S = torch.rand(N, 8, H, W, generator=g) * L.unfold_wo_center(torch.ones(1, 1, H, W))[:, 0]  # 0 off the map, as color_similarity
    box = torch.zeros(N, 1, H, W)
    box[0, :, 2:6, 3:11] = 1
    box[1, :, 0:13, 0:4] = 1    # touches three borders
    box[2, :, 9:13, 12:17] = 1  # bottom-right corner
    box[4, :, 4:9, 5:8] = 1
    box[4, :, 6, 9] = 1         # not a rectangle: its bounding rectangle is windowed
    # box 3: empty (a box between grid points)
    got = L.pairwise_loss(logits, S, box)
    (g_got,) = torch.autograd.grad(got, logits)
    # per-image S with im_inds: the same
    assert L.pairwise_loss(logits, S[[0, 1, 2, 3, 4]].flip(0), box, im_inds=torch.arange(N).flip(0)).item() == got.item()
    lf, lb = F.logsigmoid(logits), F.logsigmoid(-logits)
    l = -torch.logaddexp(lf[:, :, None] + L.unfold_wo_center(lf), lb[:, :, None] + L.unfold_wo_center(lb))[:, 0]
    w = (S >= 0.3).float() * box
    want = (l * w).sum() / w.sum()
    (g_want,) = torch.autograd.grad(want, logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(g_got, g_want, atol=1e-7)


def test_pairwise_warmup():
    assert L.pairwise_warmup(1) == 1e-4
    assert L.pairwise_warmup(5000) == 0.5
    assert L.pairwise_warmup(10000) == 1.0 and L.pairwise_warmup(20000) == 1.0

# -----------------------------------------------------------------------------
# SIM


def test_weighted_bce_dice_hand_value_ignores_weight_zero():
    logits = torch.tensor([[0.0, math.log(3), -math.log(3), 5.0]])
    target = torch.tensor([[1., 1., 0., 0.]])
    weight = torch.tensor([[1., 1., 1., 0.]])
    # BCE over 3 pixels: (ln 2 + ln(4/3) + ln(4/3)) / 3; dice: x = (0.5, 0.75, 0.25, 0), y = (1, 1, 0, 0)
    bce = (math.log(2) + 2 * math.log(4 / 3)) / 3
    dice = 1 - 2 * 1.25 / (0.875 + 2 + 1e-5)
    got = L.weighted_bce_dice(logits, target, weight)
    assert got.shape == (1,) and got.item() == pytest.approx(bce + dice, rel=1e-6)
    # changing the ignored pixel changes nothing
    got2 = L.weighted_bce_dice(torch.tensor([[0.0, math.log(3), -math.log(3), -7.0]]), torch.tensor([[1., 1., 0., 1.]]), weight)
    assert got2.item() == pytest.approx(got.item(), rel=1e-7)


def test_pseudo_mask_loss_eq8_mean_over_positives():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 4, generator=g, requires_grad=True)
    target = (torch.rand(3, 4, 4, generator=g) > 0.5).float()
    weight = (torch.rand(3, 4, 4, generator=g) > 0.3).float()
    loss = L.pseudo_mask_loss(logits, target, weight)
    per = [L.weighted_bce_dice(logits[k:k + 1], target[k:k + 1], weight[k:k + 1]).item() for k in range(3)]
    assert loss.item() == pytest.approx(sum(per) / 3, rel=1e-6)
    loss.backward()
    assert (logits.grad[weight == 0] == 0).all() and logits.grad.abs().sum() > 0
    empty = torch.zeros(0, 4, 4, requires_grad=True)
    z = L.pseudo_mask_loss(empty, empty.detach(), empty.detach())
    assert z.item() == 0 and z.requires_grad


def test_paste_loss_only_pasted_positives():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1, 4, 4, generator=g, requires_grad=True)
    masks = (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float()
    per = L.weighted_bce_dice(logits, masks, torch.ones_like(masks))
    loss = L.paste_loss(logits, masks, torch.tensor([True, False, True]))
    assert loss.item() == pytest.approx((per[0] + per[2]).item() / 2, rel=1e-6)
    loss.backward()
    assert (logits.grad[1] == 0).all() and logits.grad[0].abs().sum() > 0
    z = L.paste_loss(logits, masks, torch.tensor([False, False, False]))
    assert z.item() == 0 and z.requires_grad


def test_total_loss_eq10_weights():
    one = lambda: torch.tensor(1.0, requires_grad=True)
    keys = ['loss_fcos_cls', 'loss_fcos_loc', 'loss_fcos_ctr', 'loss_prj', 'loss_pairwise', 'loss_pseudo', 'loss_paste']
    d = {k: one() for k in keys}
    # fcos 3 + prj 1 + w_pair * 1; SIM terms off through iteration 10000
    for it, expected in [(1, 4.0001), (5000, 4.5), (10000, 5.0), (10001, 5.0 + 0.5 + 1.0)]:
        total, logs = L.total_loss(d, it)
        assert total.item() == pytest.approx(expected, rel=1e-6)
    total, logs = L.total_loss(d, 5000)
    assert logs['loss_pairwise'].item() == 0.5 and logs['loss_pseudo'].item() == 0 and not logs['loss_prj'].requires_grad
    total, logs = L.total_loss({k: torch.tensor(2.0) for k in keys}, 20000, lambda1=0.25, lambda2=0.5)
    assert total.item() == pytest.approx(2 * (5 + 0.25 + 0.5)) and logs['loss_pseudo'].item() == 0.5
    # BoxInst (no SIM keys) and full supervision (loss_mask) through the same function
    boxinst = {k: torch.tensor(1.0) for k in keys[:5]}
    assert L.total_loss(boxinst, 20000)[0].item() == 5.0
    full = {k: torch.tensor(1.0) for k in keys[:3] + ['loss_mask']}
    assert L.total_loss(full, 1)[0].item() == 4.0
    with pytest.raises(KeyError):
        L.total_loss({'loss_pairwse': torch.tensor(1.0)}, 1)


def test_pseudo_loss_weight_ramp():
    assert L.pseudo_loss_weight(700, 0.5, 700, 300) == 0.0                 # not yet on
    assert L.pseudo_loss_weight(701, 0.5, 700, 0) == 0.5                   # the paper: a step
    assert L.pseudo_loss_weight(850, 0.5, 700, 300) == pytest.approx(0.25)  # halfway up the ramp
    assert L.pseudo_loss_weight(5000, 0.5, 700, 300) == 0.5
    # the official ramp from iteration 0: 0.3 * 10001 / 270000 at its first iteration
    assert L.pseudo_loss_weight(10001, 0.3, 10000, 270000, 0) == pytest.approx(0.3 * 10001 / 270000)
    total, logs = L.total_loss({'loss_pseudo': torch.tensor(2.0)}, 850, 0.5, 1.0, 700, 10, 300)
    assert total.item() == pytest.approx(0.5)


def test_official_focal_loss_hand_value():
    # docs/official_code.md §6.3: p = (0.9, 0.2), t = (1, 0), W = 1 -> 0.00827 (the probability fed as a logit)
    p = torch.tensor([[0.9, 0.2]])
    logits = torch.log(p / (1 - p))
    fq = L.official_focal_loss(logits, torch.tensor([[1.0, 0.0]]), torch.ones(1, 2))
    by_hand = (0.25 * 0.1 ** 2 * F.softplus(torch.tensor(-0.9)) + 0.75 * 0.2 ** 2 * F.softplus(torch.tensor(0.2))) / 3
    assert fq.item() == pytest.approx(by_hand.item(), rel=1e-5) and fq.item() == pytest.approx(0.00827, abs=1e-5)
    # the official paste loss: dice averaged over ALL positives (a non-pasted one adds 1, no gradient)
    m = torch.tensor([[4.0, -4.0], [0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = L.official_paste_loss(m, t, torch.tensor([True, False]))
    fq_only = L.official_focal_loss(m, t, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    d = L.dice_loss(torch.sigmoid(m[:1]), t[:1])
    assert loss.item() == pytest.approx(fq_only.item() + (d.item() + 1.0) / 2, rel=1e-5)
    loss.backward()
    assert (m.grad[1] == 0).all()
