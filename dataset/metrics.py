"""Episode scoring and the FSS metrics (docs/protocol.md), computed on the device.

Per episode we count intersection and union of background (0) and foreground (1).
* class mIoU: per held-out class, ΣI / (ΣU + 1e-10) of the foreground over that class's
  episodes, averaged over the fold's classes — the headline number;
* FB-IoU: ΣI / (ΣU + 1e-10) of background and of foreground over all episodes, averaged.
Sums (not per-episode IoUs) are accumulated, so shards of an episode list reduce exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-10


def intersection_union(pred: torch.Tensor, target: torch.Tensor, ignore_label: int = 255):
    """Per-image intersection and union of classes 0 and 1.

    ``pred`` and ``target``: B×H×W integer tensors. Returns two B×2 float64 tensors.
    """
    valid = target != ignore_label
    inter, union = [], []
    for c in (0, 1):
        p, t = (pred == c) & valid, (target == c) & valid
        inter.append((p & t).flatten(1).sum(1))
        union.append((p | t).flatten(1).sum(1))
    return torch.stack(inter, 1).double(), torch.stack(union, 1).double()


def to_original_size(maps: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """Canvas maps (N×C×S×S) → N×C×height×width, PFENet's ori_resize mapping: the canvas
    covers the square of the longer side (the label padded with ignore there), so upsample to
    that square (bilinear, align_corners=True) and crop top-left. Scoring the crop equals
    scoring the padded square, whose padding is ignored."""
    side = max(height, width)
    kwargs = {"align_corners": True} if mode == "bilinear" else {}
    return F.interpolate(maps.float(), size=(side, side), mode=mode, **kwargs)[:, :, :height, :width]


def score_episodes(logits: torch.Tensor, batch: dict, ignore: int = 255,
                   ori_resize: bool = True) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Intersection and union (B×2) of a batch of episodes, and the predictions scored.

    Scoring modes: ``ori_resize`` (default) — logits upsampled bilinearly (align_corners=True)
    to the scored label (``query_mask_ori``) padded to a square of its longer side, then
    cropped: PFENet's original-size scoring; under the hsnet protocol that label is the
    square-resized one, of the logits' own size, so this leaves the logits as they are.
    Otherwise the label on the evaluation canvas. Pixels labelled ``ignore`` are not scored.
    Returns predictions at the scored size (ori mode: cropped to the label's size).
    """
    if not ori_resize:
        target = batch["query_mask"].to(logits.device)
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=True)
        pred = logits.argmax(1)
        inter, union = intersection_union(pred, target, ignore)
        return inter, union, list(pred)
    inters, unions, preds = [], [], []
    # original labels differ in size, so each episode is upsampled on its own
    for i, label in enumerate(batch["query_mask_ori"]):
        label = label.to(logits.device)
        pred = to_original_size(logits[i:i + 1], *label.shape).argmax(1)
        inter, union = intersection_union(pred, label[None], ignore)
        inters.append(inter)
        unions.append(union)
        preds.append(pred[0])
    return torch.cat(inters), torch.cat(unions), preds


class IoUAccumulator:
    """Sums of intersections and unions per class (foreground) and overall (bg, fg)."""

    def __init__(self, class_ids: list[int], device="cpu"):
        self.class_ids = list(class_ids)
        self.slot = torch.full((max(self.class_ids) + 1,), -1, dtype=torch.long)
        self.slot[self.class_ids] = torch.arange(len(self.class_ids))
        self.slot = self.slot.to(device)
        n = len(self.class_ids)
        self.class_inter = torch.zeros(n, dtype=torch.float64, device=device)
        self.class_union = torch.zeros(n, dtype=torch.float64, device=device)
        self.fb_inter = torch.zeros(2, dtype=torch.float64, device=device)
        self.fb_union = torch.zeros(2, dtype=torch.float64, device=device)
        self.episodes = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, class_ids: torch.Tensor, inter: torch.Tensor, union: torch.Tensor) -> None:
        slots = self.slot[class_ids.to(self.slot.device)]
        self.class_inter.index_add_(0, slots, inter[:, 1])
        self.class_union.index_add_(0, slots, union[:, 1])
        self.fb_inter += inter.sum(0)
        self.fb_union += union.sum(0)
        self.episodes += inter.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.class_inter, self.class_union, self.fb_inter, self.fb_union, self.episodes]

    def all_reduce(self) -> None:
        """Sum over processes (a no-op without torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in self.tensors():
                torch.distributed.all_reduce(t)

    def result(self, class_names: dict[int, str] | None = None) -> "IoUResult":
        class_iou = (self.class_inter / (self.class_union + EPS)).cpu()
        fb_iou = (self.fb_inter / (self.fb_union + EPS)).cpu()
        names = class_names or {c: str(c) for c in self.class_ids}
        return IoUResult(
            miou=100 * class_iou.mean().item(),
            fbiou=100 * fb_iou.mean().item(),
            class_iou={names[c]: 100 * v for c, v in zip(self.class_ids, class_iou.tolist())},
            episodes=int(self.episodes.item()),
        )


@dataclass
class IoUResult:
    miou: float                   # percent
    fbiou: float                  # percent
    class_iou: dict[str, float]   # class name -> percent
    episodes: int
