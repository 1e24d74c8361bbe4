"""Build COCO-20i data (COCO 2014) from the untouched official folders.

    python tools/prepare_coco.py --coco <root with train2014/, val2014/, annotations/> \
        --out data/coco

writes ``<out>/JPEGImages/<file_name>`` (symlinks, or copies with --copy),
``<out>/SegmentationClassAug/<stem>.png`` and the lists ``train.txt`` (train2014) and
``val.txt`` (val2014) in ``--lists`` (lists/coco). Images without any annotation are
skipped and counted.

Labels (grayscale PNG): 0 background, 1..80 the categories in ascending COCO category id,
255 crowd. Every polygon and RLE of every instance is rasterised with pycocotools; crowd
regions are painted 255 first (``--crowd background``: not painted, so 0), then the
non-crowd instances from the largest (pixel count of the decoded mask) to the smallest,
ties by ascending annotation id, so small instances stay visible and a crowd region never
hides an instance. Re-running skips every JPEG already in place and every label PNG that
already decodes to exactly the array this tool would write. See docs/data.md.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import NamedTuple, Sequence


import numpy as np
from pycocotools import mask as mask_utils

from tools._prep_common import (IMAGE_DIR, IGNORE, LABEL_DIR, ItemResult, PrepError, add_output_args,
                                image_hw, link_or_copy, require_dir, require_file, run_tasks, summarise,
                                write_label, write_list)
from util.cli import run

COCO_HINT = ("--coco must point at the folder holding train2014/, val2014/ and annotations/ "
             "(extracted from train2014.zip, val2014.zip and annotations_trainval2014.zip)")
SPLITS = (("train", "train2014"), ("val", "val2014"))   # (list name, image folder)
CROWD_MODES = ("ignore", "background")
NO_PIXEL = "annotations that paint no pixel"
SHORT_POLYGON = "polygons with fewer than 3 points dropped"


def category_map(categories: Sequence[dict]) -> dict[int, int]:
    """COCO category id -> contiguous label id 1..N, in ascending category id."""
    ids = sorted(int(c["id"]) for c in categories)
    if len(set(ids)) != len(ids):
        raise PrepError(f"the annotation file lists a category id twice: {ids}")
    if not ids or len(ids) >= IGNORE:
        raise PrepError(f"{len(ids)} categories cannot be stored as label ids 1..254")
    return {cid: i + 1 for i, cid in enumerate(ids)}


def instance_mask(segmentation, height: int, width: int) -> tuple[np.ndarray, int]:
    """(HxW bool mask of every part of one instance, number of degenerate polygons dropped)."""
    if isinstance(segmentation, list):
        polygons = []
        for poly in segmentation:
            if not isinstance(poly, list) or len(poly) % 2:
                raise PrepError(f"a polygon must be a flat list of x, y pairs, got {str(poly)[:80]}")
            polygons.append([float(v) for v in poly])
        # pycocotools reads a 4-number list as a box, and fewer than 3 points have no area
        kept = [p for p in polygons if len(p) >= 6]
        if not kept:
            return np.zeros((height, width), bool), len(polygons)
        rle = mask_utils.merge(mask_utils.frPyObjects(kept, height, width))
        return mask_utils.decode(rle).astype(bool), len(polygons) - len(kept)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise PrepError(f"RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(counts, list) else segmentation
        return mask_utils.decode(rle).astype(bool), 0
    raise PrepError(f"segmentation is neither polygons nor RLE: {str(segmentation)[:80]}")


class Instance(NamedTuple):
    ann_id: int
    class_id: int        # contiguous 1..N
    iscrowd: bool
    segmentation: object


def build_label(instances: Sequence[Instance], height: int, width: int,
                crowd: str = "ignore") -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The uint8 label of one image and its (kind, detail) warnings; see the module doc."""
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd must be one of {CROWD_MODES}, got {crowd!r}")
    label = np.zeros((height, width), np.uint8)
    warnings = []
    painted = []
    for inst in instances:
        try:
            mask, dropped = instance_mask(inst.segmentation, height, width)
        except PrepError as e:
            raise PrepError(f"annotation {inst.ann_id}: {e}") from None
        warnings += [(SHORT_POLYGON, f"annotation {inst.ann_id}")] * dropped
        if not mask.any():
            warnings.append((NO_PIXEL, f"annotation {inst.ann_id}"))
        elif inst.iscrowd:
            if crowd == "ignore":
                label[mask] = IGNORE
        else:
            painted.append((-int(mask.sum()), inst.ann_id, inst.class_id, mask))
    for _, _, class_id, mask in sorted(painted, key=lambda p: p[:2]):
        label[mask] = class_id
    return label, warnings


class CocoTask(NamedTuple):
    name: str            # file stem, e.g. COCO_train2014_000000000009
    image: str           # source JPEG
    height: int
    width: int
    instances: tuple[Instance, ...]
    out: str
    copy: bool
    crowd: str


