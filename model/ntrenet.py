"""NTRENet++: the network of docs/method.md, assembled from the modules beside it."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .base import ELIMINATIONS, EliminatingNetwork
from .losses import (LossSettings, bg_mining_loss, episode_mean, pixel_contrast_loss, pixel_negative_loss,
                     prototype_infonce, segmentation_losses, total_loss)
from .memory_bank import DOMemoryBank
from .modules import (ASPP, BGMiningModule, Merge, Reduce, ScalePath, distracting_object_mask, masked_average_pooling,
                      prior_mask)
from .ops import resize

MIN_DO_AREA = 1.0   # feature pixels; emptier DO masks give no prototype for the bank


class NTRENetPP(EliminatingNetwork):
    """Few-shot segmentation that removes the background (BGMM) and distracting objects (DO).

    ``forward(query_img, support_imgs, support_masks, query_mask=None, class_ids=None,
    return_extras=False)`` with ``B×3×H×W``, ``B×K×3×H×W``, ``B×K×H×W`` (0/1/255),
    ``B×H×W``, ``B`` (class ids 1..N, used by the DO memory bank in training).

    - eval: ``B×2×H×W`` logits; with ``return_extras`` also a dict of ``bg_logits``
      (B×2×H×W), ``do_mask`` (B×H×W long, first bin) and ``prior`` (B×1×H×W);
    - training: ``(logits, losses)`` with ``main, aux1, aux2, bg, contrast, proto, pixel, total``
      and the masks' shares ``monitor/bg_mask``, ``monitor/do_mask``, ``monitor/do_on_target``
      (the steps that are on; not losses).

    K is read from the input, so a model trained at one shot evaluates at any other.
    """

    def __init__(self, backbone: nn.Module, *, reduce_dim: int = 256,
                 ppm_scales: Sequence[float] = (60, 30, 15, 8), aspp_dilations: Sequence[int] = (6, 12, 18),
                 do_pool: str = "gap", self_proto_pool: str = "gap", freeze_backbone: bool = True,
                 fix_bn: bool = True,
                 losses: LossSettings = LossSettings(), bank_classes: int = 20, memory_size: int = 2000,
                 num_negatives: int = 1000, seed: int = 0, elimination: str = "bg+do", do_mask: str = "argmax",
                 elimination_training: str = "guided"):
        super().__init__(backbone, ppm_scales, freeze_backbone, fix_bn)
        if elimination not in ELIMINATIONS:
            raise ValueError(f"elimination {elimination!r}: expected one of {', '.join(ELIMINATIONS)}")
        eliminate_bg, eliminate_do = ELIMINATIONS[elimination]
        self.elimination = elimination
        self.loss_settings = losses
        mid_channels = backbone.layer2_channels + backbone.layer3_channels
        C = reduce_dim
        self.down_query = Reduce(mid_channels, C)
        self.down_supp = Reduce(mid_channels, C)
        self.aspp = ASPP(C, aspp_dilations)
        # the DO mask needs the BG branch's logits, so BGMM stays while either step is on
        self.bgmm = BGMiningModule(C) if eliminate_bg or eliminate_do else None
        self.scales = nn.ModuleList(
            ScalePath(C, has_previous=i > 0, do_pool=do_pool, self_proto_pool=self_proto_pool,
                      eliminate_bg=eliminate_bg, eliminate_do=eliminate_do, do_mask=do_mask)
            for i in range(len(self.ppm_scales)))
        self.merge = Merge(C, len(self.ppm_scales))
        # the DO bank serves the contrastive loss, which contrasts against mined DOs
        self.memory_bank = DOMemoryBank(bank_classes, memory_size, C, num_negatives, seed) if eliminate_do else None
        self.setup_elimination_training(elimination_training)

    def ddp_ignored_buffers(self) -> list[str]:
        """The DO bank's buffers: its own gather keeps them identical on every rank, so DDP must
        not re-send its 41-158 MiB from rank 0 at each forward (docs/extending.md)."""
        if self.memory_bank is None:
            return []
        return [f"memory_bank.{name}" for name, _ in self.memory_bank.named_buffers()]

    # ---- the forward pass ----------------------------------------------------------------
    def backbone_features(self, query_img, support_imgs, support_masks):
        """The frozen part of the forward: ``(F, prior, m)`` with ``F = [layer3, layer2]`` of the
        query and all supports (two B(1+K)×·×h×w maps, query first, then the supports episode by
        episode; the network uses their channel concatenation, which is never built), the prior
        (B×1×h×w) and the support masks at feature size (BK×1×h×w).

        Where BatchNorm is a fixed affine map (eval mode, or ``fix_bn``) the query and all supports
        pass as one batch, and the masked supports' layer4 with the query's as one more. In
        training with ``fix_bn: False`` BatchNorm normalises with the statistics of its batch, so
        the passes are the authors': the query images alone, then each shot's images alone, and
        the same for layer4 — the same features and the same running-statistics updates.
        """
        B, K = support_imgs.shape[:2]
        support_target = (support_masks == 1).flatten(0, 1).unsqueeze(1).float()       # BK×1×H×W
        batch_statistics = self.training and not self.fix_bn
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            if batch_statistics:
                layer2, layer3 = self._per_group(self.backbone.mid_level, query_img, support_imgs.unbind(1))
            else:
                # laid out like the first convolution's weight (channels_last when the model is)
                images = torch.cat([query_img, support_imgs.flatten(0, 1)]).contiguous(memory_format=self._input_format())
                layer2, layer3 = self.backbone.mid_level(images)
            feature_size = layer3.shape[-2:]
            support_mask = resize(support_target, feature_size).to(layer3.dtype)         # m^k
            masked = layer3[B:] * support_mask
            if batch_statistics:
                (high,) = self._per_group(lambda x: (self.backbone.high_level(x),), layer3[:B],
                                          masked.unflatten(0, (B, K)).unbind(1))
            else:
                high = self.backbone.high_level(torch.cat([layer3[:B], masked]))
            support_high = high[B:] * resize(support_mask, high.shape[-2:])
            prior = prior_mask(high[:B], support_high.unflatten(0, (B, K)), feature_size)
        return [layer3, layer2], prior, support_mask

    def forward(self, query_img, support_imgs, support_masks, query_mask=None, class_ids=None,
                return_extras: bool = False):
        if support_imgs.dim() != 5 or support_masks.dim() != 4:
            raise ValueError(f"support_imgs must be B×K×3×H×W and support_masks B×K×H×W; got "
                             f"{tuple(support_imgs.shape)} and {tuple(support_masks.shape)}")
        self._check_mode(query_mask, return_extras, "B×H×W")
        B, K = support_imgs.shape[:2]
        image_size = query_img.shape[-2:]
        mid, prior, support_mask = self.backbone_features(query_img, support_imgs, support_masks)

        x_query = self.aspp(self.down_query([f[:B] for f in mid]))
        x_support = self.down_supp([f[B:] for f in mid])
        support_mask = support_mask.to(x_support.dtype)
        support_prototype = masked_average_pooling(x_support, support_mask).unflatten(0, (B, K)).mean(dim=1)
        # in training the BG branch also sees every support (BG mining loss on them)
        if self.bgmm is None:
            bg_logits_all = bg_logits = None
        else:
            bg_logits_all = self.bgmm(torch.cat([x_query, x_support]) if self.training else x_query)
            bg_logits = bg_logits_all[:B]

        prior = prior.to(x_query.dtype)
        logits, scale_outputs = self.pyramid(x_query, support_prototype, prior, bg_logits, image_size,
                                             label_target=self.guiding_target(query_mask))

        if not self.training:
            if not return_extras:
                return logits
            extras = {"prior": resize(prior.float(), image_size)}
            if bg_logits is not None:
                extras["bg_logits"] = resize(bg_logits, image_size)
            if self.memory_bank is not None:     # DO elimination on
                do_mask = resize(scale_outputs[0]["do_mask"].float(), image_size)[:, 0] >= 0.5
                extras["do_mask"] = do_mask.long()
            return logits, extras

        losses = self._losses(logits, scale_outputs, bg_logits_all, x_query, x_support, support_mask,
                              support_prototype, support_masks, query_mask, class_ids)
        return logits, losses

    # ---- training losses -------------------------------------------------------------------
    def _losses(self, logits, scale_outputs, bg_logits_all, x_query, x_support, support_mask,
                support_prototype, support_masks, query_mask, class_ids):
        settings = self.loss_settings
        ignore = settings.ignore_label
        query_mask = query_mask.long()
        B, K = support_masks.shape[:2]
        # all 1 + 3·scales segmentation losses against the query label at once (same-size maps share
        # one upsampling): main, the auxiliary heads, then the initial and second predictions
        n = len(scale_outputs)
        values = segmentation_losses([logits] + [o["aux"] for o in scale_outputs]
                                     + [o[name] for o in scale_outputs for name in ("init", "second")],
                                     query_mask, ignore)
        losses = {"main": values[0], "aux1": values[1:1 + n].mean(), "aux2": values[1 + n:].mean()}
        if bg_logits_all is None:
            losses["bg"] = logits.new_zeros((), dtype=torch.float32)
        else:
            bg_labels = torch.cat([query_mask, support_masks.flatten(0, 1).long()])
            losses["bg"] = bg_mining_loss(bg_logits_all, bg_labels, settings.bg_alpha, ignore)
        if settings.contrast_weight > 0 and self.memory_bank is not None:
            proto, pixel = self._contrast(bg_logits_all, x_query, x_support, support_mask, support_prototype,
                                          support_masks, query_mask, class_ids)
        else:
            proto = pixel = logits.new_zeros((), dtype=torch.float32)
        losses["proto"], losses["pixel"] = proto, pixel
        losses["contrast"] = (proto + pixel) / 2
        losses["total"] = total_loss(losses, settings)
        losses.update(self.elimination_monitor(bg_logits_all[:B] if bg_logits_all is not None else None,
                                               scale_outputs[0], query_mask))
        return losses

    def _contrast(self, bg_logits_all, x_query, x_support, support_mask, support_prototype,
                  support_masks, query_mask, class_ids):
        """Prototype InfoNCE against the class's DO bank, the pixel term, and the bank update."""
        if class_ids is None:
            raise ValueError("training with contrast_weight > 0 needs class_ids (B, ids 1..N) for the "
                             "DO memory bank; pass them or set 'contrast_weight 0'")
        settings = self.loss_settings
        B, K = support_masks.shape[:2]
        C = x_query.shape[1]
        feature_size = x_query.shape[-2:]
        query_target = resize((query_mask == 1).unsqueeze(1).float(), feature_size).to(x_query.dtype)

        # prototype level: anchor = query GT prototype, positive = P_s, negatives from the bank
        anchor = masked_average_pooling(x_query, query_target).flatten(1)
        negatives, negative_valid = self.memory_bank.sample(class_ids)
        proto = prototype_infonce(anchor, support_prototype.flatten(1), negatives, negative_valid,
                                  settings.temperature)
        support_area = support_mask.flatten(1).sum(dim=1).view(B, K).sum(dim=1)
        episode_valid = (query_target.flatten(1).sum(dim=1) > 0) & (support_area > 0)
        proto = episode_mean(proto, episode_valid)

        # pixel level
        query_on = query_target >= 0.5
        support_on = (support_mask >= 0.5).unflatten(0, (B, K))
        pixel, pixel_valid = pixel_contrast_loss(x_query, query_on, x_support.unflatten(0, (B, K)), support_on)
        if settings.pixel_negative:
            pixel = pixel + pixel_negative_loss(x_query, query_on, negatives, negative_valid)
        pixel = episode_mean(pixel, pixel_valid)

        # the bank learns this episode's DOs after it has been used (MoCo order)
        with torch.no_grad():
            labels = torch.cat([query_mask, support_masks.flatten(0, 1)]).unsqueeze(1)
            target = torch.cat([query_target, support_mask]).float()     # already at feature size
            valid = resize((labels != settings.ignore_label).float(), feature_size)
            do_mask = distracting_object_mask(bg_logits_all.detach(), target) * valid
            features = torch.cat([x_query, x_support]).detach().float()
            do_prototypes = masked_average_pooling(features, do_mask).view(-1, C)
            keep = do_mask.flatten(1).sum(dim=1) >= MIN_DO_AREA
            # per episode: the query's DO prototype, then its K supports'
            do_prototypes = torch.cat([do_prototypes[:B, None], do_prototypes[B:].view(B, K, C)], dim=1)
            keep = torch.cat([keep[:B, None], keep[B:].view(B, K)], dim=1)
            self.memory_bank.push(do_prototypes, class_ids, keep)
        return proto, pixel


def parameter_counts(model: nn.Module) -> list[tuple[str, int, int]]:
    """(top-level module, trainable, frozen) parameter counts, one row per child."""
    rows = []
    for name, child in model.named_children():
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in child.parameters() if not p.requires_grad)
        rows.append((name, trainable, frozen))
    return rows
