"""Losses of NTRENet++ (docs/method.md §3 and §6), vectorised over episodes and shots.

All of them compute in float32 whatever the autocast dtype, and none reads a tensor value
on the host: "nothing to learn from" cases (no negatives yet, an episode without target
pixels) are masked, not branched on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import resize

BG_TARGET_EPS = 1e-5
PIXEL_LOG_EPS = 1e-8


@dataclass(frozen=True)
class LossSettings:
    """The loss weights and contrast settings of the config (docs/method.md §6)."""
    ignore_label: int = 255
    aux_weight: float = 1.0
    bg_weight: float = 1.0
    aux1_weight: float = 0.4
    aux2_weight: float = 0.6
    contrast_weight: float = 0.01
    bg_alpha: float = 0.5
    temperature: float = 1.0
    pixel_negative: bool = False
    main_weight: float = 1.0     # the video model's 5 (docs/video.md)
    iou_weight: float = 0.0      # the video model's soft-IoU term (1)


def target_margin(logits: torch.Tensor, size) -> torch.Tensor:
    """``z_1 − z_0`` of N×2×h×w logits, in fp32, bilinearly upsampled to ``size`` → N×H×W.

    With two classes every log-probability is a function of this margin alone
    (``log p_1 = −softplus(−d)``, ``log p_0 = −softplus(d)``), and upsampling is linear, so
    resizing the one-channel margin equals resizing both logits and subtracting: half the
    interpolation, and no log-softmax across a channel dimension of 2.
    """
    return resize((logits[:, 1:2].float() - logits[:, 0:1].float()), size)[:, 0]


def segmentation_losses(logit_maps, label: torch.Tensor, ignore_label: int = 255) -> torch.Tensor:
    """Cross-entropy of every N×2×h×w map of ``logit_maps``, bilinearly upsampled to the same
    N×H×W label (0/1, ignore 255) → a tensor of one loss per map.

    Each loss is averaged over each image's valid pixels, then over images: what the
    reference's 4 GPUs × 1 episode computed, and the same value however a batch is split
    across ranks (a batch-wide pixel mean is not). An image with no valid pixel contributes
    0. Computed from the upsampled logit margin (:func:`target_margin`); equals
    ``F.cross_entropy(resize(logits), label, ignore_index=255)`` per image (tested).

    Maps of the same size are upsampled in one call, and the label-derived masks are built
    once, not once per map.
    """
    size = label.shape[-2:]
    N = label.shape[0]
    valid = label != ignore_label
    # CE = softplus(d) where the label is 0, softplus(−d) where it is 1 (d = z_1 − z_0)
    sign = torch.where(label == 1, -1.0, 1.0)
    sign = torch.where(valid, sign, 0.0)            # ignored pixels: softplus(0) · 0 below
    valid_f = valid.to(torch.float32)
    count = valid_f.flatten(1).sum(dim=1).clamp_min(1)
    losses = [None] * len(logit_maps)
    groups: dict = {}
    for i, m in enumerate(logit_maps):
        groups.setdefault(tuple(m.shape[-2:]), []).append(i)
    for members in groups.values():
        margins = torch.cat([logit_maps[i] for i in members]) if len(members) > 1 else logit_maps[members[0]]
        margin = target_margin(margins, size).view(len(members), N, *size)
        per_pixel = F.softplus(margin * sign) * valid_f          # 0 where ignored
        per_image = per_pixel.flatten(2).sum(dim=2) / count       # G×N
        for j, i in enumerate(members):
            losses[i] = per_image[j].mean()
    return torch.stack(losses)


def bg_mining_loss(bg_logits: torch.Tensor, label: torch.Tensor, alpha: float = 0.5,
                   ignore_label: int = 255) -> torch.Tensor:
    """``Σ_{y=1} CE(z, 0) / (|y=1| + 1e-5) + α · mean_{y≠255} CE(z, 1)``, per image, averaged.

    ``bg_logits``: N×2×h×w (channel 1 = BG), upsampled to the N×H×W label (1 = target).
    Target pixels must not be BG; every valid pixel is weakly pulled towards BG.
    With ``d = z_BG − z_0`` (upsampled): ``CE(z, 0) = softplus(d)``, ``CE(z, 1) = softplus(d) − d``.
    """
    d = target_margin(bg_logits, label.shape[-2:])
    not_bg = F.softplus(d)                                   # −log p(not BG)
    target = (label == 1).float()
    valid = (label != ignore_label).float()
    not_bg_term = (not_bg * target).sum(dim=(1, 2)) / (target.sum(dim=(1, 2)) + BG_TARGET_EPS)
    bg_term = ((not_bg - d) * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1)
    return (not_bg_term + alpha * bg_term).mean()


def prototype_infonce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                      negative_valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-episode InfoNCE with cosine similarity.

    ``anchor``, ``positive``: N×C; ``negatives``: N×M×C with ``negative_valid`` N×M (bool).
    ``−log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ_valid e^{s_n/τ}))`` → N. With no valid negative it is
    exactly 0 (and so is its gradient).
    """
    anchor = F.normalize(anchor.float(), dim=-1)
    positive_logit = (anchor * F.normalize(positive.float(), dim=-1)).sum(dim=-1, keepdim=True) / temperature
    negative_logits = torch.einsum("nc,nmc->nm", anchor, F.normalize(negatives.float(), dim=-1)) / temperature
    negative_logits = negative_logits.masked_fill(~negative_valid, float("-inf"))
    logits = torch.cat([positive_logit, negative_logits], dim=1)
    return torch.logsumexp(logits, dim=1) - positive_logit[:, 0]


