"""Video segmentation metrics from the DAVIS definitions (docs/video.md, "Metrics").

Per frame, on binary masks at the canvas size, batched over frames and computed on the
masks' device:

* **J** (region similarity): |P ∩ G| / |P ∪ G|, 1 when both are empty;
* **F** (boundary accuracy): the F-measure of the boundary pixels of P and G (boundaries
  as DAVIS's ``seg2bmap``), a boundary pixel matching when the other boundary lies within
  a disk of radius ``ceil(0.008 · sqrt(H² + W²))`` (4 px at 241×425); precision 1 / recall
  0 when only P's boundary is empty and the reverse when only G's is, F = 1 when both are
  empty and F = 0 when precision + recall = 0;
* TP, FP, FN pixel counts for the class IoU ΣTP / Σ(TP+FP+FN).

:class:`VideoScoreAccumulator` pools them: per class the mean J and F over all its scored
frames (over its videos together), the fold value the mean over classes, and per query
(episode) the same sums for a per-video report. Sums, not means, are accumulated, so
shards of an evaluation list reduce exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BOUND_TH = 0.008
EPS = 1e-10


def seg2bmap(masks: torch.Tensor) -> torch.Tensor:
    """One-pixel boundaries of binary masks (…×H×W), as DAVIS's ``seg2bmap`` at full size:
    a pixel is on the boundary if it differs from its east, south or south-east neighbour
    (outside the image counts as 0); the last row compares only east, the last column only
    south, and the bottom-right pixel is never a boundary."""
    seg = masks.bool()
    e = torch.zeros_like(seg)
    s = torch.zeros_like(seg)
    se = torch.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """Matching tolerance in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th · diagonal)."""
    return int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.sqrt(height ** 2 + width ** 2))


def disk(radius: int, device=None) -> torch.Tensor:
    """(2r+1)×(2r+1) bool disk: the offsets (x, y) with x² + y² <= r²."""
    r = torch.arange(-radius, radius + 1, device=device)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius ** 2


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of N×H×W masks by :func:`disk` (nothing enters from outside the image)."""
    kernel = disk(radius, masks.device).to(torch.float32)[None, None]
    hit = F.conv2d(masks[:, None].to(torch.float32), kernel, padding=radius)
    return hit[:, 0] > 0.5


