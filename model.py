"""
The network: torchvision ResNet + FPN (P3-P7), the FCOS head, and CondInst's mask branch,
controller and dynamic mask head. BoxInst and SIM use exactly this network; they differ
only in their losses (losses.py) and in what is built around it (prototypes.py, copypaste.py).

References: FCOS (Tian et al. 2019), CondInst (Tian et al. 2020), BoxInst (Tian et al. 2021),
as the AdelaiDet reference implements them (docs/official_code.md, Part B).

Reading order: aligned_bilinear -> FPN -> FCOSHead -> MaskBranch -> dynamic mask head ->
CondInst (training forward, then inference) -> fold_batchnorm (forward-only twins) -> build_model
-> load_checkpoint (the one checkpoint loader of every script).
The backbones are in backbone.py, box helpers in box_ops.py, SIM's EMA teacher in sim.py.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import batched_nms

import losses
from backbone import Backbone
from box_ops import box_mask_centers, decode_boxes, host_to_device, mask_centers

# -----------------------------------------------------------------------------


def aligned_bilinear(x, factor):
    """Upsample (N, C, h, w) -> (N, C, f*h, f*w) keeping stride-grid cell centres aligned.

    CondInst pads, resizes with align_corners=True and re-crops so cell centres line up (a plain
    F.interpolate is half a cell off). Factor 2 in closed form (_upsample2_aligned: 4x faster backward).
    """
    if factor == 1:
        return x
    if factor == 2:
        return _upsample2_aligned(_upsample2_aligned(x, -2), -1)
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")                       # (N, C, h+1, w+1)
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]                         # (N, C, f*h, f*w)


def _upsample2_aligned(x, dim):
    """aligned_bilinear's factor 2 along one dim (-2 or -1): out[2m+1] = x[m], out[2m] = (x[m-1] +
    x[m]) / 2 with x[-1] = x[0] (the replicate pad). -> the dim twice as long."""
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)   # x[m-1]
    return torch.stack([(prev + x) * 0.5, x], dim).flatten(dim - 1, dim)    # even, odd interleaved


def compute_locations(feature_sizes, strides, device):
    """Pixel coordinates of every feature cell, levels concatenated (level-major, row-major): cell (i, j)
    of a stride-s level sits at (j*s + s//2, i*s + s//2). -> locations (L, 2) float (x, y), loc_level (L,)."""
    locs, levels = [], []
    for lvl, ((h, w), s) in enumerate(zip(feature_sizes, strides)):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        locs.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))  # (h*w, 2)
        levels.append(torch.full((h * w,), lvl, device=device, dtype=torch.long))
    return torch.cat(locs), torch.cat(levels)


# -----------------------------------------------------------------------------
# FPN (the backbones are in backbone.py)


class FPN(nn.Module):
    """Feature pyramid P3-P7: lateral 1x1 + output 3x3 on C3-C5, nearest top-down, P6 from P5, P7 from ReLU(P6).

    with_p2 adds P2 = lateral(C2) + up(P3's top-down sum) for the stride-4 mask branch (mask_out_stride
    2), without an output conv: the mask branch's refine conv follows, and the head never sees P2.
    """

    def __init__(self, in_channels, channels=256, with_p2=False):
        super().__init__()
        c2, *in_channels = in_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.lateral_p2 = nn.Conv2d(c2, channels, 1) if with_p2 else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # detectron2's "c2_xavier_fill"
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats):
        c2, c3, c4, c5 = feats
        l5 = self.lateral[2](c5)
        l4 = self.lateral[1](c4) + F.interpolate(l5, size=c4.shape[-2:], mode="nearest")
        l3 = self.lateral[0](c3) + F.interpolate(l4, size=c3.shape[-2:], mode="nearest")
        p3, p4, p5 = self.output[0](l3), self.output[1](l4), self.output[2](l5)
        p6 = self.p6(p5)
        p7 = self.p7(F.relu(p6))
        if self.lateral_p2 is None:
            return [p3, p4, p5, p6, p7]   # strides 8, 16, 32, 64, 128
        p2 = self.lateral_p2(c2) + F.interpolate(l3, size=c2.shape[-2:], mode="nearest")
        return [p2, p3, p4, p5, p6, p7]   # strides 4, 8, ..., 128


