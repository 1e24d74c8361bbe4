"""Few-shot video object segmentation (YouTube-VIS, the synthetic videos; docs/video.md): query
clips of T frames and K annotated support frames, scored by J, F and class IoU; the reference's
two optimisers."""
from __future__ import annotations

import logging
import os

import torch

from dataset.video import ValidationClips, VideoEvalDataset, VideoTrainDataset, video_eval_collate
from dataset.video_metrics import VideoResult, VideoScoreAccumulator, score_frames
from engine.tasks.base import Scorer, Task, mean_std, per_unit_ms, tested_model, with_spread
from engine.video_predict import VideoPredictor
from model.modules import AgentAttention
from util.classes import class_name
from util.errors import CheckpointError
from util.fileio import atomic_write_image, atomic_write_json
from util.vis import save_video_strip, video_strip_image

log = logging.getLogger("ntrenetpp")


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


def format_video_result(title: str, r: VideoResult, ms: float, unit: str = "videos") -> str:
    """The per-class table of one run: J, F, class IoU, frames and query videos (or
    validation clips) per class, then the means."""
    count = r.videos if unit == "videos" else r.queries
    lines = [f"{title}: J {r.mean_j:.2f}  F {r.mean_f:.2f}  J&F {r.jf:.2f}  class IoU {r.class_iou:.2f}  "
             f"({r.frames} frames of {count} {unit} scored, {per_unit_ms(ms, 'frame')})",
             f"    {'class':<16s} {'J':>6s} {'F':>6s} {'IoU':>6s} {'frames':>7s} {unit:>6s}"]
    lines += [f"    {name:<16s} {v['J']:6.2f} {v['F']:6.2f} {v['IoU']:6.2f} {v['frames']:7d} {v['videos']:6d}"
              for name, v in r.per_class.items()]
    return "\n".join(lines)