def process_image(task: CocoTask) -> ItemResult:
    """Check one image, place its JPEG and write its label."""
    if not os.path.isfile(task.image):
        raise PrepError(f"{task.name}: image '{os.path.abspath(task.image)}' named by the annotation file does not exist; "
                        f"re-extract the image archive")
    height, width = image_hw(task.image)
    if (height, width) != (task.height, task.width):
        raise PrepError(f"{task.name}: image '{task.image}' is {width}x{height} but the annotation file "
                        f"says {task.width}x{task.height} (width x height)")
    try:
        label, warnings = build_label(task.instances, task.height, task.width, task.crowd)
    except PrepError as e:
        raise PrepError(f"{task.name}: {e}") from None
    result = ItemResult(task.name, warnings=[(kind, f"{task.name} {detail}") for kind, detail in warnings])
    result.image_written = link_or_copy(task.image, os.path.join(task.out, IMAGE_DIR, task.name + ".jpg"),
                                        task.copy)
    result.label_written = write_label(os.path.join(task.out, LABEL_DIR, task.name + ".png"), label)
    return result


def load_annotations(path: str) -> dict:
    require_file(path, COCO_HINT)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise PrepError(f"'{path}' is not a readable JSON file ({e}); re-extract "
                        f"annotations_trainval2014.zip") from e
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise PrepError(f"'{path}' has no {', '.join(missing)}; expected a COCO instances_*.json file")
    return data


def split_tasks(data: dict, ann_path: str, image_dir: str, cat_map: dict[int, int], out: str,
                copy: bool, crowd: str) -> tuple[list[CocoTask], int]:
    """One task per annotated image of one annotation file, and the number of images skipped."""
    try:
        return _split_tasks(data, ann_path, image_dir, cat_map, out, copy, crowd)
    except (KeyError, TypeError, ValueError) as e:
        raise PrepError(f"'{ann_path}': malformed image or annotation entry ({type(e).__name__}: {e}); "
                        f"expected a COCO instances_*.json file") from e


def _split_tasks(data, ann_path, image_dir, cat_map, out, copy, crowd):
    by_image = defaultdict(list)
    known = {img["id"] for img in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in known:
            raise PrepError(f"'{ann_path}': annotation {ann['id']} names image {ann['image_id']}, "
                            f"which the file does not list")
        if ann["category_id"] not in cat_map:
            raise PrepError(f"'{ann_path}': annotation {ann['id']} has category {ann['category_id']}, "
                            f"which is not among the file's categories")
        by_image[ann["image_id"]].append(Instance(int(ann["id"]), cat_map[ann["category_id"]],
                                                  bool(ann.get("iscrowd", 0)), ann["segmentation"]))
    tasks = []
    for img in data["images"]:
        stem, ext = os.path.splitext(img["file_name"])
        if ext.lower() != ".jpg" or "/" in stem or "\\" in stem:
            raise PrepError(f"'{ann_path}': image file_name {img['file_name']!r} is not a plain <name>.jpg")
        if img["id"] in by_image:
            tasks.append(CocoTask(stem, os.path.join(image_dir, img["file_name"]), int(img["height"]),
                                  int(img["width"]), tuple(by_image[img["id"]]), out, copy, crowd))
    return tasks, len(data["images"]) - len(tasks)


def prepare_coco(coco: str, out: str, lists_dir: str = "lists/coco", crowd: str = "ignore",
                 copy: bool = False, workers: int = 0) -> dict:
    """Write images, labels and the two lists; return the counts (see the module doc)."""
    if crowd not in CROWD_MODES:
        raise PrepError(f"--crowd must be one of {CROWD_MODES}, got {crowd!r}")
    require_dir(coco, COCO_HINT)
    for _, folder in SPLITS:
        require_dir(os.path.join(coco, folder), COCO_HINT)
    require_dir(os.path.join(coco, "annotations"), COCO_HINT)

    tasks, names, first = [], {}, None   # first: (annotation file, its category map)
    summary = {"skipped": {}, "lists": {}}
    for key, folder in SPLITS:
        ann_path = os.path.join(coco, "annotations", f"instances_{folder}.json")
        data = load_annotations(ann_path)
        cat_map = category_map(data["categories"])
        if first is None:
            first = (ann_path, cat_map)
        elif cat_map != first[1]:
            raise PrepError(f"'{ann_path}' lists other categories than '{first[0]}'; the label ids "
                            f"would differ between the splits")
        split, skipped = split_tasks(data, ann_path, os.path.join(coco, folder), cat_map, out, copy, crowd)
        del data   # the train file is large; only the tasks are needed from here on
        names[key] = [t.name for t in split]
        summary["skipped"][key] = skipped
        print(f"{folder}: {len(split) + skipped} images in the annotation file, {skipped} without "
              f"annotation skipped")
        tasks += split
    if len(cat_map) != 80:
        print(f"note: {len(cat_map)} categories (COCO has 80), mapped to 1..{len(cat_map)}")
    if len({t.name for t in tasks}) != len(tasks):
        raise PrepError("an image file name appears twice in the annotation files; re-extract annotations_trainval2014.zip")

    results = run_tasks(process_image, tasks, workers, desc="coco")
    summary.update(summarise(results, f"COCO labels in '{out}'"))
    for key, _ in SPLITS:
        path = os.path.join(lists_dir, key + ".txt")
        summary["lists"][key] = write_list(path, names[key])
        print(f"{path}: {summary['lists'][key]} images")
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", required=True, help="folder holding train2014/, val2014/, annotations/")
    p.add_argument("--crowd", choices=CROWD_MODES, default="ignore",
                   help="crowd regions: 255 where no instance is painted (ignore, default) or 0 (background)")
    add_output_args(p, "coco")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_coco(args.coco, args.out, args.lists, args.crowd, args.copy, args.workers)
    return 0


if __name__ == "__main__":
    run(main)
