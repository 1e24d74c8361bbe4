"""Build PASCAL-5i data (VOC2012 + SBD) from the untouched official folders.

    python tools/prepare_pascal.py --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset \
        --out data/pascal

writes ``<out>/JPEGImages/<id>.jpg`` (symlinks, or copies with --copy),
``<out>/SegmentationClassAug/<id>.png`` (grayscale class ids 0..20, 255 ignore) for every
image of the union of the lists, and the lists ``train.txt`` (5953 with the official
files), ``train_aug.txt`` (10582) and ``val.txt`` (1449) in ``--lists`` (lists/pascal).

Label of an image: the VOC2012 SegmentationClass PNG where it has one (its palette indices,
boundaries 255 kept), otherwise SBD's ``cls/<id>.mat`` (``GTcls.Segmentation``). Re-running
skips every JPEG already in place and every label PNG that already decodes to exactly the
array this tool would write. See docs/data.md.
"""
from __future__ import annotations

import argparse
import os
from typing import NamedTuple, Sequence


import numpy as np
import scipy.io
from PIL import Image

from tools._prep_common import (IMAGE_DIR, IGNORE, LABEL_DIR, ItemResult, PrepError, add_output_args,
                                image_hw, link_or_copy, require_dir, require_file, run_tasks, summarise,
                                write_label, write_list)
from util.cli import run

NUM_CLASSES = 20
VOC_HINT = ("--voc must point at VOCdevkit/VOC2012 (the folder holding JPEGImages/, "
            "SegmentationClass/, ImageSets/) as extracted from VOCtrainval_11-May-2012.tar")
SBD_HINT = ("--sbd must point at benchmark_RELEASE/dataset (the folder holding cls/, img/, "
            "train.txt, val.txt) as extracted from SBD's benchmark.tgz")
OFFICIAL_COUNTS = {"train": 5953, "train_aug": 10582, "val": 1449}


def read_split(path: str, hint: str) -> list[str]:
    """Image ids of an official split file (one id per line)."""
    require_file(path, hint)
    ids = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if len(line.split()) != 1 or "/" in line or "\\" in line:
                raise PrepError(f"{path}:{lineno}: expected one image id per line, got {line!r}; {hint}")
            ids.append(line)
    if not ids:
        raise PrepError(f"split file '{path}' names no images; {hint}")
    return ids


def build_lists(voc_train: Sequence[str], voc_val: Sequence[str], sbd_train: Sequence[str],
                sbd_val: Sequence[str]) -> dict[str, list[str]]:
    """The three lists as sorted, de-duplicated ids.

    train (PFENet): (SBD train | VOC train) - VOC val;  train_aug: (SBD train | SBD val |
    VOC train) - VOC val;  val: VOC val.
    """
    val = set(voc_val)
    return {
        "train": sorted((set(sbd_train) | set(voc_train)) - val),
        "train_aug": sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - val),
        "val": sorted(val),
    }


def _check_values(label: np.ndarray, path: str) -> np.ndarray:
    if label.ndim != 2:
        raise PrepError(f"'{path}': label has shape {label.shape}, expected a single-channel HxW array")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.issubdtype(label.dtype, np.floating) or not np.array_equal(label, np.round(label)):
            raise PrepError(f"'{path}': label values are {label.dtype}, expected integer class ids")
    values = np.unique(label)
    bad = values[((values < 0) | (values > NUM_CLASSES)) & (values != IGNORE)]
    if bad.size:
        raise PrepError(f"'{path}': label values {bad.tolist()[:10]} outside 0..{NUM_CLASSES} and {IGNORE}; "
                        f"the file is not a PASCAL class annotation (or is corrupt)")
    return label.astype(np.uint8)


def convert_label(path: str) -> np.ndarray:
    """The uint8 class-id array of a VOC SegmentationClass PNG or an SBD cls .mat file.

    PNG: the palette *indices* (mode P; mode L is taken as indices too); an RGB PNG is an
    error because colours would have to be guessed back into ids.
    """
    if path.endswith(".mat"):
        try:
            mat = scipy.io.loadmat(path, variable_names=["GTcls"], struct_as_record=False)
        except Exception as e:  # noqa: BLE001 - scipy raises several types for corrupt files
            raise PrepError(f"'{path}' is not a readable .mat file ({e}); re-extract benchmark.tgz") from e
        if "GTcls" not in mat:
            raise PrepError(f"'{path}' has no GTcls struct; expected an SBD cls/*.mat file")
        segmentation = getattr(mat["GTcls"].flat[0], "Segmentation", None)
        if segmentation is None:
            raise PrepError(f"'{path}': GTcls has no Segmentation field; expected an SBD cls/*.mat file")
        return _check_values(np.asarray(segmentation), path)
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise PrepError(f"'{path}' is a {im.mode} image; expected a palette PNG of class indices "
                            f"(VOC SegmentationClass), whose colours must not be read as ids")
        return _check_values(np.asarray(im), path)


