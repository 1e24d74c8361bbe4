"""Networks by name: ``ARCHS`` maps each registered ``arch`` to its builder, a function of the
validated config returning an ``nn.Module`` with the forward contract of docs/extending.md."""
from __future__ import annotations

import torch.nn as nn

from .backbone import backbone_of
from .losses import LossSettings
from .ntrenet import NTRENetPP
from .pfenet import build_pfenet
from .video import VideoNTRENetPP

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
                              temporal_attention=cfg.video_attention, losses=settings,
                              elimination=cfg.elimination, do_mask=cfg.do_mask,
                              elimination_training=cfg.elimination_training)
    return NTRENetPP(backbone, reduce_dim=cfg.reduce_dim, ppm_scales=cfg.ppm_scales,
                     aspp_dilations=cfg.aspp_dilations, do_pool=cfg.do_pool, self_proto_pool=cfg.self_proto_pool,
                     freeze_backbone=cfg.freeze_backbone, fix_bn=cfg.fix_bn, losses=settings,
                     bank_classes=cfg.bank_classes, memory_size=cfg.memory_size,
                     num_negatives=cfg.num_negatives, seed=cfg.manual_seed, elimination=cfg.elimination,
                     do_mask=cfg.do_mask, elimination_training=cfg.elimination_training)


# arch name -> builder(cfg, warn_random_backbone) -> nn.Module
ARCHS = {"ntrenetpp": build_ntrenetpp, "pfenet": build_pfenet}
