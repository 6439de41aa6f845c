"""
Mask2Former (Cheng et al., CVPR 2022, "Masked-attention Mask Transformer for Universal Image Segmentation"),
the query-based segmenter on which the SIM paper also reports (its Tab. 1: Mask2Former-R101, BoxInst-style
box supervision 35.7 mask AP, SIM 37.4), in plain PyTorch: the network, the box-supervised Hungarian
matcher, and its training from boxes (train.py --arch=mask2former): BoxInst's projection and colour-pairwise
terms on the matched queries (BoxInst-dagger), and SIM on top (SIM-dagger) with the prototypes, teacher, pseudo
masks and copy-paste that CondInst uses (sim.py, prototypes.py, copypaste.py, losses.py: called, not copied).

The network, at the reference's COCO instance-segmentation settings (configs/coco_*_m2f_*.py; config.py's
Mask2Former group holds the demo's widths):
  backbone (backbone.py: C2-C5, strides 4-32)
  -> pixel decoder: a multi-scale deformable-attention encoder (Deformable DETR) over C3-C5, then an
     FPN-style lateral + output conv on C2 -> per-pixel embeddings ("mask features", stride 4) and the
     three encoder maps (strides 32, 16, 8) the decoder attends to
  -> transformer decoder: learnable queries; each layer = masked cross-attention (a query sees only the
     pixels its previous mask prediction covers) -> self-attention -> FFN, round-robin over the 3 scales
  -> after the learnable queries and after every layer: class logits (K + 1, the last = no object) and
     mask logits = <query mask embedding, per-pixel embedding>.

Training from boxes, in the paper's Fig. 2 names: the segmentation network F_seg is this network, its
momentum copy F'_seg the teacher (sim.py); the mask features Z are the pixel decoder's per-pixel embeddings
(mask_features), where the prototypes live; each object's "positive" is the query the matcher assigns it,
in every prediction set (deep supervision); its M_I comes from the teacher's query masks (teacher_queries).

Reading order: ms_deform_attn_core -> MSDeformAttn -> sine_position_encoding -> PixelDecoder ->
attention_mask -> MaskedCrossAttention -> DecoderLayer -> MaskedTransformerDecoder -> Mask2Former
(forward, predict) -> matching (class_cost, projection_cost, hungarian_match, match) -> training
(to_loss_grid, matched_queries, class_loss, box_terms, teacher_queries, pseudo_masks, training_losses).
Everything is pure PyTorch (no compiled deformable-attention op); facts from the paper and the reference
code (facebookresearch/Mask2Former, Deformable DETR), the code written here.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
import prototypes
import sim
from backbone import Backbone
from box_ops import box_iou_pairs, box_masks_inclusive, masks_to_boxes

# what Mask2Former reads from the config (config.py's names; its Mask2Former group, the reference's values
# in configs/coco_*_m2f_*.py). dec_layers counts the layers after the learnable queries' own prediction
# (the reference's DEC_LAYERS 10 counts that prediction too)
MODEL_KEYS = ("backbone", "pretrained", "backbone_norm", "freeze_at", "num_classes", "conv_dim", "mask_dim",
              "enc_layers", "enc_dim_feedforward", "enc_n_points", "hidden_dim", "num_queries", "nheads",
              "dim_feedforward", "dec_layers", "max_dets", "mask_thresh", "channels_last")
NUM_LEVELS = 3                   # the reference always uses 3 scales (C3-C5 / strides 8-32)
STRIDE = 4                       # pred_masks and mask_features: stride 4 of the padded image

# -----------------------------------------------------------------------------
# Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), the pure-PyTorch path


def ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights):
    """MSDeformAttn(q) = sum_l sum_p A[q, m, l, p] * V_l^m(loc[q, m, l, p]) per head m, heads concatenated.

    Each head reads its value maps V_l^m at P points per level by bilinear interpolation and sums them
    with softmax weights. Locations are normalised to [0, 1] over the map ((0, 0) the top-left corner of
    the first pixel, pixel j's centre at (j + 0.5) / W: F.grid_sample's align_corners=False after mapping to
    [-1, 1], as the reference's ms_deform_attn_core_pytorch); a sample outside the map reads zeros.
    value (B, S, M, Dh) with S = sum_l H_l W_l (levels concatenated, row-major); spatial_shapes: L (H_l, W_l);
    sampling_locations (B, Lq, M, L, P, 2) (x, y); attention_weights (B, Lq, M, L, P) -> (B, Lq, M * Dh).
    """
    B, S, M, Dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    values = value.split([h * w for h, w in shapes], dim=1)                         # L x (B, H_l W_l, M, Dh)
    grids = 2 * sampling_locations - 1                                              # [0, 1] -> [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * M, Dh, h, w)         # (B M, Dh, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)                      # (B M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # (B M, Dh, Lq, P)
    a = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L * P)               # (B M, 1, Lq, L P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1)                    # (B M, Dh, Lq)
    return out.view(B, M * Dh, Lq).transpose(1, 2)                                  # (B, Lq, M Dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query predicts, from its own feature, M x L x P sampling
    offsets around its reference point (in cells of each level) and their softmax weights, so it reads
    a few learned points per level instead of every pixel (linear in the number of pixels, which is what
    lets the encoder run on strides 8-32 at once).

    Initialisation as the reference: offsets' weights 0 and biases a ring of directions, head m pointing
    at angle 2 pi m / M, scaled so its larger coordinate is 1, point p at (p + 1) times that (so at the
    start head m samples 1, 2, ..., P cells away along its own direction); attention weights 0 (uniform);
    value/output projections Xavier, zero bias."""

    def __init__(self, d_model=256, n_levels=NUM_LEVELS, n_heads=8, n_points=4):
        super().__init__()
        assert d_model % n_heads == 0, f"d_model {d_model} not divisible by n_heads {n_heads}"
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)   # (M,)
        ring = torch.stack([theta.cos(), theta.sin()], -1)                                       # (M, 2) (x, y)
        ring = ring / ring.abs().amax(-1, keepdim=True)                                          # on the unit square
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)                           # (P,)
        grid = ring[:, None, None, :] * steps[None, None, :, None]                                # (M, 1, P, 2)
        self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))      # (M L P 2,)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value_in, spatial_shapes):
        """query (B, Lq, C); reference_points (B or 1, Lq, L, 2) normalised (x, y) per level;
        value_in (B, S, C) the levels flattened; spatial_shapes L (H_l, W_l) -> (B, Lq, C)."""
        B, Lq, C = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(B, value_in.shape[1], M, C // M)          # (B, S, M, Dh)
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)                  # in cells of each level
        weights = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        wh = query.new_tensor([[w, h] for h, w in spatial_shapes])                      # (L, 2) cells -> [0, 1]
        loc = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]  # (B, Lq, M, L, P, 2)
        return self.output_proj(ms_deform_attn_core(value, spatial_shapes, loc, weights))  # (B, Lq, C)


