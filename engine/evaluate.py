"""The one evaluation routine, used by train.py (validation) and test.py.

It runs a (possibly sharded) fixed episode list through the model, scores each episode
(dataset/metrics.py), reduces the sums across processes, and times the model with device
synchronisation. Results equal a single-process evaluation of the whole list.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from util.amp import MODEL_INPUTS, autocast, batch_to_device, synchronize
from dataset.classes import class_name
from dataset.image import FewShotEvalDataset, close_loader, eval_collate, worker_init
from util.fileio import atomic_write_image, atomic_write_json
from dataset.metrics import IoUAccumulator, IoUResult, score_episodes

log = logging.getLogger(__name__)


@dataclass
class EvalOutput:
    result: IoUResult
    ms_per_episode: float                 # model forward time per episode, device-synchronised
    wall_s: float                         # the whole evaluation, loading included
    predictions: list[dict] = field(default_factory=list)   # with save_pred
    samples: list[dict] = field(default_factory=list)       # a few episodes for images/panels


def eval_loader(dataset: FewShotEvalDataset, cfg) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.batch_size_val, shuffle=False, num_workers=cfg.workers,
                      collate_fn=eval_collate, pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init,
                      persistent_workers=False, generator=torch.Generator())  # leaves the global RNG alone


@torch.no_grad()
def evaluate(model, dataset: FewShotEvalDataset, cfg, device: torch.device, pred_dir: str = "",
             keep_samples: int = 0, progress=None) -> EvalOutput:
    """Score ``dataset`` (this process's shard) with ``model``; sums are all-reduced.

    ``pred_dir``: write each episode's predicted mask (0/1 PNG, original label size) and,
    on rank 0, ``episodes.json`` there. ``keep_samples``: keep that many episodes' inputs,
    prediction and extras (for TensorBoard images and panels).
    """
    was_training = model.training
    model.eval()
    acc = IoUAccumulator(dataset.split.classes, device)
    names = {c: class_name(cfg.dataset, c) for c in dataset.split.classes}
    model_s, records, samples = 0.0, [], []
    t_start = time.perf_counter()
    batches = iter(eval_loader(dataset, cfg))
    try:
        for batch in (progress(batches) if progress else batches):
            q, s, m = batch_to_device(batch, device, MODEL_INPUTS).values()
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, cfg.amp):
                if len(samples) < keep_samples:
                    logits, extras = model(q, s, m, return_extras=True)
                else:
                    logits, extras = model(q, s, m), None
            synchronize(device)
            model_s += time.perf_counter() - t0
            class_ids = batch["class_id"].to(device)
            inter, union, preds = score_episodes(logits, batch, cfg)
            acc.update(class_ids, inter, union)
            if pred_dir:
                for i, pred in enumerate(preds):
                    ep = int(batch["episode_id"][i])
                    name = f"ep{ep:06d}.png"
                    atomic_write_image(os.path.join(pred_dir, name), pred.to(torch.uint8).cpu().numpy())
                    records.append({"episode": ep, "class": int(batch["class_id"][i]),
                                    "class_name": names[int(batch["class_id"][i])],
                                    "query_label": os.path.relpath(batch["query_label_path"][i], cfg.data_root),
                                    "prediction": name})
            if extras is not None:
                for i in range(min(len(preds), keep_samples - len(samples))):
                    samples.append({
                        "query_img": batch["query_img"][i], "query_mask": batch["query_mask"][i],
                        "support_imgs": batch["support_imgs"][i], "support_masks": batch["support_masks"][i],
                        "class_id": int(batch["class_id"][i]), "class_name": names[int(batch["class_id"][i])],
                        "pred": logits[i].argmax(0).cpu(),
                        "bg_map": extras["bg_logits"][i].float().softmax(0)[1].cpu(),
                        "do_mask": extras["do_mask"][i].cpu(),
                        "iou": float(inter[i, 1] / (union[i, 1] + 1e-10)) * 100,
                    })
    finally:
        close_loader(batches)   # its workers ignore SIGTERM: left to the exit, they are waited for forever
    acc.all_reduce()
    result = acc.result(names)
    if pred_dir:
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        records.sort(key=lambda r: r["episode"])
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            atomic_write_json(os.path.join(pred_dir, "episodes.json"),
                              {"data_root": cfg.data_root, "episodes": records})
    model.train(was_training)
    n_local = max(len(dataset), 1)
    return EvalOutput(result, 1000 * model_s / n_local, time.perf_counter() - t_start, records, samples)


def write_test_result(summary: dict, result_dir: str) -> str:
    """Write a test result as ``<result_dir>/test_<time>.json`` (atomically), record its path in
    ``summary['json_path']`` and log it; image and video results alike."""
    path = os.path.join(result_dir, f"test_{time.strftime('%Y%m%d_%H%M%S')}.json")
    atomic_write_json(path, summary)
    summary["json_path"] = path
    log.info("wrote %s", path)
    return path