class VideoScorer(Scorer):
    """The argmax of each scored frame on the letterbox canvas against its mask (J, boundary F,
    TP/FP/FN), summed per class and per episode. Predictions: each scored frame as a 0/1 PNG on
    the canvas, ``<video>/<class id>/<frame>.png``, and ``predictions.json`` naming them with
    each video's letterbox geometry, enough to re-score from the prepared masks."""

    def __init__(self, dataset, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.acc = VideoScoreAccumulator(dataset.classes, dataset.num_episodes, device)
        self.names = {c: class_name(cfg.dataset, c) for c in dataset.classes}
        self.units = 0

    def update(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(dim=2)                                           # B×T×H×W
        target = batch["query_masks"].to(self.device)
        scored = batch["scored"].to(self.device)
        T = pred.shape[1]
        self.units += int(scored.sum())

        def per_frame(key):
            return batch[key].to(self.device).repeat_interleave(T).view(-1, T)[scored]
        self.acc.update(score_frames(pred[scored], target[scored]), per_frame("class_id"), per_frame("episode_id"),
                        per_frame("video_id") if "video_id" in batch else None)
        return pred

    def save(self, pred_dir: str, batch: dict, pred: torch.Tensor) -> list[dict]:
        records = []
        for b in range(pred.shape[0]):
            video, class_id = batch["video"][b], int(batch["class_id"][b])
            frames = []
            for t, (name, on) in enumerate(zip(batch["frame_names"][b], batch["scored"][b].tolist())):
                if on:
                    frames.append(name)
                    atomic_write_image(os.path.join(pred_dir, video, str(class_id), f"{name}.png"),
                                       pred[b, t].to(torch.uint8).cpu().numpy())
            records.append({"episode_id": int(batch["episode_id"][b]), "chunk_id": int(batch["chunk_id"][b]),
                            "video": video, "class_id": class_id, "frames": frames,
                            "letterbox": batch["letterbox"][b].tolist()})
        return records

    def samples(self, batch: dict, logits: torch.Tensor, pred: torch.Tensor, extras: dict, n: int) -> list[dict]:
        kept = []
        for b in range(min(n, pred.shape[0])):
            kept.append({
                "query_imgs": batch["query_imgs"][b], "query_masks": batch["query_masks"][b],
                "support_imgs": batch["support_imgs"][b], "support_masks": batch["support_masks"][b],
                "pred": pred[b].cpu(), "bg_map": extras["bg_logits"][b].float().softmax(1)[:, 1].cpu(),
                "do_mask": extras["do_mask"][b].cpu(), "scored": batch["scored"][b],
                "class_name": self.names[int(batch["class_id"][b])], "video": batch["video"][b] if "video" in batch else "",
            })
        return kept

    def result(self):
        self.acc.all_reduce()
        return self.acc.result(self.names)

    def write_index(self, pred_dir: str, records: list[dict]) -> None:
        by_episode: dict[int, dict] = {}
        for r in sorted(records, key=lambda r: (r["episode_id"], r["chunk_id"])):   # frames in time order
            entry = by_episode.setdefault(r["episode_id"], {
                "episode_id": r["episode_id"], "video": r["video"], "class_id": r["class_id"],
                "class_name": self.names[r["class_id"]], "letterbox": r["letterbox"], "frames": []})
            entry["frames"] += r["frames"]
        atomic_write_json(os.path.join(pred_dir, "predictions.json"), {
            "data_root": self.cfg.data_root, "canvas": [self.cfg.video_h, self.cfg.video_w],
            "letterbox_fields": ["top", "left", "new_h", "new_w", "height", "width"],
            "masks": "<video>/<class id>/<frame>.png, 0/1 on the canvas; targets: the prepared Masks/ "
                     "letterboxed to the canvas (dataset/video_transform.py)",
            "episodes": list(by_episode.values())})


class VideoTask(Task):
    name = "video"
    train_inputs = ("query_imgs", "support_imgs", "support_masks", "query_masks", "class_id")
    eval_inputs = train_inputs[:3]
    eval_collate = staticmethod(video_eval_collate)
    headline = (("J", "J"), ("F", "F"), ("J&F", "JF"), ("class IoU", "class_iou"))
    selection_metric = "class IoU"
    predictor = VideoPredictor

    def input_size(self, cfg, train):
        return (cfg.video_h, cfg.video_w)    # the letterbox canvas, in training and evaluation

    def clip_frames(self, cfg):
        return cfg.clip_len

    def train_dataset(self, cfg, info):
        return VideoTrainDataset(cfg, train=True)

    def describe_train_set(self, dataset):
        return (f"class-balanced clips of {len(dataset.classes)} classes ({dataset.samples_per_class} per class, "
                f"from {len(set().union(*(dataset.index.videos_of[c] for c in dataset.classes)))} videos)")

    def val_dataset(self, cfg, info, seed):
        return ValidationClips(cfg, seed, info.rank, info.world_size)

    def test_datasets(self, cfg, info, seeds):
        for seed in seeds:
            yield seed, VideoEvalDataset(cfg, seed, rank=info.rank, world_size=info.world_size)

    def optimizer(self, model, cfg, fused):
        """The reference's SGD for the head + Adam for the attention blocks."""
        return video_optimizer(model, cfg, fused)

    def scorer(self, dataset, cfg, device):
        return VideoScorer(dataset, cfg, device)

    def validation_metrics(self, out, epoch, writer, step):
        r = out.result
        log.info(format_video_result(f"validation after epoch {epoch}", r, out.ms_per_unit, unit="clips"))
        if writer is not None:
            for key, value in (("class_iou", r.class_iou), ("J", r.mean_j), ("F", r.mean_f), ("JF", r.jf)):
                writer.add_scalar(f"val/{key}", value, step)
            for i, sample in enumerate(out.samples):
                writer.add_image(f"val/clip_{i}", video_strip_image(sample), step, dataformats="HWC")
        return {"miou": r.class_iou, "J": r.mean_j, "F": r.mean_f, "JF": r.jf,
                "class_iou": {k: v["IoU"] for k, v in r.per_class.items()}, "frames": r.frames}

    def describe_test(self, cfg):
        return (f"{cfg.shot}-shot, clips of {cfg.clip_len} frames, supports per {cfg.support_per}, "
                f"{cfg.test_seeds} run(s)")

    def result_episodes(self, result):
        keys = {"test_seeds": len(result["runs"]), "shot": result["shot"], "clip_len": result["clip_len"],
                "support_per": result["support_per"], "manual_seed": result["manual_seed"]}
        if "canvas" in result:                      # J, F and class IoU are scored on this canvas
            keys.update(video_h=result["canvas"][0], video_w=result["canvas"][1])
        return keys

    def run_record(self, seed, out, dataset, cfg):
        r = out.result
        log.info(format_video_result(f"run {seed - cfg.manual_seed + 1} (seed {seed})", r, out.ms_per_unit))
        videos = [{"video": dataset.index.videos[dataset.episodes[e["episode_id"]].video].name,
                   "class": class_name(cfg.dataset, dataset.episodes[e["episode_id"]].class_id), **e}
                  for e in r.per_episode]
        return {"seed": seed, "J": r.mean_j, "F": r.mean_f, "JF": r.jf, "class_iou": r.class_iou,
                "per_class": r.per_class, "frames": r.frames, "videos": r.videos, "queries": r.queries,
                "ms_per_frame": out.ms_per_unit, "per_video": videos}

    def summary(self, cfg, runs):
        summary = {"clip_len": cfg.clip_len, "support_per": cfg.support_per, "support_mode": cfg.support_mode,
                   "canvas": [cfg.video_h, cfg.video_w]}
        for key in ("J", "F", "JF", "class_iou"):
            summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std(run[key] for run in runs)
        summary.update(frames=runs[0]["frames"], videos=runs[0]["videos"],
                       ms_per_frame=mean_std(run["ms_per_frame"] for run in runs)[0], runs=runs)
        return summary

    def format_summary(self, cfg, s):
        n = len(s["runs"])
        figures = ", ".join(f"{title} {with_spread(s[key + '_mean'], s[key + '_std'], n)}" for title, key in
                            (("J", "J"), ("F", "F"), ("J&F", "JF"), ("class IoU", "class_iou")))
        return (f"{cfg.shot}-shot over {n} run(s), {tested_model(s)}: {figures} "
                f"({s['frames']} frames of {s['videos']} videos per run)")

    def save_visuals(self, samples, folder, rank):
        for k, sample in enumerate(samples):
            save_video_strip(os.path.join(folder, f"rank{rank}_strip{k:03d}.png"), sample)
