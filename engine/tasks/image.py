"""Few-shot segmentation of images (PASCAL-5i, COCO-20i, the synthetic set, class folders:
your own, FSS-1000, the cross-domain benchmark): episodes of a query image and K annotated
supports, scored by class mIoU and FB-IoU under the pfenet or hsnet protocol (docs/protocol.md,
docs/data.md). Which datasets a config's family builds is dataset/sources.py's table."""
from __future__ import annotations

import logging
import os

import torch

from torch.utils.data import Dataset

from dataset import sources
from dataset.image import eval_collate
from dataset.metrics import IoUAccumulator, score_episodes
from engine.predictor import Predictor
from engine.tasks.base import Scorer, Task, mean_std, per_unit_ms, tested_model, with_spread
from util.classes import FOLDER_DATASETS
from util.config import HSNET
from util.fileio import atomic_write_image, atomic_write_json
from util.vis import panel_image, save_panel

log = logging.getLogger("ntrenetpp")

LISTED_CLASSES = 20   # more classes than this (FSS-1000's 240) are not listed one per log line


class ImageScorer(Scorer):
    """Intersection and union per episode, pooled per class (class mIoU) and over all
    episodes (FB-IoU), as HSNet's evaluator pools them too; predictions written as 0/1 PNGs at
    the scored size. The classes, their names and the root label paths are relative to come
    from the dataset (``class_ids``, ``class_names``, ``root``)."""

    def __init__(self, dataset: Dataset, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.acc = IoUAccumulator(dataset.class_ids, device)
        self.names = dict(dataset.class_names)
        self.root = dataset.root
        self.units = max(len(dataset), 1)
        self.episode_iou = None

    def update(self, batch: dict, logits: torch.Tensor) -> list:
        inter, union, preds = score_episodes(logits, batch, self.cfg.ignore_label, self.cfg.ori_resize)
        self.acc.update(batch["class_id"].to(self.device), inter, union)
        self.episode_iou = inter[:, 1] / (union[:, 1] + 1e-10) * 100
        return preds

    def save(self, pred_dir: str, batch: dict, preds: list) -> list[dict]:
        records = []
        for i, pred in enumerate(preds):
            episode, class_id = int(batch["episode_id"][i]), int(batch["class_id"][i])
            name = f"ep{episode:06d}.png"
            atomic_write_image(os.path.join(pred_dir, name), pred.to(torch.uint8).cpu().numpy())
            records.append({"episode": episode, "class": class_id, "class_name": self.names[class_id],
                            "query_label": os.path.relpath(batch["query_label_path"][i], self.root),
                            "prediction": name})
        return records

    def samples(self, batch: dict, logits: torch.Tensor, preds: list, extras: dict, n: int) -> list[dict]:
        kept = []
        for i in range(min(len(preds), n)):
            class_id = int(batch["class_id"][i])
            kept.append({
                "query_img": batch["query_img"][i], "query_mask": batch["query_mask"][i],
                "support_imgs": batch["support_imgs"][i], "support_masks": batch["support_masks"][i],
                "class_id": class_id, "class_name": self.names[class_id], "pred": logits[i].argmax(0).cpu(),
                "iou": float(self.episode_iou[i]),
                # what the network's extras hold (docs/extending.md): NTRENet++ mines BG and DOs
                "bg_map": extras["bg_logits"][i].float().softmax(0)[1].cpu() if "bg_logits" in extras else None,
                "do_mask": extras["do_mask"][i].cpu() if "do_mask" in extras else None,
                "prior": extras["prior"][i, 0].float().cpu() if "prior" in extras else None,
            })
        return kept

    def result(self):
        self.acc.all_reduce()
        return self.acc.result(self.names)

    def write_index(self, pred_dir: str, records: list[dict]) -> None:
        records.sort(key=lambda r: r["episode"])
        atomic_write_json(os.path.join(pred_dir, "episodes.json"), {"data_root": self.root, "episodes": records})


class ImageTask(Task):
    name = "image"
    train_inputs = ("query_img", "support_imgs", "support_masks", "query_mask", "class_id")
    eval_inputs = train_inputs[:3]
    eval_collate = staticmethod(eval_collate)
    headline = (("class mIoU", "miou"), ("FB-IoU", "fbiou"))
    selection_metric = "class mIoU"
    predictor = Predictor
    prototype_matcher = True

    def input_size(self, cfg, train):
        return (cfg.train_h, cfg.train_w) if train else (cfg.val_size, cfg.val_size)

    def train_dataset(self, cfg, info):
        return sources.train_dataset(cfg, info)

    def val_dataset(self, cfg, info, seed):
        es, make = sources.eval_datasets(cfg, info, "val")
        log.info("validation: %s", es.describe())
        return make(seed)

    def test_datasets(self, cfg, info, seeds):
        es, make = sources.eval_datasets(cfg, info, "test")
        log.info("test: %s", es.describe())
        for seed in seeds:
            yield seed, make(seed)

    def scorer(self, dataset, cfg, device):
        return ImageScorer(dataset, cfg, device)

    def validation_metrics(self, out, epoch, writer, step):
        r = out.result
        log.info("validation after epoch %d: class mIoU %.2f, FB-IoU %.2f over %d episodes (%s)",
                 epoch, r.miou, r.fbiou, r.episodes, per_unit_ms(out.ms_per_unit, "episode"))
        if len(r.class_iou) <= LISTED_CLASSES:
            log.info("  " + "  ".join(f"{k}: {v:.2f}" for k, v in r.class_iou.items()))
        if writer is not None:
            writer.add_scalar("val/miou", r.miou, step)
            writer.add_scalar("val/fbiou", r.fbiou, step)
            for i, sample in enumerate(out.samples):
                writer.add_image(f"val/episode_{i}", panel_image(sample), step, dataformats="HWC")
        return {"miou": r.miou, "fbiou": r.fbiou, "class_iou": r.class_iou, "episodes": r.episodes}

    def describe_test(self, cfg):
        count = "one episode per image" if cfg.test_num == 0 else f"{cfg.test_num} episodes"
        return f"{cfg.shot}-shot, {cfg.test_seeds} seed(s) x {count}, {cfg.eval_protocol} protocol"

    def result_episodes(self, result):
        return {"test_num": result.get("test_num", result["episodes"]), "test_seeds": result["seeds"],
                "shot": result["shot"],
                **{k: result[k] for k in ("manual_seed", "eval_protocol", "val_size") if k in result}}

    def run_record(self, seed, out, dataset, cfg):
        r = out.result
        lines = [f"seed {seed}: class mIoU {r.miou:.2f}  FB-IoU {r.fbiou:.2f}  "
                 f"({r.episodes} episodes, {per_unit_ms(out.ms_per_unit, 'episode')})"]
        if len(r.class_iou) <= LISTED_CLASSES:
            lines += [f"    {name:<18s} {iou:6.2f}" for name, iou in r.class_iou.items()]
        else:
            lines.append(f"    (the IoU of each of the {len(r.class_iou)} classes is in the result JSON)")
        log.info("\n".join(lines))
        return {"seed": seed, "miou": r.miou, "fbiou": r.fbiou, "class_iou": r.class_iou,
                "episodes": r.episodes, "ms_per_episode": out.ms_per_unit}

    def summary(self, cfg, runs):
        (miou_mean, miou_std), (fbiou_mean, fbiou_std) = mean_std(r["miou"] for r in runs), \
            mean_std(r["fbiou"] for r in runs)
        if cfg.eval_protocol == HSNET:
            scoring = f"{cfg.val_size}x{cfg.val_size} resized label"
        else:
            scoring = "ori_resize" if cfg.ori_resize else "val_size canvas"
        folders = ({"data_root": cfg.data_root, "test_classes": cfg.test_classes}
                   if cfg.dataset in FOLDER_DATASETS else {})
        return {"miou_mean": miou_mean, "miou_std": miou_std, "fbiou_mean": fbiou_mean, "fbiou_std": fbiou_std,
                "episodes": runs[0]["episodes"] if runs else 0, "seeds": len(runs),
                "use_split_coco": cfg.use_split_coco, "val_list": cfg.val_list, "scoring": scoring,
                "eval_protocol": cfg.eval_protocol, "val_size": cfg.val_size, "test_num": cfg.test_num, **folders,
                "ms_per_episode": mean_std(r["ms_per_episode"] for r in runs)[0], "per_seed": runs}

    def format_summary(self, cfg, s):
        n = s["seeds"]
        return (f"{cfg.shot}-shot over {s['seeds']} seed(s) x {s['episodes']} episodes ({s['eval_protocol']} "
                f"protocol), {tested_model(s)}: class mIoU {with_spread(s['miou_mean'], s['miou_std'], n)}, "
                f"FB-IoU {with_spread(s['fbiou_mean'], s['fbiou_std'], n)}")

    def save_visuals(self, samples, folder, rank):
        for i, sample in enumerate(samples):
            save_panel(os.path.join(folder, f"rank{rank}_panel{i:03d}.png"), sample)