# -----------------------------------------------------------------------------
# Pixel decoder: deformable encoder over C3-C5, then C2 added FPN-style


def sine_position_encoding(h, w, num_pos_feats, device=None, temperature=10000.0, scale=2 * math.pi):
    """DETR's normalised 2-D sine encoding (the reference's PositionEmbeddingSine(normalize=True)): row i
    -> y = (i + 1) / h * 2 pi, column j -> x = (j + 1) / w * 2 pi; channel 2k / 2k + 1 of each half is
    sin / cos(. / temperature^(2k / num_pos_feats)); y's half first. The same for every image (no padding
    mask: the reference does not mask padding either). -> (2 num_pos_feats, h, w)."""
    eps = 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * scale   # (h,)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * scale   # (w,)
    k = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_pos_feats)   # (F,)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t                                       # (h, F), (w, F)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], -1).flatten(1)               # (h, F) sin, cos interleaved
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], -1).flatten(1)               # (w, F)
    return torch.cat([py[:, None, :].expand(h, w, -1), px[None, :, :].expand(h, w, -1)], -1).permute(2, 0, 1)  # (2F, h, w)


def encoder_reference_points(spatial_shapes, device=None):
    """Every encoder token's reference point: its cell centre normalised to [0, 1] ((j + 0.5) / W_l,
    (i + 0.5) / H_l), levels concatenated row-major. A token uses the same normalised point on every level
    (no padding, so the reference's valid ratios are 1). -> (S, 2) (x, y)."""
    refs = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1))                # (H_l W_l, 2)
    return torch.cat(refs)                                                              # (S, 2)


class DeformEncoderLayer(nn.Module):
    """Post-norm encoder layer: x = LN(x + MSDeformAttn(x + pos, x)); x = LN(x + FFN(x)) (dropout 0)."""

    def __init__(self, d_model, n_heads, d_ffn, n_points, n_levels=NUM_LEVELS):
        super().__init__()
        self.attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x, pos, reference_points, spatial_shapes):
        x = self.norm1(x + self.attn(x + pos, reference_points, x, spatial_shapes))    # (B, S, C)
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))                  # (B, S, C)


