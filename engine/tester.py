"""The test loop behind test.py, for images and videos alike: ``test_seeds`` runs (seeds) over
the task's evaluation list, each logged, then mean ± std over runs (sample std), written to
``<save_path>/result/test_<timestamp>.json``. The JSON names the scoring protocol."""
from __future__ import annotations

import logging
import os

from engine.checkpoint import build_model_from_checkpoint, resolve_weight, saved_architecture
from engine.evaluate import evaluate, write_test_result
from engine.tasks import task_for
from util.amp import to_device
from util.config import HSNET, validate
from util.distributed import DistInfo

log = logging.getLogger("ntrenetpp")


def test_seeds(cfg) -> list[int]:
    """Evaluation seeds: ``manual_seed + i`` (training validates on other episodes); under the
    hsnet protocol ``i`` itself, so that the first run is HSNet's and PATNet's one, seed 0."""
    first = 0 if cfg.eval_protocol == HSNET else cfg.manual_seed
    return [first + i for i in range(cfg.test_seeds)]


def run_test(cfg, info: DistInfo, model=None, write_json: bool = True, state: dict | None = None) -> dict:
    """Evaluate the configured checkpoint (built from the architecture it records), or ``model``
    as given, and write the JSON result. ``state``: the checkpoint already read (test.py's
    checks before the run read it)."""
    validate(cfg)
    task = task_for(cfg)
    weight_path, epoch, arch, elimination = "(in-memory model)", None, cfg.arch, cfg.elimination
    if model is None:
        weight_path = resolve_weight(cfg.weight, cfg.save_path)
        model, state = build_model_from_checkpoint(weight_path, cfg, state)
        model = to_device(model, info.device, cfg.channels_last)
        architecture = saved_architecture(state)
        epoch, arch = state.get("epoch"), architecture["arch"]
        elimination = architecture.get("elimination", "bg+do")     # recorded since the ablation key exists
        log.info("checkpoint: %s (epoch %s, iteration %s); %s", weight_path, epoch, state.get("iteration"),
                 task.describe_test(cfg))
    else:
        log.info("checkpoint: %s; %s", weight_path, task.describe_test(cfg))
    result_dir = os.path.join(cfg.save_path or ".", "result")
    runs = []
    for seed, dataset in task.test_datasets(cfg, info, test_seeds(cfg)):
        pred_dir = os.path.join(result_dir, f"pred_seed{seed}") if cfg.save_pred else ""
        out = evaluate(model, dataset, cfg, info.device, pred_dir=pred_dir, keep_samples=cfg.vis, task=task)
        task.save_visuals(out.samples, os.path.join(result_dir, f"vis_seed{seed}"), info.rank)
        runs.append(task.run_record(seed, out, dataset, cfg))
    summary = {"arch": arch, "dataset": cfg.dataset, "split": cfg.split, "shot": cfg.shot, "weight": weight_path,
               "checkpoint_epoch": epoch, "manual_seed": cfg.manual_seed, **task.summary(cfg, runs)}
    if arch == "ntrenetpp" and cfg.task == "image":
        summary["elimination"] = elimination
    log.info(task.format_summary(cfg, summary))
    if info.is_main and write_json:
        write_test_result(summary, result_dir)
    return summary
