"""tools/prepare_fss1000.py on a tiny fake FSS-1000 download, and the shipped split lists."""
import os

import numpy as np
import pytest
from PIL import Image

from dataset.folder import FolderEvalDataset, FolderIndex, read_class_list
from tools._prep_common import PrepError
from tools.prepare_fss1000 import SRC_HINT, main, prepare_fss1000
from util.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 8, 6
SPLITS = {"train": ["ab_wheel", "zebra"], "val": ["bus"], "test": ["tower_pisa", "abe's_flyingfish"]}


def src_mask(k):
    """0/255 with grey levels 127 and 128 on the first row (-> 0 and 1)."""
    m = np.zeros((H, W), np.uint8)
    m[k % H:, :3] = 255
    m[0, :2] = [127, 128]
    return m


def make_download(tmp_path, odd_mask=("bus", 3)):
    """Class folders with 1..10.jpg + 1..10.png; one mask (odd_mask) of another size."""
    src = tmp_path / "fewshot_data"
    for names in SPLITS.values():
        for c in names:
            (src / c).mkdir(parents=True)
            for n in range(1, 11):
                rgb = np.full((H, W, 3), (n * 20, len(c) * 9, 50), np.uint8)
                Image.fromarray(rgb).save(src / c / f"{n}.jpg")
                mask = src_mask(n)
                if (c, n) == odd_mask:
                    mask = np.kron(mask, np.ones((2, 2), np.uint8))      # 12x16: twice the size
                Image.fromarray(mask).save(src / c / f"{n}.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    for s, names in SPLITS.items():
        (lists / f"{s}.txt").write_text("".join(n + "\r\n" for n in names))   # CRLF like HSNet's test.txt
    return str(src), str(lists)


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_shipped_splits_are_hsnets_520_240_240_disjoint():
    splits = {s: read_class_list(os.path.join(ROOT, "lists", "fss1000", s + ".txt")) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 520, "val": 240, "test": 240}
    assert len(set().union(*splits.values())) == 1000                     # disjoint, no duplicates
    for s, names in splits.items():
        assert names == sorted(names)                                      # HSNet sorts them on load
        raw = open(os.path.join(ROOT, "lists", "fss1000", s + ".txt"), "rb").read()
        assert b"\r" not in raw and raw.endswith(b"\n")
    assert "fountain" in splits["train"] and "handcuff" in splits["val"] and "bus" in splits["test"]
    assert splits["test"][:2] == ["abe's_flyingfish", "accordion"] and splits["train"][0] == "ac_wall"


def test_prepare_writes_copies_binary_masks_and_lists(tmp_path, capsys):
    src, lists = make_download(tmp_path)
    out = str(tmp_path / "fss1000")
    summary = prepare_fss1000(src, out, lists, workers=1)
    assert summary["sources"] == 5 and summary["written"] == 100 and summary["unchanged"] == 0
    assert summary["lists"] == {"train": 2, "val": 1, "test": 2}
    assert summary["warnings"] == {"masks of another size than their image, resized to it (nearest neighbour)": 1}
    printed = capsys.readouterr().out
    assert (f"warning: 1 x masks of another size than their image, resized to it (nearest neighbour) "
            f"(first: '{src}/bus/3.png' 12x16, image 6x8)") in printed
    assert f"{out}/test.txt: 2 classes, 20 images  (HSNet's split has 240)" in printed
    expected = sorted([f"{c}/{n}.{e}" for names in SPLITS.values() for c in names for n in range(1, 11)
                       for e in ("jpg", "png")] + ["train.txt", "val.txt", "test.txt"])
    assert files_under(out) == expected
    for c in ("zebra", "bus"):
        for n in (1, 3, 10):
            assert open(f"{out}/{c}/{n}.jpg", "rb").read() == open(f"{src}/{c}/{n}.jpg", "rb").read()
            with Image.open(f"{out}/{c}/{n}.png") as im:
                assert im.mode == "L"
                mask = np.asarray(im)
            assert np.array_equal(mask, (src_mask(n) >= 128).astype(np.uint8))     # resized one included
            assert mask[0, :2].tolist() == [0, 1]
    assert open(f"{out}/test.txt").read() == "tower_pisa\nabe's_flyingfish\n"
    # what dataset/folder.py reads: 2 test classes x 10 images = 20 episodes, one per image
    ds = FolderEvalDataset(out, f"{out}/test.txt", shot=5, seed=0, image_size=16)
    assert len(ds) == 20 and ds.class_names == {1: "tower_pisa", 2: "abe's_flyingfish"}
    assert [os.path.basename(i) for i, _ in ds.index.pairs[:3]] == ["1.jpg", "10.jpg", "2.jpg"]


def test_rerun_writes_nothing_and_link_mode(tmp_path):
    src, lists = make_download(tmp_path)
    out = str(tmp_path / "fss1000")
    prepare_fss1000(src, out, lists, workers=1)
    stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in files_under(out)}
    again = prepare_fss1000(src, out, lists, workers=1)
    assert again["written"] == 0 and again["unchanged"] == 100
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in files_under(out)} == stamps
    # a damaged output file is rewritten, only it
    with open(f"{out}/zebra/4.png", "wb") as f:
        f.write(b"junk")
    assert prepare_fss1000(src, out, lists, workers=1)["written"] == 1
    linked = str(tmp_path / "linked")
    prepare_fss1000(src, linked, lists, link=True, workers=2)
    assert os.readlink(f"{linked}/bus/1.jpg") == os.path.abspath(f"{src}/bus/1.jpg")
    assert not os.path.islink(f"{linked}/bus/1.png")
    assert prepare_fss1000(src, linked, lists, link=True, workers=1)["written"] == 0


