"""Everything this code does on a GPU, checked in one call (about 5 minutes on one GPU).

    sh tools/measure/gpu_check.sh OUT_DIR            # or: make gpu-check OUT=OUT_DIR
    python tools/measure/gpu_check.py --out OUT_DIR [--device cuda|cpu] [--budget 420]

Sections, each timed and recorded whatever the others do:

1. ``cuda_tests`` — the test suite's CUDA-only tests (``pytest -m cuda``);
2. ``train_steps`` — a few real training steps (PASCAL settings: ResNet-50, 1-shot, batch 4,
   473²) in fp32, bf16 and fp16 with its GradScaler, each with and without channels_last:
   finite losses, weights still finite, step time, the GradScaler's scale;
3. ``benchmark`` — ``tools/measure/benchmark.py`` rows: PASCAL R50 1-shot 473, 5-shot, COCO R50 641,
   PASCAL DINOv2 ViT-S/14 and ViT-B/14 1-shot 476, each fp32 and bf16 (the loader is measured on
   the first row only);
4. ``eval_1000`` — a timed 1000-episode evaluation at PASCAL size (val_size 473, R50 random
   init) on generated images, fp32 then bf16 on the same episodes, with their agreement
   (``tools/measure/amp_compare.py``);
5. ``torchrun_nccl`` — ``train.py`` under a one-process ``torchrun``: process group (NCCL on
   CUDA), DDP, a few iterations, a checkpoint.

Writes ``OUT_DIR/summary.json`` (every figure) and ``OUT_DIR/summary.md`` (tables), and logs
beside them. Exit status 0 when every section passed, 1 otherwise; without a CUDA device it
prints one line and exits 1 before doing anything. ``--device cpu`` runs every section at a
tiny size on the CPU (fp16 and the CUDA-only tests are recorded as skipped): the test suite
checks the summary files that way.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.measure import benchmark
from tools.measure.amp_compare import compare, format_table, generate_eval_data
from tools.measure.benchmark import machine_name, make_batch, make_trainer
from tools.make_synthetic import main as make_synthetic
from util.config import load_cfg
from util.distributed import DistInfo
from util.fileio import atomic_write_json, atomic_write_text
from util.host_memory import tune_cpu_process

SECTIONS = ("cuda_tests", "train_steps", "benchmark", "eval_1000", "torchrun_nccl")
PASCAL = "config/pascal/pascal_split0_resnet50.yaml"
COCO = "config/coco/coco_split0_resnet50.yaml"
PASCAL_VITS = "config/pascal/pascal_split0_vits14.yaml"
PASCAL_VITB = "config/pascal/pascal_split0_vitb14.yaml"
SYNTHETIC = "config/synthetic/synthetic_split0_resnet18.yaml"

# the CPU rehearsal: every section's code path, at sizes a test can afford
TINY = dict(layers=18, reduce_dim=8, ppm_scales=[1.0, 0.5], train_h=33, train_w=33, val_size=41, batch_size=2,
            workers=0, memory_size=8, num_negatives=4)


class Budget:
    """Seconds left of the whole check; a section that would start after it runs out is skipped."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def config(path: str, tiny: bool, **over):
    cfg = load_cfg(os.path.join(ROOT, path))
    cfg.update(pretrained="")
    if tiny:
        cfg.update(TINY)
    cfg.update(over)
    return cfg


