"""refine.py: the steps that refine a given box's mask (box region, flip averaging, colour affinity, the
CRF's mean-field step, the colour prior, maskness) on hand-made inputs; predict.py's flip and mIoU;
bench.py's GrabCut on a two-colour image (skipped without OpenCV)."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

torch.set_num_threads(1)

import predict
import refine
from model import build_model
from test_model import tiny_cfg

RED, BLUE = (220, 30, 30), (30, 30, 220)


def two_colour(h, w, left_cols, left=RED, right=BLUE):
    """uint8 (3, h, w): the first left_cols columns one colour, the rest another."""
    img = torch.empty(3, h, w, dtype=torch.uint8)
    img[:, :, :left_cols] = torch.tensor(left, dtype=torch.uint8)[:, None, None]
    img[:, :, left_cols:] = torch.tensor(right, dtype=torch.uint8)[:, None, None]
    return img


def test_box_region_is_pixel_centres_strictly_inside():
    r = refine.box_region(torch.tensor([[0.4, 0.6, 2.5, 2.4]]), 3, 4)
    # x centres 0.5, 1.5 inside (2.5 is not < 2.5); y centre 1.5 only (0.5 < 0.6, 2.5 > 2.4)
    assert r.tolist() == [[[False] * 4, [True, True, False, False], [False] * 4]]


def test_average_flipped_mirrors_the_second_map_back():
    p = torch.tensor([[[0.2, 0.4, 0.9]]])
    pf = torch.tensor([[[0.1, 0.5, 0.6]]])                  # in the mirrored frame
    assert torch.allclose(refine.average_flipped(p, pf), torch.tensor([[[0.4, 0.45, 0.5]]]))


def test_color_affinity_one_within_a_colour_zero_across_and_off_the_image():
    a = refine.color_affinity(two_colour(3, 4, 2), kernel_size=3, dilation=1)   # (8, 3, 4)
    # neighbour order of unfold_wo_center: (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)
    right = 4                                                                 # offset (0, +1)
    assert a[right, 1, 0] == 1.0                             # red -> red
    assert a[right, 1, 1] < 1e-30                            # red -> blue: Lab distance ~ 170
    assert a[right, 1, 3] == 0.0                             # off the image
    assert (a[:3, 0] == 0).all() and (a[5:, 2] == 0).all()   # rows above the top, below the bottom


def test_crf_one_step_exact_on_a_flat_row():
    """A 1 x 3 image of one colour: each pixel's on-image neighbours have affinity 1, so one step is
    Q_i = sigmoid(logit(P_i) + w * sum_j (2 P_j - 1)) over the left and right neighbours."""
    img = torch.full((3, 1, 3), 100, dtype=torch.uint8)
    p = torch.tensor([[[0.9, 0.3, 0.9]]])
    aff = refine.color_affinity(img, kernel_size=3, dilation=1)
    q = refine.crf_mean_field(p, aff, torch.ones(1, 1, 3, dtype=torch.bool), weight=0.5, iters=1, kernel_size=3,
                              dilation=1)
    sig = lambda x: 1 / (1 + math.exp(-x))
    logit = lambda x: math.log(x / (1 - x))
    want = [sig(logit(0.9) + 0.5 * (2 * 0.3 - 1)), sig(logit(0.3) + 0.5 * 2 * (2 * 0.9 - 1)),
            sig(logit(0.9) + 0.5 * (2 * 0.3 - 1))]
    assert torch.allclose(q[0, 0], torch.tensor(want), atol=1e-6)


def test_crf_fixes_wrong_seed_pixels_and_stops_at_the_colour_edge():
    """Left 3 columns red, right 3 blue; the network says 0.8 on red and 0.2 on blue but is wrong at one
    pixel of each. After the CRF the mask is exactly the red half: the wrong pixels are outvoted by
    their same-colour neighbours, and nothing leaks across the edge (affinity ~ 0 there)."""
    img = two_colour(6, 6, 3)
    p = torch.where(torch.arange(6)[None, :] < 3, 0.8, 0.2).expand(6, 6).clone()
    p[2, 1], p[4, 4] = 0.3, 0.7
    aff = refine.color_affinity(img, kernel_size=3, dilation=1)
    q = refine.crf_mean_field(p[None], aff, torch.ones(1, 6, 6, dtype=torch.bool), weight=1.0, iters=5,
                              kernel_size=3, dilation=1)
    assert ((p > 0.5) != (torch.arange(6)[None, :] < 3)).sum() == 2          # the seed is wrong twice
    assert torch.equal(q[0] > 0.5, (torch.arange(6)[None, :] < 3).expand(6, 6))


def test_crf_outside_the_box_is_background_and_pulls_the_rim_down():
    """Outside the box Q is exactly 0; a neighbour outside the box votes for background, so an in-box
    pixel at the rim ends below its unary probability."""
    img = torch.full((3, 4, 6), 90, dtype=torch.uint8)
    p = torch.full((1, 4, 6), 0.6)
    region = refine.box_region(torch.tensor([[1.0, 0.0, 4.0, 4.0]]), 4, 6)   # columns 1..3
    q = refine.crf_mean_field(p, refine.color_affinity(img, 3, 1), region, weight=1.0, iters=3, kernel_size=3,
                              dilation=1)
    assert (q[0][:, [0, 4, 5]] == 0).all()
    assert (q[0][:, 1] < 0.6).all() and (q[0][:, 1:4] > 0).all()


def test_colour_prior_mixes_the_colour_model_into_the_box():
    """A red square on blue: the network is confident only at the square's centre (0.9) and says 0.5
    elsewhere in the box. The colour model (seeds="network": the confident centre against a ring outside
    the box) says 1
    on red and 0 on blue, so in the box P' = 0.5 P + 0.5 M_C: 0.75 on red, 0.25 on blue, 0.95 at the
    centre; outside the box P is kept."""
    img = two_colour(14, 14, 0, left=RED, right=BLUE)
    img[:, 4:10, 4:10] = torch.tensor(RED, dtype=torch.uint8)[:, None, None]
    region = refine.box_region(torch.tensor([[3.0, 3.0, 11.0, 11.0]]), 14, 14)      # rows/cols 3..10
    p = torch.full((1, 14, 14), 0.5)
    p[0, 6:8, 6:8] = 0.9
    out = refine.colour_prior(img, p, region, weight=0.5, seeds="network")
    red = torch.zeros(14, 14, dtype=torch.bool)
    red[4:10, 4:10] = True
    want = torch.where(red, 0.75, 0.25)
    want[6:8, 6:8] = 0.95
    want = torch.where(region[0], want, p[0])
    assert torch.allclose(out[0], want, atol=1e-6)


def test_colour_prior_box_seeds_find_the_object_the_network_is_unsure_of():
    """The same scene with the network unsure everywhere (0.5, no confident pixel): seeds="network" has
    no object colour, so M_C = 0.5 and P is kept; seeds="box" takes the box's colours the ring lacks
    (red) as the object's: 0.15 + 0.7 = 0.85 on red, 0.15 on blue (weight 0.7)."""
    img = two_colour(14, 14, 0, left=RED, right=BLUE)
    img[:, 4:10, 4:10] = torch.tensor(RED, dtype=torch.uint8)[:, None, None]
    region = refine.box_region(torch.tensor([[3.0, 3.0, 11.0, 11.0]]), 14, 14)
    p = torch.full((1, 14, 14), 0.5)
    assert torch.equal(refine.colour_prior(img, p, region, weight=0.7, seeds="network"), p)
    red = torch.zeros(14, 14, dtype=torch.bool)
    red[4:10, 4:10] = True
    want = torch.where(region[0], torch.where(red, 0.85, 0.15), 0.5)
    assert torch.allclose(refine.colour_prior(img, p, region, weight=0.7, seeds="box")[0], want, atol=1e-6)


