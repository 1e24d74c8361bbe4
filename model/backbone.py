"""Backbones: dilated ResNets (output stride 8), VGG-16-bn (PFENet's slices) and DINOv2 vision
transformers (model/vit.py, stride 14), and their weight loading.

Every backbone exposes the same two calls the network needs:

- ``mid_level(x) -> (layer2, layer3)``: the features behind ``F = concat(layer3, layer2)``;
- ``high_level(layer3) -> layer4``: used only for the prior mask;

and the attributes ``layer2_channels``, ``layer3_channels``, ``layer4_channels``.

Weights come from local files. ``load_backbone_weights`` accepts the semseg "v2" deep-stem
layout (``conv1/bn1/conv2/bn2/conv3/bn3``, ``layer1..4``, ``fc``), torchvision's ResNet
layout (7×7 ``conv1``; needs ``deep_stem: False``), torchvision's VGG-16-bn layout
(``features.N``) and Meta's released DINOv2 files, reports every missing / unexpected key and
refuses a half-loaded backbone.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import BackboneWeightsError
from util.torchload import load_tensors

from .vit import DINOv2, describe_file, found_variant

log = logging.getLogger(__name__)

README_HINT = ("see docs/guide.md, 'Pretrained backbones', for where these files come from (the synthetic "
               "configs' from tools/pretrain_backbone.py)")


# --------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------
def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``. With BN in eval mode (fixed statistics: the frozen backbone) it is an
    affine map per channel, folded into the convolution's weight and bias: one pass over the
    activations instead of two. Same value up to float rounding; gradients (a trainable
    backbone) flow through the fold to the conv and BN parameters alike."""
    if bn.training or bn.running_var is None or bn.weight is None:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvBNSequential(nn.Sequential):
    """An ``nn.Sequential`` (same keys) whose Conv2d → BatchNorm2d pairs run as :func:`conv_bn`."""

    def forward(self, x):
        modules = list(self)
        i = 0
        while i < len(modules):
            m = modules[i]
            if isinstance(m, nn.Conv2d) and i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d):
                x = conv_bn(m, modules[i + 1], x)
                i += 2
            else:
                x = m(x)
                i += 1
        return x


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_bn(self.conv1, self.bn1, x))
        out = conv_bn(self.conv2, self.bn2, out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # stride on the 3x3 conv (semseg / torchvision v1.5), so both weight layouts fit
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_bn(self.conv1, self.bn1, x))
        out = self.relu(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, out)
        return self.relu(out.add_(identity))


