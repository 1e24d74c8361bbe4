"""tools/prepare_ytvis.py on a hand-written YouTube-VIS folder and on the synthetic set."""
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.video_fixtures import box, synthetic_video_tree, write_ytvis  # noqa: F401 (fixture)
from tools.prepare_ytvis import main, prepare_ytvis
from util.cli import run
from dataset.video_index import load_video_index

# pycocotools' decode trips numpy 2's __array__ copy deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 6, 8
A0, A1 = box(H, W, 0, 2, 0, 3), box(H, W, 1, 3, 1, 4)
B1, B2 = box(H, W, 2, 5, 2, 6), box(H, W, 4, 6, 5, 8)
C0 = box(H, W, 3, 6, 0, 2)
VIDEOS = {
    # two person (1) instances, one uncompressed and one compressed, overlapping in frame 1; a snake (9)
    "v1": (3, H, W, [(1, [A0, A1, None], "u"), (1, [None, B1, B2], "c"), (9, [C0, None, None], "c")]),
    # a sedan (6) only in its second frame
    "v2": (2, H, W, [(6, [None, C0], "u")]),
    # no instance at all
    "v3": (1, H, W, []),
}


def read(path):
    return cv2.imread(path, cv2.IMREAD_GRAYSCALE)


def test_class_masks_are_instance_unions_and_the_index_lists_class_frames(tmp_path):
    src, out = str(tmp_path / "ytvis"), str(tmp_path / "out")
    write_ytvis(src, VIDEOS)
    summary = prepare_ytvis(src, out, workers=1)
    assert summary == {"dataset": "ytvis", "videos": 3, "frames": 6, "frames_placed": 6, "masks": 5,
                       "masks_written": 5, "videos_without_class": 1}
    assert np.array_equal(read(f"{out}/Masks/v1/1/00000.png"), A0)
    assert np.array_equal(read(f"{out}/Masks/v1/1/00005.png"), A1 | B1)
    assert np.array_equal(read(f"{out}/Masks/v1/1/00010.png"), B2)
    assert np.array_equal(read(f"{out}/Masks/v1/9/00000.png"), C0)
    assert np.array_equal(read(f"{out}/Masks/v2/6/00005.png"), C0)
    assert sorted(os.listdir(f"{out}/Masks/v1/9")) == ["00000.png"]
    assert not os.path.exists(f"{out}/Masks/v3")
    assert os.path.realpath(f"{out}/JPEGImages/v1/00010.jpg") == os.path.realpath(f"{src}/train/JPEGImages/v1/00010.jpg")
    index = load_video_index(out, "ytvis")
    assert [v.name for v in index.videos] == ["v1", "v2", "v3"]
    assert index.videos[0].frames == ("00000", "00005", "00010")
    assert index.videos[0].class_frames == {1: (0, 1, 2), 9: (0,)}
    assert index.videos[1].class_frames == {6: (1,)} and index.videos[2].class_frames == {}
    assert index.videos_of[1] == [0] and index.videos_of[6] == [1] and index.videos_of[2] == []
    assert index.frames_of(1) == 3 and index.categories[5] == "sedan"


def test_rerun_keeps_what_is_right_and_repairs_what_is_not(tmp_path):
    src, out = str(tmp_path / "ytvis"), str(tmp_path / "out")
    write_ytvis(src, VIDEOS)
    prepare_ytvis(src, out, workers=1)
    first = open(f"{out}/index.json").read()
    again = prepare_ytvis(src, out, workers=2)
    assert again["frames_placed"] == 0 and again["masks_written"] == 0
    assert open(f"{out}/index.json").read() == first
    cv2.imwrite(f"{out}/Masks/v1/1/00005.png", np.zeros((H, W), np.uint8))
    assert prepare_ytvis(src, out, workers=1)["masks_written"] == 1
    assert np.array_equal(read(f"{out}/Masks/v1/1/00005.png"), A1 | B1)
    assert not [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp") or ".tmp." in f]


def fails(capsys, argv, *fragments):
    """The CLI exits 2 with one line naming what is wrong."""
    with pytest.raises(SystemExit) as e:
        run(main, argv, prog="prepare_ytvis.py")
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not line.startswith("ytvis:")]     # the progress bar
    assert len(err) == 1 and err[0].startswith("prepare_ytvis.py: error: ")
    for fragment in fragments:
        assert fragment in err[0]
    return err[0]


