import os
import time

import cv2
import numpy as np
import pytest

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


# ---------------------------------------------------------------- the label check, exactly
def test_label_check_messages_name_every_wrong_property(tmp_path):
    from dataset.class_index import LABEL_FORMAT, label_class_areas
    from util.errors import DataError
    rgb16 = np.zeros((4, 5, 3), np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((4, 5, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "grey16.png"), np.zeros((4, 5), np.uint16))
    for name, kind in (("rgb16", "3-channel (colour or palette), 16-bit"), ("rgb", "3-channel (colour or palette)"),
                       ("grey16", "16-bit")):
        path = str(tmp_path / f"{name}.png")
        with pytest.raises(DataError) as e:
            label_class_areas(path)
        assert str(e.value) == f"label '{path}' is a {kind} image; {LABEL_FORMAT}"
    with pytest.raises(DataError) as e:
        label_class_areas(str(tmp_path / "none.png"))
    assert str(e.value) == (f"label '{tmp_path}/none.png' does not exist; check the path, the list that names it "
                            f"or data_root")
    cv2.imwrite(str(tmp_path / "ok.png"), np.array([[0, 3, 3], [7, 3, 0]], np.uint8))   # no 255 pixel at all
    ids, counts = label_class_areas(str(tmp_path / "ok.png"))
    assert ids.tolist() == [3, 7] and counts.tolist() == [3, 1]


def test_class_ids_beyond_the_dataset_name_the_first_label_and_its_values(tmp_path):
    from dataset.class_index import LABEL_FORMAT
    from util.errors import DataError
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((8, 8), {1: 5, 20: 5}), label_with((8, 8), {1: 5, 20: 5, 21: 3}),
                                  label_with((8, 8), {50: 4})])
    paths = labels_of(list_path, root)
    with pytest.raises(DataError) as e:
        load_area_table(list_path, root, paths, workers=1, num_classes=20)
    assert str(e.value) == (f"label '{paths[1]}' holds the values [21], outside 0..20 and 255 (2 label(s) in all); "
                            f"{LABEL_FORMAT}")
    with pytest.raises(DataError) as e:
        load_area_table(list_path, root, paths, workers=1, num_classes=20, fix="Run the tool.")
    assert str(e.value) == (f"label '{paths[1]}' holds the values [21], outside 0..20 and 255 (2 label(s) in all); "
                            f"{LABEL_FORMAT}. Run the tool.")
    table, _ = load_area_table(list_path, root, paths, workers=1, num_classes=50)     # all within 1..50
    assert areas_of(table, 2) == {50: 4}


def test_the_default_threshold_is_2048_pixels(tmp_path):
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((64, 64), {1: 2048}), label_with((64, 64), {1: 2047})])
    table, _ = load_area_table(list_path, root, labels_of(list_path, root), workers=1, use_cache=False)
    assert build_class_index(table, [1]).images == [0]


def test_an_empty_list_scans_to_an_empty_int64_table():
    table = scan_areas([], workers=1)
    assert table.num_images == 0
    for field in ("image", "cls", "area"):
        assert getattr(table, field).shape == (0,) and getattr(table, field).dtype == np.int64
    assert build_class_index(table, [1, 2]).images == [] and build_class_index(table, [1]).images_of == {1: []}


def test_scanned_tables_hold_int64_arrays(tmp_path):
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((8, 8), {1: 5, 3: 2}), label_with((8, 8), {2: 7})])
    table = scan_areas(labels_of(list_path, root), workers=1)
    assert [getattr(table, f).dtype for f in ("image", "cls", "area")] == [np.int64] * 3
    assert table.image.tolist() == [0, 0, 1] and table.cls.tolist() == [1, 3, 2] and table.area.tolist() == [5, 2, 7]


# ---------------------------------------------------------------- the cache: what is trusted, what is not
def cached_tree(tmp_path):
    """Two images, the first with two classes: a valid table has a repeated image position."""
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((64, 64), {1: 2048, 2: 100}), label_with((64, 64), {2: 2048})])
    paths = labels_of(list_path, root)
    load_area_table(list_path, root, paths, workers=1)
    return root, list_path, paths


def rewrite_cache(list_path, **arrays):
    cache = cache_path_for(list_path)
    with np.load(cache) as z:
        fields = {k: z[k] for k in z.files}
    fields.update(arrays)
    with open(cache, "wb") as f:
        np.savez(f, **fields)


def test_a_valid_cache_with_a_two_class_image_is_used(tmp_path):
    root, list_path, paths = cached_tree(tmp_path)
    table, cached = load_area_table(list_path, root, paths, workers=1)
    assert cached and table.image.tolist() == [0, 0, 1] and areas_of(table, 0) == {1: 2048, 2: 100}
    # use_cache False neither reads nor writes it
    table, cached = load_area_table(list_path, root, paths, workers=1, use_cache=False)
    assert not cached and areas_of(table, 1) == {2: 2048}


@pytest.mark.parametrize("image, reason", [([0, 1, 0], "image positions out of range or unsorted"),
                                           ([0, 0, 2], "image positions out of range or unsorted"),
                                           ([-1, 0, 1], "image positions out of range or unsorted"),
                                           ([0, 1], "arrays of different lengths")])
def test_an_inconsistent_cache_is_rebuilt_naming_the_reason(tmp_path, caplog, image, reason):
    root, list_path, paths = cached_tree(tmp_path)
    rewrite_cache(list_path, image=np.array(image, np.int64))
    caplog.clear()
    table, cached = load_area_table(list_path, root, paths, workers=1)
    assert not cached and table.image.tolist() == [0, 0, 1]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"ignoring damaged class-index cache {cache_path_for(list_path)} (ValueError: {reason}); rebuilding it"]


def test_a_cache_holding_a_pickle_is_never_unpickled(tmp_path, caplog):
    root, list_path, paths = cached_tree(tmp_path)
    rewrite_cache(list_path, key=np.array([{"not": "an array"}], dtype=object))
    caplog.clear()
    table, cached = load_area_table(list_path, root, paths, workers=1)
    assert not cached and areas_of(table, 0) == {1: 2048, 2: 100}
    assert "ignoring damaged class-index cache" in caplog.text and "allow_pickle=False" in caplog.text


def test_a_cache_that_cannot_be_written_is_a_warning_not_an_error(tmp_path, caplog, monkeypatch):
    import dataset.class_index as class_index
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((64, 64), {1: 2048})])

    def full_disk(path, writer):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(class_index, "atomic_write", full_disk)
    table, cached = load_area_table(list_path, root, labels_of(list_path, root), workers=1)
    assert not cached and areas_of(table, 0) == {1: 2048}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"could not write class-index cache {cache_path_for(list_path)} ([Errno 28] No space left on device); "
        f"the next start will rescan"]


def test_a_missing_label_has_its_own_cache_key(tmp_path):
    from dataset.class_index import cache_key
    root = str(tmp_path)
    list_path = write_tree(root, [label_with((8, 8), {1: 5})])
    present = labels_of(list_path, root)
    missing = present + [os.path.join(root, "gone.png")]
    assert cache_key(list_path, root, missing) == cache_key(list_path, root, missing)
    assert cache_key(list_path, root, missing) != cache_key(list_path, root, present)
