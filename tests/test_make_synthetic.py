"""tools/make_synthetic.py: determinism, label values, 255 bands, list files."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from tools import make_synthetic as ms
from util.classes import SYNTHETIC_CLASSES
from util.fileio import read_list

N_TRAIN, N_VAL, SIZE = 12, 8, 64


def _generate(out, seed=0, workers=1):
    return ms.main(["--out", str(out), "--train", str(N_TRAIN), "--val", str(N_VAL),
                    "--size", str(SIZE), "--seed", str(seed), "--workers", str(workers)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "w1"
    counts = _generate(out, workers=1)
    return out, counts


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _labels(out):
    folder = os.path.join(out, "SegmentationClassAug")
    return {n: cv2.imread(os.path.join(folder, n), cv2.IMREAD_UNCHANGED) for n in sorted(os.listdir(folder))}


def test_class_specs_follow_util_classes():
    assert [s.name for s in ms.CLASS_SPECS] == list(SYNTHETIC_CLASSES)
    pairs = {(s.shape, s.texture) for s in ms.CLASS_SPECS}
    assert len(pairs) == 20 == len(ms.SHAPES) * len(ms.TEXTURES)


@pytest.mark.parametrize("fold", range(4))
def test_every_fold_holds_out_new_combinations_of_seen_parts(fold):
    """Image folds (5i+1..5i+5) and video folds (i+1, i+5, ...): the training classes show every
    shape and every texture, the held-out ones at least 4 shapes and 3 textures."""
    for held in (range(5 * fold, 5 * fold + 5), range(fold, 20, 4)):
        train = [s for i, s in enumerate(ms.CLASS_SPECS) if i not in held]
        test = [ms.CLASS_SPECS[i] for i in held]
        assert {s.shape for s in train} == set(ms.SHAPES) and {s.texture for s in train} == set(ms.TEXTURES)
        assert len({s.shape for s in test}) >= 4 and len({s.texture for s in test}) >= 3


def test_colours_are_two_distinct_palette_entries_for_any_class():
    rng = np.random.default_rng(0)
    drawn = [ms.draw_colours(rng) for _ in range(200)]
    assert all(not np.array_equal(a, b) for a, b in drawn)
    assert {tuple(a) for a, _ in drawn} == {tuple(c) for c in ms.PALETTE}


def test_distractors_wear_the_main_objects_colours_about_half_the_time(monkeypatch):
    drawn = []
    original = ms._object_texture

    def spy(rng, texture, colours, *args):
        drawn.append(tuple(map(tuple, colours)))
        return original(rng, texture, colours, *args)

    monkeypatch.setattr(ms, "_object_texture", spy)
    same = total = 0
    for seed in range(60):
        drawn.clear()
        monkeypatch.setattr(ms, "add_clutter", lambda rng, img, count: None)   # objects only
        ms.render_image(seed, 80)
        main, *others = drawn
        same += sum(c == main for c in others)
        total += len(others)
    assert total >= 60 and 0.35 <= same / total <= 0.75


def test_render_image_deterministic_and_valid():
    img, lbl = ms.render_image(123, 96)
    img2, lbl2 = ms.render_image(123, 96)
    assert np.array_equal(img, img2) and np.array_equal(lbl, lbl2)
    img3, lbl3 = ms.render_image(124, 96)
    assert img3.shape != img.shape or not np.array_equal(img3, img)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert lbl.dtype == np.uint8 and lbl.shape == img.shape[:2]
    assert all(72 <= s <= 120 for s in lbl.shape)
    values = set(np.unique(lbl).tolist())
    assert values <= set(range(21)) | {255}
    assert 0 in values and 255 in values
    assert 2 <= len(values - {0, 255}) <= 4


def test_image_sides_vary():
    shapes = {ms.render_image(s, 100)[1].shape for s in range(20)}
    assert len(shapes) > 10
    assert all(75 <= h <= 125 and 75 <= w <= 125 for h, w in shapes)


def test_main_class_is_forced_and_large():
    for cls in (0, 4, 19):
        _, lbl = ms.render_image(7, 160, main_class=cls)
        counts = np.bincount(lbl.ravel(), minlength=256)[1:21]
        assert counts[cls] >= 2048 and (counts > 0).sum() >= 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_band_covers_every_outline(seed):
    # band=0 and band=3 draw the same objects; the band only overwrites outline pixels
    _, bare = ms.render_image(seed, 128, band=0)
    _, banded = ms.render_image(seed, 128, band=3)
    assert 255 not in bare
    band = banded == 255
    assert np.array_equal(banded[~band], bare[~band])
    # every pixel whose 4-neighbour holds another value (an outline) is in the band
    edge = np.zeros_like(band)
    dy = bare[1:] != bare[:-1]
    dx = bare[:, 1:] != bare[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    assert edge.any() and band[edge].all()
    # and the band is thin: every band pixel is within 2 px of an outline
    near = cv2.dilate(edge.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert near[band].all()
    assert band.sum() < 4 * edge.sum()


def test_main_class_of_is_balanced_per_block():
    for split in ("train", "val"):
        for block in range(3):
            mains = [ms.main_class_of(5, split, 20 * block + i) for i in range(20)]
            assert sorted(mains) == list(range(20))
    assert [ms.main_class_of(5, "train", i) for i in range(20)] != [ms.main_class_of(6, "train", i) for i in range(20)]


def test_lists_name_exactly_the_written_files(dataset):
    out, _ = dataset
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        text = open(os.path.join(out, f"{split}.txt")).read()
        assert text.endswith("\n")
        lines = text.splitlines()
        assert lines == sorted(lines) and len(lines) == n
        assert lines[0] == f"JPEGImages/{split}_000000.jpg SegmentationClassAug/{split}_000000.png"
        pairs = read_list(os.path.join(out, f"{split}.txt"), str(out))
        assert len(pairs) == n
    listed = set()
    for split in ("train", "val"):
        for line in open(os.path.join(out, f"{split}.txt")):
            listed.update(line.split())
    written = {f"{sub}/{f}" for sub in ("JPEGImages", "SegmentationClassAug") for f in os.listdir(os.path.join(out, sub))}
    assert listed == written
    assert set(os.listdir(out)) == {"JPEGImages", "SegmentationClassAug", "train.txt", "val.txt"}


def test_labels_valid_and_match_returned_counts(dataset):
    out, counts = dataset
    labels = _labels(out)
    assert len(labels) == N_TRAIN + N_VAL
    n_multi = 0
    for name, lbl in labels.items():
        assert lbl.ndim == 2 and lbl.dtype == np.uint8
        assert set(np.unique(lbl).tolist()) <= set(range(21)) | {255}
        assert (lbl == 255).any()
        img = cv2.imread(os.path.join(out, "JPEGImages", name[:-4] + ".jpg"))
        assert img.shape[:2] == lbl.shape
        split, idx = name[:-4].split("_")
        assert np.array_equal(counts[split][int(idx)], np.bincount(lbl.ravel(), minlength=256)[:21])
        n_multi += len(set(np.unique(lbl).tolist()) - {0, 255}) >= 2
    # most queries also hold objects of other classes
    assert n_multi >= 0.8 * len(labels)


def test_same_seed_same_bytes_whatever_workers(dataset, tmp_path):
    out1, _ = dataset
    out2 = tmp_path / "w2"
    _generate(out2, workers=2)
    for sub in ("SegmentationClassAug", "JPEGImages"):
        a, b = _files(os.path.join(out1, sub)), _files(os.path.join(out2, sub))
        assert a.keys() == b.keys() and a == b
    for lst in ("train.txt", "val.txt"):
        assert open(os.path.join(out1, lst)).read() == open(os.path.join(out2, lst)).read()


def test_different_seed_differs(dataset, tmp_path):
    out1, _ = dataset
    out2 = tmp_path / "s1"
    _generate(out2, seed=1)
    a, b = _labels(out1), _labels(out2)
    assert a.keys() == b.keys()
    differing = sum(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a.values(), b.values()))
    assert differing == len(a)


def test_bad_arguments_are_rejected(tmp_path, capsys):
    for argv, message in ((["--train", "0", "--val", "0"], "--train and --val must be >= 0 and not both 0"),
                          (["--seed", "-1"], "--seed must be non-negative")):
        with pytest.raises(SystemExit) as e:
            ms.main(["--out", str(tmp_path), *argv])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and err[0].startswith("usage: ") and err[-1].endswith(f": error: {message}")
        assert sum("error:" in line for line in err) == 1
    assert not any(tmp_path.iterdir())                                   # nothing written


def test_the_per_class_table_lines_up_with_the_longest_name(tmp_path, capsys):
    """'checkered triangle' (18 characters) no longer pushes its row's counts out of their column."""
    ms.main(["--out", str(tmp_path), "--train", "0", "--val", "20", "--size", "48", "--workers", "1"])
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("images per class"))) + 1:][:21]
    assert len({len(line) for line in table}) == 1, table
    assert any("checkered triangle" in line for line in table)