# -----------------------------------------------------------------------------
# FCOS head (+ CondInst's controller) and CondInst's mask branch


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def conv_gn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(32, cout), cout), nn.ReLU(inplace=True)]


class FCOSHead(nn.Module):
    """Shared over levels: cls tower -> class logits; box tower -> ltrb, centerness and the controller
    (CondInst: the dynamic mask head's parameters at a location). Only the few locations that get a mask
    read the controller, so controller_at() evaluates its 3x3 conv there alone (the dense conv's
    numbers, test_model checks; the dense map would be 11% of the demo model's FLOPs).
    """

    def __init__(self, channels, num_classes, num_params, num_convs=4, num_levels=5, prior_prob=0.01):
        super().__init__()
        self.cls_tower = nn.Sequential(*sum([conv_gn_relu(channels, channels) for _ in range(num_convs)], []))
        self.box_tower = nn.Sequential(*sum([conv_gn_relu(channels, channels) for _ in range(num_convs)], []))
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(channels, 1, 3, padding=1)
        self.controller = nn.Conv2d(channels, num_params, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats, classify=True):
        """feats: list of (B, Ch, H_l, W_l) -> flattened (B, L, .) outputs over all levels, and the box tower's
        output per level (for controller_at). classify=False: no class branch (SIM's teacher)."""
        flat = lambda t: t.flatten(2).transpose(1, 2)    # (B, K, H, W) -> (B, H*W, K)
        cls, reg, ctr, box_feats = [], [], [], []
        for lvl, x in enumerate(feats):
            b = self.box_tower(x)
            if classify:
                cls.append(flat(self.cls_logits(self.cls_tower(x))))
            # ReLU(scale * x): distances in stride units (the reference's norm_reg_targets)
            reg.append(flat(F.relu(self.scales[lvl](self.bbox_pred(b)))))
            ctr.append(flat(self.ctrness(b)))
            box_feats.append(b)                 # (B, Ch, H_l, W_l)
        return (torch.cat(cls, 1) if classify else None,  # (B, L, C)
                torch.cat(reg, 1),              # (B, L, 4)
                torch.cat(ctr, 1).squeeze(2),   # (B, L)
                box_feats)

    def controller_at(self, box_feats, im_inds, loc_inds):
        """The controller's 3x3 conv (zero padding 1) at K locations only -> params (K, P).
        im_inds (K,) image, loc_inds (K,) flat index over all levels (level-major, row-major)."""
        sizes = [f.shape[-2:] for f in box_feats]
        padded = torch.cat([F.pad(f, (1, 1, 1, 1)).flatten(2) for f in box_feats], 2)  # (B, Ch, sum (H+2)(W+2))
        # for every location, the flat indices of its 3x3 neighbourhood in `padded`, row-major (dy, dx)
        nbrs, offset = [], 0
        for h, w in sizes:
            r = torch.arange(h, device=padded.device)[:, None, None, None]              # (h, 1, 1, 1)
            c = torch.arange(w, device=padded.device)[None, :, None, None]              # (1, w, 1, 1)
            d = torch.arange(3, device=padded.device)
            nb = offset + (r + d[:, None]) * (w + 2) + c + d[None, :]                    # (h, w, 3, 3)
            nbrs.append(nb.reshape(h * w, 9))
            offset += (h + 2) * (w + 2)
        nb = torch.cat(nbrs)[loc_inds]                                                   # (K, 9)
        # index_select: the backward of padded[im_inds[:, None], :, nb] (index_put_, accumulate) adds the
        # overlapping neighbourhoods with atomics across CPU threads, so its rounding changed run to run
        B, Ch, Lp = padded.shape
        rows = padded.permute(0, 2, 1).reshape(B * Lp, Ch)                               # (B * sum (H+2)(W+2), Ch)
        patches = rows.index_select(0, (im_inds[:, None] * Lp + nb).flatten()).view(-1, 9, Ch)  # (K, 9, Ch)
        weight = self.controller.weight.permute(0, 2, 3, 1).flatten(1)                   # (P, 9*Ch), same order
        return F.linear(patches.flatten(1), weight, self.controller.bias)                # (K, P)