def c2_xavier_fill(conv):
    """detectron2's init of the FPN convs: kaiming_uniform(a=1) weights, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class PixelDecoder(nn.Module):
    """The reference's MSDeformAttnPixelDecoder: C3-C5 -> 1x1 conv + GroupNorm to conv_dim each, plus a
    sine positional encoding and a learned embedding per level; enc_layers deformable encoder layers
    over the three levels at once; then FPN-style on C2: lateral 1x1 (+GN) + bilinear upsampling of the
    stride-8 encoder output, a 3x3 output conv (+GN, ReLU), and a 1x1 conv to mask_dim: the per-pixel
    embeddings at stride 4. Levels are kept coarse-first (stride 32, 16, 8), the order the decoder's
    round-robin starts from. Runs in float32 under autocast, as the reference (the deformable sampling
    is not reliable in half precision)."""

    def __init__(self, in_channels, conv_dim=256, mask_dim=256, n_heads=8, enc_layers=6, d_ffn=1024, n_points=4):
        super().__init__()
        c2, c3, c4, c5 = in_channels
        gn = lambda: nn.GroupNorm(32 if conv_dim % 32 == 0 else 1, conv_dim)
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, conv_dim, 1), gn()) for c in (c5, c4, c3))
        self.layers = nn.ModuleList(DeformEncoderLayer(conv_dim, n_heads, d_ffn, n_points) for _ in range(enc_layers))
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, conv_dim))
        self.lateral = nn.Sequential(nn.Conv2d(c2, conv_dim, 1, bias=False), gn())
        self.output = nn.Sequential(nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False), gn(), nn.ReLU(inplace=True))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        self.conv_dim = conv_dim
        # the reference: Xavier on every matrix of the encoder, then MSDeformAttn's own init on top
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for conv in (self.lateral[0], self.output[0], self.mask_features):
            c2_xavier_fill(conv)

    def forward(self, feats):
        """feats [C2, C3, C4, C5] -> mask_features (B, mask_dim, H/4, W/4), [(B, conv_dim, H/s, W/s) for s = 32, 16, 8]."""
        with torch.autocast(feats[0].device.type, enabled=False):
            c2, c3, c4, c5 = [f.float() for f in feats]
            srcs = [proj(x) for proj, x in zip(self.input_proj, (c5, c4, c3))]         # 3 x (B, C, h_l, w_l)
            shapes = [tuple(s.shape[-2:]) for s in srcs]
            B, C = c2.shape[0], self.conv_dim
            x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)              # (B, S, C)
            pos = torch.cat([(sine_position_encoding(h, w, C // 2, x.device).flatten(1).t() + self.level_embed[lvl])
                             for lvl, (h, w) in enumerate(shapes)])[None]              # (1, S, C)
            ref = encoder_reference_points(shapes, x.device)[None, :, None, :].expand(1, -1, NUM_LEVELS, 2)  # (1, S, L, 2)
            for layer in self.layers:
                x = layer(x, pos, ref, shapes)                                          # (B, S, C)
            levels = [z.transpose(1, 2).reshape(B, C, h, w)
                      for z, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)]  # strides 32, 16, 8
            y = self.lateral(c2) + F.interpolate(levels[-1], size=c2.shape[-2:], mode="bilinear", align_corners=False)
            return self.mask_features(self.output(y)), levels                          # (B, D, H/4, W/4), 3 maps


# -----------------------------------------------------------------------------
# Transformer decoder with masked attention


def attention_mask(mask_logits, size, num_heads):
    """Masked attention's mask (the paper's Eq. 2-3): query q may attend to pixel x of a scale only where
    its previous mask prediction, bilinearly resized to that scale, has sigmoid >= 0.5 (logit >= 0). A
    query whose mask is empty at that scale would have no key at all (softmax of all -inf = NaN): its row
    is unmasked instead, so it attends everywhere, as the reference does. Detached: the mask is a
    routing decision, not a path for gradients.
    mask_logits (B, Q, H, W), size (h, w) -> bool (B num_heads, Q, h w), True = may NOT attend, batch-major
    as nn.MultiheadAttention expects."""
    m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)   # (B, Q, h, w)
    blocked = m.flatten(2) < 0                                                          # (B, Q, h w)
    blocked = blocked & ~blocked.all(-1, keepdim=True)                                  # empty mask -> attend everywhere
    return blocked.repeat_interleave(num_heads, dim=0)                                  # (B M, Q, h w)


class MaskedCrossAttention(nn.Module):
    """Post-norm masked cross-attention: x = LN(x + MHA(x + query_pos, memory + memory_pos, memory, mask))."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, query_pos, memory, memory_pos, mask):
        """x, query_pos (B, Q, C); memory, memory_pos (B, S, C); mask bool (B M, Q, S) from attention_mask."""
        out = self.attn(x + query_pos, memory + memory_pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(x + out)                                                       # (B, Q, C)


class DecoderLayer(nn.Module):
    """One decoder layer in the paper's order: masked cross-attention -> self-attention -> FFN, each
    post-norm with a residual (dropout 0, the reference's settings). Xavier init of every matrix."""

    def __init__(self, d_model, n_heads, d_ffn):
        super().__init__()
        self.cross = MaskedCrossAttention(d_model, n_heads)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm_self = nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x, query_pos, memory, memory_pos, mask):
        x = self.cross(x, query_pos, memory, memory_pos, mask)                          # (B, Q, C)
        q = x + query_pos
        x = self.norm_self(x + self.self_attn(q, q, x, need_weights=False)[0])          # (B, Q, C)
        return self.norm_ffn(x + self.linear2(F.relu(self.linear1(x))))                # (B, Q, C)