# ----------------------------------------------------------------------------- sections
def cuda_tests(device: torch.device, out: str, budget: Budget) -> dict:
    if device.type != "cuda":
        return {"skipped": "the CUDA-only tests need a CUDA device"}
    log = os.path.join(out, "cuda_tests.log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, min(180, budget.left())))
    atomic_write_text(log, proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"ok": proc.returncode == 0, "summary": last, "log": os.path.basename(log)}


def train_steps(device: torch.device, out: str, budget: Budget, steps: int = 3) -> dict:
    tiny = device.type != "cuda"
    rows, ok = [], True
    for amp in ("none", "bf16", "fp16"):
        for channels_last in (False, True):
            row = {"amp": amp, "channels_last": channels_last}
            rows.append(row)
            if amp == "fp16" and device.type != "cuda":
                row["skipped"] = "fp16 needs CUDA"
                continue
            cfg = config(PASCAL, tiny, amp=amp, channels_last=channels_last)
            torch.manual_seed(cfg.manual_seed)
            trainer = make_trainer(cfg, DistInfo(device=device))
            batch = make_batch(cfg.batch_size, cfg.shot, (cfg.train_h, cfg.train_w), 20, cfg.manual_seed,
                               device.type == "cuda")
            times = []
            for _ in range(steps):
                _sync(device)
                t0 = time.perf_counter()
                trainer.step(batch, 0.001)
                _sync(device)
                times.append(1000 * (time.perf_counter() - t0))
            losses = torch.stack(trainer.losses.pending).float().cpu()
            finite_weights = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
            row.update(step_ms=statistics.median(times[1:] or times), first_step_ms=times[0],
                       total_loss=[round(float(v), 5) for v in losses[:, trainer.losses.names.index("total")]],
                       losses_finite=bool(torch.isfinite(losses).all()), weights_finite=finite_weights,
                       grad_scale=float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else None)
            row["ok"] = row["losses_finite"] and finite_weights
            ok = ok and row["ok"]
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"ok": ok, "steps": steps, "rows": rows}


def benchmark_rows(device: torch.device, out: str, budget: Budget) -> dict:
    tiny = device.type != "cuda"
    # the ViT rows rehearse on the CPU with the tiny ViT
    vit = {"backbone": "vit_tiny8"} if tiny else {}
    specs = [("PASCAL R50 1-shot 473", PASCAL, {}), ("PASCAL R50 5-shot 473", PASCAL, {"shot": 5}),
             ("COCO R50 1-shot 641", COCO, {}), ("PASCAL ViT-S/14 1-shot 476", PASCAL_VITS, vit),
             ("PASCAL ViT-B/14 1-shot 476", PASCAL_VITB, vit)]
    rows, ok = [], True
    for name, path, over in specs:
        for amp in ("none", "bf16"):
            row = {"row": name, "amp": amp}
            rows.append(row)
            if budget.left() < 30:
                row["skipped"] = "time budget spent"
                ok = False
                continue
            cfg = config(path, tiny, amp=amp, **over)
            skip = () if (not rows[:-1]) else ("loader",)
            with contextlib.redirect_stdout(io.StringIO()):
                res = benchmark.run(cfg, device, reps=3 if tiny else 5, warmup=1 if tiny else 2, skip=skip,
                                    log=lambda m: None)
            row.update({k: res.get(k) for k in ("train_step_ms", "backbone_ms", "eval_episode_ms",
                                                "eval_batched_episode_ms", "efficiency", "peak_gflops",
                                                "achieved_gflops", "peak_mem_mib", "sync_free",
                                                "loader_episodes_per_s")})
            row["machine"] = res["machine"]
            if res.get("amp_loss_check"):       # {loss: [fp32, amp, |difference|]}
                row["amp_loss_max_abs_diff"] = max(v[2] for v in res["amp_loss_check"].values())
            row["ok"] = bool(res["train_step_ms"]) and res["sync_free"] is not False
            ok = ok and row["ok"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"ok": ok, "rows": rows}


def eval_1000(device: torch.device, out: str, budget: Budget) -> dict:
    tiny = device.type != "cuda"
    episodes, images = (8, 80) if tiny else (1000, 300)
    over = dict(min_class_pixels=150, batch_size_val=2, workers=0) if tiny else {}
    cfg = config(PASCAL, tiny, **over)
    with tempfile.TemporaryDirectory(prefix="gpu_check_eval_") as root:
        t0 = time.perf_counter()
        generate_eval_data(root, images, max(cfg.val_size, 64))
        generate_s = time.perf_counter() - t0
        cfg.update(dataset="synthetic", data_root=root, val_list=os.path.join(root, "val.txt"), class_index_workers=1)
        with contextlib.redirect_stdout(io.StringIO()):
            res = compare(cfg, device, episodes, ("none", "bf16"), log=lambda m: None)
    atomic_write_text(os.path.join(out, "eval_1000.txt"), format_table(res) + "\n")
    return {"ok": all(r["ms_per_episode"] > 0 for r in res["runs"].values()), "episodes": episodes,
            "generated_images": images, "generate_s": generate_s, "val_size": cfg.val_size, **res}


