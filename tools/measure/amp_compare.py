"""Evaluate one model in fp32 and in low precision on the same episodes: time and agreement.

    python tools/measure/amp_compare.py --config CFG [--device cpu|cuda] [--weight CKPT | (random init)]
        [--generate N] [--episodes 100] [--amps none,bf16] [--json OUT] [KEY VALUE ...]

Runs the evaluation of test.py (``engine.evaluate``: same episodes, same scoring, predictions
at the original label size) once per ``amp`` value on one fixed episode list and reports, per
precision, ms per episode (model time, device-synchronised), class mIoU and FB-IoU, the
predicted foreground share and, against the first (fp32), the **pixel agreement** of the
predictions (scored pixels, i.e. label not 255, predicted alike) and the mIoU difference.

``--weight`` evaluates a trained checkpoint; without it a randomly initialised network of
the config (``pretrained ''``, seed ``manual_seed``) is used — enough to time the arithmetic and
see how far rounding moves the argmax, but a random network's margins are small, so its
agreement is a pessimistic bound. ``--generate N`` writes N synthetic evaluation images with
sides around ``val_size`` (``tools/make_synthetic.py``) into a temporary folder and evaluates on
them (dataset synthetic, its folds) — PASCAL-size episodes without a download; otherwise the
config's ``val_list`` is used.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile

import numpy as np
import torch


from engine.checkpoint import build_model_from_checkpoint
from engine.evaluate import evaluate
from engine.networks import build_model
from tools.make_synthetic import main as make_synthetic
from util.amp import to_device
from util.config import load_cfg, parse_args_with_overrides
from dataset.image import FewShotEvalDataset, load_split, read_label
from util.distributed import pick_device
from util.errors import ConfigError
from util.fileio import atomic_write_json
from util.host_memory import tune_cpu_process

AMPS = ("none", "bf16", "fp16")


def generate_eval_data(root: str, images: int, size: int, seed: int = 0) -> None:
    """``images`` synthetic evaluation images (sides 0.75–1.25 × ``size``) under ``root``."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        make_synthetic(["--out", root, "--train", "0", "--val", str(images), "--size", str(size),
                        "--seed", str(seed)])


class MarginRecorder(torch.nn.Module):
    """Passes ``model``'s logits through and keeps each episode's margin (foreground minus
    background logit) average-pooled to at most 64×64, in fp32 on the CPU."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.margins = model, []

    def forward(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        margin = (logits[:, 1] - logits[:, 0]).float().unsqueeze(1)
        side = margin.shape[-1]
        factor = max(1, -(-side // 64))
        self.margins.append(torch.nn.functional.avg_pool2d(margin, factor, ceil_mode=True)[:, 0].cpu())
        return logits


def margin_error(reference: list, other: list) -> dict:
    """How far the low precision moved the logit margins: relative L2 error and the share of
    pooled positions whose margin sign (the prediction) is the same."""
    a, b = torch.cat(reference).double(), torch.cat(other).double()
    return {"margin_rel_error": float((a - b).norm() / a.norm().clamp_min(1e-12)),
            "margin_sign_agreement_pct": float(((a > 0) == (b > 0)).double().mean() * 100)}


def build(cfg, weight: str, device: torch.device):
    """The model to compare: a checkpoint, or the config's network randomly initialised."""
    if weight:
        model, _ = build_model_from_checkpoint(weight, cfg)
    else:
        torch.manual_seed(cfg.manual_seed)
        bare = cfg.copy()
        bare.pretrained = ""
        model = build_model(bare)
    return to_device(model, device, cfg.channels_last).eval()


def read_predictions(pred_dir: str) -> list[tuple[dict, np.ndarray]]:
    """(episode record, 0/1 prediction) per episode, in episode order, from a ``pred_dir``."""
    import cv2
    with open(os.path.join(pred_dir, "episodes.json")) as f:
        records = json.load(f)["episodes"]
    return [(r, cv2.imread(os.path.join(pred_dir, r["prediction"]), cv2.IMREAD_UNCHANGED)) for r in records]


def agreement(reference: list, other: list, data_root: str, ignore_label: int = 255) -> dict:
    """Pixel agreement (%) of two prediction lists over the scored (non-ignored) pixels: all
    episodes pooled, and the least-agreeing episode."""
    same = total = 0
    worst = 100.0
    for (rec, a), (rec_b, b) in zip(reference, other):
        assert rec["episode"] == rec_b["episode"] and a.shape == b.shape
        valid = read_label(os.path.join(data_root, rec["query_label"])) != ignore_label
        n, k = int(valid.sum()), int(((a == b) & valid).sum())
        same, total = same + k, total + n
        if n:
            worst = min(worst, 100.0 * k / n)
    return {"pixel_agreement_pct": 100.0 * same / max(total, 1), "worst_episode_agreement_pct": worst,
            "scored_pixels": total}