class MaskedTransformerDecoder(nn.Module):
    """The reference's MultiScaleMaskedTransformerDecoder: num_queries learnable query features (the
    decoder's input) and query positional embeddings; layer i attends to scale i mod 3 (strides 32,
    16, 8, coarse to fine, then again), masked by the prediction made before it. Predictions (class logits
    and mask logits, through a shared LayerNorm) on the learnable queries themselves and after every
    layer: dec_layers + 1 sets, the last one the output, the others the auxiliary outputs that deep
    supervision trains."""

    def __init__(self, in_channels, num_classes, hidden_dim=256, num_queries=100, n_heads=8, d_ffn=2048,
                 dec_layers=9, mask_dim=256):
        super().__init__()
        self.n_heads = n_heads
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_channels == hidden_dim else nn.Conv2d(in_channels, hidden_dim, 1) for _ in range(NUM_LEVELS))
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                c2_xavier_fill(proj)
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)     # the queries' content (decoder input)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)    # the queries' positional embedding
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, n_heads, d_ffn) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)   # last logit: no object
        self.mask_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, mask_dim))

    def heads(self, x, mask_features, size):
        """Class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4) = einsum(mask embedding, per-pixel
        embeddings), and the next layer's attention mask at `size`."""
        h = self.decoder_norm(x)                                                       # (B, Q, C)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(h), mask_features)  # (B, Q, H/4, W/4)
        return self.class_embed(h), mask_logits, attention_mask(mask_logits, size, self.n_heads)

    def forward(self, multi_scale, mask_features):
        """multi_scale: 3 maps (B, C_in, h_l, w_l) coarse first; mask_features (B, D, H/4, W/4)
        -> dict(pred_logits (B, Q, K+1), pred_masks (B, Q, H/4, W/4), aux_outputs: dec_layers dicts)."""
        B = mask_features.shape[0]
        sizes = [tuple(f.shape[-2:]) for f in multi_scale]
        memory = [proj(f).flatten(2).transpose(1, 2) + self.level_embed.weight[lvl]
                  for lvl, (proj, f) in enumerate(zip(self.input_proj, multi_scale))]  # 3 x (B, h_l w_l, C)
        pos = [sine_position_encoding(h, w, memory[0].shape[-1] // 2, f.device).flatten(1).t()[None].to(f.dtype)
               for (h, w), f in zip(sizes, multi_scale)]                               # 3 x (1, h_l w_l, C)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)                    # (B, Q, C)
        x = self.query_feat.weight[None].expand(B, -1, -1)                             # (B, Q, C)
        logits, masks, mask = self.heads(x, mask_features, sizes[0])
        preds = [(logits, masks)]
        for i, layer in enumerate(self.layers):
            lvl = i % NUM_LEVELS
            x = layer(x, query_pos, memory[lvl], pos[lvl], mask)
            logits, masks, mask = self.heads(x, mask_features, sizes[(i + 1) % NUM_LEVELS])
            preds.append((logits, masks))
        return dict(pred_logits=logits, pred_masks=masks,
                    aux_outputs=[dict(pred_logits=l, pred_masks=m) for l, m in preds[:-1]])


# -----------------------------------------------------------------------------
# The network


class Mask2Former(nn.Module):
    """Backbone -> PixelDecoder -> MaskedTransformerDecoder. cfg: a flat config dict (config.py's) holding
    MODEL_KEYS; the other keys are not read.

    forward(images[, targets]) -> dict(pred_logits (B, Q, K+1), pred_masks (B, Q, Hp/4, Wp/4) logits, aux_outputs
    (dec_layers dicts of the same two keys, earliest first), mask_features (B, mask_dim, Hp/4, Wp/4): the
    per-pixel embeddings, where SIM's prototypes will read). predict(images, targets) -> detections as
    model.CondInst.predict returns them."""

    def __init__(self, cfg):
        super().__init__()
        missing = [k for k in MODEL_KEYS if k not in cfg]
        if missing:
            raise SystemExit(f"mask2former.py: config lacks {missing} — fix: start from config.defaults()")
        self.cfg = c = {k: cfg[k] for k in MODEL_KEYS}
        self.num_classes = c["num_classes"]
        self.backbone = Backbone(c["backbone"], c["pretrained"], c["backbone_norm"], c["freeze_at"], with_c2=True)
        self.pixel_decoder = PixelDecoder(self.backbone.out_channels, c["conv_dim"], c["mask_dim"], c["nheads"],
                                          c["enc_layers"], c["enc_dim_feedforward"], c["enc_n_points"])
        self.decoder = MaskedTransformerDecoder(c["conv_dim"], self.num_classes, c["hidden_dim"], c["num_queries"],
                                                c["nheads"], c["dim_feedforward"], c["dec_layers"], c["mask_dim"])
        # ImageNet statistics in the 0-255 range: images arrive as raw uint8 RGB (as model.CondInst)
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images, targets=None):
        """images uint8 (B, 3, Hp, Wp), Hp and Wp multiples of 32 (data.collate pads so). targets: not read (the
        matching is the loss's business, training_losses); the argument keeps model.CondInst's call."""
        x = (images.float() - self.pixel_mean) / self.pixel_std                        # (B, 3, Hp, Wp)
        if self.cfg["channels_last"]:  # NHWC convolutions (model.CondInst's): faster on CPU and tensor cores
            x = x.contiguous(memory_format=torch.channels_last)
        mask_features, multi_scale = self.pixel_decoder(self.backbone(x))
        out = self.decoder(multi_scale, mask_features)
        out["mask_features"] = mask_features                                           # (B, D, Hp/4, Wp/4)
        return out

    def features(self, images, classify=True):
        """The forward's dict; classify=False (SIM's teacher, sim.teacher_outputs): the final prediction set and
        mask_features only, no auxiliary sets (the pseudo masks read the final set alone)."""
        out = self(images)
        return out if classify else {k: v for k, v in out.items() if k != "aux_outputs"}

    @torch.no_grad()
    def predict(self, images, targets):
        """The reference's instance inference. images uint8 (B, 3, Hp, Wp); targets give 'size' (h, w) and
        'orig_size' (H0, W0). Per image: scores = softmax(class logits)[:, :K] over queries x classes, the
        top max_dets (query, class) pairs (a query may be kept with two classes); each pair's mask logits
        resized to the padded input (bilinear), cropped to (h, w), resized to (H0, W0), thresholded at
        mask_thresh; score x the mean mask probability inside the binary mask (the "mask score": a
        confident class on a vague mask ranks lower); box = the binary mask's tight box (masks_to_boxes;
        the reference leaves boxes at zero). Pairs whose mask is empty are dropped (their score is 0
        anyway, and a box needs a pixel). Returns per image: boxes (K, 4), scores (K,) descending,
        labels (K,), masks (K, H0, W0) bool, as model.CondInst.predict."""
        out = self(images)
        Hp, Wp = images.shape[-2:]
        K = self.num_classes
        results = []
        for b, t in enumerate(targets):
            (h, w), (H0, W0) = t["size"], t["orig_size"]
            probs = out["pred_logits"][b].float().softmax(-1)[:, :K]                    # (Q, K)
            scores, idx = probs.flatten().topk(min(self.cfg["max_dets"], probs.numel()))  # (k,)
            queries, labels = torch.div(idx, K, rounding_mode="floor"), idx % K
            m = F.interpolate(out["pred_masks"][b, queries][None].float(), size=(Hp, Wp), mode="bilinear",
                              align_corners=False)[:, :, :h, :w]                        # (1, k, h, w)
            m = F.interpolate(m, size=(H0, W0), mode="bilinear", align_corners=False)[0].sigmoid()  # (k, H0, W0)
            masks = m > self.cfg["mask_thresh"]                                        # (k, H0, W0)
            area = masks.flatten(1).sum(1)                                             # (k,)
            mask_score = (m * masks).flatten(1).sum(1) / (area + 1e-6)                  # (k,)
            scores = scores * mask_score
            keep = (area > 0).nonzero().squeeze(1)
            keep = keep[scores[keep].argsort(descending=True)]
            results.append(dict(boxes=masks_to_boxes(masks[keep]), scores=scores[keep], labels=labels[keep],
                                masks=masks[keep]))
        return results


