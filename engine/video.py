"""The video task's training and evaluation parts (docs/video.md): the reference's two
optimisers, the validation clips, the J/F evaluation loop and test.py's video report.

The training loop itself is the image task's (engine/trainer.py); it asks this module for
what differs: the optimiser, the datasets and the validation.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from engine.checkpoint import build_model_from_checkpoint, resolve_weight
from engine.evaluate import write_test_result
from model.modules import AgentAttention
from util.amp import autocast, synchronize, to_device
from dataset.classes import VIDEO_DATASETS, class_name
from dataset.image import EpisodeSampler, shard, worker_init
from util.distributed import DistInfo
from util.errors import CheckpointError
from util.fileio import atomic_write_image, atomic_write_json
from dataset.video import VideoEvalDataset, VideoTrainDataset, video_eval_collate
from dataset.video_metrics import VideoResult, VideoScoreAccumulator, score_frames
from util.vis import save_video_strip, video_strip_image

log = logging.getLogger("ntrenetpp")

# batch keys of a training step's inputs (query clips, supports, support masks, clip labels,
# class), in the order of util.amp.TRAIN_INPUTS for images
VIDEO_BATCH_KEYS = ("query_imgs", "support_imgs", "support_masks", "query_masks", "class_id")


def is_video(cfg) -> bool:
    """Whether ``cfg`` is a video experiment (its ``dataset`` key)."""
    return cfg.dataset in VIDEO_DATASETS


# ---------------------------------------------------------------------------------------
# Optimisation: SGD for the head, Adam for the cross-frame attention, both stepped
# ---------------------------------------------------------------------------------------
class HeadAndAttentionOptimizer:
    """The reference's recipe as one optimiser object: SGD (``base_lr``, momentum, weight
    decay) for every trainable parameter outside the attention blocks and Adam
    (``attention_lr``, betas 0.9/0.999, ``attention_weight_decay``) for those inside, both
    stepped every iteration (the reference builds both and steps neither correctly).

    It offers what the training loop, GradScaler and the checkpoints use of an optimiser:
    ``param_groups`` (SGD's, then Adam's; each carries ``lr_scale``, its rate relative to
    ``base_lr``, so the loop's schedule moves both), ``state``, ``step``, ``zero_grad``,
    ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, head_params, attention_params, cfg, fused: bool = False):
        self.sgd = torch.optim.SGD(head_params, lr=cfg.base_lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, fused=fused)
        # fused: one kernel, and no host read of the step count (the per-tensor Adam reads it)
        self.adam = torch.optim.Adam(attention_params, lr=cfg.attention_lr, betas=(0.9, 0.999),
                                     weight_decay=cfg.attention_weight_decay, fused=fused)
        for group in self.sgd.param_groups:
            group["lr_scale"] = 1.0
        for group in self.adam.param_groups:
            group["lr_scale"] = cfg.attention_lr / cfg.base_lr

    @property
    def param_groups(self) -> list[dict]:
        return self.sgd.param_groups + self.adam.param_groups

    @property
    def state(self) -> dict:
        return {**self.sgd.state, **self.adam.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)
        self.adam.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        self.sgd.step()
        self.adam.step()

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"sgd", "adam"}:
            raise CheckpointError("the checkpoint's optimiser is not the video recipe's SGD + Adam pair: "
                                  "resume it with the config it was trained with")
        self.sgd.load_state_dict(state["sgd"])
        self.adam.load_state_dict(state["adam"])


