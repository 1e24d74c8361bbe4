"""Score simple few-shot baselines on exactly the episodes test.py scores (image or video
experiments alike: the config's task decides), and put test.py results side by side.

    python tools/baseline.py --config CFG [KEY VALUE ...] [--compare result/test_*.json [...]]
                             [--weight CKPT] [--pretrained IMAGENET.pth]

Two baselines, each on the same episodes (seeds, count, shots) as a test.py result:

* **all-foreground** — predicts the target everywhere; any model should beat it clearly.
* **prototype matcher** — a training-free few-shot segmenter (PANet's non-parametric
  matching, without its training): the backbone's mid-level features (layer3 and layer2
  concatenated, the features NTRENet++'s head starts from) are averaged under the support's
  foreground and under its background (masked average pooling, K shots averaged); every
  query feature goes to the prototype of higher cosine similarity (argmax of foreground vs
  background — no threshold to tune). Its backbone is that of a trained NTRENet++
  checkpoint (``--weight``, default the one ``--compare`` scored) and, with
  ``--pretrained``, a backbone weight file: ImageNet's (the frozen backbone of the PASCAL/COCO
  configs), Meta's DINOv2 file (with ``backbone dinov2_vitb14`` etc.: the training-free
  matching of Matcher and GF-SAM, in its plainest form) or one tools/pretrain_backbone.py wrote
  (the synthetic demo's).

With ``--compare`` it prints each result beside the baselines, one row each: several results
(PFENet's and NTRENet++'s test JSONs, say) must have scored the very same episodes (dataset,
fold, seeds, count, shots), or it says which differ. Of the files given, the newest result of
each experiment folder, checkpoint and shot is compared (``result/test_*.json`` of an experiment
tested several times); a line names each file left out, and ``--all`` compares every file, rows
of one checkpoint then named by their file too. Video experiments get the all-foreground row only
(J, F, J&F, class IoU).
"""
from __future__ import annotations

import argparse
import os
import re
import time

import torch
import torch.nn.functional as F


from engine.checkpoint import build_model_from_checkpoint
from engine.tester import run_test
from model.backbone import backbone_from_cfg, load_backbone_weights
from model.modules import masked_average_pooling
from model.ops import memory_format_of, resize
from util.amp import to_device
from engine.tasks import task_for
from util.cli import run
from util.config import load_cfg, parse_args_with_overrides, split_trailing_overrides
from util.distributed import DistInfo
from util.errors import ConfigError, DataFileMissing, UserError
from util.fileio import read_json_result
from util.logger import setup_logger


class AllForeground(torch.nn.Module):
    """Predicts the target everywhere (foreground logit above background): B×2×H×W logits
    for B×3×H×W queries, B×T×2×H×W for B×T×3×H×W query clips (on a video canvas the
    letterbox padding is predicted too, as a model's would be)."""

    def forward(self, query_img, support_imgs, support_masks, return_extras=False, **_):
        shape = query_img.shape[:-3] + query_img.shape[-2:]
        zeros = torch.zeros(shape, device=query_img.device)
        logits = torch.stack([zeros, zeros + 1], -3)
        if return_extras:
            return logits, {"bg_logits": torch.stack([zeros + 1, zeros], -3), "do_mask": zeros.long()}
        return logits


