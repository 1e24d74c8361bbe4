"""Prepare YouTube-VIS 2019 (train split) for the few-shot video task.

    python tools/prepare_ytvis.py --ytvis <folder with train/JPEGImages/ and the train JSON> \
        --out data/ytvis

The annotation file is looked for as ``train/instances.json``, ``train.json`` or
``train/train.json`` under --ytvis (or given with --json). Writes under --out
(dataset/video_index.py defines the layout, docs/video.md describes it):

* ``JPEGImages/<video>/<frame>.jpg`` — every annotated frame (symlinks, or copies with --copy);
* ``Masks/<video>/<class id>/<frame>.png`` — for each class of a video and each frame that
  has it (an instance of the class with a non-null segmentation there) the union of the
  class's instance masks, grayscale 0/1, decoded with pycocotools (uncompressed RLE through
  ``frPyObjects``);
* ``index.json`` — categories, and per video its size, frames and class frames; written
  last, and only when every video was prepared without a problem.

Every frame the file references must exist and have the size the file gives. Re-running
keeps every link and mask already correct. The same tool prepares the synthetic set of
tools/make_synthetic_video.py (its 20 categories give dataset ``synthetic_video``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence


import numpy as np

from tools._prep_common import (MAX_SHOWN, ItemResult, PrepError, image_hw, link_or_copy, require_dir,
                                run_tasks, write_label)
from tools.prepare_coco import instance_mask
from util.classes import class_names
from util.config import VIDEO, datasets_of
from util.fileio import atomic_write_json
from util.cli import run
from dataset.video_index import IMAGE_DIR, INDEX_NAME, MASK_DIR, Video, image_relpath, index_document, mask_relpath

JSON_CANDIDATES = ("train/instances.json", "train.json", "train/train.json")
YTVIS_HINT = ("--ytvis must point at the extracted YouTube-VIS 2019 training data: the folder holding "
              "train/JPEGImages/<video>/<frame>.jpg and the train annotation file (train.json); "
              "see docs/video.md")


def find_annotation_file(ytvis: str, json_path: str = "") -> str:
    if json_path:
        if not os.path.isfile(json_path):
            raise PrepError(f"annotation file '{os.path.abspath(json_path)}' (--json) does not exist; {YTVIS_HINT}")
        return json_path
    for rel in JSON_CANDIDATES:
        path = os.path.join(ytvis, rel)
        if os.path.isfile(path):
            return path
    looked = ", ".join(f"'{os.path.join(ytvis, r)}'" for r in JSON_CANDIDATES)
    raise PrepError(f"no annotation file: none of {looked} exists; {YTVIS_HINT} (or pass --json)")


def load_annotations(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise PrepError(f"'{path}' is not a readable JSON file ({e}); re-download or re-extract it") from None
    if not isinstance(data, dict):
        raise PrepError(f"'{path}' holds a {type(data).__name__}, expected a YouTube-VIS annotation object")
    missing = [k for k in ("videos", "annotations", "categories") if k not in data]
    if missing:
        raise PrepError(f"'{path}' has no {', '.join(missing)}; expected a YouTube-VIS instances file (train.json)")
    return data


def dataset_of(categories: Sequence[dict], path: str) -> tuple[str, list[str]]:
    """Which known dataset the category list is: ids 1..N and the names in id order."""
    try:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        ids, names = [int(c["id"]) for c in cats], [str(c["name"]) for c in cats]
    except (KeyError, TypeError, ValueError) as e:
        raise PrepError(f"'{path}': malformed categories ({type(e).__name__}: {e})") from None
    for dataset in datasets_of(VIDEO):
        expected = list(class_names(dataset))
        if ids == list(range(1, len(expected) + 1)) and names == expected:
            return dataset, names
    expected = list(class_names("ytvis"))
    diff = next((f"id {i}: '{n}' where YouTube-VIS 2019 has '{expected[i - 1]}'" for i, n in zip(ids, names)
                 if i > len(expected) or n != expected[i - 1]), f"{len(ids)} categories instead of 40")
    raise PrepError(f"'{path}': the categories are not YouTube-VIS 2019's ({diff}); this tool prepares the "
                    f"2019 train split (2021/2022 renamed classes) or tools/make_synthetic_video.py's output")


class VideoTask(NamedTuple):
    name: str                          # video folder name
    frames: tuple[str, ...]            # frame stems
    height: int
    width: int
    instances: tuple[tuple[int, int, tuple], ...]   # (annotation id, class id, per-frame segmentations)
    image_dir: str                     # source train/JPEGImages
    out: str
    copy: bool


@dataclass
class VideoResult(ItemResult):
    video: Video | None = None
    frames_placed: int = 0
    masks_written: int = 0
    masks: int = 0
    problems: list[str] = field(default_factory=list)


def _check_frames(task: VideoTask) -> None:
    """Every frame exists and has the size the annotation file gives."""
    missing, wrong = [], []
    for stem in task.frames:
        path = os.path.join(task.image_dir, task.name, stem + ".jpg")
        if not os.path.isfile(path):
            missing.append(path)
        elif image_hw(path) != (task.height, task.width):
            h, w = image_hw(path)
            wrong.append(f"'{path}' is {w}x{h}")
    if missing:
        raise PrepError(f"{task.name}: {len(missing)} of {len(task.frames)} frames named by the annotation file "
                        f"do not exist (first: '{os.path.abspath(missing[0])}'); re-extract train.zip")
    if wrong:
        raise PrepError(f"{task.name}: {wrong[0]} but the annotation file says {task.width}x{task.height} "
                        f"(width x height){f' ({len(wrong)} frames)' if len(wrong) > 1 else ''}")


def class_masks(task: VideoTask) -> dict[int, dict[int, np.ndarray]]:
    """class id -> {frame position: union of the class's instance masks} for the frames that have it."""
    out: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    for ann_id, class_id, segmentations in task.instances:
        for t, seg in enumerate(segmentations):
            if seg is None:
                continue
            try:
                mask, _ = instance_mask(seg, task.height, task.width)
            except PrepError as e:
                raise PrepError(f"{task.name}: annotation {ann_id}, frame {t}: {e}") from None
            except Exception as e:  # noqa: BLE001 - pycocotools raises several types on bad RLE
                raise PrepError(f"{task.name}: annotation {ann_id}, frame {t}: undecodable RLE "
                                f"({type(e).__name__}: {e})") from None
            prev = out[class_id].get(t)
            out[class_id][t] = mask if prev is None else prev | mask
    return out


def process_video(task: VideoTask) -> VideoResult:
    """Check one video's frames, place them and write its class masks."""
    _check_frames(task)
    masks = class_masks(task)
    result = VideoResult(task.name)
    for stem in task.frames:
        src = os.path.join(task.image_dir, task.name, stem + ".jpg")
        result.frames_placed += link_or_copy(src, os.path.join(task.out, image_relpath(task.name, stem)), task.copy)
    class_frames = {}
    for class_id in sorted(masks):
        for t, mask in sorted(masks[class_id].items()):
            path = os.path.join(task.out, mask_relpath(task.name, class_id, task.frames[t]))
            result.masks_written += write_label(path, mask.astype(np.uint8))
            result.masks += 1
        class_frames[class_id] = tuple(sorted(masks[class_id]))
    result.video = Video(task.name, task.height, task.width, task.frames, class_frames)
    return result


def build_tasks(data: dict, path: str, image_dir: str, num_classes: int, out: str, copy: bool) -> list[VideoTask]:
    try:
        return _build_tasks(data, path, image_dir, num_classes, out, copy)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PrepError(f"'{path}': malformed video or annotation entry ({type(e).__name__}: {e}); "
                        f"expected a YouTube-VIS instances file (train.json)") from None


def _build_tasks(data, path, image_dir, num_classes, out, copy):
    videos = {}
    for v in data["videos"]:
        names = [str(f) for f in v["file_names"]]
        parts = [n.split("/") for n in names]
        if not names or any(len(p) != 2 or not p[1].endswith(".jpg") for p in parts) or \
                len({p[0] for p in parts}) != 1:
            raise PrepError(f"'{path}': video {v['id']} has file_names {names[:2]}...; expected "
                            f"'<video>/<frame>.jpg' entries of one video folder")
        if int(v.get("length", len(names))) != len(names):
            raise PrepError(f"'{path}': video {v['id']} has length {v['length']} but {len(names)} file_names")
        videos[v["id"]] = (parts[0][0], tuple(p[1][:-4] for p in parts), int(v["height"]), int(v["width"]))
    instances = defaultdict(list)
    for a in data["annotations"]:
        if a["video_id"] not in videos:
            raise PrepError(f"'{path}': annotation {a['id']} names video {a['video_id']}, which the file does not list")
        if not 1 <= int(a["category_id"]) <= num_classes:
            raise PrepError(f"'{path}': annotation {a['id']} has category {a['category_id']}, outside 1..{num_classes}")
        segs = a["segmentations"]
        n = len(videos[a["video_id"]][1])
        if not isinstance(segs, list) or len(segs) != n:
            raise PrepError(f"'{path}': annotation {a['id']} has {len(segs) if isinstance(segs, list) else 'no'} "
                            f"per-frame segmentations, its video has {n} frames")
        instances[a["video_id"]].append((int(a["id"]), int(a["category_id"]), tuple(segs)))
    names = [v[0] for v in videos.values()]
    if len(set(names)) != len(names):
        raise PrepError(f"'{path}': two videos share a folder name; re-download the annotation file")
    return [VideoTask(name, frames, h, w, tuple(instances[vid]), image_dir, out, copy)
            for vid, (name, frames, h, w) in videos.items()]


def prepare_ytvis(ytvis: str, out: str, json_path: str = "", copy: bool = False, workers: int = 0) -> dict:
    """Prepare the tree under ``out``; return counts (see the module doc)."""
    require_dir(ytvis, YTVIS_HINT)
    image_dir = os.path.join(ytvis, "train", IMAGE_DIR)
    require_dir(image_dir, YTVIS_HINT)
    ann_path = find_annotation_file(ytvis, json_path)
    data = load_annotations(ann_path)
    dataset, categories = dataset_of(data["categories"], ann_path)
    tasks = build_tasks(data, ann_path, image_dir, len(categories), out, copy)
    del data
    print(f"{ann_path}: {len(tasks)} videos, {sum(len(t.frames) for t in tasks)} frames, "
          f"{sum(len(t.instances) for t in tasks)} instances ({dataset})")
    results = run_tasks(process_video, tasks, workers, desc=dataset, unit="video")
    errors = [e for r in results for e in r.errors]
    if len(errors) > 1:
        for e in errors[:MAX_SHOWN]:
            print(f"problem: {e}", file=sys.stderr)
        if len(errors) > MAX_SHOWN:
            print(f"problem: ... and {len(errors) - MAX_SHOWN} more", file=sys.stderr)
    if errors:
        raise PrepError(f"{len(errors)} video(s) could not be prepared, so no index was written; first: {errors[0]} "
                        f"-- fix and re-run (what is already written is kept)")
    videos = [r.video for r in results]
    summary = {
        "dataset": dataset, "videos": len(videos), "frames": sum(len(v.frames) for v in videos),
        "frames_placed": sum(r.frames_placed for r in results),
        "masks": sum(r.masks for r in results), "masks_written": sum(r.masks_written for r in results),
        "videos_without_class": sum(not v.class_frames for v in videos),
    }
    atomic_write_json(os.path.join(out, INDEX_NAME), index_document(dataset, categories, videos, ann_path), indent=None)
    print(f"{out}: {summary['frames']} frames ({summary['frames_placed']} placed, the rest already in place), "
          f"{summary['masks']} class masks ({summary['masks_written']} written, the rest already correct); "
          f"index {os.path.join(out, INDEX_NAME)}")
    if summary["videos_without_class"]:
        print(f"note: {summary['videos_without_class']} video(s) have no annotated instance and serve no class")
    stale = _stale_videos(out, {v.name for v in videos})
    if stale:
        print(f"note: {stale} video folder(s) in {out}/{MASK_DIR} are not in this annotation file "
              f"(left from another run; the index ignores them)")
    return summary


def _stale_videos(out: str, names: set[str]) -> int:
    folder = os.path.join(out, MASK_DIR)
    return sum(1 for d in os.listdir(folder) if d not in names) if os.path.isdir(folder) else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ytvis", required=True, help="folder holding train/JPEGImages/ and the train annotation file")
    p.add_argument("--json", default="", help="the annotation file, if not at one of the usual places")
    p.add_argument("--out", default="data/ytvis", help="data_root to write (default: data/ytvis)")
    p.add_argument("--copy", action="store_true", help="copy the frames instead of symlinking them")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Broken input raises PrepError (a DataError): ``run`` reports it on one line, exit 2."""
    args = parse_args(argv)
    return prepare_ytvis(args.ytvis, args.out, args.json, args.copy, args.workers)


if __name__ == "__main__":
    run(main)
