"""The no-download image demo (``make demo``): the paper's comparison in miniature, one table.

    python tools/demo.py [--jobs 2] [--pretrain-iters 1000] [KEY VALUE ...]

On the synthetic dataset (tools/make_synthetic.py: classes told apart by shape and texture,
colours shared, distractors in most images), fold 0:

1. writes the data (seeded: the same bytes on every machine);
2. pretrains the backbone on the 15 training classes (tools/pretrain_backbone.py): the demo's
   stand-in for PFENet's frozen ImageNet backbone, shared by every network below;
3. trains and tests, on the same frozen backbone and recipe, NTRENet++
   (config/synthetic/synthetic_split0_resnet18.yaml), PFENet (..._pfenet.yaml) and NTRENet++
   with BG and DO elimination switched off (..._noelim.yaml), ``--jobs`` at a time;
4. prints them beside the training-free prototype matcher (on the same backbone) and the
   all-foreground prediction, every row scored on the very same test episodes.

Thread counts are fixed, because floating-point sums and therefore the trained weights depend on
them: pretraining and scoring use 2 threads, every network trains and tests on 1 thread, so a
2-core machine runs two at once and the numbers do not depend on the machine's core count.
``KEY VALUE`` overrides reach every pretraining, training and test (``manual_seed 322``: another
training seed). Each step's output goes to a log under exp/synthetic/demo/; the table, the stage
times and the total wall time to the terminal.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

from util.cli import run
from util.config import parse_args_with_overrides
from util.errors import UserError
from util.fileio import read_json_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = "initmodel/synthetic_split0_resnet18x0.5.pth"   # the image configs' 'pretrained'
TRAIN_THREADS, MAIN_THREADS = 1, 2


@dataclass(frozen=True)
class Demo:
    dataset: str
    networks: tuple[str, ...]            # experiment names, longest training first
    train_threads: int                   # per network


IMAGE = Demo("synthetic", ("split0_resnet18", "split0_resnet18_noelim", "split0_resnet18_pfenet"), TRAIN_THREADS)
VIDEO = Demo("synthetic_video", ("split0_resnet18",), MAIN_THREADS)


def config_of(demo: Demo) -> str:
    return f"config/{demo.dataset}/{demo.dataset}_{demo.networks[0]}.yaml"


def log_dir(demo: Demo) -> str:
    return f"exp/{demo.dataset}/demo"


@dataclass
class Step:
    name: str
    argv: list[str]
    threads: int
    log: str
    then: "Step | None" = None           # run after this one succeeds, in the same slot
    started: float = field(default=0.0)


def steps(demo: Demo, python: str, pretrain_iters: int, opts: list[str]) -> tuple[list[Step], list[Step], Step]:
    """(the data and the pretrained backbone, one train-then-test chain per network, the table):
    the commands the demo runs, in order."""
    log = lambda name: os.path.join(log_dir(demo), f"{name}.log")
    first = [Step("data", [python, "tools/make_synthetic.py", "--out", "data/synthetic", "--train", "4000"],
                  MAIN_THREADS, log("data")),
             Step("pretrain", [python, "tools/pretrain_backbone.py", "--config", config_of(IMAGE), "--out", BACKBONE,
                               "--iters", str(pretrain_iters), *opts], MAIN_THREADS, log("pretrain"))]
    if demo is VIDEO:
        first += [Step("video data", [python, "tools/make_synthetic_video.py", "--out", "data/synthetic_video"],
                       MAIN_THREADS, log("video_data")),
                  Step("prepare", [python, "tools/prepare_ytvis.py", "--ytvis", "data/synthetic_video", "--out",
                                   "data/synthetic_video"], MAIN_THREADS, log("prepare"))]
    chains = []
    for name in demo.networks:
        test = Step(f"test {name}", ["sh", "test.sh", demo.dataset, name, "weight", "best", *opts],
                    demo.train_threads, log(f"test_{name}"))
        chains.append(Step(f"train {name}", ["sh", "train.sh", demo.dataset, name, "resume", "", "overwrite",
                                            "True", *opts], demo.train_threads, log(f"train_{name}"), then=test))
    matcher = ["--weight", "none", "--pretrained", BACKBONE] if demo is IMAGE else []
    table = Step("table", [python, "tools/baseline.py", "--config", config_of(demo), *matcher, *opts, "--compare"],
                 MAIN_THREADS, log("table"))
    return first, chains, table


def environment(threads: int, python: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHON=python)
    env.pop("NTRENETPP_PROGRESS_FD", None)   # no progress bars in the logs
    return env


def start(step: Step, python: str) -> subprocess.Popen:
    os.makedirs(os.path.dirname(step.log), exist_ok=True)
    step.started = time.perf_counter()
    with open(step.log, "w") as out:
        return subprocess.Popen(step.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environment(step.threads, python))


def finish(step: Step, proc: subprocess.Popen, times: dict) -> None:
    status = proc.wait()
    times[step.name] = time.perf_counter() - step.started
    if status != 0:
        tail = open(step.log).read().strip().splitlines()[-3:]
        raise UserError(f"demo step '{step.name}' failed (exit {status}); its log is {step.log}: " + " | ".join(tail))


def run_chains(chains: list[Step], jobs: int, python: str, times: dict) -> None:
    """Each chain (train, then test) in its own slot; at most ``jobs`` slots at once."""
    pending, running = list(chains), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                step = pending.pop(0)
                running.append((step, start(step, python)))
            time.sleep(0.2)
            for item in list(running):
                step, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                finish(step, proc, times)
                if step.then is not None:
                    running.append((step.then, start(step.then, python)))
    finally:
        for _, proc in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def latest_result(dataset: str, name: str) -> str:
    found = sorted(glob.glob(os.path.join(ROOT, "exp", dataset, name, "result", "test_*.json")), key=os.path.getmtime)
    found = [path for path in found if read_json_result(path, "test result") is not None]   # skips a partial one
    if not found:
        raise UserError(f"no test result of {name} under exp/{dataset}/{name}/result")
    return os.path.relpath(found[-1], ROOT)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--jobs", type=int, default=3, help="networks trained at once (each on 1 thread)")
    p.add_argument("--pretrain-iters", type=int, default=1000, help="backbone pretraining iterations")
    p.add_argument("--video", action="store_true", help="the video demo (make demo-video) instead of the image one")
    args, opts = parse_args_with_overrides(p, argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if len(opts) % 2:
        p.error(f"overrides come in KEY VALUE pairs; got {opts}")
    return args, opts


def main(argv=None) -> dict:
    args, opts = _parse(argv)
    python = sys.executable
    demo = VIDEO if args.video else IMAGE
    first, chains, table = steps(demo, python, args.pretrain_iters, opts)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in first:
        print(f"[demo] {step.name} ({step.threads} thread(s)), log {step.log}", flush=True)
        finish(step, start(step, python), times)
    print(f"[demo] training and testing {len(chains)} network(s), {min(args.jobs, len(chains))} at a time on "
          f"{demo.train_threads} thread(s) each; logs {log_dir(demo)}/train_*.log, test_*.log", flush=True)
    run_chains(chains, args.jobs, python, times)
    table.argv += [latest_result(demo.dataset, name) for name in demo.networks]
    finish(table, start(table, python), times)
    total = time.perf_counter() - t0
    text = open(table.log).read()
    print(text[text.index("\n\n") + 1 if "\n\n" in text else 0:].rstrip())
    seed = dict(zip(opts[::2], opts[1::2])).get("manual_seed", "321 (the configs')")
    print(f"\ntraining seed {seed}; {cpu_name()}, {os.cpu_count()} cores; pretraining and scoring on "
          f"{MAIN_THREADS} threads, each network on {demo.train_threads}"
          + (f", {min(args.jobs, len(chains))} at a time" if len(chains) > 1 else ""))
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"wall time {total / 60:.1f} min")
    return {"times": times, "total": total, "table": table.log}


if __name__ == "__main__":
    run(main)