def region_similarity(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """J per frame (N float64) of N×H×W binary masks; 1 where both are empty."""
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (p & t).sum(1).double()
    union = (p | t).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def boundary_f(pred: torch.Tensor, target: torch.Tensor, bound_th: float = BOUND_TH) -> torch.Tensor:
    """F per frame (N float64) of N×H×W binary masks (see the module doc)."""
    radius = boundary_radius(*pred.shape[-2:], bound_th)
    pb, tb = seg2bmap(pred), seg2bmap(target)
    n_p = pb.flatten(1).sum(1).double()
    n_t = tb.flatten(1).sum(1).double()
    p_match = (pb & dilate(tb, radius)).flatten(1).sum(1).double()
    t_match = (tb & dilate(pb, radius)).flatten(1).sum(1).double()
    precision = torch.where(n_p > 0, p_match / n_p.clamp(min=1), torch.ones_like(n_p))
    recall = torch.where(n_t > 0, t_match / n_t.clamp(min=1), torch.ones_like(n_t))
    # only P empty: precision 1, recall 0; only G empty: precision 0, recall 1 (DAVIS)
    precision = torch.where((n_p > 0) & (n_t == 0), torch.zeros_like(precision), precision)
    recall = torch.where((n_p == 0) & (n_t > 0), torch.zeros_like(recall), recall)
    total = precision + recall
    return torch.where(total > 0, 2 * precision * recall / total.clamp(min=EPS), torch.zeros_like(total))


def confusion(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(TP, FP, FN) pixel counts per frame, each N float64."""
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    return (p & t).sum(1).double(), (p & ~t).sum(1).double(), (~p & t).sum(1).double()


@dataclass
class FrameScores:
    """Per-frame J, F, TP, FP, FN (each N float64)."""
    j: torch.Tensor
    f: torch.Tensor
    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor


def score_frames(pred: torch.Tensor, target: torch.Tensor, bound_th: float = BOUND_TH) -> FrameScores:
    """Every metric of N predicted masks (N×H×W, nonzero = class) against their targets."""
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred and target must both be N×H×W, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return FrameScores(region_similarity(pred, target), boundary_f(pred, target, bound_th), *confusion(pred, target))


@dataclass
class VideoResult:
    mean_j: float                       # percent: mean over classes of the per-class mean J
    mean_f: float                       # percent
    jf: float                           # (mean_j + mean_f) / 2
    class_iou: float                    # percent: mean over classes of ΣTP / Σ(TP+FP+FN)
    per_class: dict[str, dict]          # class name -> {"J", "F", "IoU" (percent), "frames", "videos"}
    frames: int                         # frames scored
    queries: int                        # (video, class) queries scored
    videos: int                         # distinct query videos (needs video_ids in update)
    per_episode: list[dict] = field(default_factory=list)   # {"episode_id", "J", "F", "frames"}


class VideoScoreAccumulator:
    """Sums per class and per episode (query video × class) of J, F, TP, FP, FN and frames.

    ``class_ids`` are the evaluated classes; ``num_episodes`` the length of the full
    evaluation list (episode ids index the per-episode sums on every shard alike).
    """

    def __init__(self, class_ids: list[int], num_episodes: int, device="cpu"):
        self.class_ids = list(class_ids)
        slot = torch.full((max(self.class_ids) + 1,), -1, dtype=torch.long)
        slot[self.class_ids] = torch.arange(len(self.class_ids))
        self.slot = slot.to(device)
        zeros = lambda *n: torch.zeros(*n, dtype=torch.float64, device=device)  # noqa: E731
        self.by_class = zeros(len(self.class_ids), 6)     # J, F, TP, FP, FN, frames
        self.by_episode = zeros(num_episodes, 3)          # J, F, frames
        self.episode_class = torch.full((num_episodes,), -1, dtype=torch.long, device=device)
        self.episode_video = torch.full((num_episodes,), -1, dtype=torch.long, device=device)

    def update(self, scores: FrameScores, class_ids: torch.Tensor, episode_ids: torch.Tensor,
               video_ids: torch.Tensor | None = None) -> None:
        """Add N scored frames (only frames to score: drop the pads first); ``class_ids``,
        ``episode_ids`` and optionally ``video_ids`` (the query video's index position) are
        N per-frame ids."""
        device = self.by_class.device
        class_ids, episode_ids = class_ids.to(device), episode_ids.to(device)
        if video_ids is not None:
            self.episode_video[episode_ids] = video_ids.to(device)
        ones = torch.ones_like(scores.j)
        rows = torch.stack([scores.j, scores.f, scores.tp, scores.fp, scores.fn, ones], 1).to(device)
        self.by_class.index_add_(0, self.slot[class_ids], rows)
        self.by_episode.index_add_(0, episode_ids, rows[:, [0, 1, 5]])
        self.episode_class[episode_ids] = class_ids

    def all_reduce(self) -> None:
        """Sum over processes (a no-op without torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.by_class)
            torch.distributed.all_reduce(self.by_episode)
            torch.distributed.all_reduce(self.episode_class, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(self.episode_video, op=torch.distributed.ReduceOp.MAX)

    def result(self, class_names: dict[int, str] | None = None) -> VideoResult:
        names = class_names or {c: str(c) for c in self.class_ids}
        by_class, by_episode = self.by_class.cpu(), self.by_episode.cpu()
        episode_class, episode_video = self.episode_class.cpu(), self.episode_video.cpu()
        seen = by_episode[:, 2] > 0
        per_class, js, fs, ious = {}, [], [], []
        for k, c in enumerate(self.class_ids):
            j, f, tp, fp, fn, n = by_class[k].tolist()
            if n == 0:
                continue
            iou = tp / (tp + fp + fn + EPS)
            videos = int(((episode_class == c) & seen).sum())   # one query per video of a class
            per_class[names[c]] = {"J": 100 * j / n, "F": 100 * f / n, "IoU": 100 * iou,
                                   "frames": int(n), "videos": videos}
            js.append(j / n)
            fs.append(f / n)
            ious.append(iou)
        mean = lambda v: 100 * sum(v) / len(v) if v else float("nan")  # noqa: E731
        per_episode = [{"episode_id": e, "J": 100 * j / n, "F": 100 * f / n, "frames": int(n)}
                       for e, (j, f, n) in enumerate(by_episode.tolist()) if n > 0]
        return VideoResult(mean_j=mean(js), mean_f=mean(fs), jf=(mean(js) + mean(fs)) / 2, class_iou=mean(ious),
                           per_class=per_class, frames=int(by_class[:, 5].sum()), queries=int(seen.sum()),
                           videos=len(set(episode_video[seen & (episode_video >= 0)].tolist())),
                           per_episode=per_episode)
