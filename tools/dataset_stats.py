"""How many images (videos and frames) serve each class of a fold, and the evaluation episodes.

    python tools/dataset_stats.py --config config/pascal/pascal_split0_resnet50.yaml \
        [KEY VALUE ...] [--episodes N --seed S] --json stats.json
    python tools/dataset_stats.py dataset ytvis data_root data/ytvis split 0 shot 5

Prints a table and writes JSON; ``episodes`` are drawn exactly as evaluation draws them
(the same seeded list test.py scores for that seed). For the video datasets (ytvis,
synthetic_video) it reports videos and frames per class, the held-out totals of every
fold, and with ``--episodes N`` (any N > 0) the whole evaluation list of the seed.
"""
from __future__ import annotations

import argparse
import os


from util.classes import class_names, fold_classes
from util.cli import run
from util.config import defaults, load_cfg, merge_cfg_from_list, parse_args_with_overrides, task_of, validate
from dataset.image import _check_enough_images, draw_episodes, load_split
from util.fileio import atomic_write_json
from dataset.video import build_chunks, draw_video_episodes
from dataset.video_index import load_video_index


def relative(path: str, root: str) -> str:
    """A path as written in the list file (relative to data_root)."""
    return os.path.relpath(path, root) if root else path


def video_stats(cfg, episodes: int = 0, seed: int | None = None) -> dict:
    """Videos and frames per class of a prepared video tree, for the config's fold."""
    index = load_video_index(cfg.data_root, cfg.dataset)
    train_classes, val_classes = fold_classes(cfg.dataset, cfg.split)
    names = class_names(cfg.dataset)
    per_class = {c: {"videos": len(index.videos_of[c]), "frames": index.frames_of(c)}
                 for c in range(1, len(names) + 1)}
    out = {
        "dataset": cfg.dataset, "split": cfg.split, "shot": cfg.shot,
        "train_classes": train_classes, "val_classes": val_classes,
        "class_names": {str(c): names[c - 1] for c in train_classes + val_classes},
        "videos": len(index.videos), "frames": sum(len(v.frames) for v in index.videos),
    }
    for part, classes in (("train", train_classes), ("val", val_classes)):
        serving = {v for c in classes for v in index.videos_of[c]}
        out[part] = {"videos": len(serving), "frames": sum(per_class[c]["frames"] for c in classes),
                     "per_class": {str(c): per_class[c] for c in classes}}
    out["folds"] = {str(i): {"held_out": fold_classes(cfg.dataset, i)[1],
                             "videos": sum(per_class[c]["videos"] for c in fold_classes(cfg.dataset, i)[1]),
                             "frames": sum(per_class[c]["frames"] for c in fold_classes(cfg.dataset, i)[1])}
                    for i in range(4)}
    if episodes:
        seed = cfg.manual_seed if seed is None else seed
        drawn = draw_video_episodes(index, val_classes, cfg.shot, seed, cfg.support_per)
        out["chunks"] = len(build_chunks(drawn, cfg.clip_len))
        out["episodes"] = [{
            "query_video": index.videos[e.video].name, "class": e.class_id,
            "frames": [index.videos[e.video].frames[f] for f in e.frames],
            "supports": [{"video": index.videos[v].name, "frame": index.videos[v].frames[f]} for v, f in e.supports],
        } for e in drawn]
    return out


def name_width(stats: dict) -> int:
    """The class column's width: the longest class name (at least 16), so every count lines up."""
    return max(16, *(len(name) for name in stats["class_names"].values()))


