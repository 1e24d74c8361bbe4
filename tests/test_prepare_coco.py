"""tools/prepare_coco.py on a tiny fake COCO 2014 folder (polygons, RLE, crowd)."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tools._prep_common import PrepError
from tools.prepare_coco import Instance, build_label, category_map, instance_mask, main, prepare_coco

# pycocotools' decode trips numpy 2's __array__ copy deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 16, 20
# listed out of order on purpose: ids 1, 3, 18, 90 -> labels 1, 2, 3, 4
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
              {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]
PERSON, CAR, DOG, TOOTHBRUSH = 1, 2, 3, 4


def rect(x0, y0, x1, y1):
    """Polygon of the box covering rows y0..y1-1 and columns x0..x1-1 under pycocotools."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"counts": np.diff(np.concatenate([[0], change])).tolist(), "size": [H, W]}


def compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [H, W]}


def ann(ann_id, image_id, category_id, segmentation, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": segmentation, "iscrowd": iscrowd, "area": 0.0, "bbox": [0, 0, 1, 1]}


TRAIN_IMAGES = {9: "COCO_train2014_000000000009", 25: "COCO_train2014_000000000025",
                30: "COCO_train2014_000000000030", 31: "COCO_train2014_000000000031"}
VAL_IMAGES = {42: "COCO_val2014_000000000042", 73: "COCO_val2014_000000000073"}
TRAIN_ANNS = [
    # image 9: a small instance with the lowest id must still be painted over the big one
    ann(100, 9, 90, [rect(4, 4, 8, 8)]),                                  # 16 px
    ann(101, 9, 3, [rect(0, 0, 16, 12)]),                                 # 192 px
    ann(103, 9, 1, [rect(12, 10, 20, 16), rect(0, 14, 2, 16)]),           # two parts, 52 px
    ann(104, 9, 18, uncompressed_rle(box(0, 16, 16, 20)), iscrowd=1),     # crowd strip over 103
    # image 25: equal areas (ties by id: 202 over 201), a compressed RLE, degenerate parts
    ann(202, 25, 1, [rect(4, 2, 10, 6)]),
    ann(201, 25, 3, [rect(2, 2, 8, 6)]),
    ann(203, 25, 18, compressed_rle(box(10, 14, 10, 18))),
    ann(204, 25, 90, [[1, 1, 5, 5], rect(15, 0, 17, 2)]),                 # 4 numbers: dropped, not a box
    ann(205, 25, 90, []),                                                 # paints nothing
    # image 31: crowd only
    ann(310, 31, 1, uncompressed_rle(box(5, 9, 5, 9)), iscrowd=1),
]
VAL_ANNS = [ann(420, 42, 90, [rect(1, 1, 19, 15)])]


def expected_train(crowd="ignore"):
    crowd_value = 255 if crowd == "ignore" else 0
    lab9 = np.zeros((H, W), np.uint8)
    lab9[box(0, 16, 16, 20)] = crowd_value
    lab9[box(0, 12, 0, 16)] = CAR
    lab9[box(10, 16, 12, 20)] = PERSON
    lab9[box(14, 16, 0, 2)] = PERSON
    lab9[box(4, 8, 4, 8)] = TOOTHBRUSH
    lab25 = np.zeros((H, W), np.uint8)
    lab25[box(2, 6, 2, 8)] = CAR
    lab25[box(2, 6, 4, 10)] = PERSON
    lab25[box(10, 14, 10, 18)] = DOG
    lab25[box(0, 2, 15, 17)] = TOOTHBRUSH
    lab31 = np.zeros((H, W), np.uint8)
    lab31[box(5, 9, 5, 9)] = crowd_value
    return {TRAIN_IMAGES[9]: lab9, TRAIN_IMAGES[25]: lab25, TRAIN_IMAGES[31]: lab31}


def expected_val():
    lab = np.zeros((H, W), np.uint8)
    lab[box(1, 15, 1, 19)] = TOOTHBRUSH
    return {VAL_IMAGES[42]: lab}


def save_jpg(path, h=H, w=W):
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def write_json(path, images, anns, categories=CATEGORIES):
    data = {"images": [{"id": i, "file_name": n + ".jpg", "height": H, "width": W} for i, n in images.items()],
            "annotations": anns, "categories": categories}
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    for folder, images, anns in (("train2014", TRAIN_IMAGES, TRAIN_ANNS), ("val2014", VAL_IMAGES, VAL_ANNS)):
        (root / folder).mkdir(parents=True)
        for name in images.values():
            save_jpg(root / folder / f"{name}.jpg")
        (root / "annotations").mkdir(exist_ok=True)
        write_json(root / "annotations" / f"instances_{folder}.json", images, anns)
    return str(root)


def read_png(path):
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def expected_list(names):
    return "".join(f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png\n" for n in sorted(names))


def test_category_map_is_ascending_id_order():
    assert category_map(CATEGORIES) == {1: 1, 3: 2, 18: 3, 90: 4}
    with pytest.raises(PrepError, match="lists a category id twice"):
        category_map(CATEGORIES + [{"id": 3, "name": "car again"}])


def test_instance_mask_formats():
    mask, dropped = instance_mask([rect(1, 2, 8, 7)], H, W)
    assert np.array_equal(mask, box(2, 7, 1, 8)) and dropped == 0
    mask, dropped = instance_mask([[1, 1, 5, 5], [2, 2, 3, 3]], H, W)   # a box and a 2-point line
    assert not mask.any() and dropped == 2
    strip = box(0, 16, 16, 20)
    assert np.array_equal(instance_mask(uncompressed_rle(strip), H, W)[0], strip)
    assert np.array_equal(instance_mask(compressed_rle(strip), H, W)[0], strip)
    with pytest.raises(PrepError, match=r"RLE size \[16, 21\] differs from the image's \[16, 20\]"):
        instance_mask({"counts": [0, 336], "size": [16, 21]}, H, W)
    with pytest.raises(PrepError, match="flat list of x, y pairs"):
        instance_mask([[1, 1, 5, 5, 3]], H, W)
    with pytest.raises(PrepError, match="neither polygons nor RLE"):
        instance_mask({"points": []}, H, W)


def test_build_label_order_and_crowd_modes():
    big = Instance(2, CAR, False, [rect(0, 0, 16, 12)])
    small = Instance(1, TOOTHBRUSH, False, [rect(4, 4, 8, 8)])
    crowd = Instance(3, DOG, True, uncompressed_rle(box(0, 8, 0, 20)))
    label, warnings = build_label([small, crowd, big], H, W)
    want = np.zeros((H, W), np.uint8)
    want[box(0, 8, 16, 20)] = 255          # crowd only where no instance is painted
    want[box(0, 12, 0, 16)] = CAR
    want[box(4, 8, 4, 8)] = TOOTHBRUSH
    assert np.array_equal(label, want) and warnings == []
    label, _ = build_label([small, crowd, big], H, W, crowd="background")
    want[want == 255] = 0
    assert np.array_equal(label, want)


def test_end_to_end_labels_and_lists(coco, tmp_path, capsys):
    out, lists = tmp_path / "data" / "coco", tmp_path / "lists" / "coco"
    assert main(["--coco", coco, "--out", str(out), "--lists", str(lists), "--workers", "1"]) == 0
    expected = {**expected_train(), **expected_val()}
    assert sorted(os.listdir(out / "SegmentationClassAug")) == sorted(n + ".png" for n in expected)
    for name, want in expected.items():
        assert np.array_equal(read_png(out / "SegmentationClassAug" / f"{name}.png"), want), name
        folder = "train2014" if "train" in name else "val2014"
        assert os.readlink(out / "JPEGImages" / f"{name}.jpg") == os.path.join(coco, folder, name + ".jpg")
    assert (lists / "train.txt").read_text() == expected_list(expected_train())
    assert (lists / "val.txt").read_text() == expected_list(expected_val())
    printed = capsys.readouterr().out
    assert "train2014: 4 images in the annotation file, 1 without annotation skipped" in printed
    assert "val2014: 2 images in the annotation file, 1 without annotation skipped" in printed
    assert "note: 4 categories (COCO has 80), mapped to 1..4" in printed
    assert "4 images; labels written 4, already correct 0; images placed 4, already in place 0" in printed
    assert f"warning: 1 x annotations that paint no pixel (first: {TRAIN_IMAGES[25]} annotation 205)" in printed
    assert f"warning: 1 x polygons with fewer than 3 points dropped (first: {TRAIN_IMAGES[25]} annotation 204)" \
        in printed
    assert f"{lists / 'train.txt'}: 3 images" in printed


def test_parallel_equals_serial_rerun_and_crowd_switch(coco, tmp_path):
    serial = prepare_coco(coco, str(tmp_path / "s"), str(tmp_path / "ls"), workers=1)
    parallel = prepare_coco(coco, str(tmp_path / "p"), str(tmp_path / "lp"), workers=2)
    assert serial == parallel == {
        "skipped": {"train": 1, "val": 1}, "lists": {"train": 3, "val": 1}, "images": 4,
        "labels_written": 4, "images_written": 4,
        "warnings": {"annotations that paint no pixel": 1, "polygons with fewer than 3 points dropped": 1}}
    for name in [*expected_train(), *expected_val()]:
        assert (tmp_path / "s" / "SegmentationClassAug" / f"{name}.png").read_bytes() == \
            (tmp_path / "p" / "SegmentationClassAug" / f"{name}.png").read_bytes()
    for key in ("train", "val"):
        assert (tmp_path / "ls" / f"{key}.txt").read_text() == (tmp_path / "lp" / f"{key}.txt").read_text()

    again = prepare_coco(coco, str(tmp_path / "p"), str(tmp_path / "lp"), workers=2)
    assert (again["labels_written"], again["images_written"]) == (0, 0)
    # switching the crowd mode rewrites exactly the two images that have a crowd region
    switched = prepare_coco(coco, str(tmp_path / "p"), str(tmp_path / "lp"), crowd="background", workers=1)
    assert (switched["labels_written"], switched["images_written"]) == (2, 0)
    for name, want in expected_train("background").items():
        assert np.array_equal(read_png(tmp_path / "p" / "SegmentationClassAug" / f"{name}.png"), want), name


def test_copy_makes_regular_files(coco, tmp_path):
    main(["--coco", coco, "--out", str(tmp_path / "out"), "--lists", str(tmp_path / "l"),
          "--workers", "1", "--copy", "--crowd", "background"])
    jpg = tmp_path / "out" / "JPEGImages" / f"{VAL_IMAGES[42]}.jpg"
    assert not os.path.islink(jpg)
    assert jpg.read_bytes() == open(os.path.join(coco, "val2014", VAL_IMAGES[42] + ".jpg"), "rb").read()
    lab31 = read_png(tmp_path / "out" / "SegmentationClassAug" / f"{TRAIN_IMAGES[31]}.png")
    assert not lab31.any()


def test_missing_folder_names_the_fix(coco, tmp_path):
    os.rename(os.path.join(coco, "annotations"), os.path.join(coco, "ann"))
    with pytest.raises(PrepError, match=r"annotations' does not exist; --coco must point at the folder holding"):
        main(["--coco", coco, "--out", str(tmp_path / "out")])
    os.rename(os.path.join(coco, "ann"), os.path.join(coco, "annotations"))
    os.remove(os.path.join(coco, "annotations", "instances_val2014.json"))
    with pytest.raises(PrepError, match=r"instances_val2014.json' does not exist"):
        prepare_coco(coco, str(tmp_path / "out"), str(tmp_path / "lists"))


@pytest.mark.parametrize("breakage, message", [
    ("no_jpg", r"COCO_train2014_000000000025: image '.*' named by the annotation file does not exist"),
    ("size", r"COCO_val2014_000000000042: image '.*' is 20x15 but the annotation file says 20x16"),
    ("odd_polygon", r"COCO_train2014_000000000009: annotation 100: a polygon must be a flat list"),
])
def test_broken_image_is_an_error_and_no_list_is_written(coco, tmp_path, breakage, message):
    if breakage == "no_jpg":
        os.remove(os.path.join(coco, "train2014", TRAIN_IMAGES[25] + ".jpg"))
    elif breakage == "size":
        save_jpg(os.path.join(coco, "val2014", VAL_IMAGES[42] + ".jpg"), h=H - 1)
    else:
        anns = [dict(a, segmentation=[[4, 4, 8, 4, 8]]) if a["id"] == 100 else a for a in TRAIN_ANNS]
        write_json(os.path.join(coco, "annotations", "instances_train2014.json"), TRAIN_IMAGES, anns)
    lists = tmp_path / "lists"
    with pytest.raises(PrepError, match=r"1 problem\(s\) in COCO labels") as err:
        main(["--coco", coco, "--out", str(tmp_path / "out"), "--lists", str(lists), "--workers", "2"])
    assert re.search(message, str(err.value)), str(err.value)
    assert not lists.exists()
    assert len(os.listdir(tmp_path / "out" / "SegmentationClassAug")) == 3


def test_broken_annotation_file(coco, tmp_path):
    train_json = os.path.join(coco, "annotations", "instances_train2014.json")
    write_json(train_json, TRAIN_IMAGES, TRAIN_ANNS + [ann(999, 9, 5, [rect(0, 0, 2, 2)])])
    with pytest.raises(PrepError, match="annotation 999 has category 5, which is not among the file's categories"):
        prepare_coco(coco, str(tmp_path / "out"), str(tmp_path / "lists"))
    write_json(train_json, TRAIN_IMAGES, TRAIN_ANNS + [ann(998, 77, 1, [rect(0, 0, 2, 2)])])
    with pytest.raises(PrepError, match="annotation 998 names image 77, which the file does not list"):
        prepare_coco(coco, str(tmp_path / "out"), str(tmp_path / "lists"))
    write_json(train_json, TRAIN_IMAGES, [{"id": 1, "image_id": 9}])
    with pytest.raises(PrepError, match="malformed image or annotation entry"):
        prepare_coco(coco, str(tmp_path / "out"), str(tmp_path / "lists"))
    write_json(train_json, TRAIN_IMAGES, TRAIN_ANNS)
    write_json(os.path.join(coco, "annotations", "instances_val2014.json"), VAL_IMAGES, VAL_ANNS,
               categories=CATEGORIES[:3])
    with pytest.raises(PrepError, match="instances_val2014.json' lists other categories than"):
        prepare_coco(coco, str(tmp_path / "out"), str(tmp_path / "lists"))
    write_json(os.path.join(coco, "annotations", "instances_val2014.json"), {42: TRAIN_IMAGES[9]}, VAL_ANNS)
    with pytest.raises(PrepError, match="an image file name appears twice"):
        prepare_coco(coco, str(tmp_path / "out"), str(tmp_path / "lists"))
    with open(train_json, "w") as f:
        f.write("{not json")
    with pytest.raises(PrepError, match="is not a readable JSON file"):
        prepare_coco(coco, str(tmp_path / "out"), str(tmp_path / "lists"))
    assert not os.path.exists(tmp_path / "out")
