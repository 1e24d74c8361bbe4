"""What the image and the video network share around their blocks: a (frozen) backbone whose
BatchNorm may stay fixed, and the pyramid bins."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

import torch

from .modules import init_pass_through
from .ops import input_format, pool_to, pyramid_bins, resize

ELIMINATION_TRAININGS = ("guided", "authors")
# config 'elimination' -> (BG elimination, DO elimination); anything but 'bg+do' is an ablation
ELIMINATIONS = {"bg+do": (True, True), "bg": (True, False), "do": (False, True), "none": (False, False)}


class BackboneNetwork(nn.Module):
    """Holds ``backbone``, ``ppm_scales``, ``freeze_backbone`` (no gradients into it) and
    ``fix_bn`` (its BatchNorm layers stay in eval mode whatever the network's mode: the authors'
    code lets their statistics drift)."""

    def __init__(self, backbone: nn.Module, ppm_scales: Sequence[float], freeze_backbone: bool, fix_bn: bool):
        super().__init__()
        if not ppm_scales:
            raise ValueError("ppm_scales is empty; e.g. [60, 30, 15, 8] or [1.0, 0.5, 0.25, 0.125]")
        self.backbone = backbone
        self.freeze_backbone, self.fix_bn = freeze_backbone, fix_bn
        self.ppm_scales = tuple(ppm_scales)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.train()   # modules added later start in training mode too; the backbone's BN per fix_bn

    def train(self, mode: bool = True):
        super().train(mode)
        if self.fix_bn:
            self.backbone.eval()
        return self

    def bin_sizes(self, feature_size: int) -> list[int]:
        """Pyramid bins at this feature size: values <= 1.0 are fractions of it (PFENet)."""
        return pyramid_bins(self.ppm_scales, feature_size)

    def _check_mode(self, query_mask, return_extras: bool, label_shape: str) -> None:
        """Training needs the query labels (``label_shape``) for the losses; ``return_extras`` is
        an evaluation output."""
        if self.training and query_mask is None:
            raise ValueError(f"training needs query_mask ({label_shape}) for the losses")
        if self.training and return_extras:
            raise ValueError("return_extras is for evaluation; call model.eval() first")

    def _input_format(self):
        return input_format(self.backbone)

    def _per_group(self, run, query, shots):
        """``run`` on the query batch, then on each shot's batch (B each), outputs joined as one
        batch does them: the query, then the supports episode by episode (index ``B + b·K + k``).
        The authors' passes with train-mode BatchNorm, whose statistics are those of each batch."""
        memory_format = self._input_format()
        query_out = run(query.contiguous(memory_format=memory_format))
        shot_outs = [run(x.contiguous(memory_format=memory_format)) for x in shots]
        return [torch.cat([q, torch.stack(per_shot, dim=1).flatten(0, 1)])
                for q, per_shot in zip(query_out, zip(*shot_outs))]

    def pyramid(self, x_query: torch.Tensor, support_prototype: torch.Tensor, prior: torch.Tensor,
                bg_logits: torch.Tensor, image_size, frames: int | None = None, label_target=None):
        """The per-scale paths (``self.scales``: BG elimination, target matching, DO elimination,
        enrichment) over the pyramid bins, then the merge (``self.merge``) upsampled to
        ``image_size``: ``(logits, per-scale outputs)``. ``frames``: the clip length of the video
        network (its paths' cross-frame attention), None for images. ``label_target``: the query's
        target (N×1×H×W, 0/1) for the DO prototype's mask in guided training, else None."""
        feature_size = x_query.shape[-2:]
        prior = prior.to(x_query.dtype)
        bg_prototype = None if self.bgmm is None else self.bgmm.bg_prototype   # None: no BG branch (ablation)
        scale_features, scale_outputs = [], []
        for path, size in zip(self.scales, self.bin_sizes(feature_size[0])):
            label_bin = None if label_target is None else (resize(label_target, size) >= 0.5).to(x_query.dtype)
            x, outputs = path(pool_to(x_query, size), bg_prototype, support_prototype,
                              resize(prior, size), None if bg_logits is None else resize(bg_logits, size),
                              scale_features[-1] if scale_features else None, frames=frames,
                              label_target_bin=label_bin)
            scale_features.append(resize(x, feature_size))   # every level at h×w (PFENet, the authors)
            scale_outputs.append(outputs)
        return resize(self.merge(scale_features), image_size), scale_outputs


class EliminatingNetwork(BackboneNetwork):
    """What the image and the video NTRENet++ share around BG and DO elimination: how their
    elimination steps are trained (``elimination_training``) and the masks' shares that training
    logs (:meth:`elimination_monitor`).

    ``elimination_training`` 'guided' (the default): every BG and DO elimination fusion starts as
    the identity on its feature map (:func:`init_pass_through`), and in training the DO
    prototype's mask takes the target from the query's label, ``relu(1 − BG − y)``, the mask the
    DO bank uses. 'authors': PyTorch's initialisation and the mask of the second prediction in
    training too. Evaluation is the same function either way: a checkpoint gives the same logits
    whichever trained it (docs/method.md, "Training the elimination steps")."""

    def setup_elimination_training(self, training: str = "guided") -> None:
        if training not in ELIMINATION_TRAININGS:
            raise ValueError(f"elimination_training {training!r}: expected one of "
                             f"{', '.join(ELIMINATION_TRAININGS)}")
        self.guided = training == "guided"
        if self.guided:
            for path in self.scales:
                for step in (path.bg_eliminating, path.do_eliminating):
                    if step is not None:
                        init_pass_through(step.fuse)

    def guiding_target(self, labels: torch.Tensor | None):
        """The DO prototype's target in guided training: ``(labels == 1)`` as N×1×H×W floats
        (``labels`` N×H×W); None in evaluation, with 'authors' or without a DO step."""
        if not (self.training and self.guided and labels is not None
                and any(p.do_eliminating is not None for p in self.scales)):
            return None
        return (labels == 1).unsqueeze(1).float()

    @staticmethod
    def elimination_monitor(bg_logits, first_scale: dict, labels) -> dict:
        """Shares, at the first pyramid bin, of the query pixels the BG branch calls background
        (``monitor/bg_mask``), of those in the DO mask (``monitor/do_mask``), and of the query's
        target pixels inside the DO mask (``monitor/do_on_target``): detached 0-dim tensors,
        logged beside the losses. ``labels``: the query labels (N×H×W, 1 = target)."""
        monitor = {}
        do_mask = first_scale.get("do_mask")
        size = (do_mask if do_mask is not None else first_scale["second"]).shape[-2:]
        with torch.no_grad():
            if bg_logits is not None:
                is_bg = resize(bg_logits.detach().float(), size).argmax(dim=1)
                monitor["monitor/bg_mask"] = is_bg.float().mean()
            if do_mask is not None:
                do_mask = do_mask.detach().float()
                target = (resize((labels == 1).unsqueeze(1).float(), size) >= 0.5).float()
                monitor["monitor/do_mask"] = do_mask.mean()
                monitor["monitor/do_on_target"] = (do_mask * target).sum() / target.sum().clamp_min(1)
        return monitor