# -----------------------------------------------------------------------------
# Box-supervised Hungarian matching


def class_cost(logits, labels):
    """-p(class of GT g | query q): logits (Q, K+1), labels (G,) -> (Q, G) (the reference's class cost)."""
    return -logits.float().softmax(-1)[:, labels]                                      # (Q, G)


def projection_cost(mask_logits, box_masks, eps=1e-5):
    """BoxInst's projection term for every (query, box) pair: dice(max_y p_q, max_y B_g) +
    dice(max_x p_q, max_x B_g), p = sigmoid(mask logits), dice(a, b) = 1 - 2 sum(a b) / (sum a^2 + sum b^2
    + eps) (losses.dice_loss's form, so the cost of a pair is its projection loss exactly). The
    max-projection of a box mask is the box's extent along that axis, so a mask pays for every row and
    column it misses or covers outside the box. mask_logits (Q, H, W), box_masks (G, H, W) on the same grid
    -> (Q, G), each in [0, 2]."""
    p = mask_logits.float().sigmoid()                                                  # (Q, H, W)
    b = box_masks.float()                                                              # (G, H, W)
    cost = 0
    for dim in (1, 2):                                                                 # max over rows: profile along x; then along y
        pp, bb = p.amax(dim), b.amax(dim)                                              # (Q, n), (G, n)
        inter = pp @ bb.t()                                                            # (Q, G)
        cost = cost + 1 - 2 * inter / ((pp * pp).sum(1)[:, None] + (bb * bb).sum(1)[None] + eps)
    return cost                                                                        # (Q, G)


