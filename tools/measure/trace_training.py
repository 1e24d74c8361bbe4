"""Trace the first training steps of a config: what the network predicts and mines, how large its
activations are at each fusion, and how much gradient reaches each module.

    python tools/measure/trace_training.py --config config/synthetic/synthetic_split0_resnet18.yaml \\
        --steps 400 --out out/trace [KEY VALUE ...]

Per training step (the run's own schedule: learning rate, warm-ups, seed) it records

- the losses and the shares the training log shows (``monitor/*``: the predicted foreground; for
  NTRENet++ the BG mask, the DO mask and the target inside the DO mask, at the first bin);
- the RMS of every prototype fusion's output (after its ReLU) and the share of its outputs that
  are zero, at every pyramid bin, with the DO fusion's input (``X_self``) beside it;
- the gradient norm of each module (``down_query``, ``bgmm``, ``scales.0.do_eliminating``, ...).

It writes ``<out>/trace.json`` (one record per step) and ``<out>/trace.png`` (four panels: the
shares, the fusions' RMS at the first bin, the gradient norms summed over the bins, the main and
BG losses). Nothing is saved in the experiment folder: the run trains in memory only.
docs/benchmarks.md, "Why NTRENet++ stalled", shows what it found.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections import defaultdict

import torch

from engine.trainer import Trainer, poly_lr
from util.cli import run
from util.config import config_with_overrides, parse_args_with_overrides
from util.distributed import DistInfo, pick_device
from util.fileio import atomic_path, atomic_write_json

# the prototype fusions of one pyramid bin: (name, path inside a ScalePath, index of its ReLU)
FUSIONS = (("bg_elim", "bg_eliminating.fuse"), ("support_merge", "target_matching.support_merge"),
           ("self_merge", "target_matching.self_merge"), ("do_elim", "do_eliminating.fuse"),
           ("inter_scale", "enrichment.inter_scale"))


def _submodule(root: torch.nn.Module, dotted: str):
    module = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class ActivationProbe:
    """Forward hooks on every fusion's ReLU (and on the DO step's input): RMS and zero share of
    the latest forward, keyed ``<fusion>/<bin>``."""

    def __init__(self, model: torch.nn.Module):
        self.values: dict[str, float] = {}
        self.handles = []
        bgmm = getattr(model, "bgmm", None)
        if bgmm is not None:
            self._watch(bgmm.fuse[1], "bgmm_fuse")
        for b, path in enumerate(getattr(model, "scales", ())):
            for name, dotted in FUSIONS:
                block = _submodule(path, dotted)
                if block is not None:
                    self._watch(block[1], f"{name}/{b}")
            if getattr(path, "do_eliminating", None) is not None:
                self.handles.append(path.do_eliminating.register_forward_hook(self._input_hook(f"do_input/{b}")))

    def _record(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.values[f"rms/{key}"] = x.pow(2).mean().sqrt().item()
        self.values[f"zero/{key}"] = (x == 0).float().mean().item()

    def _watch(self, relu: torch.nn.Module, key: str) -> None:
        self.handles.append(relu.register_forward_hook(lambda _m, _i, out: self._record(key, out)))

    def _input_hook(self, key: str):
        return lambda _m, inputs, _out: self._record(key, inputs[0])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def gradient_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of each module: top-level children, and each pyramid bin's steps
    (``scales.<b>.<step>``)."""
    squares: dict[str, float] = defaultdict(float)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[0] == "scales" else parts[0]
        squares[key] += p.grad.detach().float().pow(2).sum().item()
    return {f"grad/{k}": v ** 0.5 for k, v in squares.items()}


def trace(cfg, steps: int) -> list[dict]:
    """Train ``steps`` iterations of ``cfg`` in memory (one process, the config's device) and return one
    record per step."""
    info = DistInfo(device=pick_device(cfg.device))
    cfg.evaluate = False
    trainer = Trainer.from_cfg(cfg, info)
    probe = ActivationProbe(trainer.model)
    records = []
    trainer.net.train()
    trainer.loader.sampler.set_epoch(0, start=0)
    try:
        while len(records) < steps:
            for batch in trainer.loader:
                it = trainer.state.iteration
                lr = poly_lr(cfg.base_lr, it + 1, trainer.max_iter, cfg.power, cfg.warmup_iters)
                trainer.step(batch, lr)
                trainer.state.iteration += 1
                values = trainer.losses.pending.pop()
                record = {"step": it + 1, "lr": lr}
                record.update({name: float(v) for name, v in zip(trainer.losses.names, values)})
                record.update(probe.values)
                record.update(gradient_norms(trainer.model))
                records.append(record)
                if len(records) >= steps:
                    break
            trainer.state.epoch += 1
            trainer.loader.sampler.set_epoch(trainer.state.epoch, start=0)
    finally:
        probe.close()
    return records


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(records: list[dict], path: str, title: str) -> None:
    """Four panels of the trace (moving average over 10 steps), written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    keys = sorted({k for r in records for k in r})
    series = {k: [r.get(k, float("nan")) for r in records] for k in keys}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = [
        ("shares (first bin; fg: final prediction)", [k for k in keys if k.startswith("monitor/")], "share", False),
        ("activation RMS at the first bin", [k for k in keys if k.startswith("rms/") and k.endswith("/0")]
         + [k for k in keys if k == "rms/bgmm_fuse"], "RMS", False),
        ("gradient norm per module (log)", [k for k in keys if k.startswith("grad/") and
                                            not k.startswith("grad/scales.")], "norm", True),
        ("losses", [k for k in ("main", "aux1", "aux2", "bg", "contrast") if k in series], "loss", False),
    ]
    # the per-bin steps summed over bins: one curve per kind of step
    per_kind: dict[str, list[float]] = {}
    for k in keys:
        if k.startswith("grad/scales."):
            kind = "grad/" + k.split(".")[-1]
            current = [v ** 2 for v in series[k]]
            per_kind[kind] = [a + b for a, b in zip(per_kind.get(kind, [0.0] * len(current)), current)]
    for kind, squares in per_kind.items():
        series[kind] = [v ** 0.5 for v in squares]
        panels[2][1].append(kind)
    for ax, (name, names, ylabel, log_scale) in zip(axes.flat, panels):
        for k in names:
            ax.plot(steps, _smooth(series[k], 10), label=k.split("/", 1)[1] if "/" in k else k, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config/<dataset>/<dataset>_<exp>.yaml")
    p.add_argument("--steps", type=int, default=400, help="training steps to trace")
    p.add_argument("--out", default="out/trace", help="folder for trace.json and trace.png")
    args, opts = parse_args_with_overrides(p, argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args, opts


def main(argv=None) -> list[dict]:
    args, opts = _parse(argv)
    cfg = config_with_overrides(args.config, opts)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    records = trace(cfg, args.steps)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "trace.json"), records, indent=None)
    title = f"{os.path.basename(args.config)} {' '.join(opts)}".strip()
    plot(records, os.path.join(args.out, "trace.png"), title)
    last = records[-25:]
    shares = {k: sum(r[k] for r in last) / len(last) for k in last[-1] if k.startswith("monitor/")}
    print(f"{len(records)} steps traced; mean over the last {len(last)}: "
          + ", ".join(f"{k[len('monitor/'):]} {v:.3f}" for k, v in shares.items()))
    print(f"wrote {os.path.join(args.out, 'trace.json')} and {os.path.join(args.out, 'trace.png')}")
    return records


if __name__ == "__main__":
    run(main)