def compare(cfg, device: torch.device, episodes: int, amps=("none", "bf16"), weight: str = "",
            log=print) -> dict:
    """Evaluate ``episodes`` episodes (seed ``manual_seed``) once per precision in ``amps``."""
    model = build(cfg, weight, device)
    split = load_split(cfg, train=False)
    out = {"device": str(device), "episodes": episodes, "shot": cfg.shot, "val_size": cfg.val_size,
           "model": "checkpoint " + weight if weight else "random init (seed %d)" % cfg.manual_seed,
           "layers": cfg.layers, "backbone_width": cfg.backbone_width, "vgg": cfg.vgg, "batch_size_val": cfg.batch_size_val, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="amp_compare_") as tmp:
        predictions, margins = {}, {}
        for amp in amps:
            run_cfg = cfg.copy()
            run_cfg.amp = amp
            dataset = FewShotEvalDataset(run_cfg, seed=cfg.manual_seed, num_episodes=episodes, split=split)
            log(f"amp {amp}: {episodes} episodes ...")
            recorder = MarginRecorder(model)
            res = evaluate(recorder, dataset, run_cfg, device, pred_dir=os.path.join(tmp, amp))
            margins[amp] = recorder.margins
            predictions[amp] = read_predictions(os.path.join(tmp, amp))
            fg = np.mean([p.mean() for _, p in predictions[amp]]) * 100
            run = {"ms_per_episode": res.ms_per_unit, "wall_s": res.wall_s, "miou": res.result.miou,
                   "fbiou": res.result.fbiou, "foreground_pct": float(fg)}
            if amp != amps[0]:
                run.update(agreement(predictions[amps[0]], predictions[amp], cfg.data_root, cfg.ignore_label))
                run.update(margin_error(margins[amps[0]], margins[amp]))
                run["miou_diff"] = res.result.miou - out["runs"][amps[0]]["miou"]
                run["speedup"] = out["runs"][amps[0]]["ms_per_episode"] / res.ms_per_unit
            out["runs"][amp] = run
    return out


def format_table(res: dict) -> str:
    lines = [f"{res['model']}, {res['episodes']} episodes, {res['shot']}-shot, val_size {res['val_size']}, "
             f"{res['device']}",
             f"{'amp':6s}{'ms/episode':>12s}{'class mIoU':>12s}{'FB-IoU':>9s}{'fg %':>7s}"
             f"{'agree %':>10s}{'worst ep %':>12s}{'ΔmIoU':>8s}{'margin err':>12s}"]
    for amp, r in res["runs"].items():
        extra = (f"{r['pixel_agreement_pct']:10.3f}{r['worst_episode_agreement_pct']:12.2f}{r['miou_diff']:+8.2f}"
                 f"{r['margin_rel_error']:12.2e}"
                 if "pixel_agreement_pct" in r else f"{'(ref)':>10s}{'':12s}{'':8s}")
        lines.append(f"{amp:6s}{r['ms_per_episode']:12.1f}{r['miou']:12.2f}{r['fbiou']:9.2f}"
                     f"{r['foreground_pct']:7.1f}" + extra)
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--weight", default="", help="a checkpoint (default: the config's network, random init)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="evaluate on N generated synthetic images of about val_size (default: the config's data)")
    parser.add_argument("--amps", default="none,bf16", help="precisions, the reference first (none, bf16, fp16)")
    parser.add_argument("--json", default="", help="also write the results here")
    args, opts = parse_args_with_overrides(parser, argv)
    amps = tuple(a for a in args.amps.split(",") if a)
    if len(amps) < 2 or set(amps) - set(AMPS) or len(set(amps)) != len(amps):
        raise ConfigError(f"--amps {args.amps!r}: give two or more of {', '.join(AMPS)}, comma-separated, "
                          f"the reference first (e.g. none,bf16)")
    if args.episodes < 1:
        raise ConfigError(f"--episodes {args.episodes}: give at least 1")
    cfg = load_cfg(args.config, opts)
    device = pick_device(args.device)
    if "fp16" in amps and device.type != "cuda":
        raise ConfigError("--amps fp16 needs a CUDA device (use bf16 on the CPU)")
    if device.type == "cpu":
        tune_cpu_process()
    with tempfile.TemporaryDirectory(prefix="amp_compare_data_") as root:
        if args.generate:
            generate_eval_data(root, args.generate, cfg.val_size)
            cfg.update(dataset="synthetic", data_root=root, val_list=os.path.join(root, "val.txt"),
                       class_index_workers=1)
        res = compare(cfg, device, args.episodes, amps, args.weight)
    res["generated_images"] = args.generate
    print(format_table(res))
    if args.json:
        atomic_write_json(args.json, res)
    return res


if __name__ == "__main__":
    from util.cli import run
    run(main)
