"""The prepared video tree (tools/prepare_ytvis.py) and its index, as the loaders see it.

A prepared ``data_root`` (docs/video.md) holds

* ``JPEGImages/<video>/<frame>.jpg`` — the frames (links to the source, or copies);
* ``Masks/<video>/<class id>/<frame>.png`` — per video, per class, per frame the class mask
  (the union of the class's instances), a grayscale PNG of 0 (not the class) and 1 (the
  class), written for every frame that *has* the class (an instance of it is annotated
  there) and only for those;
* ``index.json`` — the category list and, per video, its size, its frames in order and
  for each class the positions of the frames that have it.

This module is the single definition of that layout: the preparation tool writes with it
and the datasets read with it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from util.classes import class_names
from dataset.image import read_image, read_label
from util.errors import DataError

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
IMAGE_DIR = "JPEGImages"
MASK_DIR = "Masks"
PREPARE_COMMAND = {
    "ytvis": "python tools/prepare_ytvis.py --ytvis <folder with train/JPEGImages and train.json> --out data/ytvis",
    "synthetic_video": ("python tools/make_synthetic_video.py --out data/synthetic_video && "
                        "python tools/prepare_ytvis.py --ytvis data/synthetic_video --out data/synthetic_video"),
}


def image_relpath(video: str, frame: str) -> str:
    return f"{IMAGE_DIR}/{video}/{frame}.jpg"


def mask_relpath(video: str, class_id: int, frame: str) -> str:
    return f"{MASK_DIR}/{video}/{class_id}/{frame}.png"


@dataclass(frozen=True)
class Video:
    name: str
    height: int
    width: int
    frames: tuple[str, ...]                      # frame names (file stems), in time order
    class_frames: dict[int, tuple[int, ...]]     # class id -> ascending positions into frames


class VideoIndex:
    """The videos of a prepared tree; ``videos_of[c]`` lists (ascending) the positions in
    ``videos`` of the videos that have class ``c`` in at least one frame."""

    def __init__(self, root: str, dataset: str, categories: list[str], videos: list[Video]):
        self.root, self.dataset, self.categories, self.videos = root, dataset, categories, videos
        self.videos_of: dict[int, list[int]] = {c: [] for c in range(1, len(categories) + 1)}
        for v, video in enumerate(videos):
            for c in video.class_frames:
                self.videos_of[c].append(v)

    def frames_of(self, class_id: int) -> int:
        """Number of frames that have ``class_id``, over all videos."""
        return sum(len(self.videos[v].class_frames[class_id]) for v in self.videos_of[class_id])

    def image_path(self, video: int, frame: int) -> str:
        v = self.videos[video]
        return os.path.join(self.root, image_relpath(v.name, v.frames[frame]))

    def mask_path(self, video: int, class_id: int, frame: int) -> str:
        v = self.videos[video]
        return os.path.join(self.root, mask_relpath(v.name, class_id, v.frames[frame]))

    def read_frame(self, video: int, frame: int) -> np.ndarray:
        """RGB float32 H×W×3 on the 0–255 scale."""
        return read_image(self.image_path(video, frame))

    def read_mask(self, video: int, class_id: int, frame: int) -> np.ndarray:
        """The 0/1 uint8 mask of ``class_id`` in a frame that has it."""
        return read_label(self.mask_path(video, class_id, frame))


def index_document(dataset: str, categories: list[str], videos: list[Video], source: str) -> dict:
    """The JSON document of ``index.json`` (written by tools/prepare_ytvis.py)."""
    return {
        "format": INDEX_FORMAT, "dataset": dataset, "source": source,
        "categories": [{"id": i, "name": n} for i, n in enumerate(categories, 1)],
        "videos": [{"name": v.name, "height": v.height, "width": v.width, "frames": list(v.frames),
                    "classes": {str(c): list(f) for c, f in sorted(v.class_frames.items())}}
                   for v in videos],
    }


def load_video_index(root: str, dataset: str) -> VideoIndex:
    """Read ``<root>/index.json`` and check it serves ``dataset`` (its class names)."""
    path = os.path.join(root, INDEX_NAME)
    fix = PREPARE_COMMAND.get(dataset, PREPARE_COMMAND["ytvis"])
    if not os.path.isfile(path):
        raise DataError(f"'{os.path.abspath(path)}' does not exist (data_root '{root}' is not a prepared video tree); "
                             f"build it with: {fix}")
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != INDEX_FORMAT:
            raise DataError(f"'{path}' has index format {doc.get('format')!r}, this code reads "
                                 f"{INDEX_FORMAT}; re-run: {fix}")
        categories = [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])]
        videos = [Video(v["name"], int(v["height"]), int(v["width"]), tuple(v["frames"]),
                        {int(c): tuple(f) for c, f in v["classes"].items()}) for v in doc["videos"]]
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"'{path}' is not a readable video index ({type(e).__name__}: {e}); "
                             f"re-run: {fix}") from None
    expected = list(class_names(dataset))
    if categories != expected:
        raise DataError(f"'{path}' was prepared for dataset '{doc.get('dataset')}' ({len(categories)} "
                             f"categories), but the config says dataset '{dataset}' ({len(expected)}); "
                             f"set the config's dataset to match or point data_root at the right tree")
    return VideoIndex(root, dataset, categories, videos)