def video_optimizer(model: torch.nn.Module, cfg, fused: bool = False) -> HeadAndAttentionOptimizer:
    """The two-optimiser recipe over ``model``'s trainable parameters."""
    attention = {id(p) for m in model.modules() if isinstance(m, AgentAttention) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = [p for p in trainable if id(p) not in attention]
    attn = [p for p in trainable if id(p) in attention]
    if not attn:   # video_attention False: no attention blocks, an empty Adam is not allowed
        attn = [torch.nn.Parameter(torch.zeros(()), requires_grad=False)]
    return HeadAndAttentionOptimizer(head, attn, cfg, fused)


# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------
class ValidationClips(Dataset):
    """The reference's validation during training: ``val_samples_per_class`` clips per
    held-out class (no augmentation), a fixed list keyed by ``seed`` — identical whatever
    the number of workers or processes — and one disjoint shard of it per process. Every
    frame of a clip is scored."""

    def __init__(self, cfg, seed: int, rank: int = 0, world_size: int = 1):
        self.clips = VideoTrainDataset(cfg, train=False)
        keys = EpisodeSampler(len(self.clips), 0, seed, shuffle=False).global_order()
        self.num_episodes = len(keys)
        self.keys = shard(list(enumerate(keys)), rank, world_size)
        self.classes = self.clips.classes

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        position, key = self.keys[i]
        item = self.clips[key]
        item["scored"] = torch.ones(item["query_masks"].shape[0], dtype=torch.bool)
        item["episode_id"] = position
        return item


def video_datasets(cfg, info: DistInfo, val_seed: int):
    """(training clips, validation clips or None) of a video experiment."""
    train_set = VideoTrainDataset(cfg, train=True)
    val_set = ValidationClips(cfg, val_seed, info.rank, info.world_size) if cfg.evaluate else None
    return train_set, val_set


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@dataclass
class VideoEvalOutput:
    result: VideoResult
    ms_per_frame: float       # model time (device-synchronised) per scored frame
    wall_s: float
    records: list[dict] = field(default_factory=list)   # with pred_dir: one per scored chunk
    samples: list[dict] = field(default_factory=list)   # chunks kept for panels / TensorBoard


def _gather(records: list) -> list:
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        return [r for part in parts for r in part]
    return records


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def evaluate_video(model, dataset, cfg, device: torch.device, pred_dir: str = "", keep_samples: int = 0,
                   progress=None) -> VideoEvalOutput:
    """Score this process's shard of ``dataset`` (:class:`VideoEvalDataset` or
    :class:`ValidationClips`): the argmax of each scored frame on the letterbox canvas
    against its mask (J, boundary F, TP/FP/FN), summed per class and per episode and
    all-reduced.

    ``pred_dir``: each scored frame's prediction as a 0/1 PNG on the canvas,
    ``<video>/<class id>/<frame>.png``, and (rank 0) ``predictions.json`` naming them with
    each video's letterbox geometry, enough to re-score from the prepared masks.
    ``keep_samples``: keep that many chunks (frames, prediction, mined BG and DO) for panels.
    """
    was_training = model.training
    model.eval()
    acc = VideoScoreAccumulator(dataset.classes, dataset.num_episodes if isinstance(dataset, ValidationClips)
                                else len(dataset.episodes), device)
    names = {c: class_name(cfg.dataset, c) for c in dataset.classes}
    loader = DataLoader(dataset, batch_size=cfg.batch_size_val, shuffle=False, num_workers=cfg.workers,
                        collate_fn=video_eval_collate, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                        generator=torch.Generator())
    model_s, frames, records, samples = 0.0, 0, [], []
    t_start = time.perf_counter()
    for batch in (progress(loader) if progress else loader):
        q = batch["query_imgs"].to(device, non_blocking=True)
        s = batch["support_imgs"].to(device, non_blocking=True)
        m = batch["support_masks"].to(device, non_blocking=True)
        want_extras = len(samples) < keep_samples
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, cfg.amp):
            out = model(q, s, m, return_extras=want_extras)
        synchronize(device)
        model_s += time.perf_counter() - t0
        logits, extras = out if want_extras else (out, None)
        pred = logits.argmax(dim=2)                                           # B×T×H×W
        target = batch["query_masks"].to(device)
        scored = batch["scored"].to(device)
        T = pred.shape[1]
        frames += int(scored.sum())
        scores = score_frames(pred[scored], target[scored])
        class_ids = batch["class_id"].to(device).repeat_interleave(T).view(-1, T)[scored]
        episode_ids = batch["episode_id"].to(device).repeat_interleave(T).view(-1, T)[scored]
        video_ids = (batch["video_id"].to(device).repeat_interleave(T).view(-1, T)[scored]
                     if "video_id" in batch else None)
        acc.update(scores, class_ids, episode_ids, video_ids)
        if pred_dir:
            records += _save_chunk_predictions(pred_dir, batch, pred)
        if extras is not None:
            samples += _keep_samples(batch, pred, extras, names, keep_samples - len(samples))
    acc.all_reduce()
    result = acc.result(names)
    if pred_dir:
        records = _gather(records)
        if _is_main():
            _write_prediction_index(pred_dir, records, cfg)
    model.train(was_training)
    return VideoEvalOutput(result, 1000 * model_s / max(frames, 1), time.perf_counter() - t_start, records, samples)