def torchrun_nccl(device: torch.device, out: str, budget: Budget) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as root:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            make_synthetic(["--out", root, "--train", "120", "--val", "0", "--size", "64", "--workers", "2"])
        save = os.path.join(root, "exp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "train.py", "--config", SYNTHETIC, "data_root", root, "train_list", os.path.join(root, "train.txt"),
               "save_path", save, "evaluate", "False", "epochs", "1", "epoch_size", "32", "batch_size", "4",
               "print_freq", "2", "workers", "2", "device", device.type, "min_class_pixels", "200",
               "tb_images", "0", "pretrained", "", "freeze_backbone", "False", "fix_bn", "False"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, min(240, budget.left())))
        seconds = time.perf_counter() - t0
        text = proc.stdout + proc.stderr
        atomic_write_text(os.path.join(out, "torchrun.log"), text)
        backend = "nccl" if "process group nccl" in text else "gloo" if "process group gloo" in text else None
        checkpoint = os.path.isfile(os.path.join(save, "model", "last.pth"))
    expected = "nccl" if device.type == "cuda" else "gloo"
    return {"ok": proc.returncode == 0 and backend == expected and checkpoint, "returncode": proc.returncode,
            "backend": backend, "expected_backend": expected, "checkpoint_written": checkpoint,
            "iterations": 8, "wall_s": seconds, "log": "torchrun.log"}


RUNNERS = {"cuda_tests": cuda_tests, "train_steps": train_steps, "benchmark": benchmark_rows,
           "eval_1000": eval_1000, "torchrun_nccl": torchrun_nccl}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the summary
