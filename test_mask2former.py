"""Tests of mask2former.py: deformable attention against a hand-written bilinear loop, the reference's
initialisation and positional encoding, masked attention's masking, the projection cost by hand, the
Hungarian matcher against brute force, the network's shapes and predict's format, and a tiny model
that overfits two one-square images with a box-only loss."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import losses
from box_ops import box_iou_pairs, box_masks_inclusive, masks_to_boxes
from mask2former import (MSDeformAttn, Mask2Former, MaskedCrossAttention, attention_mask, encoder_reference_points,
                         hungarian_match, match, ms_deform_attn_core, projection_cost, sine_position_encoding)


def tiny_cfg(**kw):
    """A tiny Mask2Former: ResNet-10 from scratch, width 32, 8 queries, 2 encoder / 3 decoder layers."""
    cfg = dict(backbone="resnet10", pretrained="", backbone_norm="bn", freeze_at=0, num_classes=2, conv_dim=32,
               mask_dim=32, hidden_dim=32, num_queries=8, nheads=4, dim_feedforward=64, enc_dim_feedforward=64,
               enc_layers=2, dec_layers=3)
    cfg.update(kw)
    return cfg


def square_scene():
    """Two 64 x 64 grey images with one coloured square each (class 0 red, class 1 blue); targets as data.py."""
    images = torch.full((2, 3, 64, 64), 110, dtype=torch.uint8)
    images[0, :, 8:32, 12:36] = torch.tensor([240, 30, 30], dtype=torch.uint8)[:, None, None]
    images[1, :, 30:58, 28:60] = torch.tensor([30, 30, 230], dtype=torch.uint8)[:, None, None]
    targets = [dict(boxes=torch.tensor([[12.0, 8, 36, 32]]), labels=torch.tensor([0]), size=(64, 64), orig_size=(64, 64)),
               dict(boxes=torch.tensor([[28.0, 30, 60, 58]]), labels=torch.tensor([1]), size=(64, 64), orig_size=(64, 64))]
    return images, targets


# -----------------------------------------------------------------------------
# multi-scale deformable attention


def bilinear_by_hand(img, x, y):
    """Sample img (H, W, D) at normalised (x, y) from the formula: pixel j's centre at (j + 0.5) / W, so
    the continuous index is x W - 0.5; the 4 neighbours weighted (1 - fx)(1 - fy), ...; outside = 0."""
    H, W, _ = img.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(img.shape[-1], dtype=img.dtype)
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < H and 0 <= xx < W:
                out += wy * wx * img[yy, xx]
    return out


def test_ms_deform_attn_core_equals_a_loop_over_queries_heads_levels_points():
    """grid_sample with align_corners=False and zero padding is exactly the hand-written bilinear sum,
    points outside the maps included (locations drawn in [-0.3, 1.3]), on 2 levels 3x4 and 2x2."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    B, M, Dh, Lq, L, P = 2, 2, 3, 5, 2, 2
    value = torch.randn(B, 12 + 4, M, Dh, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    loc[0, 0, 0, 0, 0] = torch.tensor([-0.9, 0.5], dtype=torch.float64)   # far outside: reads 0
    loc[0, 0, 0, 0, 1] = torch.tensor([0.0, 0.0], dtype=torch.float64)    # the corner: 1/4 of pixel (0, 0)
    weights = torch.rand(B, Lq, M, L, P, generator=g, dtype=torch.float64)
    out = ms_deform_attn_core(value, shapes, loc, weights)
    assert out.shape == (B, Lq, M * Dh)
    levels = value.split([12, 4], dim=1)
    expect = torch.zeros(B, Lq, M, Dh, dtype=torch.float64)
    for b, q, m, l, p in itertools.product(range(B), range(Lq), range(M), range(L), range(P)):
        img = levels[l][b, :, m].reshape(*shapes[l], Dh)                                   # (H, W, Dh)
        x, y = loc[b, q, m, l, p].tolist()
        expect[b, q, m] += weights[b, q, m, l, p] * bilinear_by_hand(img, x, y)
    assert (out - expect.reshape(B, Lq, M * Dh)).abs().max() <= 1e-10
    # the two hand-placed points of query 0, head 0, level 0 alone
    one = torch.zeros_like(weights)
    one[0, 0, 0, 0, 1] = 1.0
    corner = ms_deform_attn_core(value, shapes, loc, one)[0, 0, :Dh]
    assert torch.allclose(corner, 0.25 * levels[0][0, 0, 0], atol=1e-12)
    one.zero_()
    one[0, 0, 0, 0, 0] = 1.0
    assert ms_deform_attn_core(value, shapes, loc, one).abs().max() == 0


def test_msdeformattn_offsets_start_on_a_ring_of_directions():
    """8 heads: head m points at angle 2 pi m / 8, scaled to the unit square: (1, 0), (1, 1), (0, 1), (-1, 1), ...;
    point p at (p + 1) times that, the same on every level; attention weights start uniform."""
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=2)
    bias = attn.sampling_offsets.bias.view(8, 3, 2, 2)                                      # (M, L, P, 2)
    ring = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    for lvl in range(3):
        assert torch.allclose(bias[:, lvl, 0], ring, atol=1e-6)
        assert torch.allclose(bias[:, lvl, 1], 2 * ring, atol=1e-6)
    assert attn.sampling_offsets.weight.abs().max() == 0 and attn.attention_weights.weight.abs().max() == 0
    # so at the start a query at a cell centre reads the cell (p + 1) cells away along its head's direction:
    # head 0 (+x), point 0 on a 2 x 4 level samples the next cell's value exactly
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=4, n_points=1)
    with torch.no_grad():
        attn.value_proj.weight.copy_(torch.eye(8))
        attn.output_proj.weight.copy_(torch.eye(8))
    feats = torch.randn(1, 8, 8)                                                          # (B, S = 2 x 4, C)
    ref = encoder_reference_points([(2, 4)])[None, :, None]                               # (1, S, 1, 2)
    out = attn(torch.zeros(1, 8, 8), ref, feats, [(2, 4)])                                # (1, S, C)
    assert torch.allclose(out[0, 0, :2], feats[0, 1, :2], atol=1e-6)                      # cell (0, 0) head 0 -> cell (0, 1)