def test_missing_files_one_line_naming_class_and_file_nothing_written(tmp_path, capsys):
    src, lists = make_download(tmp_path)
    os.remove(f"{src}/zebra/7.png")
    out = str(tmp_path / "fss1000")
    with pytest.raises(PrepError) as e:
        prepare_fss1000(src, out, lists, workers=1)
    assert str(e.value) == (f"class 'zebra': missing '{src}/zebra/7.png'; FSS-1000 has 10 pairs N.jpg + N.png "
                            f"per class: re-extract the download")
    assert not os.path.exists(out)
    os.remove(f"{src}/ab_wheel/1.jpg")
    os.rename(f"{src}/bus", f"{src}/Bus")
    with pytest.raises(PrepError) as e:
        prepare_fss1000(src, out, lists, workers=1)
    assert str(e.value) == (f"1 of the 5 class folders the split lists name do not exist in '{src}' ('bus'); "
                            f"{SRC_HINT} (2 more problem(s) printed above)")
    err = capsys.readouterr().err
    assert f"  also: class 'ab_wheel': missing '{src}/ab_wheel/1.jpg'" in err
    assert f"  also: class 'zebra': missing '{src}/zebra/7.png'" in err
    assert not os.path.exists(out)
    # a --src that holds none of the classes (the folder above, say): one line with the count
    with pytest.raises(SystemExit) as code:
        run(main, ["--src", str(tmp_path), "--out", out, "--lists", lists], prog="prepare_fss1000.py")
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"prepare_fss1000.py: error: '{tmp_path}' holds none of the 5 class folders the split lists "
                   f"name ('ab_wheel', 'abe's_flyingfish', 'bus', ...); {SRC_HINT}\n")
    assert not os.path.exists(out)
    # through the command line: one line on stderr, exit status 2
    with pytest.raises(SystemExit) as code:
        run(main, ["--src", str(tmp_path / "nowhere"), "--out", out, "--lists", lists], prog="prepare_fss1000.py")
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"prepare_fss1000.py: error: folder '{tmp_path}/nowhere' does not exist; --src must be the "
                   f"folder holding FSS-1000's 1000 class folders (ab_wheel/, abacus/, ..., each with 1.jpg..10.jpg "
                   f"and 1.png..10.png) as extracted from the download\n")


def test_unreadable_mask_fails_its_class_only_and_no_list_is_written(tmp_path):
    src, lists = make_download(tmp_path)
    with open(f"{src}/bus/5.png", "wb") as f:
        f.write(b"not a png")
    out = str(tmp_path / "fss1000")
    with pytest.raises(PrepError) as e:
        prepare_fss1000(src, out, lists, workers=1)
    assert str(e.value).startswith(f"cannot read mask '{src}/bus/5.png' (")
    assert str(e.value).endswith("); re-extract the archive") and "\n" not in str(e.value)
    written = files_under(out)
    assert not any(f.endswith(".txt") for f in written)                     # no class list: nothing to load
    assert not any(os.path.basename(f).startswith(".") for f in written)   # no temporary left behind
    assert [f for f in written if f.startswith("bus/")] == ["bus/1.jpg", "bus/1.png", "bus/2.jpg", "bus/2.png",
                                                            "bus/3.jpg", "bus/3.png", "bus/4.jpg", "bus/4.png"]
    with pytest.raises(FileNotFoundError, match=f"class list '{out}/test.txt' does not exist"):
        FolderIndex(out, f"{out}/test.txt")
    Image.fromarray(src_mask(5)).save(f"{src}/bus/5.png")                    # fixed: the re-run completes
    summary = prepare_fss1000(src, out, lists, workers=1)
    assert summary["written"] == 12 and summary["unchanged"] == 88
    assert FolderIndex(out, f"{out}/val.txt").sizes == [10]
