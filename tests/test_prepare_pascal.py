"""tools/prepare_pascal.py (and tools/_prep_common.py) on tiny fake VOC2012 + SBD folders."""
import os
import re

import numpy as np
import pytest
import scipy.io
from PIL import Image

from tools._prep_common import PrepError, link_or_copy, write_label
from tools.prepare_pascal import build_lists, convert_label, main, prepare_pascal

H, W = 16, 20

# a, b: VOC train; c, d: VOC val; SBD train: b (twice), c, e, f; SBD val: a, g.
VOC_TRAIN = ["2007_000001", "2007_000002"]
VOC_VAL = ["2007_000003", "2007_000004"]
SBD_TRAIN = ["2007_000002", "2008_000005", "2007_000003", "2008_000006", "2007_000002"]
SBD_VAL = ["2008_000007", "2007_000001"]
ALL = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))
TRAIN = ["2007_000001", "2007_000002", "2008_000005", "2008_000006"]
TRAIN_AUG = ["2007_000001", "2007_000002", "2008_000005", "2008_000006", "2008_000007"]
VAL = ["2007_000003", "2007_000004"]


def voc_palette():
    """The VOC colour map: a palette PNG's colours are not its class ids."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_label(k):
    """Distinct per image: class k+1 in a box with a 255 boundary; class 20 in a corner."""
    lab = np.zeros((H, W), np.uint8)
    lab[2:10, 3 + k:12 + k] = 255
    lab[3:9, 4 + k:11 + k] = k + 1
    lab[12:, :2] = 20
    return lab


def sbd_label(k):
    lab = np.zeros((H, W), np.uint8)
    lab[k:k + 5, 1:15] = 10 + k
    return lab


def save_palette_png(path, label):
    im = Image.fromarray(label)   # putpalette makes it a palette (P) image
    im.putpalette(voc_palette())
    im.save(path)


def save_mat(path, label):
    scipy.io.savemat(path, {"GTcls": {"Segmentation": label, "CategoriesPresent": np.unique(label)}})


def save_jpg(path, h=H, w=W, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_lines(path, ids):
    with open(path, "w") as f:
        f.write("".join(i + "\n" for i in ids))


@pytest.fixture
def archives(tmp_path):
    """Fake VOCdevkit/VOC2012 and benchmark_RELEASE/dataset; returns (voc, sbd, expected labels)."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
              sbd / "cls", sbd / "img"):
        d.mkdir(parents=True)
    write_lines(voc / "ImageSets" / "Segmentation" / "train.txt", VOC_TRAIN)
    write_lines(voc / "ImageSets" / "Segmentation" / "val.txt", VOC_VAL)
    write_lines(sbd / "train.txt", SBD_TRAIN)
    write_lines(sbd / "val.txt", SBD_VAL)
    expected = {}
    for k, name in enumerate(ALL):
        save_jpg(voc / "JPEGImages" / f"{name}.jpg", seed=k)
        if name in VOC_TRAIN + VOC_VAL:
            expected[name] = voc_label(k)
            save_palette_png(voc / "SegmentationClass" / f"{name}.png", expected[name])
        if name in SBD_TRAIN + SBD_VAL:
            save_mat(sbd / "cls" / f"{name}.mat", sbd_label(k))   # loses to VOC where both exist
            expected.setdefault(name, sbd_label(k))
    return str(voc), str(sbd), expected


def read_png(path):
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def run(voc, sbd, out, lists, *extra):
    return main(["--voc", voc, "--sbd", sbd, "--out", str(out), "--lists", str(lists), *extra])


