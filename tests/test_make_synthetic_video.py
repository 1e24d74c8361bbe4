"""tools/make_synthetic_video.py: seeded, worker-independent, YouTube-VIS-shaped, with motion."""
import hashlib
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tools.make_synthetic_video import compressed_rle, main, uncompressed_rle
from util.classes import SYNTHETIC_VIDEO_CLASSES

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def digest(root):
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def make(root, *extra):
    return main(["--out", str(root), "--videos", "10", "--size", "20", "--frames-min", "2", "--frames-max", "6",
                 *extra])


def test_same_bytes_whatever_the_workers_and_seed_matters(tmp_path):
    make(tmp_path / "a", "--workers", "1")
    make(tmp_path / "b", "--workers", "2")
    make(tmp_path / "c", "--workers", "1", "--seed", "1")
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b
    assert len(a) == 1 + sum(len(v["file_names"]) for v in json.load(open(tmp_path / "a/train/instances.json"))["videos"])
    assert a["train/instances.json"] != c["train/instances.json"]


def test_youtube_vis_format_and_motion(tmp_path):
    doc = main(["--out", str(tmp_path), "--videos", "40", "--size", "24", "--portrait", "0.3", "--workers", "1"])
    assert [c["name"] for c in doc["categories"]] == list(SYNTHETIC_VIDEO_CLASSES)
    assert [c["id"] for c in doc["categories"]] == list(range(1, 21))
    assert [v["id"] for v in doc["videos"]] == list(range(1, 41))
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
    videos = {v["id"]: v for v in doc["videos"]}
    assert any(v["height"] > v["width"] for v in videos.values()) and any(v["height"] < v["width"] for v in videos.values())
    # every block of 20 videos has each class as the main object: all 20 classes appear
    assert {a["category_id"] for a in doc["annotations"]} == set(range(1, 21))
    nulls = moved = 0
    for a in doc["annotations"]:
        v = videos[a["video_id"]]
        assert len(a["segmentations"]) == v["length"] == len(v["file_names"])
        assert os.path.isfile(tmp_path / "train" / "JPEGImages" / v["file_names"][0])
        nulls += sum(s is None for s in a["segmentations"])
        boxes = [b for b in a["bboxes"] if b is not None]
        moved += len({tuple(b) for b in boxes}) > 1
        for s, area in zip(a["segmentations"], a["areas"]):
            if s is not None:
                rle = mask_utils.frPyObjects(s, v["height"], v["width"]) if isinstance(s["counts"], list) else s
                assert int(mask_utils.decode(rle).sum()) == area > 0
    assert nulls > 0                                    # objects enter late or leave the frame
    assert moved > len(doc["annotations"]) // 2         # and move


def test_rle_helpers_round_trip():
    m = np.zeros((5, 7), np.uint8)
    m[1:4, 2:6] = 1
    m[0, 0] = 1
    for enc in (uncompressed_rle, compressed_rle):
        s = enc(m)
        rle = mask_utils.frPyObjects(s, 5, 7) if isinstance(s["counts"], list) else s
        assert np.array_equal(mask_utils.decode(rle), m)
    # column-major: one 1 at (0, 0), ten 0s (4 + column 1 + the top of column 2), three 1s, ...
    assert uncompressed_rle(m)["counts"][:4] == [0, 1, 10, 3]
