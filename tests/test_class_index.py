import os
import time

import cv2
import numpy as np

from tests.conftest import label_with, write_tree
from dataset.class_index import build_class_index, cache_path_for, load_area_table, scan_areas
from util.fileio import read_list


def areas_of(table, index):
    """{class id: pixel count} of image ``index`` of an area table."""
    lo, hi = np.searchsorted(table.image, [index, index + 1])
    return dict(zip(table.cls[lo:hi].tolist(), table.area[lo:hi].tolist()))


def labels_of(list_path, root):
    return [lab for _, lab in read_list(list_path, root)]


def test_filter_at_exactly_2048_pixels(tmp_path):
    root = str(tmp_path)
    list_path = write_tree(root, [
        label_with((64, 96), {1: 2048, 2: 2047}),   # serves 1 only
        label_with((64, 64), {2: 2049, 7: 100}),    # serves 2
        label_with((64, 64), {3: 2047}),            # serves nothing
        label_with((64, 64), {7: 3000}),            # class 7 is not active
    ])
    table, _ = load_area_table(list_path, root, labels_of(list_path, root), workers=1, use_cache=False)
    assert areas_of(table, 0) == {1: 2048, 2: 2047}      # 0 and 255 never counted
    assert areas_of(table, 1) == {2: 2049, 7: 100}
    index = build_class_index(table, [1, 2, 3, 4, 5], 2048)
    assert index.images == [0, 1]
    assert index.classes_of == {0: [1], 1: [2]}
    assert index.images_of == {1: [0], 2: [1], 3: [], 4: [], 5: []}
    # a lower threshold admits the short areas
    index = build_class_index(table, [1, 2, 3, 4, 5], 2047)
    assert index.classes_of == {0: [1, 2], 1: [2], 2: [3]}
    # BAM-style exclusion drops images holding any pixel of an excluded class
    index = build_class_index(table, [1, 2, 3], 2048, exclude_classes=[7])
    assert index.images == [0]


def test_parallel_scan_equals_serial(tmp_path):
    rng = np.random.default_rng(1)
    labels = [rng.choice(np.array([0, 1, 2, 5, 255], np.uint8), (20, 24)) for _ in range(80)]
    root = str(tmp_path)
    list_path = write_tree(root, labels)
    paths = labels_of(list_path, root)
    serial, parallel = scan_areas(paths, workers=1), scan_areas(paths, workers=2)
    for field in ("image", "cls", "area"):
        np.testing.assert_array_equal(getattr(serial, field), getattr(parallel, field))
    for i in (0, 41, 79):
        expected = {c: int((labels[i] == c).sum()) for c in (1, 2, 5) if (labels[i] == c).any()}
        assert areas_of(serial, i) == expected


def test_cache_is_used_and_invalidated_by_list_or_label_changes(tmp_path):
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((64, 64), {c: 2048}) for c in (1, 2, 3)])
    paths = labels_of(list_path, root)
    t1, cached = load_area_table(list_path, root, paths, workers=1)
    assert not cached and os.path.isfile(cache_path_for(list_path))
    t2, cached = load_area_table(list_path, root, paths, workers=1)
    assert cached and areas_of(t2, 2) == {3: 2048}
    # the list changes: dropping a line rebuilds
    lines = open(list_path).read().splitlines()
    open(list_path, "w").write("\n".join(lines[:2]) + "\n")
    paths = labels_of(list_path, root)
    t3, cached = load_area_table(list_path, root, paths, workers=1)
    assert not cached and t3.num_images == 2
    # a label is rewritten with other content: rebuilds and sees the new areas
    time.sleep(0.01)
    cv2.imwrite(paths[0], label_with((64, 64), {4: 3000}))
    t4, cached = load_area_table(list_path, root, paths, workers=1)
    assert not cached and areas_of(t4, 0) == {4: 3000}
    # a damaged cache file is rebuilt, not trusted
    open(cache_path_for(list_path), "wb").write(b"garbage")
    t5, cached = load_area_table(list_path, root, paths, workers=1)
    assert not cached and areas_of(t5, 0) == {4: 3000}
    assert [f for f in os.listdir(root) if f.endswith(".tmp.npz")] == []


def test_truncated_or_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((64, 64), {c: 2048}) for c in (1, 2, 3)])
    paths = labels_of(list_path, root)
    load_area_table(list_path, root, paths, workers=1)
    cache = cache_path_for(list_path)
    good = open(cache, "rb").read()
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF                     # inside an array: the zip CRC catches it
    inconsistent = tmp_path / "bad.npz"
    with np.load(cache) as z:
        np.savez(inconsistent, key=z["key"], num_images=z["num_images"], image=z["image"], cls=z["cls"][:-1],
                 area=z["area"])
    damaged = [b"", good[:10], good[:len(good) // 2], good[:-1], bytes(flipped), inconsistent.read_bytes()]
    for content in damaged:
        open(cache, "wb").write(content)
        caplog.clear()
        table, cached = load_area_table(list_path, root, paths, workers=1)
        assert not cached and areas_of(table, 1) == {2: 2048}
        assert "ignoring damaged class-index cache" in caplog.text and cache in caplog.text
        assert open(cache, "rb").read() == good          # rewritten whole
