"""Build FSS-1000 in the class-folder layout from the untouched download.

    python tools/prepare_fss1000.py --src <folder holding the 1000 class folders> --out data/fss1000

For every class named by the split lists (``--lists``, default lists/fss1000: HSNet's
train/val/test class splits, 520/240/240 classes) the source folder ``<src>/<class>/`` must
hold the ten pairs ``1.jpg``..``10.jpg`` + ``1.png``..``10.png``; the tool writes
``<out>/<class>/N.jpg`` (a copy, or a symlink with --link) and ``<out>/<class>/N.png``, the
mask as 0/1 grayscale (grey level >= 128 → 1, HSNet's rule). A mask of another size than
its image is resized to it with nearest neighbour (counted warning; a few official masks
are). Last, when nothing failed, the three lists are copied to ``<out>/train.txt``,
``val.txt``, ``test.txt``: the class lists dataset/folder.py reads. Re-running skips every
file that already holds exactly what would be written. See docs/data.md.
"""
from __future__ import annotations

import argparse
import os
from typing import NamedTuple, Sequence

from dataset.folder import read_class_list
from tools._folder_prep import (PrepResult, mask_for_image, place_file, put_mask, raise_problems, run_tasks,
                                summarise, write_class_list)
from tools._prep_common import require_dir
from util.cli import run

SPLITS = ("train", "val", "test")
OFFICIAL_COUNTS = {"train": 520, "val": 240, "test": 240}
IMAGES_PER_CLASS = 10
SRC_HINT = ("--src must be the folder holding FSS-1000's 1000 class folders (ab_wheel/, abacus/, ..., "
            "each with 1.jpg..10.jpg and 1.png..10.png) as extracted from the download")


class ClassTask(NamedTuple):
    name: str
    src: str
    out: str
    link: bool


def check_folders(src: str, names: list[str]) -> list[str]:
    """The class folders missing from ``src`` as one problem with a count (a wrong ``--src``
    misses all 1000 of them: one line, not a thousand), or none."""
    missing = [n for n in names if not os.path.isdir(os.path.join(src, n))]
    if not missing:
        return []
    first = ", ".join(f"'{n}'" for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
    if len(missing) == len(names):
        return [f"'{src}' holds none of the {len(names)} class folders the split lists name ({first}); {SRC_HINT}"]
    return [f"{len(missing)} of the {len(names)} class folders the split lists name do not exist in '{src}' "
            f"({first}); {SRC_HINT}"]


def check_class(src: str, name: str) -> list[str]:
    """Problems of one source class folder that exists (empty when its ten pairs are all there)."""
    folder = os.path.join(src, name)
    if not os.path.isdir(folder):
        return []                                   # counted by check_folders
    problems = []
    for n in range(1, IMAGES_PER_CLASS + 1):
        for ext in (".jpg", ".png"):
            path = os.path.join(folder, f"{n}{ext}")
            if not os.path.isfile(path):
                problems.append(f"class '{name}': missing '{path}'; FSS-1000 has {IMAGES_PER_CLASS} pairs "
                                f"N.jpg + N.png per class: re-extract the download")
    return problems


def process_class(task: ClassTask) -> PrepResult:
    result = PrepResult(task.name)
    folder, out = os.path.join(task.src, task.name), os.path.join(task.out, task.name)
    for n in range(1, IMAGES_PER_CLASS + 1):
        image, mask_path = os.path.join(folder, f"{n}.jpg"), os.path.join(folder, f"{n}.png")
        mask = mask_for_image(mask_path, image, result)   # read and checked before anything is written
        result.count(place_file(image, os.path.join(out, f"{n}.jpg"), task.link))
        put_mask(os.path.join(out, f"{n}.png"), mask, result)
        result.per_class[task.name] += 1
    return result


def prepare_fss1000(src: str, out: str, lists_dir: str = "lists/fss1000", link: bool = False,
                    workers: int = 0) -> dict:
    require_dir(src, SRC_HINT)
    splits = {s: read_class_list(os.path.join(lists_dir, s + ".txt")) for s in SPLITS}
    names = sorted(set().union(*splits.values()))
    problems = check_folders(src, names) + [p for name in names for p in check_class(src, name)]
    raise_problems(problems)

    tasks = [ClassTask(n, src, out, link) for n in names]
    results = run_tasks(process_class, tasks, workers, desc="fss1000", unit="class")
    summary = summarise(results, f"FSS-1000 in '{out}'", "classes")
    for s, classes in splits.items():
        path = os.path.join(out, s + ".txt")
        write_class_list(path, classes)
        note = "" if len(classes) == OFFICIAL_COUNTS[s] else f"  (HSNet's split has {OFFICIAL_COUNTS[s]})"
        print(f"{path}: {len(classes)} classes, {len(classes) * IMAGES_PER_CLASS} images{note}")
    summary["lists"] = {s: len(c) for s, c in splits.items()}
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder holding the 1000 class folders")
    p.add_argument("--out", default="data/fss1000", help="folder to write (default: data/fss1000)")
    p.add_argument("--lists", default=os.path.join("lists", "fss1000"),
                   help="folder of the split class lists train/val/test.txt (default: lists/fss1000)")
    p.add_argument("--link", action="store_true", help="symlink the JPEGs instead of copying them")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    return prepare_fss1000(args.src, args.out, args.lists, args.link, args.workers)


if __name__ == "__main__":
    run(main)