def hungarian_match(cost):
    """The one-to-one assignment of minimal total cost (scipy's linear_sum_assignment, the reference's
    solver). cost (Q, G), a tensor or a host array -> (rows, cols) int64 tensors of length min(Q, G), rows
    ascending."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise SystemExit("mask2former.py: the Hungarian matcher needs scipy — fix: pip install 'scipy>=1.10' "
                         "(requirements.txt lists it)")
    c = cost if isinstance(cost, np.ndarray) else cost.detach().float().cpu().numpy()  # a host read (match reads once)
    if not np.isfinite(c).all():
        raise ValueError("mask2former.py: non-finite matching cost (NaN/inf logits: the run diverged)")
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@torch.no_grad()
def match(outputs, targets, cost_class=2.0, cost_projection=5.0):
    """Per image, the query matched to each GT object from boxes alone:
    cost = w_class * (-p(class)) + w_projection * projection_cost(query mask, GT box mask), the box masks
    built as BoxInst builds them (box_ops.box_masks_inclusive, end-inclusive) on the pred_masks grid
    (stride 4 of the padded image, whose boxes targets' 'boxes' are in). The weights: config.py's
    cost_class and cost_projection (the reference's class weight 2, and its mask weight 5 on the projection).
    No box L1 / GIoU term: the max-projections of a box mask are exactly the box's x- and y-extents, so the
    projection dice already is a box-agreement cost per axis; a box regressed from the mask would
    measure the same thing twice and needs a box read off a mask that is empty or fragmented early in
    training. The fully supervised reference has no box term either.
    outputs: dict with pred_logits (B, Q, K+1), pred_masks (B, Q, h, w) (one prediction set: the final
    one or an aux_outputs entry); targets: per image 'boxes' (G, 4) xyxy, 'labels' (G,). -> per image (query indices (G',), GT indices (G',)), G' = min(Q, G), on the
    outputs' device."""
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    h, wd = masks.shape[-2:]
    costs = []
    for b, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            costs.append(masks.new_zeros((masks.shape[1], 0)))
            continue
        box_masks = box_masks_inclusive(t["boxes"].float(), (h * STRIDE, wd * STRIDE), STRIDE)   # (G, h, w)
        costs.append(cost_class * class_cost(logits[b], t["labels"])
                     + cost_projection * projection_cost(masks[b], box_masks))               # (Q, G)
    # every image's costs to the host in one transfer (the solver runs there), then split
    host = torch.cat([c.detach().float().flatten() for c in costs]).cpu().numpy()
    ends = np.cumsum([c.numel() for c in costs])
    indices = []
    for c, part in zip(costs, np.split(host, ends[:-1])):
        if c.shape[1] == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=masks.device)
            indices.append((empty, empty.clone()))
            continue
        rows, cols = hungarian_match(part.reshape(c.shape))
        indices.append((rows.to(masks.device), cols.to(masks.device)))
    return indices


# -----------------------------------------------------------------------------
# Training from boxes: BoxInst-dagger (projection + pairwise on matched queries) and SIM-dagger on top


def to_loss_grid(maps, stride):
    """Maps at stride 4 (N, C, Hp/4, Wp/4) -> the loss grid of `stride` (mask_out_stride: 4 on COCO, where this
    is the identity; 2 on the demo, whose 16-px objects are 4 stride-4 cells wide): bilinear x 4/stride,
    align_corners=False, which puts output i at pixel stride * i + stride / 2 since stride-4 cell j sits at
    pixel 4j + 2: the [stride//2::stride] grid of BoxInst's box masks (box_ops.box_masks_inclusive)."""
    if STRIDE % stride:
        raise SystemExit(f"mask2former.py: mask_out_stride={stride} — fix: 4 (the masks' own stride) or 2")
    f = STRIDE // stride
    return maps if f == 1 else F.interpolate(maps, scale_factor=f, mode="bilinear", align_corners=False)


def prediction_sets(out):
    """The prediction sets deep supervision trains: the auxiliary ones (the learnable queries' and each
    decoder layer's but the last), then the final one."""
    return out["aux_outputs"] + [out]


def object_offsets(targets):
    """Each image's first index in the batch order of the objects (losses.object_box_masks, sim.objects):
    a list of B ints."""
    sizes = [len(t["boxes"]) for t in targets]
    return [sum(sizes[:b]) for b in range(len(sizes))]


def matched_pairs(idx, targets):
    """match's per-image (query, object) indices idx as flat pairs -> (bi (K,) each pair's image, qi (K,) its
    query, gi (K,) its object in batch order)."""
    offsets = object_offsets(targets)
    bi = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(idx)])
    qi = torch.cat([q for q, _ in idx])
    gi = torch.cat([g + offsets[b] for b, (_, g) in enumerate(idx)])
    return bi, qi, gi


def matched_queries(sets, indices, targets, stride):
    """The matched (query, object) pairs of every prediction set, in the layout sim.sim_losses and
    step.py read for CondInst's positives: dict(mask_logits (K, 1, Hp/s, Wp/s) on the loss grid (to_loss_grid),
    inst=dict(gt_inds (K,) each pair's object in batch order, im_inds (K,) its image)), K = the pairs of all
    sets, earliest set first. sets: prediction_sets; indices: match's per set."""
    logits, gt, im = [], [], []
    for s, idx in zip(sets, indices):
        bi, qi, gi = matched_pairs(idx, targets)                                       # (K_s,) each
        logits.append(s["pred_masks"][bi, qi])                                         # (K_s, Hp/4, Wp/4)
        gt.append(gi)
        im.append(bi)
    return dict(mask_logits=to_loss_grid(torch.cat(logits)[:, None], stride),       # (K, 1, Hp/s, Wp/s)
                inst=dict(gt_inds=torch.cat(gt), im_inds=torch.cat(im)))


def class_loss(logits, targets, indices, no_object_weight=0.1):
    """The reference's classification term for one prediction set: the cross-entropy of every query's K + 1
    logits against its matched object's class, or "no object" (the last logit) for an unmatched query, the
    no-object class weighted no_object_weight: sum_q w_q CE_q / sum_q w_q over the batch (w_q the weight
    of q's target class; F.cross_entropy's weighted mean). logits (B, Q, K+1); indices: match's -> scalar."""
    B, Q, K1 = logits.shape
    target = torch.full((B, Q), K1 - 1, dtype=torch.long, device=logits.device)       # (B, Q) no object
    for b, ((q, g), t) in enumerate(zip(indices, targets)):
        target[b, q] = t["labels"][g]
    weight = torch.ones(K1, device=logits.device)
    weight[-1] = no_object_weight
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), weight)