def machine(device: torch.device) -> dict:
    info = {"device": machine_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": sys.version.split()[0], "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def _fmt(v, spec="{:.1f}"):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def format_markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"# GPU check — {m['device']}", "",
             f"{m['date']}; torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}; "
             f"{'CPU rehearsal at tiny sizes' if summary['rehearsal'] else 'real sizes'}; "
             f"{summary['total_s']:.0f} s in all; **{'all sections passed' if summary['ok'] else 'FAILED'}**.", "",
             "| section | result | seconds |", "|---|---|---|"]
    for name in SECTIONS:
        s = summary["sections"][name]
        state = ("skipped: " + s["skipped"]) if s.get("skipped") else ("passed" if s.get("ok") else
                                                                        "FAILED" + (": " + s["error"].splitlines()[-1]
                                                                                    if s.get("error") else ""))
        lines.append(f"| {name} | {state} | {_fmt(s.get('seconds'), '{:.0f}')} |")
    sec = summary["sections"]
    if sec["cuda_tests"].get("summary"):
        lines += ["", f"CUDA-only tests: `{sec['cuda_tests']['summary']}`"]
    if sec["train_steps"].get("rows"):
        lines += ["", "## Training steps", "", "| amp | channels_last | step ms | first step ms | total loss per step "
                  "| finite | grad scale |", "|---|---|---|---|---|---|---|"]
        for r in sec["train_steps"]["rows"]:
            if r.get("skipped"):
                lines.append(f"| {r['amp']} | {r['channels_last']} | skipped: {r['skipped']} | | | | |")
            else:
                lines.append(f"| {r['amp']} | {r['channels_last']} | {_fmt(r['step_ms'])} | {_fmt(r['first_step_ms'])} "
                             f"| {', '.join(f'{v:.4f}' for v in r['total_loss'])} | "
                             f"{_fmt(r['losses_finite'] and r['weights_finite'])} | {_fmt(r['grad_scale'], '{:.0f}')} |")
    if sec["benchmark"].get("rows"):
        lines += ["", "## Benchmark rows (`tools/measure/benchmark.py`)", "",
                  "| row | amp | step ms | backbone ms | eval episode ms (1 / batched) | efficiency | peak memory MiB "
                  "| no host sync | loader episodes/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sec["benchmark"]["rows"]:
            if r.get("skipped"):
                lines.append(f"| {r['row']} | {r['amp']} | skipped: {r['skipped']} | | | | | | |")
                continue
            lines.append(f"| {r['row']} | {r['amp']} | {_fmt(r['train_step_ms'])} | {_fmt(r['backbone_ms'])} | "
                         f"{_fmt(r['eval_episode_ms'])} / {_fmt(r['eval_batched_episode_ms'])} | "
                         f"{_fmt(r['efficiency'], '{:.3f}')} | {_fmt(r['peak_mem_mib'], '{:.0f}')} | "
                         f"{_fmt(r['sync_free'])} | {_fmt(r['loader_episodes_per_s'])} |")
    e = sec["eval_1000"]
    if e.get("runs"):
        lines += ["", f"## Evaluation, {e['episodes']} episodes at val_size {e['val_size']} "
                  f"({e['model']}, {e['generated_images']} generated images)", "",
                  "| amp | ms/episode | wall s | class mIoU | foreground % | pixel agreement % | worst episode % "
                  "| ΔmIoU | margin rel. error |", "|---|---|---|---|---|---|---|---|---|"]
        for amp, r in e["runs"].items():
            lines.append(f"| {amp} | {_fmt(r['ms_per_episode'])} | {_fmt(r['wall_s'])} | {_fmt(r['miou'], '{:.2f}')} | "
                         f"{_fmt(r['foreground_pct'])} | {_fmt(r.get('pixel_agreement_pct'), '{:.3f}')} | "
                         f"{_fmt(r.get('worst_episode_agreement_pct'), '{:.2f}')} | {_fmt(r.get('miou_diff'), '{:+.2f}')} | "
                         f"{_fmt(r.get('margin_rel_error'), '{:.2e}')} |")
    t = sec["torchrun_nccl"]
    if "backend" in t:
        lines += ["", f"## torchrun, one process: exit {t['returncode']}, process group {t['backend']} "
                  f"(expected {t['expected_backend']}), checkpoint written: {_fmt(t['checkpoint_written'])}, "
                  f"{t['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def run_check(out: str, device: torch.device, budget_s: float = 420.0, only=SECTIONS) -> dict:
    """Run the sections in ``only`` (others are recorded as skipped); write and return the summary."""
    os.makedirs(out, exist_ok=True)
    budget = Budget(budget_s)
    t_start = time.perf_counter()
    summary = {"machine": machine(device), "rehearsal": device.type != "cuda", "budget_s": budget_s,
               "sections": {}}
    for name in SECTIONS:
        t0 = time.perf_counter()
        if name not in only:
            entry = {"skipped": "not selected"}
        elif budget.left() < 20:
            entry = {"skipped": "time budget spent", "ok": False}
        else:
            print(f"gpu_check: {name} ...", flush=True)
            try:
                entry = RUNNERS[name](device, out, budget)
            except Exception:   # a failing section is recorded; the others still run
                entry = {"ok": False, "error": traceback.format_exc(limit=8)}
        entry["seconds"] = time.perf_counter() - t0
        summary["sections"][name] = entry
    summary["total_s"] = time.perf_counter() - t_start
    summary["ok"] = all(s.get("ok", False) or (s.get("skipped") and s.get("ok") is not False)
                        for s in summary["sections"].values())
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    atomic_write_text(os.path.join(out, "summary.md"), format_markdown(summary))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for summary.md, summary.json and the logs")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (the check); cpu: a rehearsal of every section at tiny sizes")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    args = parser.parse_args(argv)
    only = tuple(s for s in args.only.split(",") if s)
    if set(only) - set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}; got {args.only!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        return 1
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        tune_cpu_process()
    summary = run_check(args.out, device, args.budget, only)
    print(format_markdown(summary))
    print(f"gpu_check: wrote {os.path.join(args.out, 'summary.md')} and summary.json; "
          f"{'all sections passed' if summary['ok'] else 'some sections FAILED'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