RESNET_SPECS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """Dilated ResNet: layer3 dilation 2, layer4 dilation 4, both stride 1 (output stride 8).

    ``deep_stem``: PSPNet's three 3×3 convs (3→64→64→128); otherwise the 7×7 stem.
    ``width``: multiplies every channel count (1.0: the standard network, the only one ImageNet
    weight files fit; 0.5 halves the channels, a quarter of the convolution work, for training
    from scratch as the synthetic demos do).
    Attribute names equal the weight files' key names, so no key renaming is needed.
    """

    def __init__(self, depth: int = 50, deep_stem: bool = True, width: float = 1.0):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth {depth} is not available; config key 'layers' takes "
                             f"{sorted(RESNET_SPECS)}")
        if width <= 0:
            raise ValueError(f"ResNet width {width} must be positive (config key 'backbone_width')")
        block, counts = RESNET_SPECS[depth]
        self.depth, self.deep_stem, self.width = depth, deep_stem, width

        def ch(n: int) -> int:
            return max(1, round(n * width))

        if deep_stem:
            self.conv1 = _conv3x3(3, ch(64), stride=2)
            self.bn1 = nn.BatchNorm2d(ch(64))
            self.conv2 = _conv3x3(ch(64), ch(64))
            self.bn2 = nn.BatchNorm2d(ch(64))
            self.conv3 = _conv3x3(ch(64), ch(128))
            self.bn3 = nn.BatchNorm2d(ch(128))
            self.inplanes = ch(128)
        else:
            self.conv1 = nn.Conv2d(3, ch(64), 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(ch(64))
            self.inplanes = ch(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, ch(64), counts[0])
        self.layer2 = self._make_layer(block, ch(128), counts[1], stride=2)
        self.layer3 = self._make_layer(block, ch(256), counts[2], dilation=2)
        self.layer4 = self._make_layer(block, ch(512), counts[3], dilation=4)
        self.layer2_channels = ch(128) * block.expansion
        self.layer3_channels = ch(256) * block.expansion
        self.layer4_channels = ch(512) * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilation: int = 1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = ConvBNSequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def layer0(self, x):
        x = self.relu(conv_bn(self.conv1, self.bn1, x))
        if self.deep_stem:
            x = self.relu(conv_bn(self.conv2, self.bn2, x))
            x = self.relu(conv_bn(self.conv3, self.bn3, x))
        return self.maxpool(x)

    def mid_level(self, x):
        layer2 = self.layer2(self.layer1(self.layer0(x)))
        return layer2, self.layer3(layer2)

    def high_level(self, layer3):
        return self.layer4(layer3)

    def convert_state_dict(self, state: dict, source: str) -> tuple[dict, list[str]]:
        """Return (state in this module's key layout, classifier keys that are unused)."""
        classifier = [k for k in state if k.startswith("fc.")]
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        stem = state.get("conv1.weight")
        if stem is not None and stem.dim() == 4:
            file_deep = stem.shape[-1] == 3
            if file_deep != self.deep_stem:
                have = "a deep 3x3 stem (semseg 'v2' layout)" if file_deep else "a 7x7 stem (torchvision layout)"
                fix = "True" if file_deep else "False"
                raise BackboneWeightsError(
                    f"backbone weight file '{source}' has {have} but the config asks for "
                    f"deep_stem {self.deep_stem}; set 'deep_stem {fix}' or use the matching file "
                    f"({README_HINT})")
        return state, classifier


# --------------------------------------------------------------------------------------
# VGG-16-bn
# --------------------------------------------------------------------------------------
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# torchvision's features.N index ranges of PFENet's slices: layer0..layer3 each end with a
# max-pool (6, 13, 23, 33), layer4 is the fifth block without its pool (43 is not used). So
# layer2 is at stride 8 and layer3/layer4 at stride 16 (30x30 at 473).
VGG_SLICES = {"layer0": (0, 7), "layer1": (7, 14), "layer2": (14, 24), "layer3": (24, 34), "layer4": (34, 43)}


class VGG16BN(nn.Module):
    """VGG-16-bn ``features`` sliced into layer0..layer4 as PFENet and the authors do: 2×2
    max-pools in ceil mode (473 → 237 → 119 → 60 → 30), layer2 256 ch at stride 8, layer3 and
    layer4 512 ch at stride 16; ``mid_level`` resizes layer2 to layer3's size."""

    def __init__(self):
        super().__init__()
        features, in_ch = [], 3
        for v in VGG16_CFG:
            if v == "M":
                features.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                features += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
        for name, (start, stop) in VGG_SLICES.items():
            setattr(self, name, ConvBNSequential(*features[start:stop]))
        self.layer2_channels, self.layer3_channels, self.layer4_channels = 256, 512, 512
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def mid_level(self, x):
        layer2 = self.layer2(self.layer1(self.layer0(x)))
        layer3 = self.layer3(layer2)
        if layer2.shape[-2:] != layer3.shape[-2:]:
            layer2 = F.interpolate(layer2, size=layer3.shape[-2:], mode="bilinear", align_corners=True)
        return layer2, layer3

    def high_level(self, layer3):
        return self.layer4(layer3)

    def convert_state_dict(self, state: dict, source: str) -> tuple[dict, list[str]]:
        classifier = [k for k in state if k.startswith("classifier.")]
        converted = {}
        for key, value in state.items():
            if key.startswith("classifier."):
                continue
            match = re.fullmatch(r"features\.(\d+)\.(.+)", key)
            if match is None:
                converted[key] = value      # already in layerN.i layout, or unexpected
                continue
            index, rest = int(match.group(1)), match.group(2)
            for name, (start, stop) in VGG_SLICES.items():
                if start <= index < stop:
                    converted[f"{name}.{index - start}.{rest}"] = value
                    break
            else:
                converted[key] = value      # a dropped pool has no tensors: report as unexpected
        return converted, classifier


# --------------------------------------------------------------------------------------
# Construction and weight loading
# --------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    classifier_unused: list[str] = field(default_factory=list)
    benign_missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def some(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = [f"backbone weights '{self.source}': {self.loaded} tensors loaded"]
        parts.append(f"classifier keys unused (expected): {some(self.classifier_unused) or 'none'}")
        parts.append(f"missing: {some(self.missing) or 'none'}")
        parts.append(f"unexpected: {some(self.unexpected) or 'none'}")
        if self.benign_missing:
            parts.append(f"BN batch counters absent (not used by BN with momentum): {len(self.benign_missing)}")
        return "; ".join(parts)


def build_backbone(layers: int = 50, vgg: bool = False, deep_stem: bool = True, width: float = 1.0,
                   name: str = "resnet", vit_blocks=()) -> nn.Module:
    """VGG-16-bn, the dilated ResNet of ``layers`` with ``width`` times its channels, or (``name``
    one of model/vit.py's ``VIT_VARIANTS``) a DINOv2 ViT whose layer2/layer3 are ``vit_blocks``."""
    if name != "resnet":
        return DINOv2(name, vit_blocks or None)
    if vgg and width != 1.0:
        raise ValueError(f"backbone_width {width} applies to ResNets only; VGG-16-bn keeps its channels")
    return VGG16BN() if vgg else ResNet(layers, deep_stem, width)


def missing_weights_error(path: str) -> BackboneWeightsError:
    """The error for a backbone weight file ``path`` that does not exist (its absolute path named)."""
    return BackboneWeightsError(
        f"backbone weight file '{os.path.abspath(path)}' (config key 'pretrained') does not exist; {README_HINT}, "
        f"or set \"pretrained ''\" for random initialisation")


def backbone_from_cfg(cfg) -> nn.Module:
    """The backbone a validated config describes, randomly initialised."""
    return build_backbone(cfg.layers, cfg.vgg, cfg.deep_stem, cfg.backbone_width, cfg.backbone, cfg.vit_blocks)


def read_state_dict(path: str) -> dict:
    """Read a weight file; unwrap {'state_dict': ...} / {'model': ...} and 'module.' prefixes."""
    if not os.path.isfile(path):
        raise missing_weights_error(path)
    state = load_tensors(path, BackboneWeightsError, "backbone weight file", fix_refused=README_HINT,
                         fix_corrupt=README_HINT)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BackboneWeightsError(f"backbone weight file '{path}' does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_backbone_weights(backbone: nn.Module, source: str | dict, allow_missing: bool = False) -> LoadReport:
    """Load a weight file (or a state dict) into ``backbone`` and report every key.

    Missing backbone keys are an error unless ``allow_missing``; unexpected keys outside the
    classifier are always an error (they mean the file belongs to another architecture);
    shape mismatches are always an error.
    """
    name = source if isinstance(source, str) else "<state dict>"
    state = read_state_dict(source) if isinstance(source, str) else dict(source)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    vit_file = describe_file(state)
    if vit_file is not None and not isinstance(backbone, DINOv2):
        variant = found_variant(vit_file)
        raise BackboneWeightsError(
            f"backbone weight file '{name}' is a vision transformer's (width {vit_file['dim']}, patch "
            f"{vit_file['patch']}) but the config asks for a ResNet/VGG backbone; set 'backbone "
            f"{variant or 'dinov2_...'}'")
    state, classifier = backbone.convert_state_dict(state, name)
    own = backbone.state_dict()
    report = LoadReport(name, classifier_unused=sorted(classifier))
    for key in own:
        if key not in state:
            (report.benign_missing if key.endswith("num_batches_tracked") else report.missing).append(key)
    report.unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise BackboneWeightsError(f"backbone weight file '{name}' does not fit the configured backbone "
                                   f"(check 'backbone', 'layers', 'vgg', 'deep_stem', 'backbone_width'): " + "; ".join(mismatched[:5]))
    if report.unexpected:
        raise BackboneWeightsError(
            f"backbone weight file '{name}' has keys the configured backbone lacks: "
            f"{report.unexpected[:8]} ({len(report.unexpected)} in all); it belongs to another "
            f"architecture (check 'backbone', 'layers', 'vgg', 'deep_stem'); {README_HINT}")
    if report.missing and not allow_missing:
        raise BackboneWeightsError(
            f"backbone weight file '{name}' lacks backbone keys {report.missing[:8]} "
            f"({len(report.missing)} in all); a half-loaded backbone is refused. Use a complete file "
            f"({README_HINT}) or set 'allow_missing_backbone_keys True' to accept it")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report.loaded = sum(1 for k in state if k in own)
    (log.warning if report.missing else log.info)(report.summary())
    return report


def backbone_of(cfg, warn_random_backbone: bool = True) -> nn.Module:
    """The backbone of ``cfg`` (ResNet / VGG-16-bn / DINOv2 ViT), with the weight file ``pretrained``
    loaded when one is named. With ``pretrained ''`` it stays randomly initialised, and a warning
    says so unless ``warn_random_backbone`` is False (a checkpoint's weights are about to replace
    it, or random weights are what the caller wants)."""
    backbone = backbone_from_cfg(cfg)
    if cfg.pretrained:
        load_backbone_weights(backbone, cfg.pretrained, cfg.allow_missing_backbone_keys)
    elif warn_random_backbone:
        log.warning("pretrained is '': the backbone is randomly initialised (fine for tests and the "
                    "synthetic demo, not for ImageNet-based results)")
    return backbone