def format_video_table(stats: dict) -> str:
    lines = [f"{stats['dataset']} fold {stats['split']}: {stats['videos']} videos, {stats['frames']} frames; "
             f"training classes in {stats['train']['videos']} videos ({stats['train']['frames']} class frames), "
             f"held-out classes in {stats['val']['videos']} videos ({stats['val']['frames']} class frames)"]
    for part, key in (("train", "train_classes"), ("val", "val_classes")):
        lines.append(f"\n{'training' if part == 'train' else 'held-out'} classes")
        width = name_width(stats)
        lines.append(f"  {'id':>3}  {'class':<{width}} {'videos':>7} {'frames':>7}")
        for c in stats[key]:
            row = stats[part]["per_class"][str(c)]
            lines.append(f"  {c:>3}  {stats['class_names'][str(c)]:<{width}} {row['videos']:>7} {row['frames']:>7}")
    lines.append("\nheld-out classes per fold (videos and class frames are summed over the classes)")
    for i, fold in stats["folds"].items():
        lines.append(f"  fold {i}: {fold['videos']:>6} videos {fold['frames']:>8} frames  classes {fold['held_out']}")
    if "episodes" in stats:
        lines.append(f"\n{len(stats['episodes'])} evaluation queries ({stats['shot']}-shot), "
                     f"{stats['chunks']} chunks")
    return "\n".join(lines)


def dataset_stats(cfg, episodes: int = 0, seed: int | None = None) -> dict:
    if cfg.task == "video":
        return video_stats(cfg, episodes, seed)
    train_classes, val_classes = fold_classes(cfg.dataset, cfg.split, cfg.use_split_coco)
    names = class_names(cfg.dataset)
    out = {
        "dataset": cfg.dataset, "split": cfg.split, "shot": cfg.shot,
        "train_classes": train_classes, "val_classes": val_classes,
        "class_names": {str(c): names[c - 1] for c in train_classes + val_classes},
    }
    splits = {}
    for part, train in (("train", True), ("val", False)):
        split = load_split(cfg, train=train)
        splits[part] = split
        out[part] = {"images": len(split.index.images),
                     "per_class": {str(c): len(split.index.images_of[c]) for c in split.classes}}
    if episodes:
        val = splits["val"]
        _check_enough_images(val, cfg.shot, cfg.val_list)
        seed = cfg.manual_seed if seed is None else seed
        drawn = draw_episodes(val.index, episodes, cfg.shot, seed)
        pairs, root = val.pairs, cfg.data_root
        out["episodes"] = [{
            "query_image": relative(pairs[e.query][0], root),
            "query_label": relative(pairs[e.query][1], root),
            "class": e.class_id,
            "support_images": [relative(pairs[s][0], root) for s in e.supports],
            "support_labels": [relative(pairs[s][1], root) for s in e.supports],
        } for e in drawn]
    return out


def format_table(stats: dict) -> str:
    if task_of(stats["dataset"]) == "video":
        return format_video_table(stats)
    lines = [f"{stats['dataset']} fold {stats['split']}: "
             f"{stats['train']['images']} training images, {stats['val']['images']} evaluation images "
             f"serve at least one active class"]
    for part, key in (("train", "train_classes"), ("val", "val_classes")):
        lines.append(f"\n{'training' if part == 'train' else 'held-out'} classes")
        width = name_width(stats)
        lines.append(f"  {'id':>3}  {'class':<{width}} {'images':>7}")
        for c in stats[key]:
            lines.append(f"  {c:>3}  {stats['class_names'][str(c)]:<{width}} {stats[part]['per_class'][str(c)]:>7}")
    if "episodes" in stats:
        lines.append(f"\n{len(stats['episodes'])} evaluation episodes drawn ({stats['shot']}-shot)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="",
                        help="YAML config (config/<dataset>/...); without one the declared defaults and the "
                             "KEY VALUE overrides, e.g. dataset ytvis data_root data/ytvis split 0 shot 5")
    parser.add_argument("--episodes", type=int, default=0, help="also list N evaluation episodes")
    parser.add_argument("--seed", type=int, default=None, help="episode seed (default: manual_seed)")
    parser.add_argument("--json", default="", help="write the statistics to this JSON file")
    args, opts = parse_args_with_overrides(parser, argv)
    if args.config:
        cfg = load_cfg(args.config, opts)
    else:
        cfg = merge_cfg_from_list(defaults(), opts)
        validate(cfg)
    stats = dataset_stats(cfg, args.episodes, args.seed)
    print(format_table(stats))
    if args.json:
        atomic_write_json(args.json, stats)
        print(f"wrote {args.json}")
    return stats


if __name__ == "__main__":
    run(main)
