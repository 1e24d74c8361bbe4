"""Build the cross-domain few-shot benchmark's target datasets in the class-folder layout.

    python tools/prepare_cdfss.py deepglobe --src <DeepGlobe land-cover train/> --out data/cdfss/deepglobe
    python tools/prepare_cdfss.py isic --src <folder with the ISIC 2018 Task 1 training folders> --out data/cdfss/isic
    python tools/prepare_cdfss.py chest --src <folder with CXR_png/ and masks/> --out data/cdfss/chest

Each writes ``<out>/<class>/<stem>.<ext>`` images with 0/1 grayscale PNG masks (the layout
dataset/folder.py reads) and, last and only when nothing failed, ``<out>/classes.txt``,
the class list in the benchmark's class order:

* **deepglobe**: each ``<id>_sat.jpg`` / ``<id>_mask.png`` pair is cut into a 6×6 grid of
  tiles (408×408 for the official 2448×2448 images). A tile is kept when its mask has more
  than one colour and every colour covers more than 4.8 % of it; for each land-cover class
  present, the tile goes to that class's folder as ``<id>_sat_<row><col>.jpg`` (re-encoded
  JPEG, quality 95) with its binary mask. Mask colours are binarised per channel at 128
  (the DeepGlobe rule) and must be one of the seven classes' (unknown, black, is a colour
  of the tile but gets no folder).
* **isic**: ISIC 2018 Task 1 training images, filed by diagnosis from the class list
  ``--classes`` (default lists/cdfss/isic_class_id.csv, PATNet's); masks
  ``<id>_segmentation.png``.
* **chest**: the chest X-ray lung masks, ``masks/<stem>_mask.png`` or ``masks/<stem>.png``
  (both namings occur), for the image ``CXR_png/<stem>.png``; images without a mask are
  left out. PNG images keep their format, so a mask is written as ``<stem>_mask.png``.

Masks of ISIC and Chest X-ray: grey level >= 128 → 1; a mask of another size than its image
is resized to it (nearest neighbour, counted warning). Re-running skips every file that
already holds exactly what would be written. See docs/data.md.
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import NamedTuple, Sequence

import cv2
import numpy as np

from tools._folder_prep import (PrepResult, mask_for_image, place_file, put_mask, raise_problems, run_tasks,
                                summarise, write_bytes, write_class_list)
from tools._prep_common import PrepError, require_dir, require_file
from util.cli import run

# ------------------------------------------------------------------ class orders (docs/data.md)
# DeepGlobe: PATNet's folders 1..6; RGB colour of each class in the official masks.
DEEPGLOBE_CLASSES = ("agriculture", "urban", "rangeland", "forest", "water", "barren")
DEEPGLOBE_COLOURS = {"agriculture": (255, 255, 0), "urban": (0, 255, 255), "rangeland": (255, 0, 255),
                     "forest": (0, 255, 0), "water": (0, 0, 255), "barren": (255, 255, 255)}
DEEPGLOBE_UNKNOWN = (0, 0, 0)
GRID = 6
MIN_SHARE = 0.048          # every colour of a kept tile covers more than this share of it
JPEG_QUALITY = 95          # OpenCV's default, what the reference tiles were written with
# ISIC: IFA's folder order (nevus 1, seborrheic keratosis 2, melanoma 3); PATNet's class_id.csv
ISIC_CLASSES = ("nevus", "seborrheic_keratosis", "melanoma")
ISIC_IMAGES = "ISIC2018_Task1-2_Training_Input"
ISIC_MASKS = "ISIC2018_Task1_Training_GroundTruth"
ISIC_MASK_SUFFIX = "_segmentation.png"
CHEST_CLASSES = ("lung",)
CHEST_IMAGES, CHEST_MASKS = "CXR_png", "masks"
CLASS_LIST = "classes.txt"

DEEPGLOBE_HINT = ("--src must be DeepGlobe land cover's train/ folder, holding <id>_sat.jpg with "
                  "<id>_mask.png (as extracted from the download)")
ISIC_HINT = (f"--src must be the folder holding {ISIC_IMAGES}/ and {ISIC_MASKS}/ as extracted from "
             f"the ISIC 2018 Task 1 training archives")
CHEST_HINT = (f"--src must be the folder holding {CHEST_IMAGES}/ and {CHEST_MASKS}/ (the Kaggle chest "
              f"X-ray masks and labels download, folder 'Lung Segmentation')")
IMPURE = "mask pixels with channel values other than 0 and 255 (binarised at 128)"
NOT_IN_CSV = "images absent from the class list, left out"
NO_MASK = "images without a mask, left out"


def _code(rgb: Sequence[int]) -> int:
    """Colour of binarised channels → 0..7 (R·4 + G·2 + B)."""
    return (rgb[0] >> 7) * 4 + (rgb[1] >> 7) * 2 + (rgb[2] >> 7)


CODE_OF_CLASS = {c: _code(DEEPGLOBE_COLOURS[c]) for c in DEEPGLOBE_CLASSES}
KNOWN_CODES = set(CODE_OF_CLASS.values()) | {_code(DEEPGLOBE_UNKNOWN)}


def _files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")
                  and os.path.isfile(os.path.join(folder, n)))


# ------------------------------------------------------------------ deepglobe

def tile_bounds(size: int, grid: int = GRID) -> list[tuple[int, int]]:
    """[start, end) of each of ``grid`` tiles along a side: int(i·size/grid) (the reference's)."""
    return [(int(i * size / grid), int((i + 1) * size / grid)) for i in range(grid)]


def keep_tile(counts: np.ndarray) -> bool:
    """The tile filter: more than one colour, and each colour present covers more than
    MIN_SHARE of the tile (count / tile area > 0.048, as the reference computes it)."""
    area = int(counts.sum())
    present = counts[counts > 0]
    return len(present) > 1 and all(int(n) / area > MIN_SHARE for n in present)


def colour_codes(mask_path: str, result: PrepResult) -> np.ndarray:
    """H×W codes 0..7 of a DeepGlobe RGB mask; an unknown colour is an error."""
    mask = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise PrepError(f"cannot read mask '{mask_path}'; re-extract the download")
    if mask.ndim != 3 or mask.shape[2] not in (3, 4):
        raise PrepError(f"mask '{mask_path}' has {1 if mask.ndim == 2 else mask.shape[2]} channel(s); a DeepGlobe "
                        f"mask is an RGB image of the seven class colours")
    if mask.dtype != np.uint8:
        raise PrepError(f"mask '{mask_path}' is {mask.dtype}; a DeepGlobe mask is 8-bit RGB")
    rgb = mask[:, :, 2::-1]
    bits = rgb >= 128
    impure = int(np.count_nonzero((rgb != 0) & (rgb != 255)))
    if impure:
        result.warnings.append((IMPURE, f"'{mask_path}': {impure} channel values"))
    codes = (bits[:, :, 0] * 4 + bits[:, :, 1] * 2 + bits[:, :, 2]).astype(np.uint8)
    bad = sorted(set(np.unique(codes).tolist()) - KNOWN_CODES)
    if bad:
        colours = ", ".join(f"({255 * (c >> 2 & 1)},{255 * (c >> 1 & 1)},{255 * (c & 1)})" for c in bad)
        n = int(np.isin(codes, bad).sum())
        raise PrepError(f"mask '{mask_path}' has {n} pixel(s) of colour {colours}, which is no DeepGlobe class "
                        f"(classes: {', '.join(f'{c} {DEEPGLOBE_COLOURS[c]}' for c in DEEPGLOBE_CLASSES)}, "
                        f"unknown {DEEPGLOBE_UNKNOWN}); re-extract the download")
    return codes


class DeepglobeTask(NamedTuple):
    name: str         # the image id
    image: str
    mask: str
    out: str


def process_deepglobe(task: DeepglobeTask) -> PrepResult:
    result = PrepResult(task.name)
    image = cv2.imread(task.image, cv2.IMREAD_COLOR)
    if image is None:
        raise PrepError(f"cannot read image '{task.image}'; re-extract the download")
    codes = colour_codes(task.mask, result)
    if codes.shape != image.shape[:2]:
        raise PrepError(f"mask '{task.mask}' is {codes.shape[1]}x{codes.shape[0]} but its image '{task.image}' "
                        f"is {image.shape[1]}x{image.shape[0]}; re-extract the download")
    outputs = []   # everything is computed before the first file is written
    for i, (y0, y1) in enumerate(tile_bounds(image.shape[0])):
        for j, (x0, x1) in enumerate(tile_bounds(image.shape[1])):
            tile = codes[y0:y1, x0:x1]
            counts = np.bincount(tile.ravel(), minlength=8)
            if not keep_tile(counts):
                continue
            ok, jpeg = cv2.imencode(".jpg", image[y0:y1, x0:x1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise PrepError(f"could not encode a tile of '{task.image}' as JPEG")
            stem = f"{task.name}_sat_{i}{j}"
            for cls in DEEPGLOBE_CLASSES:
                if counts[CODE_OF_CLASS[cls]]:
                    outputs.append((cls, stem, jpeg.tobytes(), (tile == CODE_OF_CLASS[cls]).astype(np.uint8)))
    for cls, stem, jpeg, mask in outputs:
        folder = os.path.join(task.out, cls)
        result.count(write_bytes(os.path.join(folder, stem + ".jpg"), jpeg))
        put_mask(os.path.join(folder, stem + ".png"), mask, result)
        result.per_class[cls] += 1
    return result


def deepglobe_tasks(src: str, out: str) -> list[DeepglobeTask]:
    require_dir(src, DEEPGLOBE_HINT)
    files = _files(src)
    sats = {n[:-len("_sat.jpg")] for n in files if n.endswith("_sat.jpg")}
    masks = {n[:-len("_mask.png")] for n in files if n.endswith("_mask.png")}
    if not sats and not masks:
        raise PrepError(f"folder '{src}' holds no <id>_sat.jpg / <id>_mask.png pair; {DEEPGLOBE_HINT}")
    problems = [f"image '{os.path.join(src, i + '_sat.jpg')}' has no mask '{os.path.join(src, i + '_mask.png')}'; "
                f"{DEEPGLOBE_HINT}" for i in sorted(sats - masks)]
    problems += [f"mask '{os.path.join(src, i + '_mask.png')}' has no image '{os.path.join(src, i + '_sat.jpg')}'; "
                 f"{DEEPGLOBE_HINT}" for i in sorted(masks - sats)]
    raise_problems(problems)
    return [DeepglobeTask(i, os.path.join(src, i + "_sat.jpg"), os.path.join(src, i + "_mask.png"), out)
            for i in sorted(sats)]


# ------------------------------------------------------------------ isic and chest: one pair a task

class PairTask(NamedTuple):
    name: str          # output stem
    cls: str
    image: str
    mask: str
    out: str
    image_name: str    # output file name of the image
    mask_name: str     # output file name of the mask
    link: bool


def process_pair(task: PairTask) -> PrepResult:
    result = PrepResult(task.name)
    mask = mask_for_image(task.mask, task.image, result)   # read and checked before anything is written
    folder = os.path.join(task.out, task.cls)
    result.count(place_file(task.image, os.path.join(folder, task.image_name), task.link))
    put_mask(os.path.join(folder, task.mask_name), mask, result)
    result.per_class[task.cls] += 1
    return result


def read_isic_classes(path: str) -> dict[str, str]:
    """image id → class name, from a class_id.csv (``ID,Class`` header; BOM and CRLF allowed)."""
    require_file(path, "give the ISIC class list with --classes (lists/cdfss/isic_class_id.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ID", "Class"]:
        raise PrepError(f"'{path}': the first line must be the header 'ID,Class'; use "
                        f"lists/cdfss/isic_class_id.csv")
    classes = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise PrepError(f"{path}:{lineno}: expected 'ID,Class', got {','.join(row)!r}")
        image_id, cls = row[0].strip(), row[1].strip()
        if cls not in ISIC_CLASSES:
            raise PrepError(f"{path}:{lineno}: class '{cls}' is not one of {', '.join(ISIC_CLASSES)}")
        if image_id in classes:
            raise PrepError(f"{path}:{lineno}: image '{image_id}' is listed twice")
        classes[image_id] = cls
    if not classes:
        raise PrepError(f"'{path}' lists no image; use lists/cdfss/isic_class_id.csv")
    return classes


def isic_tasks(src: str, out: str, classes_csv: str, link: bool) -> tuple[list[PairTask], list[tuple[str, str]]]:
    require_dir(src, ISIC_HINT)
    images_dir, masks_dir = os.path.join(src, ISIC_IMAGES), os.path.join(src, ISIC_MASKS)
    require_dir(images_dir, ISIC_HINT)
    require_dir(masks_dir, ISIC_HINT)
    classes = read_isic_classes(classes_csv)
    images = {n[:-4] for n in _files(images_dir) if n.endswith(".jpg")}
    masks = {n[:-len(ISIC_MASK_SUFFIX)] for n in _files(masks_dir) if n.endswith(ISIC_MASK_SUFFIX)}
    problems = []
    for image_id in sorted(classes):
        if image_id not in images:
            problems.append(f"image '{os.path.abspath(os.path.join(images_dir, image_id + '.jpg'))}' (listed in '{classes_csv}') "
                            f"does not exist; {ISIC_HINT}")
        if image_id not in masks:
            problems.append(f"mask '{os.path.abspath(os.path.join(masks_dir, image_id + ISIC_MASK_SUFFIX))}' of image "
                            f"'{image_id}' (listed in '{classes_csv}') does not exist; {ISIC_HINT}")
    problems += [f"mask '{os.path.join(masks_dir, m + ISIC_MASK_SUFFIX)}' has no image "
                 f"'{os.path.join(images_dir, m + '.jpg')}'; {ISIC_HINT}" for m in sorted(masks - images)]
    raise_problems(problems)
    left_out = [(NOT_IN_CSV, os.path.join(images_dir, i + ".jpg")) for i in sorted(images - set(classes))]
    tasks = [PairTask(i, classes[i], os.path.join(images_dir, i + ".jpg"),
                      os.path.join(masks_dir, i + ISIC_MASK_SUFFIX), out, i + ".jpg", i + ".png", link)
             for i in sorted(classes)]
    return tasks, left_out


def chest_tasks(src: str, out: str, link: bool) -> tuple[list[PairTask], list[tuple[str, str]]]:
    require_dir(src, CHEST_HINT)
    images_dir, masks_dir = os.path.join(src, CHEST_IMAGES), os.path.join(src, CHEST_MASKS)
    require_dir(images_dir, CHEST_HINT)
    require_dir(masks_dir, CHEST_HINT)
    images = {n[:-4] for n in _files(images_dir) if n.endswith(".png")}
    mask_of: dict[str, str] = {}
    problems = []
    for n in (n for n in _files(masks_dir) if n.endswith(".png")):
        stem = n[:-len("_mask.png")] if n.endswith("_mask.png") else n[:-4]
        if stem in mask_of:
            problems.append(f"image '{os.path.join(images_dir, stem + '.png')}' has two masks, "
                            f"'{os.path.join(masks_dir, mask_of[stem])}' and '{os.path.join(masks_dir, n)}'; "
                            f"keep one")
            continue
        mask_of[stem] = n
        if stem not in images:
            problems.append(f"mask '{os.path.join(masks_dir, n)}' has no image "
                            f"'{os.path.join(images_dir, stem + '.png')}'; {CHEST_HINT}")
    if not mask_of and not problems:
        raise PrepError(f"folder '{masks_dir}' holds no mask (<name>_mask.png or <name>.png); {CHEST_HINT}")
    raise_problems(problems)
    left_out = [(NO_MASK, os.path.join(images_dir, i + ".png")) for i in sorted(images - set(mask_of))]
    tasks = [PairTask(s, CHEST_CLASSES[0], os.path.join(images_dir, s + ".png"), os.path.join(masks_dir, m), out,
                      s + ".png", s + "_mask.png", link) for s, m in sorted(mask_of.items())]
    return tasks, left_out


# ------------------------------------------------------------------ driver

CLASSES = {"deepglobe": DEEPGLOBE_CLASSES, "isic": ISIC_CLASSES, "chest": CHEST_CLASSES}
HINTS = {"deepglobe": DEEPGLOBE_HINT, "isic": ISIC_HINT, "chest": CHEST_HINT}


def prepare_cdfss(dataset: str, src: str, out: str, classes_csv: str = "lists/cdfss/isic_class_id.csv",
                  link: bool = False, workers: int = 0) -> dict:
    left_out: list[tuple[str, str]] = []
    if dataset == "deepglobe":
        tasks, fn, unit = deepglobe_tasks(src, out), process_deepglobe, "image"
    elif dataset == "isic":
        (tasks, left_out), fn, unit = isic_tasks(src, out, classes_csv, link), process_pair, "image"
    elif dataset == "chest":
        (tasks, left_out), fn, unit = chest_tasks(src, out, link), process_pair, "image"
    else:
        raise PrepError(f"unknown dataset '{dataset}'; use one of {', '.join(CLASSES)}")
    results = run_tasks(fn, tasks, workers, desc=dataset, unit=unit)
    summary = summarise(results, f"{dataset} in '{out}'", "source images", left_out)
    names = CLASSES[dataset]
    for cls in names:
        print(f"  {cls}: {summary['per_class'].get(cls, 0)} images")
    empty = [c for c in names if not summary["per_class"].get(c)]
    if empty:
        raise PrepError(f"class(es) {', '.join(empty)} received no image from '{src}', so '{out}' was left "
                        f"without {CLASS_LIST}; {HINTS[dataset]}")
    path = os.path.join(out, CLASS_LIST)
    write_class_list(path, names)
    print(f"{path}: {len(names)} class(es) in the benchmark's order")
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(CLASSES), help="which target dataset")
    p.add_argument("--src", required=True, help="the untouched download (see the module doc)")
    p.add_argument("--out", required=True,
                   help="folder to write, e.g. data/cdfss/deepglobe (where config/cdfss/ looks)")
    p.add_argument("--classes", default=os.path.join("lists", "cdfss", "isic_class_id.csv"),
                   help="isic: the image → diagnosis list (default: lists/cdfss/isic_class_id.csv)")
    p.add_argument("--link", action="store_true", help="isic, chest: symlink the images instead of copying them")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    return prepare_cdfss(args.dataset, args.src, args.out, args.classes, args.link, args.workers)


if __name__ == "__main__":
    run(main)