def box_terms(matched, images, targets, cfg, affinity=None):
    """BoxInst-dagger: the projection and colour-pairwise terms of the matched queries' masks against their
    objects' boxes on the loss grid, by BoxInst's own functions (losses.object_box_masks, image_valid_masks,
    color_similarity, projection_loss, pairwise_loss), as CondInst's positives get them (losses.compute_losses).
    The whole grid, not points: the projection term is a max over each row and column of the map, the pairwise
    term a sum over each pixel's 8 grid neighbours; neither is defined on the reference's sampled points.
    matched: matched_queries'; affinity (B, 8, Hp/s, Wp/s): the official preset's factor on the colour
    similarity -> dict(loss_prj, loss_pairwise), each the mean over all matched pairs."""
    logits, inst = matched["mask_logits"], matched["inst"]                             # (K, 1, Hp/s, Wp/s)
    padded_hw, s = images.shape[-2:], cfg["mask_out_stride"]
    bmask = losses.object_box_masks(targets, padded_hw, s, cfg["occlusion_aware"])[inst["gt_inds"]][:, None]
    valid = losses.image_valid_masks([t["size"] for t in targets], [t["orig_size"] for t in targets], padded_hw, s,
                                     bottom_pixels_removed=cfg["bottom_pixels_removed"], device=images.device)
    similarity, thresh = losses.color_similarity(images, valid, s), cfg["color_thresh"]  # (B, 8, Hp/s, Wp/s)
    if affinity is not None:
        similarity, thresh = similarity * affinity, cfg["color_feat_thresh"]
    return {"loss_prj": losses.projection_loss(logits, bmask),
            "loss_pairwise": losses.pairwise_loss(logits, similarity, bmask, thresh, im_inds=inst["im_inds"])}


@torch.no_grad()
def query_box_ious(mask_logits, boxes):
    """Eq. (6)'s IoU for a query: the tight box of its binary mask (logit > 0, i.e. sigmoid > 0.5) on the
    stride-4 grid, in pixels, against the object's box. mask_logits (K, Hp/4, Wp/4), boxes (K, 4) -> (K,)."""
    return box_iou_pairs(masks_to_boxes(mask_logits > 0) * STRIDE, boxes.float())


@torch.no_grad()
def teacher_queries(t_out, targets, cfg, idx=None):
    """Each object's positives for Eq. (6), from the teacher's final prediction set t_out.
    m2f_instance_map "matched": the query the matcher (match, on the teacher's own predictions) assigns to
    the object. Mask2Former gives an object one positive, so Eq. 6 (weights normalised over the object's
    positives) makes M_I that query's mask with weight 1: the paper's text, which defines the positives as
    the samples a detector assigns to an object (Sec. 3.2.2) and says no more for Mask2Former.
    "iou_mix": also every other query of the image whose mask's box has IoU >= mix_iou with the object's
    box (duplicates that Hungarian matching trains towards "no object" but whose masks still cover it),
    all weighted by Eq. 6's exp(mu IoU) (prototypes.positive_weights, in sim.pseudo_masks_from).
    idx: match's result on t_out when the caller has it (else matched here).
    -> probs (K, Hp/s, Wp/s) their mask probabilities on the loss grid, ious (K,), gt_inds (K,) their
    objects in batch order."""
    pred = t_out["pred_masks"]                                                         # (B, Q, Hp/4, Wp/4)
    B, Q = pred.shape[:2]
    if idx is None:
        idx = match(t_out, targets, cfg["cost_class"], cfg["cost_projection"])
    bi, qi, gi = matched_pairs(idx, targets)                                           # (G',) matched pairs
    boxes = torch.cat([t["boxes"] for t in targets]).float()                           # (G, 4)
    if cfg["m2f_instance_map"] == "iou_mix":
        G = len(boxes)
        img = torch.cat([torch.full((len(t["boxes"]),), b, dtype=torch.long, device=pred.device)
                         for b, t in enumerate(targets)])                              # (G,)
        tight = masks_to_boxes(pred.flatten(0, 1) > 0).view(B, Q, 4) * STRIDE         # (B, Q, 4) pixels
        ious = box_iou_pairs(tight[img].reshape(-1, 4), boxes.repeat_interleave(Q, 0)).view(G, Q)  # (G, Q)
        keep = ious >= cfg["mix_iou"]                                                  # (G, Q)
        keep[gi, qi] = True                                                            # the matched query always
        gi, qi = keep.nonzero(as_tuple=True)                                           # (K,) by object
        bi = img[gi]
    elif cfg["m2f_instance_map"] != "matched":
        raise SystemExit(f"mask2former.py: --m2f_instance_map={cfg['m2f_instance_map']!r} — fix: matched or iou_mix")
    logits = pred[bi, qi]                                                              # (K, Hp/4, Wp/4)
    probs = to_loss_grid(logits[:, None].float(), cfg["mask_out_stride"])[:, 0].sigmoid()  # (K, Hp/s, Wp/s)
    return probs, query_box_ious(logits, boxes[gi]), gi


