"""The cross-domain benchmark's table (PATNet's protocol, docs/data.md sections 10-12): one model
trained on PASCAL (config/pascal/pascal_all_resnet50.yaml) scored on DeepGlobe, ISIC 2018,
Chest X-ray and FSS-1000 at 1 and 5 shots, with the mean of the four, printed beside the
published rows of docs/data.md section 12 and written as JSON.

    python tools/cdfss_table.py --weight exp/pascal/all_resnet50/model/best.pth
                                [--exp resnet50] [--shots 1 5] [--configs config/cdfss] [--out FILE]
                                [KEY VALUE ...]

Each (target, shot) is one test.py run (engine/tester.py ``run_test``) of
``<configs>/cdfss_<target>_<exp>.yaml`` with ``weight`` and ``shot`` set and the KEY VALUE
overrides applied, so each also writes its own result JSON (under
exp/cdfss/<target>_<exp>[_shotK]/result/ unless ``save_path`` says otherwise). Every config is
read and checked before the first run, and so is every target's data: its class list and
folders exist (a missing target names the command that prepares it) and each class holds
enough images for the largest K. The table goes to ``--out``, by default
``<the weight's experiment>/result/cdfss_table_<time>.json``. Flags and ``KEY VALUE`` overrides
may come in any order, as with the other entry points (``--shots 1 workers 2`` is 1 shot).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from dataset.folder import FolderIndex
from dataset.sources import evaluation_set
from engine.tester import run_test
from util.cli import run
from util.config import config_with_overrides, parse_args_with_overrides
from util.distributed import DistInfo, pick_device
from util.errors import CheckpointError, DataFileMissing, user_message
from util.fileio import atomic_write_json, create_new_json
from util.logger import setup_logger

TARGETS = (("deepglobe", "DeepGlobe"), ("isic", "ISIC"), ("chest", "Chest X-ray"), ("fss1000", "FSS-1000"))
PUBLISHED_SOURCE = "docs/data.md section 12"
# The published rows of PUBLISHED_SOURCE (where each comes from, and which figures were verified,
# is there): (row name in that table, short name, 1-/5-shot mIoU per target in TARGETS' order, mean),
# the figures as that table prints them.
PUBLISHED = (
    ("HSNet, as reported by PATNet", "HSNet (PATNet's table)",
     (("29.65", "35.08"), ("31.20", "35.10"), ("51.88", "54.36"), ("77.53", "80.99"), ("47.57", "51.38"))),
    ("PATNet (ECCV 2022)", "PATNet",
     (("37.89", "42.97"), ("41.16", "53.58"), ("66.61", "70.20"), ("78.59", "81.23"), ("56.06", "61.99"))),
    ("IFA (CVPR 2024; fine-tunes on each task's supports)", "IFA (fine-tunes)",
     (("50.6", "58.8"), ("66.3", "69.8"), ("74.0", "74.6"), ("80.1", "82.4"), ("67.8", "71.4"))),
    ("ABCDFSS (CVPR 2024; no source training, adapts at test time)", "ABCDFSS (test-time)",
     (("42.6", "49.0"), ("45.7", "53.3"), ("79.8", "81.4"), ("74.6", "76.2"), ("60.7", "65.0"))),
    ("APSeg (CVPR 2024; SAM, ViT-B)", "APSeg (SAM ViT-B)",
     (("35.94", "39.98"), ("45.43", "53.98"), ("84.10", "84.50"), ("79.71", "81.90"), ("61.30", "65.09"))),
)
PUBLISHED_SHOTS = (1, 5)
KEPT = ("miou_mean", "miou_std", "fbiou_mean", "fbiou_std", "episodes", "seeds", "eval_protocol", "json_path")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", required=True, help="the checkpoint trained on PASCAL (e.g. "
                                                        "exp/pascal/all_resnet50/model/best.pth)")
    parser.add_argument("--exp", default="resnet50", help="the configs' name: <configs>/cdfss_<target>_<exp>.yaml")
    parser.add_argument("--configs", default=os.path.join("config", "cdfss"), help="folder of the four configs")
    parser.add_argument("--shots", nargs="+", default=["1", "5"], metavar="K", help="K of the K-shot columns")
    parser.add_argument("--out", default="", help="the table's JSON file")
    args, opts = parse_args_with_overrides(parser, argv)
    args.shots, opts = split_shots(parser, args.shots, opts)
    return args, opts


def split_shots(parser, words: list[str], opts: list[str]) -> tuple[list[int], list[str]]:
    """``--shots 1 5 workers 2``: argparse hands every word to ``--shots``; the leading numbers
    are the shots, the words from the first other one on are ``KEY VALUE`` overrides."""
    count = next((i for i, w in enumerate(words) if not w.isdigit()), len(words))
    shots = [int(w) for w in words[:count]]
    if not shots or min(shots) < 1:
        parser.error(f"--shots takes one or more positive whole numbers (K of the K-shot columns), got {words}")
    return shots, words[count:] + opts


# what writes each target's class folders (docs/data.md sections 9-10); {root}: the config's data_root
PREPARE = {"deepglobe": "python tools/prepare_cdfss.py deepglobe --src <DeepGlobe land cover train/> --out {root}",
           "isic": "python tools/prepare_cdfss.py isic --src <folder with the two ISIC folders> --out {root}",
           "chest": "python tools/prepare_cdfss.py chest --src <Lung Segmentation/> --out {root}",
           "fss1000": "python tools/prepare_fss1000.py --src <folder holding the 1000 class folders> --out {root}"}


def check_target(target: str, cfg, shot: int) -> None:
    """The target's class folders exist and every class has ``shot`` + 1 images: checked before
    the first run, so a missing target or a too small class stops the table at once."""
    es = evaluation_set(cfg, "test")
    try:
        index = FolderIndex(es.root, es.class_list, check_sizes=False)
    except DataFileMissing as e:
        raise DataFileMissing(f"{user_message(e)}. The {target} target is prepared by "
                              f"{PREPARE[target].format(root=cfg.data_root)}") from None
    index.require_images(shot)


def default_out(weight: str) -> str:
    """``<experiment>/result/cdfss_table_<time>`` for ``<experiment>/model/<name>.pth``, else beside it."""
    folder = os.path.dirname(os.path.abspath(weight))
    if os.path.basename(folder) == "model":
        folder = os.path.join(os.path.dirname(folder), "result")
    return os.path.join(folder, f"cdfss_table_{time.strftime('%Y%m%d_%H%M%S')}")


def cells(values: list) -> str:
    """Measured figures with two decimals, published ones (strings) as printed, missing ones '—'."""
    return " / ".join("—" if v is None else v if isinstance(v, str) else f"{v:.2f}" for v in values)


def format_table(table: dict) -> str:
    """The measured row and the published ones: one column per target and the mean, each cell
    the shots' class mIoU separated by '/'."""
    shots = table["shots"]
    head = f"{'':34s}" + "".join(f"{title:>18s}" for _, title in TARGETS) + f"{'mean':>18s}"
    lines = [f"Cross-domain few-shot segmentation: class mIoU (%), {' / '.join(f'{k}-shot' for k in shots)} "
             f"({table['eval_protocol']} protocol)", head]
    row = [cells([table["targets"][t][str(k)]["miou_mean"] for k in shots]) for t, _ in TARGETS]
    row.append(cells([table["mean"][str(k)] for k in shots]))
    lines.append(f"{'this model (' + os.path.basename(table['weight']) + ')':34s}" + "".join(f"{c:>18s}" for c in row))
    for _, short, figures in PUBLISHED:
        published = [cells([pair[PUBLISHED_SHOTS.index(k)] if k in PUBLISHED_SHOTS else None for k in shots])
                     for pair in figures]
        lines.append(f"{short:34s}" + "".join(f"{c:>18s}" for c in published))
    lines.append(f"Published rows: {PUBLISHED_SOURCE} (their sources, and which figures were verified); "
                 f"mean: the plain mean of the four targets.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args, opts = parse(argv)
    if not os.path.isfile(args.weight):
        raise CheckpointError(f"--weight '{os.path.abspath(args.weight)}' does not exist; train the PASCAL model first "
                              f"(sh train.sh pascal all_resnet50) or give the path of its best.pth")
    cfgs = {(t, k): config_with_overrides(os.path.join(args.configs, f"cdfss_{t}_{args.exp}.yaml"),
                                          [*opts, "weight", args.weight, "shot", str(k)])
            for t, _ in TARGETS for k in args.shots}
    for t, _ in TARGETS:
        check_target(t, cfgs[t, max(args.shots)], max(args.shots))
    setup_logger("", 0)
    first = next(iter(cfgs.values()))
    info = DistInfo(device=pick_device(first.device))
    targets: dict = {t: {} for t, _ in TARGETS}
    for (t, k), cfg in cfgs.items():
        summary = run_test(cfg, info)
        targets[t][str(k)] = {key: summary[key] for key in KEPT}
    table = {"weight": args.weight, "exp": args.exp, "shots": args.shots,
             "eval_protocol": first.eval_protocol, "targets": targets,
             "mean": {str(k): statistics.fmean(targets[t][str(k)]["miou_mean"] for t, _ in TARGETS)
                      for k in args.shots},
             "published_source": PUBLISHED_SOURCE,
             "published": {name: {**{t: [float(v) for v in pair] for (t, _), pair in zip(TARGETS, figures)},
                                  "mean": [float(v) for v in figures[-1]]} for name, _, figures in PUBLISHED}}
    print(format_table(table))
    if args.out:
        out = args.out
        atomic_write_json(out, table)
    else:
        out = create_new_json(default_out(args.weight), table)
    print(f"wrote {out}")
    table["json_path"] = out
    return table


if __name__ == "__main__":
    run(main)
