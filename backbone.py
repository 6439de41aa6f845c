"""
The backbones: torchvision's ResNets (and a 1-block ResNet-10 for the CPU demo), ResNet-101 with
deformable convs in res3-res5 (DCNv2) and Swin-B, each returning C2-C5 for the FPN in model.py,
with ImageNet weights through torchvision's weights API or a local file.
"""

import os

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import FrozenBatchNorm2d

def resnet10(weights=None, **kwargs):
    """torchvision's ResNet with one BasicBlock per stage: half of ResNet-18's compute. There are no
    ImageNet weights for it; it exists for the from-scratch CPU demo, where iterations per minute
    matter more than depth."""
    assert weights is None, "resnet10 has no pretrained weights"
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], **kwargs)


RESNETS = {  # name -> (builder, torchvision weights enum, channels of C2, C3, C4, C5)
    "resnet10": (resnet10, None, (64, 128, 256, 512)),
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights", (64, 128, 256, 512)),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights", (64, 128, 256, 512)),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights", (256, 512, 1024, 2048)),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights", (256, 512, 1024, 2048)),
    # the paper's Tab. 1 backbones: ResNet-101 with deformable 3x3 convs (DCNv2) in res3-res5, Swin-B
    "resnet101_dcn": (torchvision.models.resnet101, "ResNet101_Weights", (256, 512, 1024, 2048)),
    "swin_b": (torchvision.models.swin_b, "Swin_B_Weights", (128, 256, 512, 1024)),
}
DEFORMABLE_STAGES = {"resnet101_dcn": ("layer2", "layer3", "layer4")}  # torchvision's names of res3-res5


class ModulatedDeformConv(torchvision.ops.DeformConv2d):
    """DCNv2 (modulated deformable conv) in place of a ResNet block's 3x3 conv: a 3x3 conv on the input
    predicts 9 (dy, dx) offsets and 9 modulation weights per location, torchvision.ops.deform_conv2d
    samples there. The offset conv starts at zero (a plain conv with every tap weighted by 0.5, as
    detectron2's DeformBottleneckBlock starts); `weight` keeps the replaced conv's ImageNet weights."""

    def __init__(self, conv):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        self.offset = nn.Conv2d(conv.in_channels, 3 * k, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x):
        # float32 even under autocast (torchvision's CPU kernel has no bf16; on CUDA its autocast rule does the same)
        x = x.float()
        o = self.offset(x).float()                                     # (B, 3k, H', W')
        k2 = 2 * o.shape[1] // 3
        return torchvision.ops.deform_conv2d(x, o[:, :k2], self.weight, self.bias, self.stride, self.padding,
                                             self.dilation, mask=o[:, k2:].sigmoid())


