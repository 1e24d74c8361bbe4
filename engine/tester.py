"""The test loop behind test.py, for images and videos alike: ``test_seeds`` runs (seeds) over
the task's evaluation list, each logged, then mean ± std over runs (sample std), written to
``<save_path>/result/test_<timestamp>.json``. The JSON names the scoring protocol. A checkpoint
from elsewhere than ``<save_path>/model/`` (``weight PATH``: a 1-shot model tested at 5 shots, a
PASCAL model on a cross-domain set) gets a file name that says which checkpoint and shot,
``test_<timestamp>_<its experiment>_<its name>_shot<K>.json``, so a result never passes for the
folder's own model's."""
from __future__ import annotations

import logging
import os
import re

from engine.checkpoint import build_model_from_checkpoint, checkpoint_position, resolve_weight, saved_architecture
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


def foreign_checkpoint_tag(weight_path: str, save_path: str, shot: int) -> str:
    """'' for a checkpoint in ``<save_path>/model/``; else '<experiment>_<name>_shot<K>', the
    experiment being the folder above the checkpoint's ``model/`` (else its own folder)."""
    folder = os.path.dirname(os.path.abspath(weight_path))
    if save_path and folder == os.path.join(os.path.abspath(save_path), "model"):
        return ""
    experiment = os.path.basename(os.path.dirname(folder) if os.path.basename(folder) == "model" else folder)
    stem = os.path.splitext(os.path.basename(weight_path))[0]
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{experiment}_{stem}_shot{shot}")


def run_test(cfg, info: DistInfo, model=None, write_json: bool = True, name: str = "(in-memory model)",
             state: dict | None = None) -> dict:
    """Evaluate the configured checkpoint (built from the architecture it records), or ``model``
    as given (``name``: how the log names it), and write the JSON result. ``state``: the
    checkpoint already read (test.py's checks before the run read it)."""
    validate(cfg)
    task = task_for(cfg)
    weight_path, epoch, arch, elimination = name, None, cfg.arch, cfg.elimination
    from_checkpoint = model is None
    if from_checkpoint:
        weight_path = resolve_weight(cfg.weight, cfg.save_path)
        model, state = build_model_from_checkpoint(weight_path, cfg, state)
        model = to_device(model, info.device, cfg.channels_last)
        architecture = saved_architecture(state)
        epoch, arch = state.get("epoch"), architecture["arch"]
        elimination = architecture.get("elimination", "bg+do")     # recorded since the ablation key exists
        log.info("checkpoint: %s (%s); %s", weight_path, checkpoint_position(state), task.describe_test(cfg))
    else:
        log.info("model: %s; %s", name, task.describe_test(cfg))
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
        tag = foreign_checkpoint_tag(weight_path, cfg.save_path, cfg.shot) if from_checkpoint else ""
        write_test_result(summary, result_dir, tag)
    return summary
