"""What a task (image or video few-shot segmentation) supplies to the one training loop,
evaluation loop, test loop, predictor front end and baseline path of engine/."""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from util.distributed import DistInfo


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a test's runs."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def with_spread(mean: float, std: float, runs: int) -> str:
    """'50.63 ± 0.46' over several runs; one run has no spread to show: '50.63'."""
    return f"{mean:.2f} ± {std:.2f}" if runs > 1 else f"{mean:.2f}"


def per_unit_ms(ms: float, unit: str) -> str:
    """'12.3 ms/episode'; a time that rounds to 0.0 (the all-foreground baseline) is '<0.1 ms/episode'."""
    return f"{ms:.1f} ms/{unit}" if ms >= 0.05 else f"<0.1 ms/{unit}"


def tested_model(summary: dict) -> str:
    """How a summary line names what was tested: 'checkpoint PATH', or an in-memory model's name
    (tools/baseline.py's 'all-foreground')."""
    return summary["weight"] if summary.get("checkpoint_epoch") is None else f"checkpoint {summary['weight']}"


class Scorer:
    """Per-evaluation scoring state of a task: fed each batch's logits, it accumulates the
    metric sums (reduced across processes by :meth:`result`), saves predictions and keeps
    sample episodes for panels. ``units``: what the model time is divided by (episodes of
    this shard, or scored frames)."""

    units: int = 0

    def update(self, batch: dict, logits: torch.Tensor) -> list:
        raise NotImplementedError

    def save(self, pred_dir: str, batch: dict, preds: list) -> list[dict]:
        raise NotImplementedError

    def samples(self, batch: dict, logits: torch.Tensor, preds: list, extras: dict, n: int) -> list[dict]:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError

    def write_index(self, pred_dir: str, records: list[dict]) -> None:
        raise NotImplementedError


class Task:
    """One task's parts. ``train_inputs``: the batch keys a training step passes to the network,
    in its argument order (the last two: query labels and class ids); ``eval_inputs``: those
    of an evaluation forward; ``headline``: (column title, result key) of the figures a
    comparison table shows; ``predictor``: the class behind predict.py."""

    name: str
    train_inputs: tuple[str, ...]
    eval_inputs: tuple[str, ...]
    eval_collate: Callable
    headline: tuple[tuple[str, str], ...]
    selection_metric: str            # the validation figure best.pth is chosen on
    predictor: type
    prototype_matcher: bool = False  # tools/baseline.py's training-free matcher applies

    # ---- data
    def train_dataset(self, cfg, info: DistInfo) -> Dataset:
        raise NotImplementedError

    def val_dataset(self, cfg, info: DistInfo, seed: int) -> Dataset:
        raise NotImplementedError

    def test_dataset(self, cfg, info: DistInfo, seed: int) -> Dataset:
        raise NotImplementedError

    def describe_train_set(self, dataset: Dataset) -> str:
        """What the training episodes are drawn from, for the log: 'over 1412 images'."""
        return f"over {len(dataset)} images"

    def input_size(self, cfg, train: bool) -> tuple[int, int]:
        """The network's input size in training and in evaluation."""
        raise NotImplementedError

    def clip_frames(self, cfg) -> int:
        """Frames of a query clip (0: a single image, no frame axis)."""
        return 0

    # ---- optimisation
    def optimizer(self, model: torch.nn.Module, cfg, fused: bool):
        """SGD (PFENet's recipe) over the trainable parameters, or over the groups the network's
        optional ``parameter_groups()`` gives (docs/extending.md): each group a dict with
        ``params`` and optionally ``lr_scale`` (its rate relative to the schedule's) and any
        SGD option (``weight_decay``, ...)."""
        if hasattr(model, "parameter_groups"):
            groups = [dict(g) for g in model.parameter_groups()]
            for g in groups:
                g["params"] = [p for p in g["params"] if p.requires_grad]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused)

    # ---- scoring and reports
    def scorer(self, dataset: Dataset, cfg, device: torch.device) -> Scorer:
        raise NotImplementedError

    def validation_metrics(self, out, epoch: int, writer, step: int) -> dict:
        """Log a validation (and write its TensorBoard scalars and images); the metrics kept in
        checkpoints, ``miou`` the figure best.pth is chosen on."""
        raise NotImplementedError

    def describe_test(self, cfg) -> str:
        raise NotImplementedError

    def result_episodes(self, result: dict) -> dict:
        """The config keys that draw the very episodes a test result JSON scored."""
        raise NotImplementedError

    def run_record(self, seed: int, out, dataset: Dataset, cfg) -> dict:
        """One test run's figures (logged, and kept in the result JSON)."""
        raise NotImplementedError

    def summary(self, cfg, runs: list[dict]) -> dict:
        """The result JSON's task-specific fields: means ± std over runs, sizes, the runs."""
        raise NotImplementedError

    def format_summary(self, cfg, summary: dict) -> str:
        raise NotImplementedError

    def save_visuals(self, samples: list[dict], folder: str, rank: int) -> None:
        raise NotImplementedError