def test_sine_position_encoding_by_hand():
    """Row i: y = (i + 1) / h * 2 pi; channels 0, 1 = sin y, cos y (dim_t = 1), channel F = sin x; on a 2 x 4 map."""
    pos = sine_position_encoding(2, 4, num_pos_feats=4)
    assert pos.shape == (8, 2, 4)
    y = 2 * math.pi * 1 / 2            # row 0 of 2
    x = 2 * math.pi * 3 / 4            # column 2 of 4
    assert abs(pos[0, 0, 2] - math.sin(y)) < 1e-5 and abs(pos[1, 0, 2] - math.cos(y)) < 1e-5
    assert abs(pos[4, 0, 2] - math.sin(x)) < 1e-5 and abs(pos[5, 0, 2] - math.cos(x)) < 1e-5
    assert abs(pos[6, 0, 2] - math.sin(x / 100)) < 1e-5      # channel 2 of the x half: x / 10000^(2/4)


# -----------------------------------------------------------------------------
# masked attention


def test_masked_attention_ignores_exactly_the_masked_keys():
    """Query 0 sees pixels 1 and 4 of a 2 x 3 map (logit > 0): changing the memory at a masked pixel leaves its
    output bit-identical, changing pixel 4 does not. Query 1's mask is empty: its row is unmasked, so it
    attends everywhere (its output moves whichever pixel changes)."""
    torch.manual_seed(0)
    layer = MaskedCrossAttention(8, 2).eval()
    logits = torch.full((1, 2, 2, 3), -3.0)
    logits[0, 0, 0, 1] = logits[0, 0, 1, 1] = 2.0
    mask = attention_mask(logits, (2, 3), num_heads=2)                                    # (B M, Q, S)
    assert mask.shape == (2, 2, 6)
    assert mask[0, 0].tolist() == [True, False, True, True, False, True]
    assert not mask[:, 1].any()                                                          # empty mask -> everywhere
    x, qpos = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    memory, mpos = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    base = layer(x, qpos, memory, mpos, mask)
    for pixel in range(6):
        changed = memory.clone()
        changed[0, pixel] += 5.0
        out = layer(x, qpos, changed, mpos, mask)
        if pixel in (1, 4):
            assert (out[0, 0] - base[0, 0]).abs().max() > 1e-3
        else:
            assert torch.equal(out[0, 0], base[0, 0])
        assert (out[0, 1] - base[0, 1]).abs().max() > 1e-3


