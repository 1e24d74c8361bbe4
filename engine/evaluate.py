"""The one evaluation loop, behind validation during training, test.py and the baselines, for
images and videos alike: the task supplies the dataset's collate, the network's inputs and a
scorer (engine/tasks/).

It runs a (possibly sharded) fixed episode list through the model, lets the scorer score each
batch, reduces the sums across processes, and times the model with device synchronisation.
Results equal a single-process evaluation of the whole list.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from dataset.image import close_loader, loader_workers, worker_init
from engine.tasks import Task, task_for
from util.amp import autocast, batch_to_device, synchronize
from util.distributed import gather_objects, is_main_process
from util.fileio import create_new_json

log = logging.getLogger(__name__)


@dataclass
class EvalOutput:
    result: Any                           # the task's result (IoUResult, VideoResult)
    ms_per_unit: float                    # model forward time per episode (images) or scored frame (videos)
    wall_s: float                         # the whole evaluation, loading included
    predictions: list[dict] = field(default_factory=list)   # with pred_dir: what was written
    samples: list[dict] = field(default_factory=list)       # a few episodes for images/panels


def eval_loader(dataset, cfg, task: Task, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.batch_size_val, shuffle=False, num_workers=loader_workers(cfg.workers),
                      collate_fn=task.eval_collate, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                      persistent_workers=False, generator=torch.Generator())  # leaves the global RNG alone


@torch.no_grad()
def evaluate(model, dataset, cfg, device: torch.device, pred_dir: str = "", keep_samples: int = 0,
             progress=None, task: Task | None = None) -> EvalOutput:
    """Score ``dataset`` (this process's shard) with ``model``; sums are all-reduced.

    ``pred_dir``: write each episode's prediction there and, on rank 0, an index of them.
    ``keep_samples``: keep that many episodes' inputs, prediction and extras (for TensorBoard
    images and panels). ``task``: the config's task unless given.
    """
    task = task or task_for(cfg)
    was_training = model.training
    model.eval()
    scorer = task.scorer(dataset, cfg, device)
    model_s, records, samples = 0.0, [], []
    t_start = time.perf_counter()
    batches = iter(eval_loader(dataset, cfg, task, device))
    try:
        for batch in (progress(batches) if progress else batches):
            inputs = batch_to_device(batch, device, task.eval_inputs).values()
            want_extras = len(samples) < keep_samples
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, cfg.amp):
                out = model(*inputs, return_extras=True) if want_extras else model(*inputs)
            synchronize(device)
            model_s += time.perf_counter() - t0
            logits, extras = out if want_extras else (out, None)
            preds = scorer.update(batch, logits)
            if pred_dir:
                records += scorer.save(pred_dir, batch, preds)
            if extras is not None:
                samples += scorer.samples(batch, logits, preds, extras, keep_samples - len(samples))
    finally:
        close_loader(batches)   # its workers ignore SIGTERM: left to the exit, they are waited for forever
    result = scorer.result()
    if pred_dir:
        records = gather_objects(records)
        if is_main_process():
            scorer.write_index(pred_dir, records)
    model.train(was_training)
    return EvalOutput(result, 1000 * model_s / max(scorer.units, 1), time.perf_counter() - t_start, records,
                      samples)


def write_test_result(summary: dict, result_dir: str, tag: str = "") -> str:
    """Write a test result as ``<result_dir>/test_<time>.json``, ``test_<time>_<tag>.json`` with a
    tag (whole or not at all, never an empty file under the name; a name another run already took
    gets ``-2``, ``-3``, ... after the time: util/fileio.py ``create_new``), record its path in
    ``summary['json_path']`` and log it."""
    path = create_new_json(os.path.join(result_dir, f"test_{time.strftime('%Y%m%d_%H%M%S')}"), summary,
                           suffix=f"_{tag}.json" if tag else ".json")
    summary["json_path"] = path
    log.info("wrote %s", path)
    return path
