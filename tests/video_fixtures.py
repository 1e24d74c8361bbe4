"""Shared helpers of the video tests: a hand-written YouTube-VIS folder and a tiny prepared
synthetic tree."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from tools.make_synthetic_video import compressed_rle, uncompressed_rle
from util.classes import YTVIS_CLASSES
from util.config import defaults


def write_ytvis(root, videos, categories=None, json_rel="train/instances.json", raw_json=None, static=False):
    """Write ``videos`` — ``{name: (n_frames, h, w, [(category_id, [mask or None per frame], rle)])}``
    with rle 'u' (uncompressed) or 'c' (compressed) — as a YouTube-VIS folder of random
    frames (``static``: every frame of a video the same); return the JSON path."""
    rng = np.random.default_rng(0)
    doc = {"videos": [], "annotations": [],
           "categories": categories or [{"id": i, "name": n} for i, n in enumerate(YTVIS_CLASSES, 1)]}
    for vid, (name, (n, h, w, instances)) in enumerate(videos.items(), 1):
        files = [f"{name}/{5 * t:05d}.jpg" for t in range(n)]
        still = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for f in files:
            os.makedirs(os.path.join(root, "train", "JPEGImages", name), exist_ok=True)
            frame = still if static else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            cv2.imwrite(os.path.join(root, "train", "JPEGImages", f), frame)
        doc["videos"].append({"id": vid, "height": h, "width": w, "length": n, "file_names": files})
        for cat, masks, kind in instances:
            encode = uncompressed_rle if kind == "u" else compressed_rle
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "video_id": vid, "category_id": cat,
                                       "iscrowd": 0, "segmentations": [None if m is None else encode(m) for m in masks]})
    path = os.path.join(root, json_rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(raw_json if raw_json is not None else json.dumps(doc))
    return path


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture(scope="module")
def synthetic_video_tree(tmp_path_factory):
    """A tiny synthetic set (60 videos, ~24 px high: every class is the main object of 3),
    generated and prepared: (raw folder, data_root)."""
    from tools.make_synthetic_video import main as make
    from tools.prepare_ytvis import prepare_ytvis

    root = str(tmp_path_factory.mktemp("synthetic_video"))
    make(["--out", root, "--videos", "60", "--size", "24", "--frames-min", "2", "--frames-max", "8",
          "--portrait", "0.25", "--workers", "1"])
    prepare_ytvis(root, root, workers=1)
    return root, root


def video_cfg(data_root, **kw):
    cfg = defaults()
    cfg.update(dataset="synthetic_video", data_root=data_root, split=0, shot=2, clip_len=3,
               video_h=17, video_w=29, samples_per_class=4)
    cfg.update(kw)
    return cfg