def test_attention_mask_resizes_the_previous_prediction():
    """A mask predicted at 4 x 4 gates a 2 x 2 scale through bilinear resizing (align_corners=False: each
    coarse cell averages its 2 x 2 block)."""
    logits = torch.tensor([[1.0, 1, -1, -1], [1, 1, -1, -1], [-1, -1, -3, -3], [-1, -1, 1, 1]])[None, None]
    mask = attention_mask(logits, (2, 2), num_heads=1)
    assert mask[0, 0].tolist() == [False, True, True, True]                              # block means 1, -1, -1, -1


# -----------------------------------------------------------------------------
# matching


def test_projection_cost_by_hand():
    """On a 3 x 4 grid, box 0 covers rows 0-1, cols 1-2 (x profile [0,1,1,0], y profile [1,1,0]), box 1 the
    pixel (2, 3) ([0,0,0,1], [0,0,1]). Query A: p = 1 at (0,1), 0.5 at (0,2) -> x profile [0,1,.5,0], y [1,0,0]:
    dice_x = 1 - 2(1.5)/(1.25 + 2) = 1/13, dice_y = 1 - 2/3 = 1/3 -> 16/39 against box 0, 1 + 1 against box 1.
    Query B = box 0's mask: 0 / 2. Query C = nothing: 2 / 2. Query D: p = 0.5 at (2, 3): 2 / (0.2 + 0.2)."""
    box = torch.zeros(2, 3, 4)
    box[0, 0:2, 1:3] = 1
    box[1, 2, 3] = 1
    p = torch.zeros(4, 3, 4)
    p[0, 0, 1], p[0, 0, 2] = 1.0, 0.5
    p[1] = box[0]
    p[3, 2, 3] = 0.5
    cost = projection_cost(torch.logit(p), box)
    expect = torch.tensor([[16 / 39, 2], [0, 2], [2, 2], [2, 0.4]])
    assert torch.allclose(cost, expect, atol=1e-4)
    # the cost of a pair is BoxInst's projection loss of that pair (losses.projection_loss)
    loss = losses.projection_loss(torch.logit(p[:1])[:, None], box[:1, None])
    assert torch.allclose(cost[0, 0], loss, atol=1e-6)


def brute_force_min(cost):
    """Minimal total cost over every injective map of the columns to rows (Q >= G)."""
    Q, G = cost.shape
    return min(sum(cost[r, c].item() for c, r in enumerate(rows)) for rows in itertools.permutations(range(Q), G))


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_match_equals_brute_force_on_square_costs(seed):
    cost = torch.rand(5, 5, generator=torch.Generator().manual_seed(seed))
    rows, cols = hungarian_match(cost)
    assert sorted(rows.tolist()) == list(range(5)) and sorted(cols.tolist()) == list(range(5))
    assert abs(cost[rows, cols].sum().item() - brute_force_min(cost)) < 1e-6


def test_hungarian_match_rectangular():
    """5 queries, 3 objects: every object gets a distinct query, at the brute-force minimum."""
    cost = torch.rand(5, 3, generator=torch.Generator().manual_seed(7))
    rows, cols = hungarian_match(cost)
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    assert abs(cost[rows, cols].sum().item() - brute_force_min(cost)) < 1e-6