def _save_chunk_predictions(pred_dir: str, batch: dict, pred: torch.Tensor) -> list[dict]:
    records = []
    for b in range(pred.shape[0]):
        video, class_id = batch["video"][b], int(batch["class_id"][b])
        frames = [name for name, on in zip(batch["frame_names"][b], batch["scored"][b].tolist()) if on]
        for t, (name, on) in enumerate(zip(batch["frame_names"][b], batch["scored"][b].tolist())):
            if on:
                atomic_write_image(os.path.join(pred_dir, video, str(class_id), f"{name}.png"),
                                   pred[b, t].to(torch.uint8).cpu().numpy())
        records.append({"episode_id": int(batch["episode_id"][b]), "chunk_id": int(batch["chunk_id"][b]),
                        "video": video, "class_id": class_id, "frames": frames,
                        "letterbox": batch["letterbox"][b].tolist()})
    return records


def _write_prediction_index(pred_dir: str, records: list[dict], cfg) -> None:
    by_episode: dict[int, dict] = {}
    for r in sorted(records, key=lambda r: (r["episode_id"], r["chunk_id"])):   # frames in time order
        entry = by_episode.setdefault(r["episode_id"], {
            "episode_id": r["episode_id"], "video": r["video"], "class_id": r["class_id"],
            "class_name": class_name(cfg.dataset, r["class_id"]), "letterbox": r["letterbox"], "frames": []})
        entry["frames"] += r["frames"]
    atomic_write_json(os.path.join(pred_dir, "predictions.json"), {
        "data_root": cfg.data_root, "canvas": [cfg.video_h, cfg.video_w],
        "letterbox_fields": ["top", "left", "new_h", "new_w", "height", "width"],
        "masks": "<video>/<class id>/<frame>.png, 0/1 on the canvas; targets: the prepared Masks/ "
                 "letterboxed to the canvas (dataset/video_transform.py)",
        "episodes": list(by_episode.values())})


def _keep_samples(batch: dict, pred: torch.Tensor, extras: dict, names: dict, n: int) -> list[dict]:
    kept = []
    for b in range(min(n, pred.shape[0])):
        c = int(batch["class_id"][b])
        kept.append({
            "query_imgs": batch["query_imgs"][b], "query_masks": batch["query_masks"][b],
            "support_imgs": batch["support_imgs"][b], "support_masks": batch["support_masks"][b],
            "pred": pred[b].cpu(), "bg_map": extras["bg_logits"][b].float().softmax(1)[:, 1].cpu(),
            "do_mask": extras["do_mask"][b].cpu(), "scored": batch["scored"][b],
            "class_name": names[c], "video": batch["video"][b] if "video" in batch else "",
        })
    return kept


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------
def format_video_result(title: str, r: VideoResult, ms: float, unit: str = "videos") -> str:
    """The per-class table of one run: J, F, class IoU, frames and query videos (or
    validation clips) per class, then the means."""
    count = r.videos if unit == "videos" else r.queries
    lines = [f"{title}: J {r.mean_j:.2f}  F {r.mean_f:.2f}  J&F {r.jf:.2f}  class IoU {r.class_iou:.2f}  "
             f"({r.frames} frames of {count} {unit} scored, {ms:.1f} ms/frame)",
             f"    {'class':<16s} {'J':>6s} {'F':>6s} {'IoU':>6s} {'frames':>7s} {unit:>6s}"]
    lines += [f"    {name:<16s} {v['J']:6.2f} {v['F']:6.2f} {v['IoU']:6.2f} {v['frames']:7d} {v['videos']:6d}"
              for name, v in r.per_class.items()]
    return "\n".join(lines)


