"""Networks by name: ``ARCHS`` maps each registered ``arch`` to its builder, a function of the
validated config returning an ``nn.Module`` with the forward contract of docs/extending.md."""
from __future__ import annotations

import logging

import torch.nn as nn

from .backbone import build_backbone, load_backbone_weights
from .losses import LossSettings
from .ntrenet import NTRENetPP
from .video import VideoNTRENetPP

log = logging.getLogger(__name__)


def backbone_of(cfg, warn_random_backbone: bool = True) -> nn.Module:
    """The backbone of ``cfg`` (ResNet / VGG-16-bn), with the ImageNet weight file ``pretrained``
    loaded when one is named. With ``pretrained ''`` it stays randomly initialised, and a warning
    says so unless ``warn_random_backbone`` is False (a checkpoint's weights are about to replace
    it, or random weights are what the caller wants)."""
    backbone = build_backbone(cfg.layers, cfg.vgg, cfg.deep_stem, cfg.backbone_width)
    if cfg.pretrained:
        load_backbone_weights(backbone, cfg.pretrained, cfg.allow_missing_backbone_keys)
    elif warn_random_backbone:
        log.warning("pretrained is '': the backbone is randomly initialised (fine for tests and the "
                    "synthetic demo, not for ImageNet-based results)")
    return backbone


def loss_settings(cfg) -> LossSettings:
    return LossSettings(ignore_label=cfg.ignore_label, aux_weight=cfg.aux_weight, bg_weight=cfg.bg_weight,
                        aux1_weight=cfg.aux1_weight, aux2_weight=cfg.aux2_weight,
                        contrast_weight=cfg.contrast_weight, bg_alpha=cfg.bg_alpha,
                        temperature=cfg.contrast_temperature, pixel_negative=cfg.pixel_negative,
                        main_weight=cfg.main_weight, iou_weight=cfg.iou_weight)


def build_ntrenetpp(cfg, warn_random_backbone: bool = True) -> nn.Module:
    """NTRENet++ for the config's task: the image network (model/ntrenet.py) or the video
    network (model/video.py), on the configured backbone."""
    backbone = backbone_of(cfg, warn_random_backbone)
    settings = loss_settings(cfg)
    if cfg.task == "video":
        return VideoNTRENetPP(backbone, reduce_dim=cfg.reduce_dim, ppm_scales=cfg.ppm_scales,
                              use_aspp=cfg.video_aspp, aspp_dilations=cfg.aspp_dilations,
                              bg_prototype_dim=cfg.video_bg_dim, support_mode=cfg.support_mode,
                              do_pool=cfg.do_pool, self_proto_pool=cfg.self_proto_pool,
                              freeze_backbone=cfg.freeze_backbone, fix_bn=cfg.fix_bn,
                              temporal_attention=cfg.video_attention, losses=settings)
    return NTRENetPP(backbone, reduce_dim=cfg.reduce_dim, ppm_scales=cfg.ppm_scales,
                     aspp_dilations=cfg.aspp_dilations, do_pool=cfg.do_pool, self_proto_pool=cfg.self_proto_pool,
                     freeze_backbone=cfg.freeze_backbone, fix_bn=cfg.fix_bn, losses=settings,
                     bank_classes=cfg.bank_classes, memory_size=cfg.memory_size,
                     num_negatives=cfg.num_negatives, seed=cfg.manual_seed)


# arch name -> builder(cfg, warn_random_backbone) -> nn.Module
ARCHS = {"ntrenetpp": build_ntrenetpp}
