"""PFENet (Tian et al., TPAMI 2020), the NTRENet++ paper's baseline, as its authors released it.

The training-free prior from layer4, the feature enrichment module (FEM) over the pyramid bins,
the merge and the auxiliary losses; docs/method.md, section "PFENet", lists every number and
every difference from the released code. Module names are the released ones (``down_query``,
``init_merge``, ``alpha_conv``, ``beta_conv``, ``inner_cls``, ``res1``, ``res2``, ``cls``), so a
released checkpoint maps onto this network by renaming the backbone only
(tools/convert_checkpoint.py). Shared with NTRENet++ are only the pieces whose mathematics is the
same: the backbones (model/backbone.py), the prior and masked average pooling (model/modules.py)
and the per-episode cross-entropy (model/losses.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .backbone import backbone_of
from .base import BackboneNetwork
from .losses import segmentation_losses
from .modules import masked_average_pooling, prior_mask
from .ops import fuse_concat, pool_to, resize


CLASSES = 2   # not target / target


def _conv1x1_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """1×1 conv (no bias), ReLU: ``init_merge``, ``alpha_conv``, ``res1``."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True))


def _reduce(in_ch: int, out_ch: int) -> nn.Sequential:
    """1×1 conv (no bias), ReLU, Dropout2d(0.5): ``down_query``, ``down_supp``."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))


def _two_convs(channels: int) -> nn.Sequential:
    """(3×3 conv, ReLU) twice, no biases: ``beta_conv``, ``res2`` (used as ``x + f(x)``)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True))


def _head(channels: int) -> nn.Sequential:
    """3×3 conv (no bias), ReLU, Dropout2d(0.1), 1×1 conv (bias) → 2 logits: ``inner_cls``, ``cls``."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Dropout2d(0.1), nn.Conv2d(channels, CLASSES, 1))


def _fuse(block: nn.Sequential, maps, prototypes=(), scalar_maps=()) -> torch.Tensor:
    """``block`` (1×1 conv, ReLU) on ``concat(maps, expanded prototypes, scalar maps)``, computed
    without building the concatenation (model/ops.py's fuse_concat: the same value)."""
    conv, relu = block
    return relu(fuse_concat(conv, maps, prototypes, scalar_maps))


def _check_arguments(reduce_dim, ppm_scales, aux_weight, ignore_label) -> None:
    if isinstance(reduce_dim, bool) or not isinstance(reduce_dim, int) or reduce_dim < 1:
        raise ValueError(f"PFENet: reduce_dim must be a positive int; got {reduce_dim!r}")
    if not ppm_scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0
                             for s in ppm_scales):
        raise ValueError(f"PFENet: ppm_scales must be positive bin sizes or fractions (<= 1) of the "
                         f"feature size, e.g. (60, 30, 15, 8); got {ppm_scales!r}")
    if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) or not (
            math.isfinite(aux_weight) and aux_weight >= 0):
        raise ValueError(f"PFENet: aux_weight must be a finite number >= 0; got {aux_weight!r}")
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int):
        raise ValueError(f"PFENet: ignore_label must be an int; got {ignore_label!r}")