def test_missing_or_malformed_json_is_one_line_and_exit_2(tmp_path, capsys):
    src, out = tmp_path / "ytvis", str(tmp_path / "out")
    (src / "train" / "JPEGImages").mkdir(parents=True)
    fails(capsys, ["--ytvis", str(src), "--out", out], "train/instances.json", "train.json", "--json")
    fails(capsys, ["--ytvis", str(src), "--out", out, "--json", str(src / "nope.json")], "nope.json", "does not exist")
    write_ytvis(str(src), {}, raw_json="{not json")
    fails(capsys, ["--ytvis", str(src), "--out", out], "instances.json' is not a readable JSON file")
    write_ytvis(str(src), {}, raw_json='{"videos": []}')
    fails(capsys, ["--ytvis", str(src), "--out", out], "has no annotations, categories")
    fails(capsys, ["--ytvis", str(tmp_path / "elsewhere"), "--out", out], "elsewhere' does not exist")
    assert not os.path.exists(os.path.join(out, "index.json"))


def test_missing_frame_names_the_file_and_writes_no_index(tmp_path, capsys):
    src, out = tmp_path / "ytvis", str(tmp_path / "out")
    write_ytvis(str(src), VIDEOS)
    os.remove(src / "train" / "JPEGImages" / "v1" / "00005.jpg")
    fails(capsys, ["--ytvis", str(src), "--out", out, "--workers", "1"],
          "1 video(s) could not be prepared", "v1/00005.jpg", "do not exist", "re-extract")
    assert not os.path.exists(os.path.join(out, "index.json"))


def test_bad_entries_name_the_annotation_and_the_fix(tmp_path, capsys):
    src, out = tmp_path / "ytvis", str(tmp_path / "out")
    cats = [{"id": i, "name": n} for i, n in enumerate(["person", "giant_panda", "lizard", "parrot", "skateboard",
                                                        "car"], 1)]
    write_ytvis(str(src), VIDEOS, categories=cats)
    fails(capsys, ["--ytvis", str(src), "--out", out], "not YouTube-VIS 2019's",
          "id 6: 'car' where YouTube-VIS 2019 has 'sedan'")
    bad = dict(VIDEOS, v2=(2, H, W, [(6, [C0], "u")]))
    write_ytvis(str(src), bad)
    fails(capsys, ["--ytvis", str(src), "--out", out], "annotation 4 has 1 per-frame segmentations, its video has 2")
    write_ytvis(str(src), VIDEOS)
    cv2.imwrite(str(src / "train" / "JPEGImages" / "v2" / "00000.jpg"), np.zeros((7, 8, 3), np.uint8))
    fails(capsys, ["--ytvis", str(src), "--out", out, "--workers", "1"], "v2/00000.jpg' is 8x7",
          "annotation file says 8x6")


def test_synthetic_set_prepares_and_masks_match_the_rle(synthetic_video_tree):  # noqa: F811
    raw, root = synthetic_video_tree
    doc = json.load(open(os.path.join(raw, "train", "instances.json")))
    kinds = {type(s["counts"]).__name__ for a in doc["annotations"] for s in a["segmentations"] if s}
    assert kinds == {"list", "str"}                  # both RLE forms
    index = load_video_index(root, "synthetic_video")
    by_name = {v.name: i for i, v in enumerate(index.videos)}
    checked = 0
    for video in doc["videos"]:
        name = video["file_names"][0].split("/")[0]
        v = by_name[name]
        union = {}
        for a in (a for a in doc["annotations"] if a["video_id"] == video["id"]):
            for t, s in enumerate(a["segmentations"]):
                if s is None:
                    continue
                rle = mask_utils.frPyObjects(s, video["height"], video["width"]) if isinstance(s["counts"], list) else s
                m = mask_utils.decode(rle)
                key = (a["category_id"], t)
                union[key] = m if key not in union else union[key] | m
        assert {(c, t) for c, frames in index.videos[v].class_frames.items() for t in frames} == set(union)
        for (c, t), m in union.items():
            assert np.array_equal(index.read_mask(v, c, t), m)
            checked += 1
    assert checked > 100