@torch.no_grad()
def box_query_maps(out, targets, combine="mean", mu=5.0, cost_class=2.0, cost_projection=5.0, mix_iou=0.5):
    """predict.py --boxes on Mask2Former: each given box's mask from the queries of the final prediction set
    out, matched to the boxes (with their labels) as in training. combine "best": the matched query's mask;
    "mean": Eq. (6) over the matched query and every query whose mask's box has IoU >= mix_iou with the box
    (teacher_queries' iou_mix), weighted by exp(mu IoU) -> maps (G, Hp/4, Wp/4) probabilities, scores (G,)
    the matched query's p(label) (0 for a box left unmatched: more boxes than queries), img (G,)."""
    G = sum(len(t["boxes"]) for t in targets)
    dev = out["pred_masks"].device
    img = torch.cat([torch.full((len(t["boxes"]),), b, dtype=torch.long, device=dev) for b, t in enumerate(targets)])
    idx = match(out, targets, cost_class, cost_projection)
    bi, qi, gi = matched_pairs(idx, targets)
    labels = torch.cat([t["labels"] for t in targets]).to(dev)
    scores = torch.zeros(G, device=dev)
    scores[gi] = out["pred_logits"][bi, qi].float().softmax(-1)[torch.arange(len(gi), device=dev), labels[gi]]
    if combine == "best":
        maps = torch.zeros((G,) + out["pred_masks"].shape[-2:], device=dev)
        maps[gi] = out["pred_masks"][bi, qi].float().sigmoid()
    elif combine == "mean":
        probs, ious, gk = teacher_queries(out, targets, dict(cost_class=cost_class, cost_projection=cost_projection,
                                                             m2f_instance_map="iou_mix", mix_iou=mix_iou,
                                                             mask_out_stride=STRIDE), idx)
        maps = prototypes.instance_map(probs, prototypes.positive_weights(ious, gk, G, mu), gk, G)
    else:
        raise SystemExit(f"predict.py: --combine={combine!r} — fix: --combine=mean or --combine=best")
    return maps, scores, img


@torch.no_grad()
def pseudo_masks(t_out, targets, protos, obj, cfg):
    """SIM's maps for every object (sim.pseudo_masks_from: Eq. 1, 6, 7 and the thresholds), from the teacher's
    per-pixel embeddings (Eq. 1's features Z', mask_features brought to the loss grid by
    prototypes.normalize_features) and its query masks (teacher_queries) -> sim.pseudo_masks' dict."""
    feats = prototypes.normalize_features(t_out["mask_features"], STRIDE // cfg["mask_out_stride"])  # (B, D, Hp/s, Wp/s)
    probs, ious, gi = teacher_queries(t_out, targets, cfg)
    return sim.pseudo_masks_from(feats, probs, ious, gi, protos, obj, cfg)


def training_losses(out, t_out, state, images, targets, it, cfg):
    """One step's losses for Mask2Former (step.train_step's mask2former branch; it 0-based): per prediction
    set, match each object to a query from boxes alone (match); the matched queries' masks get the box terms
    (box_terms) and, with the teacher on (t_out: its final prediction set), SIM's L_pseudo and L_paste
    (sim.sim_losses on pseudo_masks) after sim_start_iter; every query gets the class term (class_loss).
    Combined as Eq. (10) (losses.total_loss: the pairwise warm-up, lambda1's ramp, lambda2) with the class
    term in place of FCOS's, summed over the prediction sets as the reference sums its terms, the mask terms
    weighted mask_weight, the class term class_weight. -> (loss, logged terms, pm, obj, the student's unit
    per-pixel features for the prototype update (sim.after_step's feats)); pm, obj, feats None without t_out."""
    if cfg["method"] not in ("boxinst", "sim"):
        raise SystemExit(f"mask2former.py: --method={cfg['method']} — fix: --method=boxinst or sim with "
                         f"--arch=mask2former (it trains from boxes)")
    if not cfg["paste_detector"]:
        raise SystemExit("mask2former.py: --paste_detector=False has no meaning without FCOS — fix: --paste_detector=True")
    sets = prediction_sets(out)
    indices = [match(p, targets, cfg["cost_class"], cfg["cost_projection"]) for p in sets]
    matched = matched_queries(sets, indices, targets, cfg["mask_out_stride"])
    extra, affinity, pm, obj, feats = {}, None, None, None, None
    if t_out is not None:
        obj = sim.objects(targets, images.shape[-2:], cfg["mask_out_stride"], cfg["occlusion_aware"],
                          images if cfg["color_weight"] > 0 else None)
        pm = pseudo_masks(t_out, targets, state.protos, obj, cfg)
        if it + 1 > cfg["sim_start_iter"]:
            extra = sim.sim_losses(matched, pm, obj, cfg)
        if cfg["pairwise_affinity"] == "color_feat":  # the official preset: x the teacher's feature affinity
            affinity = sim.feature_similarity(to_loss_grid(t_out["mask_features"].float(), cfg["mask_out_stride"]))
        feats = prototypes.normalize_features(out["mask_features"].detach(), STRIDE // cfg["mask_out_stride"])
    terms = dict(box_terms(matched, images, targets, cfg, affinity), **extra)
    # each term is a mean over the matched pairs of all sets: x the number of sets = the sum over the sets
    scale = len(sets) * cfg["mask_weight"]
    loss, logs = losses.total_loss({k: v * scale for k, v in terms.items()}, it + 1, cfg["lambda1"], cfg["lambda2"],
                                   cfg["sim_start_iter"], cfg["pairwise_warmup_iters"], losses.lambda1_ramp_length(cfg),
                                   cfg["lambda1_ramp_origin"])
    cls = cfg["class_weight"] * sum(class_loss(p["pred_logits"], targets, idx, cfg["no_object_weight"])
                                    for p, idx in zip(sets, indices))
    logs["loss_cls"] = cls.detach()
    return loss + cls, logs, pm, obj, feats