class PrototypeMatcher(torch.nn.Module):
    """Training-free matching of query features to the support's foreground and background
    prototypes (cosine similarity, argmax). ``backbone`` is any of model/backbone.py's."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        first = next(m.weight for m in self.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        layer2, layer3 = self.backbone.mid_level(images.contiguous(memory_format=memory_format_of(first)))
        return torch.cat([layer3, layer2], 1)

    def forward(self, query_img, support_imgs, support_masks, **_):
        B, K = support_imgs.shape[:2]
        feats = self.features(torch.cat([query_img, support_imgs.flatten(0, 1)])).float()
        query, support = feats[:B], feats[B:]
        size = feats.shape[-2:]
        masks = support_masks.flatten(0, 1).unsqueeze(1)           # BK×1×H×W, 0/1/255
        fg = resize((masks == 1).float(), size)
        bg = resize((masks == 0).float(), size)                     # 255 (ignore) is neither
        prototypes = torch.stack([masked_average_pooling(support, bg), masked_average_pooling(support, fg)], 1)
        prototypes = prototypes.unflatten(0, (B, K)).mean(1)        # B×2×C×1×1: background, foreground
        similarity = F.cosine_similarity(query.unsqueeze(1), prototypes, dim=2)   # B×2×h×w
        return resize(similarity, query_img.shape[-2:])


def matcher_from_checkpoint(path: str, cfg) -> PrototypeMatcher | None:
    """The prototype matcher on the backbone of a trained checkpoint (None: its network has no
    ``backbone`` of model/backbone.py's kind, docs/extending.md)."""
    model, _ = build_model_from_checkpoint(path, cfg)
    backbone = getattr(model, "backbone", None)
    return PrototypeMatcher(backbone) if hasattr(backbone, "mid_level") else None


def matcher_from_pretrained(path: str, cfg) -> PrototypeMatcher:
    """The prototype matcher on a backbone weight file (ImageNet's, DINOv2's or one pretrained here),
    loaded as ``pretrained`` loads it."""
    backbone = backbone_from_cfg(cfg)
    load_backbone_weights(backbone, path, cfg.allow_missing_backbone_keys)
    return PrototypeMatcher(backbone)


ARCH_TITLES = {"ntrenetpp": "NTRENet++", "pfenet": "PFENet"}   # how a result's network is named in the table
ELIMINATION_TITLES = {"bg": "no DO elimination", "do": "no BG elimination", "none": "no BG/DO elimination"}


def read_result(path: str, cfg) -> dict:
    """A test.py result JSON, checked to come from this config's dataset, fold and list."""
    if not os.path.isfile(path):
        raise DataFileMissing(f"--compare '{os.path.abspath(path)}' does not exist; pass a test_*.json written by test.py")
    res = read_json_result(path, "test result")
    if res is None:
        raise UserError(f"--compare '{os.path.abspath(path)}' is empty or not complete JSON (a write that was cut "
                        f"off, or an interrupted copy); run test.py again, or pass another test_*.json")
    for key in ("dataset", "split", "val_list"):
        if key in res and res[key] != cfg[key]:
            raise ConfigError(f"{path} was scored with {key} {res[key]!r}, the config has "
                              f"{cfg[key]!r}: pass the same config and overrides as that test run")
    return res


RESULT_FILE = re.compile(r"^test_(\d{8}_\d{6})(?:-(\d+))?(?:_.*)?\.json$")   # engine/evaluate.py's names


def written_at(path: str) -> tuple[str, int]:
    """When test.py wrote a result, as a sortable key: the time and ``-N`` of its file name
    (two runs in one second: test_<time>.json, then test_<time>-2.json), else the file's mtime."""
    match = RESULT_FILE.match(os.path.basename(path))
    if match:
        return match.group(1), int(match.group(2) or 1)
    return time.strftime("%Y%m%d_%H%M%S", time.localtime(os.path.getmtime(path))), 0


def newest_of_each(paths: list[str], results: list[dict]) -> tuple[list[int], list[str]]:
    """Of the given results, the newest of each experiment folder, checkpoint and shot (indices in
    the order given), and one line per file left out saying which file replaced it."""
    groups: dict[tuple, list[int]] = {}
    for i, (path, res) in enumerate(zip(paths, results)):
        key = (os.path.dirname(os.path.abspath(path)), res.get("weight"), res.get("shot"))
        groups.setdefault(key, []).append(i)
    kept, notes = [], []
    for members in groups.values():
        newest = max(members, key=lambda i: written_at(paths[i]))
        kept.append(newest)
        for i in members:
            if i != newest:
                notes.append(f"--compare: left out {paths[i]}, an older result of the same checkpoint and shot than "
                             f"{os.path.basename(paths[newest])} (--all compares every file)")
    return sorted(kept), notes


def row_names(paths: list[str], results: list[dict]) -> list[str]:
    """:func:`result_name` per result; results whose names coincide (one checkpoint tested twice)
    are told apart by their file names."""
    names = [result_name(r) for r in results]
    return [f"{name[:-1]}, {os.path.basename(path)})" if names.count(name) > 1 else name
            for name, path in zip(names, paths)]


def result_name(res: dict) -> str:
    """'NTRENet++ (split0_resnet50/best.pth)': the network and the checkpoint a result scored."""
    weight = res["weight"]
    experiment = os.path.basename(os.path.dirname(os.path.dirname(weight)))
    where = f"{experiment}/{os.path.basename(weight)}" if experiment else os.path.basename(weight)
    title = ARCH_TITLES.get(res.get("arch", "ntrenetpp"), res.get("arch"))
    if res.get("elimination", "bg+do") != "bg+do":
        title += f" ({ELIMINATION_TITLES[res['elimination']]})"
    return f"{title} ({where})"


def name_width(names) -> int:
    """The width of a table's first column: its longest row name and two spaces, at least 34."""
    return max(34, *(len(name) + 2 for name in names))


def format_table(rows: list[tuple[str, dict]], task, cfg) -> str:
    """One row per method: the task's headline figures, mean ± std over the runs."""
    width = name_width(name for name, _ in rows)
    lines = [f"\n{'':{width}s}" + "".join(f"{title:>16s}" for title, _ in task.headline)]
    for name, r in rows:
        runs = r.get("seeds") or len(r.get("runs") or [])
        lines.append(f"{name:{width}s}" + "".join(f"{r[k + '_mean']:8.2f} ± {r[k + '_std']:5.2f}" if runs > 1 else
                                                   f"{r[k + '_mean']:8.2f}{'':8s}" for _, k in task.headline))
    lines.append(f"({task.describe_test(cfg)}; the same episodes for every row)")
    return "\n".join(lines)


PER_CLASS_LISTED = 10   # classes up to which the per-class table is printed


def per_class_scores(summary: dict) -> tuple[str, dict[str, float]]:
    """(measure, {class name: mean over the runs}): J per class for videos, IoU for images."""
    runs = summary.get("runs") or summary.get("per_seed") or []     # video results / image results
    if not runs:
        return "", {}
    if "per_class" in runs[0]:
        measure, per_run = "J", [{k: v["J"] for k, v in r["per_class"].items()} for r in runs]
    else:
        measure, per_run = "IoU", [r.get("class_iou") or {} for r in runs]
    return measure, {name: sum(r[name] for r in per_run) / len(per_run) for name in per_run[0]}


def format_per_class(rows: list[tuple[str, dict]]) -> str:
    """Each method's score on each held-out class (mean over the runs), one row per method; ''
    when the results carry no per-class scores or have more than PER_CLASS_LISTED classes."""
    scored = [(name, *per_class_scores(r)) for name, r in rows]
    measure, classes = scored[0][1], list(scored[0][2])
    if not classes or len(classes) > PER_CLASS_LISTED:
        return ""
    width = name_width(name for name, _, _ in scored)
    cols = max(8, *(len(c) + 2 for c in classes))
    lines = [f"\nper held-out class, {measure} (mean over the runs)",
             f"{'':{width}s}" + "".join(f"{c:>{cols}s}" for c in classes)]
    for name, _, scores in scored:
        lines.append(f"{name:{width}s}" + "".join(f"{scores.get(c, float('nan')):{cols}.2f}" for c in classes))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--compare", nargs="+", default=[], metavar="JSON",
                        help="test_*.json results written by test.py (several: side by side, same episodes)")
    parser.add_argument("--all", action="store_true",
                        help="compare every --compare file, not only the newest of each experiment, checkpoint and shot")
    parser.add_argument("--weight", default="",
                        help="NTRENet++ checkpoint whose backbone the prototype matcher uses "
                             "(default: the checkpoint --compare scored; none: no matcher row)")
    parser.add_argument("--pretrained", default="",
                        help="also run the prototype matcher on this backbone weight file (ImageNet's, Meta's "
                             "DINOv2 file with 'backbone dinov2_...', or tools/pretrain_backbone.py's)")
    args, opts = parse_args_with_overrides(parser, argv)
    args.compare, opts = split_trailing_overrides(args.compare, opts)
    cfg = load_cfg(args.config, opts)
    cfg.update(save_pred=False, vis=0, save_path="")
    task = task_for(cfg)
    results = [read_result(path, cfg) for path in args.compare]
    paths = list(args.compare)
    if not args.all:
        kept, notes = newest_of_each(paths, results)
        for note in notes:
            print(note)
        paths, results = [paths[i] for i in kept], [results[i] for i in kept]
    for path, res in zip(paths[1:], results[1:]):
        differs = [k for k in ("dataset", "split", "shot", "manual_seed", "episodes", "seeds", "eval_protocol")
                   if res.get(k) != results[0].get(k)]
        if differs:
            raise UserError(f"{path} scored other episodes than {paths[0]} (" + ", ".join(
                f"{k} {res.get(k)!r} vs {results[0].get(k)!r}" for k in differs) + "): compare results of one "
                "test setting")
    res = results[0] if results else None
    if res is not None:
        cfg.update(task.result_episodes(res))   # the very episodes the results scored
    setup_logger("", 0)
    info = DistInfo()
    rows = list(zip(row_names(paths, results), results))
    weight = args.weight or (res["weight"] if res and os.path.isfile(res.get("weight", "")) else "")
    if weight.lower() == "none":
        weight = ""
    matcher = matcher_from_checkpoint(weight, cfg) if task.prototype_matcher and weight else None
    if matcher is not None:
        matcher = to_device(matcher, info.device, cfg.channels_last)
        name = "prototype matcher (its backbone)"
        rows.append((name, run_test(cfg, info, model=matcher, write_json=False, name=f"{name}, {weight}")))
    if task.prototype_matcher and args.pretrained:
        matcher = to_device(matcher_from_pretrained(args.pretrained, cfg), info.device, cfg.channels_last)
        name = f"prototype matcher ({os.path.basename(args.pretrained)})"
        rows.append((name, run_test(cfg, info, model=matcher, write_json=False, name=f"{name}, {args.pretrained}")))
    rows.append(("all-foreground", run_test(cfg, info, model=AllForeground(), write_json=False,
                                            name="all-foreground")))
    print(format_table(rows, task, cfg))
    per_class = format_per_class(rows)
    if per_class:
        print(per_class)
    return {name: r for name, r in rows}


if __name__ == "__main__":
    run(main)