def test_maskness_mean_confidence_of_the_kept_pixels():
    p = torch.tensor([[[0.9, 0.7, 0.2]], [[0.1, 0.3, 0.5]]])
    assert torch.allclose(refine.maskness(p), torch.tensor([0.8, 0.0]))


def test_refine_box_probs_zero_outside_every_box():
    img = two_colour(8, 8, 4)
    p = torch.full((2, 8, 8), 0.9)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 3.0, 8.0, 8.0]])
    out = refine.refine_box_probs(img, p, boxes)
    assert ((out > 0) == refine.box_region(boxes, 8, 8)).all()


def test_flip_batch_mirrors_each_image_inside_its_own_width():
    batch = torch.zeros(2, 3, 4, 6, dtype=torch.uint8)
    batch[0, :, :4, :6] = torch.arange(6, dtype=torch.uint8)
    batch[1, :, :3, :4] = torch.arange(4, dtype=torch.uint8)           # a smaller image, padded right/bottom
    targets = [dict(size=(4, 6), boxes=torch.tensor([[1.0, 0.0, 2.0, 1.0]])),
               dict(size=(3, 4), boxes=torch.tensor([[0.0, 1.0, 1.5, 3.0]]))]
    fb, ft = predict.flip_batch(batch, targets)
    assert fb[0, 0, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert fb[1, 0, 0].tolist() == [3, 2, 1, 0, 0, 0] and (fb[1, :, 3] == 0).all()
    assert ft[0]["boxes"].tolist() == [[4.0, 0.0, 5.0, 1.0]] and ft[1]["boxes"].tolist() == [[2.5, 1.0, 4.0, 3.0]]
    assert torch.equal(predict.flip_batch(fb, ft)[0], batch)


def test_flip_averaged_mask_of_a_mirror_symmetric_image_is_symmetric():
    """A left-right symmetric image with one box centred on its axis: the flip-averaged mask is exactly
    mirror-symmetric (the network alone is not: its strided grid is not)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    g = torch.Generator().manual_seed(1)
    half = torch.randint(0, 256, (3, 64, 32), generator=g, dtype=torch.uint8)
    img = torch.cat([half, half.flip(-1)], -1)
    t = dict(boxes=torch.tensor([[12.0, 10.0, 52.0, 50.0]]), labels=torch.tensor([1]), size=(64, 64),
             orig_size=(64, 64))
    batch = torch.stack([img, img])  # (a batch of one 64-px image has a 1 x 1 P7, which GroupNorm refuses)
    sym = lambda m: torch.equal(m, m.flip(-1))
    plain = predict.box_conditioned_masks(model, batch, [t, t])[0]["probs"][0]
    flip = predict.box_conditioned_masks(model, batch, [t, t], switches=dict(predict.RAW, box_flip=True))[0]["probs"][0]
    assert sym(flip) and not sym(plain) and (flip[10:50, 12:52] > 0).all()


def test_box_mask_ious_exact_on_hand_made_masks():
    """Two annotations of a 4 x 4 image: the first predicted as its GT's left half (IoU 1/2), the second
    exactly (IoU 1); a third without a GT mask is left out."""
    gt = np.zeros((4, 4), np.uint8, order="F")
    gt[0:2, 0:4] = 1
    rle = lambda m: dict((k, v.decode() if k == "counts" else v) for k, v in mask_util.encode(np.asfortranarray(m)).items())
    ds = dict(images=[dict(id=1, height=4, width=4, file_name="a.png")], categories=[dict(id=1, name="x")],
              annotations=[dict(id=1, image_id=1, category_id=1, iscrowd=0, area=8, bbox=[0, 0, 4, 2], segmentation=rle(gt)),
                           dict(id=2, image_id=1, category_id=1, iscrowd=0, area=4, bbox=[0, 2, 2, 2],
                                segmentation=[[0, 2, 2, 2, 2, 4, 0, 4]]),
                           dict(id=3, image_id=1, category_id=1, iscrowd=0, area=4, bbox=[2, 2, 2, 2])])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ds
        coco.createIndex()
    half = gt.copy(order="F")
    half[:, 2:] = 0
    sq = np.zeros((4, 4), np.uint8, order="F")
    sq[2:4, 0:2] = 1
    ious = predict.box_mask_ious(coco, {1: rle(half), 2: rle(sq), 3: rle(sq)})
    assert ious == {1: 0.5, 2: 1.0}


def test_grabcut_separates_two_colours():
    """bench.grabcut_mask on a red square in a blue image, its box a bit larger than the square: the
    square exactly (skipped without OpenCV)."""
    pytest.importorskip("cv2", reason="bench.py --compare=grabcut needs opencv-python-headless")
    import bench
    img = np.zeros((40, 40, 3), np.uint8)
    img[:] = BLUE
    img[12:28, 10:30] = RED
    m = bench.grabcut_mask(img, np.array([8.0, 10.0, 32.0, 30.0]))
    want = np.zeros((40, 40), bool)
    want[12:28, 10:30] = True
    assert (m == want).all()
