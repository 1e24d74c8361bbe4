"""The evaluation behind test.py: ``test_seeds`` seeds × ``test_num`` episodes.

Prints per-class IoU, class mIoU and FB-IoU per seed and their mean ± std (sample std
over seeds), the episode count, the checkpoint used and ms per episode, and writes
``<save_path>/result/test_<timestamp>.json``.
"""
from __future__ import annotations

import logging
import os
import statistics

from engine.checkpoint import build_model_from_checkpoint, resolve_weight
from engine.evaluate import evaluate, write_test_result
from engine.video import is_video, run_video_test
from util.amp import to_device
from dataset.image import FewShotEvalDataset, load_split_rank0_first
from util.distributed import DistInfo
from util.vis import save_panel

log = logging.getLogger("ntrenetpp")


def test_seeds(cfg) -> list[int]:
    """Evaluation seeds derived from ``manual_seed`` (training validates on other episodes)."""
    return [cfg.manual_seed + i for i in range(cfg.test_seeds)]


def format_seed_table(seed: int, result, ms: float) -> str:
    lines = [f"seed {seed}: class mIoU {result.miou:.2f}  FB-IoU {result.fbiou:.2f}  "
             f"({result.episodes} episodes, {ms:.1f} ms/episode)"]
    lines += [f"    {name:<18s} {iou:6.2f}" for name, iou in result.class_iou.items()]
    return "\n".join(lines)


def run_test(cfg, info: DistInfo, model=None, write_json: bool = True) -> dict:
    """Evaluate the configured checkpoint (or ``model`` as given) and write the JSON result
    (a video experiment: engine/video.py's report)."""
    if is_video(cfg):
        return run_video_test(cfg, info, model, write_json)
    weight_path = resolve_weight(cfg.weight, cfg.save_path) if model is None else "(in-memory model)"
    ckpt_info = ""
    if model is None:
        model, state = build_model_from_checkpoint(weight_path, cfg)
        model = to_device(model, cfg, info.device)
        ckpt_info = f" (epoch {state.get('epoch')}, iteration {state.get('iteration')})"
    log.info("checkpoint: %s%s; %d-shot, %d seed(s) x %d episodes", weight_path, ckpt_info, cfg.shot,
             cfg.test_seeds, cfg.test_num)
    split = load_split_rank0_first(cfg, train=False)
    result_dir = os.path.join(cfg.save_path or ".", "result")
    per_seed = []
    for seed in test_seeds(cfg):
        dataset = FewShotEvalDataset(cfg, seed=seed, num_episodes=cfg.test_num, split=split,
                                     rank=info.rank, world_size=info.world_size)
        pred_dir = os.path.join(result_dir, f"pred_seed{seed}") if cfg.save_pred else ""
        out = evaluate(model, dataset, cfg, info.device, pred_dir=pred_dir, keep_samples=cfg.vis)
        if out.samples and cfg.vis:
            vis_dir = os.path.join(result_dir, f"vis_seed{seed}")
            for i, sample in enumerate(out.samples):
                save_panel(os.path.join(vis_dir, f"rank{info.rank}_panel{i:03d}.png"), sample)
        r = out.result
        log.info(format_seed_table(seed, r, out.ms_per_episode))
        per_seed.append({"seed": seed, "miou": r.miou, "fbiou": r.fbiou, "class_iou": r.class_iou,
                         "episodes": r.episodes, "ms_per_episode": out.ms_per_episode})
    mious, fbious = [p["miou"] for p in per_seed], [p["fbiou"] for p in per_seed]
    std = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    summary = {
        "miou_mean": statistics.fmean(mious), "miou_std": std(mious),
        "fbiou_mean": statistics.fmean(fbious), "fbiou_std": std(fbious),
        "episodes": cfg.test_num, "seeds": len(per_seed), "shot": cfg.shot, "weight": weight_path,
        "dataset": cfg.dataset, "split": cfg.split, "use_split_coco": cfg.use_split_coco,
        "val_list": cfg.val_list, "manual_seed": cfg.manual_seed,
        "checkpoint_epoch": None if not ckpt_info else state.get("epoch"),
        "scoring": ("fixed %d" % cfg.fixed_eval_size) if cfg.fixed_eval_size else
                   ("ori_resize" if cfg.ori_resize else "val_size canvas"),
        "ms_per_episode": statistics.fmean(p["ms_per_episode"] for p in per_seed),
        "per_seed": per_seed,
    }
    log.info("%d-shot over %d seed(s) x %d episodes, checkpoint %s: class mIoU %.2f ± %.2f, FB-IoU %.2f ± %.2f",
             cfg.shot, len(per_seed), cfg.test_num, weight_path, summary["miou_mean"], summary["miou_std"],
             summary["fbiou_mean"], summary["fbiou_std"])
    if info.is_main and write_json:
        write_test_result(summary, result_dir)
    return summary