def conv_bn_relu(cin, cout):
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MaskBranch(nn.Module):
    """CondInst's bottom module: P3-P5 refined, fused at stride 8, a conv tower, then out_channels
    (16 for BoxInst/SIM) mask features shared by every instance of the image. With num_levels=4 it
    reads P2-P5 and works at stride 4 instead (mask_out_stride 2)."""

    def __init__(self, in_channels, channels=128, out_channels=16, num_convs=4, num_levels=3):
        super().__init__()
        self.refine = nn.ModuleList(nn.Sequential(*conv_bn_relu(in_channels, channels)) for _ in range(num_levels))
        self.tower = nn.Sequential(*sum([conv_bn_relu(channels, channels) for _ in range(num_convs)], []),
                                   nn.Conv2d(channels, out_channels, 1))

    def forward(self, feats):
        x = self.refine[0](feats[0])                                   # (B, Cb, H/s, W/s), s = 8 (or 4)
        for i in range(1, len(self.refine)):
            y = self.refine[i](feats[i])                               # (B, Cb, H/(s 2^i), W/(s 2^i))
            x = x + aligned_bilinear(y, x.shape[-2] // y.shape[-2])
        return self.tower(x)                                           # (B, D, H/s, W/s)


# -----------------------------------------------------------------------------
# Dynamic mask head: every instance gets its own tiny FCN whose weights come from the controller


def dynamic_head_shapes(in_channels, channels=8, num_layers=3):
    """(in, out) of each 1x1 conv: (D+2)->8, 8->8, 8->1 by default."""
    dims = [in_channels + 2] + [channels] * (num_layers - 1) + [1]
    return list(zip(dims[:-1], dims[1:]))


def num_dynamic_params(in_channels, channels=8, num_layers=3):
    """233 for 16 mask channels, 169 for 8: sum of weights and biases of all layers."""
    return sum(i * o + o for i, o in dynamic_head_shapes(in_channels, channels, num_layers))


def relative_coords(inst_locations, inst_levels, sizes_of_interest, H, W, stride=8):
    """CondInst's relative coordinates: (instance location - pixel location) / the instance level's size
    of interest, for the pixels of an (H, W) map at `stride` (pixel j at j*stride + stride//2).
    Always float32, also under autocast: in bf16 a coordinate past 1024 px is rounded to a multiple
    of 8 px (up to 4 px off, 0.06 after the /64 of P3), as the reference subtracts in float32 too.
    inst_locations (K, 2) (x, y), inst_levels (K,) -> rel_x (K, W), rel_y (K, H), float32."""
    dev = inst_locations.device
    ys = torch.arange(H, device=dev, dtype=torch.float32) * stride + stride // 2       # (H,)
    xs = torch.arange(W, device=dev, dtype=torch.float32) * stride + stride // 2       # (W,)
    soi = torch.tensor(sizes_of_interest, dtype=torch.float32).to(dev, non_blocking=True)[inst_levels]  # (K,)
    loc = inst_locations.float()                                                        # (K, 2)
    return (loc[:, 0, None] - xs[None]) / soi[:, None], (loc[:, 1, None] - ys[None]) / soi[:, None]


def dynamic_mask_head(mask_feats, params, im_inds, inst_locations, inst_levels, sizes_of_interest,
                      channels=8, num_layers=3, stride=8):
    """Run K instance-specific FCNs (1x1 convolutions) at once.

    mask_feats (B, D, H, W) at `stride`; params (K, P) laid out [W1|W2|W3|b1|b2|b3];
    im_inds (K,) image of each instance; inst_locations (K, 2) its FCOS location (x, y);
    inst_levels (K,) its FPN level; sizes_of_interest per level normalise the relative coords.
    Returns mask logits (K, 1, 2H, 2W) at stride/2, the mask-out stride (aligned bilinear x2).
    """
    B, D, H, W = mask_feats.shape
    K = params.shape[0]
    if K == 0:  # keep the graph connected so DDP sees a gradient for every parameter
        return mask_feats.new_zeros((0, 1, 2 * H, 2 * W)) + (mask_feats.sum() + params.sum()) * 0
    shapes = dynamic_head_shapes(D, channels, num_layers)
    # split the parameter vector: all weights first, then all biases
    chunks = torch.split(params.to(mask_feats.dtype), [i * o for i, o in shapes] + [o for _, o in shapes], dim=1)
    weights, biases = chunks[:num_layers], chunks[num_layers:]
    rel_x, rel_y = relative_coords(inst_locations, inst_levels, sizes_of_interest, H, W, stride)
    rel_x, rel_y = rel_x.to(mask_feats.dtype), rel_y.to(mask_feats.dtype)              # (K, W), (K, H)
    # layer 1 on [rel_x, rel_y, feats] without building the (K, D+2, H, W) input: its coordinate
    # columns act on rel_x (a row) and rel_y (a column), its feature columns are one matmul per image
    # with that image's instances stacked (the same sums; 2-3x faster with the backward on CPU)
    o = shapes[0][1]
    w1 = weights[0].reshape(K, o, D + 2)
    x = (w1[:, :, 0, None, None] * rel_x[:, None, None, :] + w1[:, :, 1, None, None] * rel_y[:, None, :, None]
         + biases[0][:, :, None, None])                                                 # (K, o, H, W)
    order = torch.argsort(im_inds, stable=True)                                         # instances by image
    w_feat = w1[:, :, 2:].index_select(0, order)                                        # (K, o, D)
    per_image = torch.split(w_feat, torch.bincount(im_inds, minlength=B).tolist())
    f = mask_feats.reshape(B, D, H * W)
    feat_term = torch.cat([(wb.reshape(-1, D) @ f[b]).reshape(-1, o, H, W) for b, wb in enumerate(per_image)])
    x = x + feat_term.index_select(0, torch.argsort(order))                             # back to instance order
    # the other layers: a batched matmul over instances
    x = x.reshape(K, o, H * W)
    for l in range(num_layers):
        if l > 0:
            i, o = shapes[l]
            x = torch.baddbmm(biases[l][:, :, None], weights[l].reshape(K, o, i), x)   # (K, o, H*W)
        if l < num_layers - 1:
            x = F.relu(x)
    return aligned_bilinear(x.reshape(K, 1, H, W), 2)                                   # (K, 1, 2H, 2W)


# -----------------------------------------------------------------------------
# CondInst


class CondInst(nn.Module):
    """Backbone -> FPN -> FCOS head + controller; mask branch -> dynamic mask head.

    forward(images, targets) (training) returns a dict of raw outputs, FCOS targets and the
    mask logits of the positives selected for the mask losses; compute_losses turns it into
    losses. predict(images, targets) returns detections at the original image size.
    """

    strides = (8, 16, 32, 64, 128)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        self.num_classes = cfg["num_classes"]
        # mask_out_stride 4 (reference): mask branch on P3-P5 at stride 8; 2: on P2-P5 at stride 4 (C2 read)
        self.mask_out_stride = cfg["mask_out_stride"]
        self.backbone = Backbone(cfg["backbone"], cfg["pretrained"], cfg["backbone_norm"], cfg["freeze_at"],
                                 with_c2=self.mask_out_stride == 2)
        self.fpn = FPN(self.backbone.out_channels, cfg["fpn_channels"], with_p2=self.mask_out_stride == 2)
        D = cfg["mask_out_channels"]
        self.num_params = num_dynamic_params(D, cfg["mask_head_channels"], cfg["mask_head_layers"])
        self.head = FCOSHead(cfg["fpn_channels"], self.num_classes, self.num_params, cfg["head_convs"])
        self.mask_branch = MaskBranch(cfg["fpn_channels"], cfg["mask_branch_channels"], D, cfg["mask_branch_convs"],
                                      num_levels=4 if self.mask_out_stride == 2 else 3)
        # ImageNet statistics in the 0-255 range: images arrive as raw uint8 RGB
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def soi_levels(self):
        """Relative-coordinate normalisers per level: sizes_of_interest plus 2x the last one."""
        soi = list(self.cfg["sizes_of_interest"])
        return soi + [soi[-1] * 2]

    def features(self, images, classify=True):
        """images uint8 (B, 3, Hp, Wp) -> dict of the network's dense outputs (cls_logits None
        without classify)."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if self.cfg["channels_last"]:  # NHWC convolutions: faster on CPU (oneDNN) and on tensor cores
            x = x.contiguous(memory_format=torch.channels_last)
        pyramid = self.fpn(self.backbone(x))                           # [P2,] P3, ..., P7
        feats = pyramid[-5:]                                           # P3-P7: the FCOS levels
        cls, reg, ctr, box_feats = self.head(feats, classify)
        mask_feats = self.mask_branch(pyramid[:-2])                    # (B, D, Hp/2s, Wp/2s), s = mask_out_stride
        locations, loc_level = compute_locations([f.shape[-2:] for f in feats], self.strides, images.device)
        return dict(cls_logits=cls, reg=reg, ctr_logits=ctr, box_feats=box_feats, mask_feats=mask_feats,
                    locations=locations, loc_level=loc_level)

    def mask_logits(self, out, inst):
        """Dynamic mask head on the instances `inst` (im_inds, loc_inds) -> (K, 1, Hp/s, Wp/s), s = mask_out_stride."""
        params = self.head.controller_at(out["box_feats"], inst["im_inds"], inst["loc_inds"])  # (K, P)
        return dynamic_mask_head(out["mask_feats"], params, inst["im_inds"], out["locations"][inst["loc_inds"]],
                                 out["loc_level"][inst["loc_inds"]], self.soi_levels,
                                 self.cfg["mask_head_channels"], self.cfg["mask_head_layers"], 2 * self.mask_out_stride)

    def forward(self, images, targets):
        """Training forward: dense outputs, FCOS targets, selected positives and their mask logits."""
        out = self.features(images)
        gt_boxes = [t["boxes"] for t in targets]
        if self.cfg["method"] == "full" and all("masks" in t for t in targets):
            centers = [mask_centers(t["masks"]) for t in targets]       # CondInst: mask centroid
        else:
            centers = [box_mask_centers(b, images.shape[-2:]) for b in gt_boxes]  # BoxInst: box-mask centroid
        with torch.no_grad():
            out["targets"] = losses.fcos_targets(out["locations"], out["loc_level"], self.strides, gt_boxes,
                                                 [t["labels"] for t in targets], self.num_classes,
                                                 self.cfg["sizes_of_interest"], self.cfg["center_radius"], centers)
            out["targets"]["num_gts"] = host_to_device([len(b) for b in gt_boxes], images.device)
            out["inst"] = self.select_instances(out)
        out["mask_logits"] = self.mask_logits(out, out["inst"])          # (K, 1, Hp/s, Wp/s)
        return out

    def select_instances(self, out):
        """Positives that train the mask head. BoxInst/SIM (topk_proposals_per_im > 0): per image, the
        k = max(64 // G, 1) best of each GT object by sigmoid(cls max) * sigmoid(ctr) (G = objects with
        positives). CondInst (max_proposals > 0): a random subset of all positives."""
        t = out["targets"]
        im_inds, loc_inds = torch.nonzero(t["labels"] != self.num_classes, as_tuple=True)   # (K,), (K,)
        gt_inds = t["gt_inds"][im_inds, loc_inds]                                           # (K,)
        topk = self.cfg["topk_proposals_per_im"]
        if topk > 0 and gt_inds.numel() > 0:
            score = (out["cls_logits"][im_inds, loc_inds].sigmoid().max(1).values
                     * out["ctr_logits"][im_inds, loc_inds].sigmoid())                     # (K,)
            n_gt = int(t["num_gts"].sum())
            order = torch.argsort(score, descending=True)
            order = order[torch.argsort(gt_inds[order], stable=True)]   # grouped by GT, best first
            counts = torch.bincount(gt_inds, minlength=n_gt)                                # (G_all,)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=order.device) - starts[gt_inds[order]]
            gt_image = torch.repeat_interleave(torch.arange(len(t["num_gts"]), device=order.device), t["num_gts"])
            G = torch.zeros(len(t["num_gts"]), dtype=torch.long, device=order.device).index_add_(0, gt_image, (counts > 0).long())
            k = (topk // G.clamp(min=1)).clamp(min=1)                                        # (B,)
            keep = order[rank < k[gt_image[gt_inds[order]]]]
        elif self.cfg["max_proposals"] > 0 and gt_inds.numel() > self.cfg["max_proposals"]:
            keep = torch.randperm(gt_inds.numel(), device=gt_inds.device)[: self.cfg["max_proposals"]]
        else:
            keep = torch.arange(gt_inds.numel(), device=gt_inds.device)
        return dict(im_inds=im_inds[keep], loc_inds=loc_inds[keep], gt_inds=gt_inds[keep],
                    labels=t["labels"][im_inds[keep], loc_inds[keep]])

    # ---- inference ----

    @torch.no_grad()
    def predict(self, images, targets):
        """images uint8 (B, 3, Hp, Wp); targets give 'size' (h, w) and 'orig_size' (H0, W0).
        Returns per image: boxes (K, 4) in the original frame, scores, labels, masks (K, H0, W0) bool."""
        c = self.cfg
        out = self.features(images)
        B = images.shape[0]
        strides = images.new_tensor(self.strides, dtype=torch.float32)[out["loc_level"]]     # (L,)
        dets = []  # per image: (locations, classes, scores, boxes) after NMS
        for b in range(B):
            p = out["cls_logits"][b].sigmoid() * out["ctr_logits"][b].sigmoid()[:, None]     # (L, C)
            cand_loc, cand_cls, cand_p = [], [], []
            for lvl in range(len(self.strides)):               # top 1000 candidates per level
                sel = (out["loc_level"] == lvl).nonzero().squeeze(1)
                pl = p[sel]                                                                 # (L_l, C)
                idx = (pl > c["score_thresh"]).flatten().nonzero().squeeze(1)
                s = pl.flatten()[idx]
                if s.numel() > c["pre_nms_topk"]:
                    s, top = s.topk(c["pre_nms_topk"])
                    idx = idx[top]
                cand_loc.append(sel[idx // self.num_classes])
                cand_cls.append(idx % self.num_classes)
                cand_p.append(s)
            loc, cls, score = torch.cat(cand_loc), torch.cat(cand_cls), torch.cat(cand_p).sqrt()
            xy, ltrb = out["locations"][loc], out["reg"][b, loc] * strides[loc, None]       # (n, 2), (n, 4)
            boxes = decode_boxes(xy, ltrb)                                                  # (n, 4)
            keep = batched_nms(boxes, score, cls, c["nms_thresh"])[: c["max_dets"]]
            dets.append((loc[keep], cls[keep], score[keep], boxes[keep]))
        # the masks of all kept detections of the batch in one dynamic-head call
        locs = [d[0] for d in dets]
        inst = dict(im_inds=torch.cat([torch.full_like(l, b) for b, l in enumerate(locs)]), loc_inds=torch.cat(locs))
        probs = self.mask_logits(out, inst).sigmoid().split([l.numel() for l in locs])       # B x (K_b, 1, Hp/s, Wp/s)
        return [self.postprocess(m, cls, score, boxes, t) for m, (_, cls, score, boxes), t in zip(probs, dets, targets)]

    def postprocess(self, mask_probs, cls, score, boxes, target):
        """One image's detections back to its original size: mask_probs (K, 1, Hp/s, Wp/s) at the
        mask-out stride, boxes (K, 4) in the resized frame -> boxes, scores, labels, masks (K, H0, W0)."""
        (h, w), (H0, W0) = target["size"], target["orig_size"]
        masks = self.masks_at_original_size(mask_probs, target)                                # (K, H0, W0)
        boxes = boxes * boxes.new_tensor([W0 / w, H0 / h, W0 / w, H0 / h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W0)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H0)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return dict(boxes=boxes[ok], scores=score[ok], labels=cls[ok], masks=masks[ok])


    def masks_at_original_size(self, mask_probs, target):
        """mask_probs (K, 1, Hp/s, Wp/s) at the mask-out stride -> (K, H0, W0) bool: up to the
        resized frame (aligned bilinear), cropped, resized to the original size, thresholded."""
        (h, w), (H0, W0) = target["size"], target["orig_size"]
        if len(mask_probs) == 0:
            return torch.zeros((0, H0, W0), dtype=torch.bool, device=mask_probs.device)
        m = aligned_bilinear(mask_probs, self.mask_out_stride)[:, :, :h, :w]                 # (K, 1, h, w)
        m = F.interpolate(m, size=(H0, W0), mode="bilinear", align_corners=False)[:, 0]       # (K, H0, W0)
        return m > self.cfg["mask_thresh"]


# -----------------------------------------------------------------------------
# forward-only twins with the BatchNorms folded into the convs before them: the same function with
# fewer passes over the feature maps, for SIM's teacher (every step) and evaluation (BENCHMARKS.md 7a/7b)

FOLDABLE_CONVS = (nn.Conv2d, torchvision.ops.DeformConv2d)
FOLDABLE_NORMS = (nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)


def conv_bn_pairs(net):
    """(parent name, conv name, norm name) for every conv that its parent registers right before a
    BatchNorm of its width. In torchvision's ResNets (conv1 bn1, conv2 bn2, downsample 0 1) and the mask
    branch's conv-BN-ReLU the forward applies them in that order, so the BN's input is that conv's
    output. Swin (LayerNorm) and the head (GroupNorm) have none."""
    pairs = []
    for parent_name, parent in net.named_modules():
        kids = list(parent.named_children())
        for (cn, conv), (bn_name, bn) in zip(kids, kids[1:]):
            if (isinstance(conv, FOLDABLE_CONVS) and isinstance(bn, FOLDABLE_NORMS) and bn.running_var is not None
                    and bn.weight is not None and conv.out_channels == bn.weight.numel()):
                pairs.append((parent_name, cn, bn_name))
    return pairs


def fold_batchnorm(net):
    """A forward-only twin of the eval-mode network `net` in which every BatchNorm right after a conv
    is folded into that conv: BN(conv(x)) = x * (w s) + (b s + beta - mean s) with s = gamma / sqrt(var + eps)
    per output channel, exact in real arithmetic (float rounding aside). Every other tensor (FPN, head,
    GroupNorms, ...) is SHARED with `net`, not copied, so the in-place EMA of net (update_teacher) and
    load_state_dict reach the twin at once; only the folded convs own their weights, which refold()
    recomputes from net's after each update. Returns (twin, pairs), pairs = [(conv, bn, folded conv)];
    (net, []) when net has nothing to fold.
    Why: SIM's teacher runs a full forward every step and never trains, and evaluation never trains
    either, so their BNs are fixed affine maps, yet each one is a pass over a feature map; net itself
    stays as it is (its state_dict is what checkpoints hold; the teacher's EMA keeps acting on gamma,
    beta and the copied statistics, the optimizer on the student's)."""
    names = conv_bn_pairs(net)
    if not names:
        return net, []
    own = set()
    for parent, cn, _ in names:
        conv = net.get_submodule(parent).get_submodule(cn)
        own.update(id(t) for t in (conv.weight, conv.bias) if t is not None)
    shared = {id(t): t for t in list(net.parameters()) + list(net.buffers()) if id(t) not in own}
    twin = copy.deepcopy(net, memo=shared)
    pairs = []
    for parent, cn, bn_name in names:
        src, dst = net.get_submodule(parent), twin.get_submodule(parent)
        folded = getattr(dst, cn)
        if folded.bias is None:
            folded.bias = nn.Parameter(folded.weight.new_zeros(folded.out_channels), requires_grad=False)
        setattr(dst, bn_name, nn.Identity())
        pairs.append((getattr(src, cn), getattr(src, bn_name), folded))
    refold(pairs)
    return twin.eval(), pairs


@torch.no_grad()
def refold(pairs):
    """Folded conv weights and biases from the current conv and BN tensors of the unfolded network."""
    for conv, bn, folded in pairs:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)                        # (C,)
        torch.mul(conv.weight, scale.view(-1, 1, 1, 1), out=folded.weight)
        shift = bn.bias - bn.running_mean * scale
        folded.bias.copy_(shift if conv.bias is None else torch.addcmul(shift, conv.bias, scale))


# -----------------------------------------------------------------------------

MODEL_KEYS = (  # what build_model reads from the config (config.py's names and defaults)
    "backbone", "pretrained", "backbone_norm", "freeze_at", "fpn_channels", "head_convs",
    "num_classes", "mask_branch_channels", "mask_branch_convs", "mask_out_channels", "mask_out_stride",
    "mask_head_channels", "mask_head_layers", "sizes_of_interest", "center_radius", "topk_proposals_per_im",
    "max_proposals", "method", "score_thresh", "pre_nms_topk", "nms_thresh", "max_dets", "mask_thresh", "channels_last",
)


def build_model(cfg):
    """The network from a flat config dict (config.defaults() as a script set it, or a checkpoint's 'config'):
    CondInst, or with arch="mask2former" mask2former.Mask2Former."""
    if cfg["arch"] == "mask2former":
        from mask2former import Mask2Former  # here: mask2former.py imports sim.py, which imports this file
        model = Mask2Former(cfg)
        return model.to(memory_format=torch.channels_last) if cfg["channels_last"] else model
    if cfg["arch"] != "condinst":
        raise SystemExit(f"model.py: --arch={cfg['arch']!r} — fix: --arch=condinst or --arch=mask2former")
    missing = [k for k in MODEL_KEYS if k not in cfg]
    if missing:
        raise SystemExit(f"model.py: config lacks {missing} — fix: use a checkpoint written by this train.py")
    cfg = {k: cfg[k] for k in MODEL_KEYS}
    if cfg["mask_out_stride"] not in (2, 4):
        raise SystemExit(f"model.py: mask_out_stride={cfg['mask_out_stride']} — fix: 4 (reference) or 2 (small images)")
    model = CondInst(cfg)
    return model.to(memory_format=torch.channels_last) if cfg["channels_last"] else model


def load_checkpoint(path):
    """A checkpoint written by train.py, onto the CPU whatever device wrote it: RNG states must be CPU
    byte tensors (torch.set_rng_state, Generator.set_state), the memory bank lives on the CPU, and
    load_state_dict copies weights onto the model's own device. weights_only: plain values and tensors
    only, so a checkpoint from elsewhere cannot run code when loaded. mmap: a process reads only the
    tensors it uses (ranks 1..N-1 never page in rank 0's bank stored in ckpt.pt)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def copy_matching_weights(model, state_dict):
    """Fine-tuning from another run's weights: every tensor of state_dict (parameters and buffers) whose name
    and shape the model has is copied into it; the model's other tensors keep their fresh initialisation
    (a classifier for another class count: FCOS's cls_logits with its prior-probability bias).
    -> (copied names, left-out model tensors as "name (model shape, checkpoint shape or 'absent')")."""
    own = model.state_dict()
    copied = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(copied, strict=False)
    left = [f"{k} {tuple(v.shape)} vs {tuple(state_dict[k].shape) if k in state_dict else 'absent'}"
            for k, v in own.items() if k not in copied]
    return sorted(copied), left


def model_from_checkpoint(ckpt, state_dict=None):
    """The network of a loaded checkpoint, on the CPU: built from its config (its arch: CondInst or
    Mask2Former; a checkpoint written before the key existed is CondInst), with its weights (or
    state_dict's: a SIM checkpoint's teacher)."""
    model = build_model(dict({"arch": "condinst"}, **ckpt["config"]))
    model.load_state_dict(ckpt["model"] if state_dict is None else state_dict)
    return model
