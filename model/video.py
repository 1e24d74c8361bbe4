"""NTRENet++ for few-shot video segmentation (docs/video.md): the image network's blocks with
the frames of a clip in the batch and cross-frame agent attention at three places."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .base import ELIMINATIONS, EliminatingNetwork
from .losses import LossSettings, bg_mining_loss, segmentation_losses, soft_iou_loss, total_loss
from .modules import (ASPP, AgentAttention, BGMiningModule, Merge, Reduce, ScalePath, masked_average_pooling,
                      prior_mask)
from .ops import resize

SUPPORT_MODES = ("paired", "mean")


class VideoNTRENetPP(EliminatingNetwork):
    """Few-shot video segmentation: ``forward(query_imgs, support_imgs, support_masks,
    query_mask=None, class_ids=None, return_extras=False)`` with ``B×T×3×H×W`` query clips,
    ``B×K×3×H×W`` support frames, ``B×K×H×W`` support masks (0/1/255), ``B×T×H×W`` query
    masks (training).

    - eval: ``B×T×2×H×W`` logits; with ``return_extras`` also ``bg_logits`` (B×T×2×H×W),
      ``do_mask`` (B×T×H×W long, first bin) and ``prior`` (B×T×1×H×W);
    - training: ``(logits, losses)`` with ``main, iou, aux1, aux2, bg, contrast, total`` and the
      masks' shares ``monitor/bg_mask``, ``monitor/do_mask``, ``monitor/do_on_target`` (not losses).

    ``support_mode``: 'paired' (the reference) matches query frame t with support t only
    (its prototype and prior; needs K = T); 'mean' gives every frame the K-shot average
    prototype and prior, as the image model does.
    """

    def __init__(self, backbone: nn.Module, *, reduce_dim: int = 256,
                 ppm_scales: Sequence[float] = (60, 30, 15, 8), use_aspp: bool = False,
                 aspp_dilations: Sequence[int] = (6, 12, 18), bg_prototype_dim: int = 512,
                 support_mode: str = "paired", do_pool: str = "gap", self_proto_pool: str = "gap",
                 freeze_backbone: bool = True,
                 fix_bn: bool = True, temporal_attention: bool = True, losses: LossSettings = LossSettings(),
                 elimination: str = "bg+do", do_mask: str = "argmax", elimination_training: str = "guided"):
        if support_mode not in SUPPORT_MODES:
            raise ValueError(f"support_mode is {support_mode!r}; expected one of {SUPPORT_MODES}")
        if elimination not in ELIMINATIONS:
            raise ValueError(f"elimination {elimination!r}: expected one of {', '.join(ELIMINATIONS)}")
        eliminate_bg, eliminate_do = ELIMINATIONS[elimination]
        super().__init__(backbone, ppm_scales, freeze_backbone, fix_bn)
        self.support_mode = support_mode
        self.loss_settings = losses
        C = reduce_dim
        mid_channels = backbone.layer2_channels + backbone.layer3_channels
        self.down_query = Reduce(mid_channels, C)
        self.down_supp = Reduce(mid_channels, C)
        self.aspp = ASPP(C, aspp_dilations) if use_aspp else None
        bg_dim = bg_prototype_dim or C
        self.elimination = elimination
        # the DO mask needs the BG branch's logits, so BGMM stays while either step is on
        self.bgmm = (BGMiningModule(C, prototype_channels=bg_dim, temporal=temporal_attention)
                     if eliminate_bg or eliminate_do else None)
        self.scales = nn.ModuleList(ScalePath(C, has_previous=i > 0, do_pool=do_pool, self_proto_pool=self_proto_pool,
                                              prototype_channels=bg_dim, temporal=temporal_attention,
                                              eliminate_bg=eliminate_bg, eliminate_do=eliminate_do, do_mask=do_mask)
                                    for i in range(len(self.ppm_scales)))
        self.merge = Merge(C, len(self.ppm_scales))
        self.setup_elimination_training(elimination_training)

    def attention_parameters(self) -> list[nn.Parameter]:
        """The cross-frame attention blocks' parameters (the reference trains them with Adam)."""
        return [p for m in self.modules() if isinstance(m, AgentAttention) for p in m.parameters()]

    # ---- the forward pass ----------------------------------------------------------------
    def backbone_features(self, query_imgs, support_imgs, support_masks):
        """``(F, prior, m)``: ``F = [layer3, layer2]`` of all query frames and supports (query
        frames first), the per-frame prior ((B·T)×1×h×w) and the support masks at feature size
        ((B·K)×1×h×w).

        Where BatchNorm is a fixed affine map (eval mode, or ``fix_bn``) the B·T frames and B·K
        supports pass the backbone as one batch, and the masked supports' layer4 with the
        frames' as one more. In training with ``fix_bn: False`` BatchNorm normalises with its
        batch's statistics, so the passes are the reference's: the query frames, then the
        supports (each with its layer4).
        """
        B, T = query_imgs.shape[:2]
        K = support_imgs.shape[1]
        n = B * T
        memory_format = self._input_format()
        support_target = (support_masks == 1).flatten(0, 1).unsqueeze(1).float()
        batch_statistics = self.training and not self.fix_bn
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            if batch_statistics:
                groups = [self.backbone.mid_level(x.flatten(0, 1).contiguous(memory_format=memory_format))
                          for x in (query_imgs, support_imgs)]
                layer2, layer3 = (torch.cat(parts) for parts in zip(*groups))
            else:
                images = torch.cat([query_imgs.flatten(0, 1), support_imgs.flatten(0, 1)])
                layer2, layer3 = self.backbone.mid_level(images.contiguous(memory_format=memory_format))
            feature_size = layer3.shape[-2:]
            support_mask = resize(support_target, feature_size).to(layer3.dtype)
            masked = layer3[n:] * support_mask
            if batch_statistics:
                high = torch.cat([self.backbone.high_level(layer3[:n]), self.backbone.high_level(masked)])
            else:
                high = self.backbone.high_level(torch.cat([layer3[:n], masked]))
            support_high = high[n:] * resize(support_mask, high.shape[-2:])
            if self.support_mode == "paired":      # frame t against support t alone
                prior = prior_mask(high[:n], support_high.unsqueeze(1), feature_size)
            else:                                  # every frame against all K supports, averaged
                query_high = high[:n].unflatten(0, (B, T))
                shots = support_high.unflatten(0, (B, K))
                prior = torch.stack([prior_mask(query_high[:, t], shots, feature_size) for t in range(T)], 1)
                prior = prior.flatten(0, 1)
        return [layer3, layer2], prior, support_mask

    def forward(self, query_imgs, support_imgs, support_masks, query_mask=None, class_ids=None,
                return_extras: bool = False):
        if query_imgs.dim() != 5 or support_imgs.dim() != 5 or support_masks.dim() != 4:
            raise ValueError(f"the video model takes query clips B×T×3×H×W, supports B×K×3×H×W and support "
                             f"masks B×K×H×W; got {tuple(query_imgs.shape)}, {tuple(support_imgs.shape)} and "
                             f"{tuple(support_masks.shape)}")
        B, T = query_imgs.shape[:2]
        K = support_imgs.shape[1]
        if self.support_mode == "paired" and K != T:
            raise ValueError(f"support_mode 'paired' matches query frame t with support t, so it needs as many "
                              f"supports as clip frames; got K={K}, T={T}: set 'support_mode mean' or make them equal")
        self._check_mode(query_mask, return_extras, "B×T×H×W clip labels")
        image_size = query_imgs.shape[-2:]
        n = B * T
        mid, prior, support_mask = self.backbone_features(query_imgs, support_imgs, support_masks)

        x_query = self.down_query([f[:n] for f in mid])
        if self.aspp is not None:
            x_query = self.aspp(x_query)
        x_support = self.down_supp([f[n:] for f in mid])
        support_mask = support_mask.to(x_support.dtype)
        prototypes = masked_average_pooling(x_support, support_mask)                 # (B·K)×C×1×1
        if self.support_mode == "paired":
            support_prototype = prototypes
        else:
            support_prototype = prototypes.unflatten(0, (B, K)).mean(dim=1).repeat_interleave(T, dim=0)
        if self.bgmm is None:
            bg_logits = support_bg_logits = None
        else:
            bg_logits = self.bgmm(x_query, frames=T)
            # in training the BG branch also sees the supports, a clip of K frames (the reference)
            support_bg_logits = self.bgmm(x_support, frames=K) if self.training else None

        prior = prior.to(x_query.dtype)
        logits, scale_outputs = self.pyramid(
            x_query, support_prototype, prior, bg_logits, image_size, frames=T,
            label_target=self.guiding_target(None if query_mask is None else query_mask.flatten(0, 1)))  # (B·T)×2×H×W

        if not self.training:
            clip = logits.unflatten(0, (B, T))
            if not return_extras:
                return clip
            extras = {"prior": resize(prior.float(), image_size).unflatten(0, (B, T))}
            if bg_logits is not None:
                extras["bg_logits"] = resize(bg_logits, image_size).unflatten(0, (B, T))
            if scale_outputs[0]["do_mask"] is not None:     # DO elimination on
                do_mask = resize(scale_outputs[0]["do_mask"].float(), image_size)[:, 0] >= 0.5
                extras["do_mask"] = do_mask.long().unflatten(0, (B, T))
            return clip, extras

        losses = self._losses(logits, scale_outputs, bg_logits, support_bg_logits, support_masks, query_mask)
        return logits.unflatten(0, (B, T)), losses

    # ---- training losses -------------------------------------------------------------------
    def _losses(self, logits, scale_outputs, bg_logits, support_bg_logits, support_masks, query_masks):
        """``main_weight·CE + iou_weight·(1 − soft IoU) + aux_weight·[bg·L_BG + aux1·L_aux1 +
        aux2·L_aux2]`` (docs/video.md); the contrastive term is not used by the video model."""
        settings = self.loss_settings
        ignore = settings.ignore_label
        B, T = query_masks.shape[:2]
        labels = query_masks.flatten(0, 1).long()
        n = len(scale_outputs)
        values = segmentation_losses([logits] + [o["aux"] for o in scale_outputs]
                                     + [o[name] for o in scale_outputs for name in ("init", "second")],
                                     labels, ignore)
        losses = {"main": values[0], "aux1": values[1:1 + n].mean(), "aux2": values[1 + n:].mean()}
        losses["iou"] = soft_iou_loss(logits.unflatten(0, (B, T)), query_masks.long(), ignore)
        # the reference's L_BG: the mean over query frames and the mean over support frames, averaged
        if bg_logits is None:
            losses["bg"] = logits.new_zeros((), dtype=torch.float32)
        else:
            losses["bg"] = (bg_mining_loss(bg_logits, labels, settings.bg_alpha, ignore)
                            + bg_mining_loss(support_bg_logits, support_masks.flatten(0, 1).long(),
                                             settings.bg_alpha, ignore)) / 2
        losses["contrast"] = logits.new_zeros((), dtype=torch.float32)
        losses["total"] = total_loss(losses, settings)
        losses.update(self.elimination_monitor(bg_logits, scale_outputs[0], labels))
        return losses