def _pixels(feature: torch.Tensor) -> torch.Tensor:
    """N×C×h×w → N×(h·w)×C unit vectors (fp32)."""
    return F.normalize(feature.float().flatten(2).transpose(1, 2), dim=-1)


def max_cosine(query: torch.Tensor, candidates: torch.Tensor, candidate_on: torch.Tensor) -> torch.Tensor:
    """For every query vector, the max cosine to the 'on' candidates (−1 where none is on).

    ``query`` B×M×C and ``candidates`` B×S×C unit vectors, ``candidate_on`` B×S (bool) → B×M.
    The B×M×S similarity is only needed to find the best candidate, so it is built without
    autograd and freed at once; the chosen pairs are recomputed with gradient (same value
    and gradient as a max over the full matrix, without keeping it for the backward pass).
    """
    with torch.no_grad():
        similarity = torch.bmm(query, candidates.transpose(1, 2))
        best = similarity.masked_fill_(~candidate_on[:, None, :], -2.0).argmax(dim=2)   # B×M
    chosen = torch.gather(candidates, 1, best.unsqueeze(-1).expand(-1, -1, candidates.shape[-1]))
    cosine = (query * chosen).sum(dim=-1)
    return torch.where(candidate_on.any(dim=1, keepdim=True), cosine, -1.0)


def pixel_contrast_loss(query_feature: torch.Tensor, query_target: torch.Tensor,
                        support_feature: torch.Tensor, support_target: torch.Tensor):
    """Pixel-level positive term, per episode.

    ``query_feature`` B×C×h×w, ``query_target`` B×1×h×w (bool); ``support_feature``
    B×K×C×h×w, ``support_target`` B×K×1×h×w (bool). For every query target pixel the max
    cosine similarity to any support target pixel (all shots), mapped to ``(s+1)/2``;
    loss ``−mean log(pos + 1e-8)`` over the episode's query target pixels.
    Returns (loss B, valid B): an episode without query or support target pixels is invalid.
    """
    B = support_feature.shape[0]
    query = _pixels(query_feature)                                          # B×M×C
    support = _pixels(support_feature.flatten(0, 1)).reshape(B, -1, query.shape[-1])  # B×KN×C
    support_on = support_target.reshape(B, -1)                              # B×KN
    positive = (max_cosine(query, support, support_on) + 1) / 2             # B×M
    query_on = query_target.flatten(1).float()                              # B×M
    count = query_on.sum(dim=1)
    loss = -(torch.log(positive + PIXEL_LOG_EPS) * query_on).sum(dim=1) / count.clamp_min(1)
    return loss, (count > 0) & support_on.any(dim=1)


def pixel_negative_loss(query_feature: torch.Tensor, query_target: torch.Tensor,
                        negatives: torch.Tensor, negative_valid: torch.Tensor) -> torch.Tensor:
    """Optional pixel-to-DO term (off by default, as in the reference's loss).

    For every query target pixel the max cosine similarity to the sampled DO prototypes,
    mapped to ``(s+1)/2``; loss ``−mean log(1 − neg + 1e-8)``. 0 for an episode with no
    valid negative. Returns B.
    """
    query = _pixels(query_feature)                                          # B×M×C
    negative = (max_cosine(query, F.normalize(negatives.float(), dim=-1), negative_valid) + 1) / 2
    query_on = query_target.flatten(1).float()
    loss = -(torch.log(1 - negative + PIXEL_LOG_EPS) * query_on).sum(dim=1) / query_on.sum(dim=1).clamp_min(1)
    return loss * negative_valid.any(dim=1)


def episode_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over all episodes, invalid ones counting 0: the same however the batch is split
    across ranks (a mean over the valid ones only would not be)."""
    return (values * valid.to(values.dtype)).mean()


def soft_iou_loss(logits: torch.Tensor, label: torch.Tensor, ignore_label: int = 255) -> torch.Tensor:
    """``1 − Σ min(p, y) / Σ max(p, y)`` per clip, averaged over clips (the video loss's IoU term).

    ``logits``: B×T×2×h×w, bilinearly upsampled to the B×T×H×W label (0/1, ignore 255);
    ``p`` = the softmax foreground probability (= sigmoid of the logit margin), ``y`` = 1 on
    the target. The sums run over all valid pixels of all T frames of a clip (the reference's
    ``mask_iou`` over a clip). With a binary ``y``: ``min(p, y) = p·y``, ``max(p, y) = p + y − p·y``.
    A clip without any valid pixel counts 0.
    """
    B, T = label.shape[:2]
    p = torch.sigmoid(target_margin(logits.flatten(0, 1), label.shape[-2:])).view(label.shape)
    y = (label == 1).float()
    valid = (label != ignore_label).float()
    inter = (p * y * valid).flatten(1).sum(dim=1)
    union = ((p + y - p * y) * valid).flatten(1).sum(dim=1)
    iou = inter / union.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(union > 0, 1 - iou, 0.0).mean()


def total_loss(losses: dict, settings: LossSettings) -> torch.Tensor:
    """``main_w·CE(final) + aux_weight · [bg_w·L_BG + aux1_w·L_aux1 + aux2_w·L_aux2 + con_w·L_con]``,
    plus ``iou_w·L_IoU`` where the losses have the video model's soft-IoU term."""
    bracket = (settings.bg_weight * losses["bg"] + settings.aux1_weight * losses["aux1"]
               + settings.aux2_weight * losses["aux2"] + settings.contrast_weight * losses["contrast"])
    total = settings.main_weight * losses["main"] + settings.aux_weight * bracket
    if "iou" in losses:
        total = total + settings.iou_weight * losses["iou"]
    return total