class PFENet(BackboneNetwork):
    """Prior Guided Feature Enrichment Network.

    ``forward(query_img, support_imgs, support_masks, query_mask=None, class_ids=None,
    return_extras=False)`` with ``B×3×H×W``, ``B×K×3×H×W``, ``B×K×H×W`` (0/1/255) and the
    ``B×H×W`` query label (training); ``class_ids`` is accepted and not used.

    - eval: ``B×2×H×W`` logits; with ``return_extras`` also ``{"prior": B×1×H×W}``;
    - training: ``(logits, losses)`` with ``main``, ``aux`` (mean over the bins) and
      ``total = main + aux_weight · aux``.

    K is read from the input, so a model trained at one shot runs at any other.
    """

    def __init__(self, backbone: nn.Module, *, reduce_dim: int = 256,
                 ppm_scales: Sequence[float] = (60, 30, 15, 8), freeze_backbone: bool = True,
                 fix_bn: bool = True, aux_weight: float = 1.0, ignore_label: int = 255):
        _check_arguments(reduce_dim, ppm_scales, aux_weight, ignore_label)
        super().__init__(backbone, ppm_scales, freeze_backbone, fix_bn)
        self.aux_weight, self.ignore_label = float(aux_weight), ignore_label
        C, n = reduce_dim, len(self.ppm_scales)
        feature_channels = backbone.layer3_channels + backbone.layer2_channels
        self.down_query = _reduce(feature_channels, C)
        self.down_supp = _reduce(feature_channels, C)
        # the FEM: per bin, merge (query, prototype, prior), the inter-scale merge with the
        # previous bin (from the second on), a residual pair of 3×3 convs and an auxiliary head
        self.init_merge = nn.ModuleList(_conv1x1_relu(2 * C + 1, C) for _ in range(n))
        self.alpha_conv = nn.ModuleList(_conv1x1_relu(2 * C, C) for _ in range(n - 1))
        self.beta_conv = nn.ModuleList(_two_convs(C) for _ in range(n))
        self.inner_cls = nn.ModuleList(_head(C) for _ in range(n))
        self.res1 = _conv1x1_relu(n * C, C)
        self.res2 = _two_convs(C)
        self.cls = _head(C)

    # ---- backbone ---------------------------------------------------------------------------
    def backbone_features(self, query_img, support_imgs, support_masks):
        """``([layer3, layer2], prior, m)``: the mid-level maps of the query and all supports
        (B(1+K)×·×h×w, the query first, then the supports episode by episode), the prior
        (B×1×h×w) and the support masks at feature size (BK×1×h×w).

        PFENet passes the query batch, then each shot's batch, through the backbone. Where
        BatchNorm is a fixed affine map (eval, or ``fix_bn``) that is the same as one batch of
        B(1+K) images, which this does; in training with ``fix_bn False`` BatchNorm uses its
        batch's statistics, so the passes are PFENet's own, in its order.
        """
        B, K = support_imgs.shape[:2]
        target = (support_masks == 1).flatten(0, 1).unsqueeze(1).float()            # BK×1×H×W
        separate = self.training and not self.fix_bn
        memory_format = self._input_format()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            if separate:
                layer2, layer3 = self._per_group(self.backbone.mid_level, query_img, support_imgs.unbind(1))
            else:
                images = torch.cat([query_img, support_imgs.flatten(0, 1)]).contiguous(memory_format=memory_format)
                layer2, layer3 = self.backbone.mid_level(images)
            support_mask = resize(target, layer3.shape[-2:]).to(layer3.dtype)
            masked = layer3[B:] * support_mask
            if separate:
                (high,) = self._per_group(lambda x: (self.backbone.high_level(x),), layer3[:B],
                                       masked.unflatten(0, (B, K)).unbind(1))
            else:
                high = self.backbone.high_level(torch.cat([layer3[:B], masked]))
            # the support's layer4 masked again, the full-size mask resized to layer4's size
            support_high = high[B:] * resize(target, high.shape[-2:]).to(high.dtype)
            prior = prior_mask(high[:B], support_high.unflatten(0, (B, K)), layer3.shape[-2:])
        return [layer3, layer2], prior, support_mask

    # ---- the head -----------------------------------------------------------------------------
    def enrich(self, x_query, prototype, prior):
        """The FEM and the merge at feature size: ``(final logits, per-bin auxiliary logits)``."""
        feature_size = x_query.shape[-2:]
        levels, aux_logits = [], []
        for i, size in enumerate(self.bin_sizes(feature_size[0])):
            x = _fuse(self.init_merge[i], pool_to(x_query, size), [prototype], [resize(prior, size)])
            if i > 0:   # the previous bin's output (already at feature size) resized to this bin
                x = _fuse(self.alpha_conv[i - 1], [x, resize(levels[-1], size)]) + x
            x = self.beta_conv[i](x) + x
            aux_logits.append(self.inner_cls[i](x))
            levels.append(resize(x, feature_size))
        x = _fuse(self.res1, levels)
        x = self.res2(x) + x
        return self.cls(x), aux_logits

    def forward(self, query_img, support_imgs, support_masks, query_mask=None, class_ids=None,
                return_extras: bool = False):
        if query_img.dim() != 4 or support_imgs.dim() != 5 or support_masks.dim() != 4:
            raise ValueError(f"PFENet takes query_img B×3×H×W, support_imgs B×K×3×H×W and support_masks "
                             f"B×K×H×W; got {tuple(query_img.shape)}, {tuple(support_imgs.shape)} and "
                             f"{tuple(support_masks.shape)}")
        self._check_mode(query_mask, return_extras, "B×H×W")
        B, K = support_imgs.shape[:2]
        image_size = query_img.shape[-2:]
        (layer3, layer2), prior, support_mask = self.backbone_features(query_img, support_imgs, support_masks)

        conv, relu, dropout = self.down_query
        x_query = dropout(relu(fuse_concat(conv, [layer3[:B], layer2[:B]])))
        conv, relu, dropout = self.down_supp
        x_support = dropout(relu(fuse_concat(conv, [layer3[B:], layer2[B:]])))
        support_mask = support_mask.to(x_support.dtype)
        # the K shots' prototypes averaged (PFENet's K-shot rule)
        prototype = masked_average_pooling(x_support, support_mask).unflatten(0, (B, K)).mean(dim=1)
        prior = prior.to(x_query.dtype)

        logits, aux_logits = self.enrich(x_query, prototype, prior)
        logits = resize(logits, image_size)
        if not self.training:
            return (logits, {"prior": resize(prior.float(), image_size)}) if return_extras else logits

        values = segmentation_losses([logits] + aux_logits, query_mask.long(), self.ignore_label)
        main, aux = values[0], values[1:].mean()
        return logits, {"main": main, "aux": aux, "total": main + self.aux_weight * aux}


def build_pfenet(cfg, warn_random_backbone: bool = True) -> PFENet:
    """PFENet from a config (util.config): the backbone (``layers``, ``vgg``, ``deep_stem``,
    ``backbone_width``), its ImageNet weights (``pretrained``, ``allow_missing_backbone_keys``)
    and the head (``reduce_dim``, ``ppm_scales``, ``freeze_backbone``, ``fix_bn``,
    ``aux_weight``, ``ignore_label``).

    With ``pretrained ''`` the backbone stays randomly initialised, and a warning says so unless
    ``warn_random_backbone`` is False (a checkpoint's weights are about to replace it)."""
    backbone = backbone_of(cfg, warn_random_backbone)
    return PFENet(backbone, reduce_dim=cfg.reduce_dim, ppm_scales=tuple(cfg.ppm_scales),
                  freeze_backbone=cfg.freeze_backbone, fix_bn=cfg.fix_bn, aux_weight=cfg.aux_weight,
                  ignore_label=cfg.ignore_label)