class SwinTrunk(nn.Module):
    """torchvision's Swin transformer as a C2-C5 trunk: the outputs of its 4 stages (strides 4-32,
    NHWC inside) each through a LayerNorm of its own (the detection backbones' per-stage norms), as NCHW."""

    def __init__(self, net, channels, with_c2=True):
        super().__init__()
        self.features = net.features                                   # [embed, s1, merge, s2, merge, s3, merge, s4]
        # C2's norm only where C2 is read (the stride-2 mask output): an unused trainable norm stops DDP
        # (find_unused_parameters=False) at its second iteration; Identity keeps the indices of the others
        self.norms = nn.ModuleList(nn.LayerNorm(c) if i > 0 or with_c2 else nn.Identity() for i, c in enumerate(channels))
        self.with_c2 = with_c2

    def forward(self, x):
        outs = []
        for i, f in enumerate(self.features):
            x = f(x)                                                   # (B, H/s, W/s, C)
            if i % 2 == 1:
                unused = i == 1 and not self.with_c2
                outs.append(None if unused else self.norms[i // 2](x).permute(0, 3, 1, 2).contiguous())
        return outs                                                    # C2 (None without with_c2), C3, C4, C5


def load_backbone_weights(name, pretrained):
    """State dict for a torchvision ResNet: 'imagenet' (torchvision's weights API, cached in
    $TORCH_HOME/hub/checkpoints) or a path to a .pth file. Offline without a cache -> one clear line."""
    if pretrained == "imagenet":
        if RESNETS[name][1] is None:
            raise SystemExit(f"backbone.py: {name} has no ImageNet weights — fix: --pretrained='' (random init) "
                             f"or a deeper ResNet (resnet18/34/50/101)")
        weights = getattr(torchvision.models, RESNETS[name][1]).IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=True)
        except Exception as e:  # URLError, socket errors, ...: all mean "could not download"
            fname = os.path.basename(weights.url)
            raise SystemExit(
                f"backbone.py: cannot load ImageNet weights for {name} ({type(e).__name__}: {e}) — fix: connect "
                f"to the internet once, or put {fname} in $TORCH_HOME/hub/checkpoints/, or pass "
                f"--pretrained=/path/to/{fname}, or --pretrained='' for random init")
    if not os.path.isfile(pretrained):
        raise SystemExit(f"backbone.py: {pretrained}: backbone weights file not found — fix: pass an existing "
                         f".pth path, --pretrained=imagenet, or --pretrained='' for random init")
    sd = torch.load(pretrained, map_location="cpu", weights_only=True)
    return sd.get("model", sd) if isinstance(sd, dict) else sd


class Backbone(nn.Module):
    """ResNet (or Swin) trunk returning C2, C3, C4, C5 (strides 4, 8, 16, 32; C2 only feeds a stride-2 mask output).

    norm='frozen' is the reference (FrozenBatchNorm2d with ImageNet statistics); norm='bn' trains
    BatchNorm, which is what a from-scratch run (the embedded demo, no ImageNet weights) needs.
    freeze_at=2 freezes the stem and res2 (torchvision's layer1), as the reference does.
    """

    def __init__(self, name="resnet50", pretrained="", norm="frozen", freeze_at=2, with_c2=True):
        super().__init__()
        if name not in RESNETS:
            raise SystemExit(f"backbone.py: --backbone={name!r} is not a backbone — fix: one of {', '.join(RESNETS)}")
        builder, _, self.out_channels = RESNETS[name]
        swin = name.startswith("swin")
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        net = builder(weights=None) if swin else builder(weights=None, norm_layer=norm_layer)
        if pretrained:
            sd = load_backbone_weights(name, pretrained)
            head = ("head.",) if swin else ("fc.",)
            sd = {k: v for k, v in sd.items() if not k.startswith(head)}
            missing, unexpected = net.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith(head)]
            if missing:
                raise SystemExit(f"backbone.py: {pretrained}: not a {name} state dict (missing {missing[:3]}...) "
                                 f"— fix: pass weights of the same network")
        if swin:  # LayerNorm throughout: norm does not apply; freeze_at 1 freezes the patch embedding, 2 also stage 1
            self.trunk = SwinTrunk(net, self.out_channels, with_c2)
            for m in list(self.trunk.features)[:freeze_at]:
                for p in m.parameters():
                    p.requires_grad_(False)
            return
        self.trunk = None
        for stage in DEFORMABLE_STAGES.get(name, ()):
            for block in getattr(net, stage):
                block.conv2 = ModulatedDeformConv(block.conv2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        frozen = [self.stem, self.layer1][:freeze_at]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def forward(self, x):
        if self.trunk is not None:
            return self.trunk(x)
        c2 = self.layer1(self.stem(x))  # (B, C2, H/4, W/4)
        c3 = self.layer2(c2)            # (B, C3, H/8, W/8)
        c4 = self.layer3(c3)            # (B, C4, H/16, W/16)
        c5 = self.layer4(c4)            # (B, C5, H/32, W/32)
        return [c2, c3, c4, c5]