def validate_video(model, val_set: ValidationClips, cfg, device: torch.device, epoch: int, writer=None, *,
                   step: int) -> dict:
    """Validation during training; the model is selected on the class IoU (the reference's).
    TensorBoard gets the figures and ``tb_images`` strips (frames, prediction, mined BG and DO)."""
    out = evaluate_video(model, val_set, cfg, device, keep_samples=cfg.tb_images if writer is not None else 0)
    r = out.result
    log.info(format_video_result(f"validation after epoch {epoch}", r, out.ms_per_frame, unit="clips"))
    if writer is not None:
        for key, value in (("class_iou", r.class_iou), ("J", r.mean_j), ("F", r.mean_f), ("JF", r.jf)):
            writer.add_scalar(f"val/{key}", value, step)
        for i, sample in enumerate(out.samples):
            writer.add_image(f"val/clip_{i}", video_strip_image(sample), step, dataformats="HWC")
    return {"miou": r.class_iou, "J": r.mean_j, "F": r.mean_f, "JF": r.jf,
            "class_iou": {k: v["IoU"] for k, v in r.per_class.items()}, "frames": r.frames}


def run_video_test(cfg, info: DistInfo, model=None, write_json: bool = True) -> dict:
    """test.py for a video experiment: ``test_seeds`` runs over the whole held-out list,
    each printed per class, then mean ± std over runs; JSON with per-video figures."""
    weight_path = resolve_weight(cfg.weight, cfg.save_path) if model is None else "(in-memory model)"
    epoch = None
    if model is None:
        model, state = build_model_from_checkpoint(weight_path, cfg)
        model = to_device(model, cfg, info.device)
        epoch = state.get("epoch")
    result_dir = os.path.join(cfg.save_path or ".", "result")
    log.info("checkpoint: %s%s; %d-shot, clips of %d frames, supports per %s, %d run(s)",
             weight_path, "" if epoch is None else f" (epoch {epoch})", cfg.shot, cfg.clip_len,
             cfg.support_per, cfg.test_seeds)
    runs = []
    for i in range(cfg.test_seeds):
        seed = cfg.manual_seed + i
        dataset = VideoEvalDataset(cfg, seed, rank=info.rank, world_size=info.world_size)
        pred_dir = os.path.join(result_dir, f"pred_seed{seed}") if cfg.save_pred else ""
        out = evaluate_video(model, dataset, cfg, info.device, pred_dir=pred_dir, keep_samples=cfg.vis)
        for k, sample in enumerate(out.samples):
            save_video_strip(os.path.join(result_dir, f"vis_seed{seed}", f"rank{info.rank}_strip{k:03d}.png"), sample)
        r = out.result
        log.info(format_video_result(f"run {i + 1} (seed {seed})", r, out.ms_per_frame))
        videos = [{"video": dataset.index.videos[dataset.episodes[e["episode_id"]].video].name,
                   "class": class_name(cfg.dataset, dataset.episodes[e["episode_id"]].class_id), **e}
                  for e in r.per_episode]
        runs.append({"seed": seed, "J": r.mean_j, "F": r.mean_f, "JF": r.jf, "class_iou": r.class_iou,
                     "per_class": r.per_class, "frames": r.frames, "videos": r.videos, "queries": r.queries,
                     "ms_per_frame": out.ms_per_frame, "per_video": videos})
    std = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)  # noqa: E731
    summary = {"dataset": cfg.dataset, "split": cfg.split, "shot": cfg.shot, "clip_len": cfg.clip_len,
               "support_per": cfg.support_per, "support_mode": cfg.support_mode, "weight": weight_path,
               "checkpoint_epoch": epoch, "canvas": [cfg.video_h, cfg.video_w], "manual_seed": cfg.manual_seed}
    for key in ("J", "F", "JF", "class_iou"):
        values = [run[key] for run in runs]
        summary[f"{key}_mean"], summary[f"{key}_std"] = statistics.fmean(values), std(values)
    summary.update(frames=runs[0]["frames"], videos=runs[0]["videos"],
                   ms_per_frame=statistics.fmean(run["ms_per_frame"] for run in runs), runs=runs)
    log.info("%d-shot over %d run(s), checkpoint %s: J %.2f ± %.2f, F %.2f ± %.2f, J&F %.2f ± %.2f, "
             "class IoU %.2f ± %.2f (%d frames of %d videos per run)", cfg.shot, len(runs), weight_path,
             summary["J_mean"], summary["J_std"], summary["F_mean"], summary["F_std"], summary["JF_mean"],
             summary["JF_std"], summary["class_iou_mean"], summary["class_iou_std"], summary["frames"],
             summary["videos"])
    if info.is_main and write_json:
        write_test_result(summary, result_dir)
    return summary