class PascalTask(NamedTuple):
    name: str
    voc: str
    sbd: str
    out: str
    copy: bool
    in_voc_split: bool   # VOC's split names it, so its SegmentationClass PNG must exist


def process_image(task: PascalTask) -> ItemResult:
    """Find the sources of one image, check them, place the JPEG and write the label."""
    result = ItemResult(task.name)
    image = os.path.join(task.voc, "JPEGImages", task.name + ".jpg")
    if not os.path.isfile(image):
        sbd_image = os.path.join(task.sbd, "img", task.name + ".jpg")
        if not os.path.isfile(sbd_image):
            raise PrepError(f"{task.name}: no image: neither '{image}' nor '{sbd_image}' exists; "
                            f"re-extract the archives")
        result.warnings.append(("images taken from SBD img/ (absent from VOC JPEGImages/)", sbd_image))
        image = sbd_image
    voc_label = os.path.join(task.voc, "SegmentationClass", task.name + ".png")
    sbd_label = os.path.join(task.sbd, "cls", task.name + ".mat")
    if os.path.isfile(voc_label):
        source, result.source = voc_label, "voc"
    elif task.in_voc_split:
        raise PrepError(f"{task.name}: '{os.path.abspath(voc_label)}' does not exist although VOC's ImageSets/Segmentation "
                        f"names the image; re-extract VOCtrainval_11-May-2012.tar")
    elif os.path.isfile(sbd_label):
        source, result.source = sbd_label, "sbd"
    else:
        raise PrepError(f"{task.name}: no label: '{os.path.abspath(sbd_label)}' does not exist (and VOC has no "
                        f"SegmentationClass PNG for it); re-extract benchmark.tgz")
    label = convert_label(source)
    height, width = image_hw(image)
    if label.shape != (height, width):
        raise PrepError(f"{task.name}: label '{source}' is {label.shape[1]}x{label.shape[0]} but image "
                        f"'{image}' is {width}x{height} (width x height)")
    result.image_written = link_or_copy(image, os.path.join(task.out, IMAGE_DIR, task.name + ".jpg"), task.copy)
    result.label_written = write_label(os.path.join(task.out, LABEL_DIR, task.name + ".png"), label)
    return result


def prepare_pascal(voc: str, sbd: str, out: str, lists_dir: str = "lists/pascal", copy: bool = False,
                   workers: int = 0) -> dict:
    """Write images, labels and the three lists; return the counts (see the module doc)."""
    require_dir(voc, VOC_HINT)
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        require_dir(os.path.join(voc, sub), VOC_HINT)
    require_dir(sbd, SBD_HINT)
    require_dir(os.path.join(sbd, "cls"), SBD_HINT)
    voc_train = read_split(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), VOC_HINT)
    voc_val = read_split(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), VOC_HINT)
    sbd_train = read_split(os.path.join(sbd, "train.txt"), SBD_HINT)
    sbd_val = read_split(os.path.join(sbd, "val.txt"), SBD_HINT)
    lists = build_lists(voc_train, voc_val, sbd_train, sbd_val)

    in_voc_split = set(voc_train) | set(voc_val)
    names = sorted(set().union(*lists.values()))
    tasks = [PascalTask(n, voc, sbd, out, copy, n in in_voc_split) for n in names]
    results = run_tasks(process_image, tasks, workers, desc="pascal")
    summary = summarise(results, f"PASCAL labels in '{out}'")
    summary["sources"] = {s: sum(r.source == s for r in results) for s in ("voc", "sbd")}
    print(f"label sources: {summary['sources']['voc']} VOC SegmentationClass, "
          f"{summary['sources']['sbd']} SBD cls")

    summary["lists"] = {}
    for key, ids in lists.items():
        path = os.path.join(lists_dir, key + ".txt")
        summary["lists"][key] = write_list(path, ids)
        note = "" if len(ids) == OFFICIAL_COUNTS[key] else \
            f"  (the official archives give {OFFICIAL_COUNTS[key]})"
        print(f"{path}: {len(ids)} images{note}")
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 folder")
    p.add_argument("--sbd", required=True, help="SBD benchmark_RELEASE/dataset folder")
    add_output_args(p, "pascal")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_pascal(args.voc, args.sbd, args.out, args.lists, args.copy, args.workers)
    return 0


if __name__ == "__main__":
    run(main)