def test_match_finds_the_query_whose_mask_fills_each_box():
    """3 queries at stride 4 on a 32 x 32 image: query 2 fills box 0, query 0 fills box 1, query 1 is empty;
    classes are uninformative (equal logits), so the projection cost decides; an image without objects gets
    an empty match."""
    boxes = torch.tensor([[0.0, 0, 15, 15], [16, 16, 31, 31]])
    grid = box_masks_inclusive(boxes, (32, 32), 4)                                        # (2, 8, 8)
    masks = torch.full((2, 3, 8, 8), -8.0)
    masks[0, 2] = 16 * grid[0] - 8
    masks[0, 0] = 16 * grid[1] - 8
    outputs = dict(pred_logits=torch.zeros(2, 3, 3), pred_masks=masks)
    targets = [dict(boxes=boxes, labels=torch.tensor([0, 1])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    (q, g), (q1, g1) = match(outputs, targets)
    assert dict(zip(g.tolist(), q.tolist())) == {0: 2, 1: 0}
    assert q1.numel() == 0 and g1.numel() == 0


# -----------------------------------------------------------------------------
# the network


def test_forward_shapes():
    torch.manual_seed(0)
    model = Mask2Former(tiny_cfg())
    out = model(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    assert out["pred_logits"].shape == (2, 8, 3)                                          # K + 1 classes
    assert out["pred_masks"].shape == (2, 8, 16, 24)
    assert out["mask_features"].shape == (2, 32, 16, 24)
    assert len(out["aux_outputs"]) == 3                                                   # learnable queries + 2 layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 8, 3) and aux["pred_masks"].shape == (2, 8, 16, 24)


def test_reference_defaults_build():
    """The reference sizes (R50, 256 wide, 100 queries, 6 + 9 layers) build; the decoder has 9 layers."""
    model = Mask2Former(dict(pretrained="", num_classes=80))
    assert len(model.pixel_decoder.layers) == 6 and len(model.decoder.layers) == 9
    assert model.decoder.query_feat.weight.shape == (100, 256)
    assert model.decoder.class_embed.out_features == 81


def test_predict_returns_condinst_format_at_original_size():
    """Boxes (K, 4) = the masks' tight boxes, scores descending in [0, 1], labels in [0, K), bool masks at the
    original size, K <= min(max_dets, Q x classes); images padded 64 x 96 holding a 60 x 90 image of 120 x 180."""
    torch.manual_seed(0)
    model = Mask2Former(tiny_cfg(max_dets=10)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    targets = [dict(size=(60, 90), orig_size=(120, 180)), dict(size=(64, 80), orig_size=(64, 80))]
    res = model.predict(images, targets)
    assert len(res) == 2
    for r, t in zip(res, targets):
        assert set(r) == {"boxes", "scores", "labels", "masks"}
        k = len(r["scores"])
        assert 0 < k <= 10
        assert r["masks"].shape == (k, *t["orig_size"]) and r["masks"].dtype == torch.bool
        assert r["boxes"].shape == (k, 4) and torch.equal(r["boxes"], masks_to_boxes(r["masks"]))
        assert r["labels"].min() >= 0 and r["labels"].max() < 2
        assert (r["scores"] >= 0).all() and (r["scores"] <= 1).all()
        assert torch.equal(r["scores"], r["scores"].sort(descending=True).values)
        assert r["masks"].flatten(1).any(1).all()


def test_tiny_model_overfits_two_squares_from_boxes_alone():
    """60 AdamW steps on 2 images of one square each, with the box-only loss the integration will refine:
    per prediction set (final + aux), Hungarian-match, then the matched queries' projection cost + class
    cross-entropy (no-object weight 0.1). The matched query's mask (logit > 0) must cover the square's box
    grid with IoU > 0.5, and predict's best detection must be the square, with its class (about 7 s)."""
    torch.manual_seed(0)
    model = Mask2Former(tiny_cfg())
    images, targets = square_scene()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    class_weight = torch.tensor([1.0, 1.0, 0.1])
    box_grids = [box_masks_inclusive(t["boxes"], (64, 64), 4) for t in targets]           # (1, 16, 16) each

    def box_loss(pred):
        indices = match(pred, targets)
        total = 0
        for b, ((q, g), t) in enumerate(zip(indices, targets)):
            total = total + projection_cost(pred["pred_masks"][b, q], box_grids[b][g]).diagonal().sum()
            cls = torch.full((8,), 2)
            cls[q] = t["labels"][g]
            total = total + F.cross_entropy(pred["pred_logits"][b], cls, weight=class_weight)
        return total / len(targets), indices

    first = None
    for _ in range(60):
        out = model(images)
        parts = [box_loss(p) for p in [out] + out["aux_outputs"]]
        loss = sum(l for l, _ in parts)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first
    indices = parts[0][1]
    for b, (q, g) in enumerate(indices):
        pred = out["pred_masks"][b, q[0]].detach() > 0
        box = box_grids[b][g[0]] > 0
        assert (pred & box).sum() / (pred | box).sum() > 0.5
    model.eval()
    for r, t in zip(model.predict(images, targets), targets):
        assert r["labels"][0] == t["labels"][0]
        assert box_iou_pairs(r["boxes"][:1], t["boxes"]) > 0.5