def expected_list(names):
    return "".join(f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png\n" for n in names)


def test_build_lists_rules_and_dedup():
    lists = build_lists(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
    assert lists == {"train": TRAIN, "train_aug": TRAIN_AUG, "val": VAL}


def test_convert_label_reads_palette_indices_not_colours(tmp_path):
    label = voc_label(0)
    save_palette_png(tmp_path / "x.png", label)
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode == "P" and im.convert("L").getpixel((4, 3)) != 1   # colour != class id
    out = convert_label(str(tmp_path / "x.png"))
    assert out.dtype == np.uint8 and np.array_equal(out, label)
    assert sorted(np.unique(out).tolist()) == [0, 1, 20, 255]
    Image.open(tmp_path / "x.png").convert("RGB").save(tmp_path / "rgb.png")
    with pytest.raises(PrepError, match="is a RGB image; expected a palette PNG"):
        convert_label(str(tmp_path / "rgb.png"))


def test_convert_label_reads_sbd_mat(tmp_path):
    save_mat(tmp_path / "x.mat", sbd_label(3))
    out = convert_label(str(tmp_path / "x.mat"))
    assert out.dtype == np.uint8 and np.array_equal(out, sbd_label(3))
    scipy.io.savemat(tmp_path / "other.mat", {"GTinst": {"Segmentation": sbd_label(3)}})
    with pytest.raises(PrepError, match="has no GTcls struct"):
        convert_label(str(tmp_path / "other.mat"))


def test_convert_label_rejects_values_outside_0_20_255(tmp_path):
    bad = voc_label(0)
    bad[0, 0], bad[0, 1] = 21, 254
    save_palette_png(tmp_path / "bad.png", bad)
    with pytest.raises(PrepError, match=r"label values \[21, 254\] outside 0..20 and 255"):
        convert_label(str(tmp_path / "bad.png"))
    save_mat(tmp_path / "bad.mat", np.full((H, W), 40, np.uint8))
    with pytest.raises(PrepError, match=r"label values \[40\] outside"):
        convert_label(str(tmp_path / "bad.mat"))


def test_end_to_end_labels_lists_and_links(archives, tmp_path, capsys):
    voc, sbd, expected = archives
    out, lists = tmp_path / "data" / "pascal", tmp_path / "lists" / "pascal"
    assert run(voc, sbd, out, lists, "--workers", "1") == 0
    for name in ALL:
        assert np.array_equal(read_png(out / "SegmentationClassAug" / f"{name}.png"), expected[name]), name
        jpg = out / "JPEGImages" / f"{name}.jpg"
        assert os.path.islink(jpg) and os.readlink(jpg) == os.path.join(voc, "JPEGImages", f"{name}.jpg")
    assert sorted(os.listdir(out / "SegmentationClassAug")) == [n + ".png" for n in ALL]
    assert (lists / "train.txt").read_text() == expected_list(TRAIN)
    assert (lists / "train_aug.txt").read_text() == expected_list(TRAIN_AUG)
    assert (lists / "val.txt").read_text() == expected_list(VAL)
    printed = capsys.readouterr().out
    assert "7 images; labels written 7, already correct 0; images placed 7, already in place 0" in printed
    assert "label sources: 4 VOC SegmentationClass, 3 SBD cls" in printed
    assert f"{lists / 'train.txt'}: 4 images  (the official archives give 5953)" in printed
    assert f"{lists / 'val.txt'}: 2 images  (the official archives give 1449)" in printed


def test_parallel_equals_serial_and_rerun_skips(archives, tmp_path):
    voc, sbd, _ = archives
    serial = prepare_pascal(voc, sbd, str(tmp_path / "s"), str(tmp_path / "ls"), workers=1)
    parallel = prepare_pascal(voc, sbd, str(tmp_path / "p"), str(tmp_path / "lp"), workers=2)
    assert serial == parallel == {
        "images": 7, "labels_written": 7, "images_written": 7, "warnings": {},
        "sources": {"voc": 4, "sbd": 3}, "lists": {"train": 4, "train_aug": 5, "val": 2}}
    for name in ALL:
        assert (tmp_path / "s" / "SegmentationClassAug" / f"{name}.png").read_bytes() == \
            (tmp_path / "p" / "SegmentationClassAug" / f"{name}.png").read_bytes()
    for key in ("train", "train_aug", "val"):
        assert (tmp_path / "ls" / f"{key}.txt").read_text() == (tmp_path / "lp" / f"{key}.txt").read_text()

    again = prepare_pascal(voc, sbd, str(tmp_path / "p"), str(tmp_path / "lp"), workers=2)
    assert (again["labels_written"], again["images_written"]) == (0, 0)
    # a label with wrong content and a dangling link are redone, nothing else
    broken = tmp_path / "p" / "SegmentationClassAug" / "2008_000006.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(broken)
    link = tmp_path / "p" / "JPEGImages" / "2007_000004.jpg"
    link.unlink()
    link.symlink_to(tmp_path / "nowhere.jpg")
    again = prepare_pascal(voc, sbd, str(tmp_path / "p"), str(tmp_path / "lp"), workers=1)
    assert (again["labels_written"], again["images_written"]) == (1, 1)
    assert np.array_equal(read_png(broken), sbd_label(ALL.index("2008_000006")))
    assert os.readlink(link) == os.path.join(voc, "JPEGImages", "2007_000004.jpg")


def test_copy_replaces_links_with_copies(archives, tmp_path):
    voc, sbd, _ = archives
    out, lists = tmp_path / "out", tmp_path / "lists"
    run(voc, sbd, out, lists, "--workers", "1")
    run(voc, sbd, out, lists, "--workers", "1", "--copy")
    for name in ALL:
        jpg = out / "JPEGImages" / f"{name}.jpg"
        assert not os.path.islink(jpg)
        assert jpg.read_bytes() == open(os.path.join(voc, "JPEGImages", f"{name}.jpg"), "rb").read()
    # copies count as in place when linking again
    assert prepare_pascal(voc, sbd, str(out), str(lists), workers=1)["images_written"] == 0


def test_image_only_in_sbd_img_is_used_and_counted(archives, tmp_path, capsys):
    voc, sbd, _ = archives
    os.replace(os.path.join(voc, "JPEGImages", "2008_000007.jpg"), os.path.join(sbd, "img", "2008_000007.jpg"))
    summary = prepare_pascal(voc, sbd, str(tmp_path / "out"), str(tmp_path / "lists"), workers=1)
    assert summary["warnings"] == {"images taken from SBD img/ (absent from VOC JPEGImages/)": 1}
    assert os.readlink(tmp_path / "out" / "JPEGImages" / "2008_000007.jpg") == \
        os.path.join(sbd, "img", "2008_000007.jpg")
    assert "warning: 1 x images taken from SBD img/" in capsys.readouterr().out


def test_missing_folder_names_the_fix(archives, tmp_path):
    voc, sbd, _ = archives
    with pytest.raises(PrepError, match=r"--voc must point at VOCdevkit/VOC2012 \(the folder holding"):
        run(os.path.dirname(voc), sbd, tmp_path / "out", tmp_path / "lists")
    os.rename(os.path.join(sbd, "cls"), os.path.join(sbd, "cls_gone"))
    with pytest.raises(PrepError, match=r"cls' does not exist; --sbd must point at benchmark_RELEASE/dataset"):
        run(voc, sbd, tmp_path / "out", tmp_path / "lists")
    os.rename(os.path.join(sbd, "cls_gone"), os.path.join(sbd, "cls"))
    os.remove(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"))
    with pytest.raises(PrepError, match=r"val.txt' does not exist; --voc must point"):
        prepare_pascal(voc, sbd, str(tmp_path / "out"), str(tmp_path / "lists"))


@pytest.mark.parametrize("breakage, message", [
    ("no_mat", r"2008_000005: no label: '.*2008_000005.mat' does not exist"),
    ("no_voc_png", r"2007_000004: '.*SegmentationClass/2007_000004.png' does not exist although VOC"),
    ("no_jpg", r"2008_000006: no image: neither"),
    ("size", r"2007_000001: label '.*2007_000001.png' is 20x16 but image '.*' is 20x15"),
    ("values", r"2008_000007.mat': label values \[33\] outside 0..20 and 255"),
])
def test_broken_input_is_an_error_and_no_list_is_written(archives, tmp_path, breakage, message, capsys):
    voc, sbd, _ = archives
    if breakage == "no_mat":
        os.remove(os.path.join(sbd, "cls", "2008_000005.mat"))
    elif breakage == "no_voc_png":
        os.remove(os.path.join(voc, "SegmentationClass", "2007_000004.png"))
    elif breakage == "no_jpg":
        os.remove(os.path.join(voc, "JPEGImages", "2008_000006.jpg"))
    elif breakage == "size":
        save_jpg(os.path.join(voc, "JPEGImages", "2007_000001.jpg"), h=H - 1)
    else:
        save_mat(os.path.join(sbd, "cls", "2008_000007.mat"), np.full((H, W), 33, np.uint8))
    lists = tmp_path / "lists"
    with pytest.raises(PrepError, match="1 problem\\(s\\) in PASCAL labels") as err:
        run(voc, sbd, tmp_path / "out", lists, "--workers", "2")
    assert __import__("re").search(message, str(err.value)), str(err.value)
    assert not lists.exists()
    # the healthy images were still written, so a fixed re-run only does the rest
    assert len(os.listdir(tmp_path / "out" / "SegmentationClassAug")) == 6
    # the failed image is counted as failed, not as 'already correct'
    printed = capsys.readouterr().out
    assert re.search(r"7 images; labels written 6, already correct 0; images placed \d, already in place 0; "
                     r"failed 1\n", printed), printed


def test_malformed_split_line(archives, tmp_path):
    voc, sbd, _ = archives
    write_lines(os.path.join(sbd, "train.txt"), ["2008_000005 extra"])
    with pytest.raises(PrepError, match=r"train.txt:1: expected one image id per line, got '2008_000005 extra'"):
        prepare_pascal(voc, sbd, str(tmp_path / "out"), str(tmp_path / "lists"))


def test_link_or_copy_never_replaces_the_source_itself(tmp_path):
    src = tmp_path / "a.jpg"
    save_jpg(src)
    before = src.read_bytes()
    assert link_or_copy(str(src), str(src), copy=False) is False
    assert link_or_copy(str(src), str(src), copy=True) is False
    assert not os.path.islink(src) and src.read_bytes() == before


def test_write_label_skips_identical_content_only(tmp_path):
    path = str(tmp_path / "x.png")
    label = voc_label(1)
    assert write_label(path, label) is True
    mtime = os.stat(path).st_mtime_ns
    assert write_label(path, label.copy()) is False and os.stat(path).st_mtime_ns == mtime
    label[0, 0] = 7
    assert write_label(path, label) is True and read_png(path)[0, 0] == 7
    save_palette_png(path, label)   # same indices, but palette mode: rewritten as grayscale
    assert write_label(path, label) is True and np.array_equal(read_png(path), label)
    assert sorted(os.listdir(tmp_path)) == ["x.png"]   # no temporary file left behind
