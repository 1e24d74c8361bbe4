"""tools/prepare_cdfss.py on tiny hand-made DeepGlobe, ISIC 2018 and chest X-ray downloads."""
import csv
import os
from collections import Counter

import cv2
import numpy as np
import pytest
from PIL import Image

from dataset.folder import FolderEvalDataset, FolderIndex
from tools._prep_common import PrepError
from tools.prepare_cdfss import keep_tile, main, prepare_cdfss, tile_bounds
from util.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AGRI, URBAN, RANGE, FOREST, WATER, BARREN, UNKNOWN = \
    (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
T = 25                       # tile side of a 150x150 image: 625 pixels, 4.8 % of which is exactly 30


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def stamps(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in files_under(folder)}


# ------------------------------------------------------------------ deepglobe

def paint(tile, colour, n):
    """Colour the first n pixels of a tile (row-major) with ``colour`` (the tile is a view)."""
    rows, cols = np.unravel_index(np.arange(n), tile.shape[:2])
    tile[rows, cols] = colour


def deepglobe_mask():
    """A 150x150 RGB mask whose 6x6 tiles exercise the 4.8 % rule (module doc of the test)."""
    m = np.zeros((150, 150, 3), np.uint8)
    m[:] = AGRI                                               # single-colour tiles: dropped

    def tile(i, j):
        return m[i * T:(i + 1) * T, j * T:(j + 1) * T]
    paint(tile(0, 0), URBAN, 30)       # exactly 4.8 %: dropped (the share must be above)
    paint(tile(0, 1), URBAN, 29)       # just below: dropped
    paint(tile(0, 2), URBAN, 31)       # just above: kept -> agriculture, urban
    tile(0, 3)[:] = FOREST             # one colour: dropped
    tile(0, 4)[:] = UNKNOWN            # unknown only: one colour, dropped
    tile(0, 5)[:] = UNKNOWN            # unknown + water: kept -> water only (unknown has no folder)
    paint(tile(0, 5), WATER, 325)
    tile(1, 0)[:] = BARREN             # three classes: kept -> rangeland, forest, barren
    paint(tile(1, 0), RANGE, 200)
    tile(1, 0)[8:16] = FOREST          # rows 8..15: 200 pixels
    tile(1, 1)[:] = WATER              # water + 31 urban + 31 unknown: kept -> urban, water
    paint(tile(1, 1), URBAN, 31)
    tile(1, 1)[24, -6:] = UNKNOWN
    tile(1, 1)[23, -25:] = UNKNOWN
    tile(5, 5)[3, 3] = (250, 200, 3)   # impure agriculture in a dropped tile: a counted warning
    return m


KEPT = {"agriculture": ["02"], "urban": ["02", "11"], "rangeland": ["10"], "forest": ["10"],
        "water": ["05", "11"], "barren": ["10"]}


def write_deepglobe(src, image_id, mask_rgb, seed=0):
    src.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*mask_rgb.shape[:2], 3), dtype=np.uint8)
    cv2.imwrite(str(src / f"{image_id}_sat.jpg"), image)
    cv2.imwrite(str(src / f"{image_id}_mask.png"), mask_rgb[:, :, ::-1])           # RGB -> BGR on disk


def test_tile_grid_and_filter_at_the_official_size():
    assert tile_bounds(2448) == [(408 * i, 408 * (i + 1)) for i in range(6)]
    assert tile_bounds(150) == [(25 * i, 25 * (i + 1)) for i in range(6)]
    assert tile_bounds(10) == [(0, 1), (1, 3), (3, 5), (5, 6), (6, 8), (8, 10)]     # int(i * 10 / 6)
    area = 408 * 408                                   # 166464, the reference's constant
    assert not keep_tile(np.array([area - 7990, 7990, 0]))      # 4.7998 %
    assert keep_tile(np.array([area - 7991, 7991, 0]))          # 4.8005 %
    assert not keep_tile(np.array([area, 0, 0]))                 # one colour
    assert not keep_tile(np.array([595, 30]))                    # exactly 4.8 % of 625
    assert keep_tile(np.array([594, 31])) and not keep_tile(np.array([596, 29]))
    assert keep_tile(np.array([563, 31, 31]))


def test_deepglobe_tiles_masks_class_list_and_rerun(tmp_path, capsys):
    src, out = tmp_path / "train", str(tmp_path / "deepglobe")
    mask = deepglobe_mask()
    write_deepglobe(src, "100", mask)
    (src / "metadata.csv").write_text("ignored\n")
    summary = prepare_cdfss("deepglobe", str(src), out, workers=1)
    assert summary["per_class"] == {c: len(v) for c, v in KEPT.items()}
    assert summary["written"] == 2 * 8 and summary["warnings"] == {
        "mask pixels with channel values other than 0 and 255 (binarised at 128)": 1}
    expected = sorted([f"{c}/100_sat_{t}.{e}" for c, ts in KEPT.items() for t in ts for e in ("jpg", "png")]
                      + ["classes.txt"])
    assert files_under(out) == expected
    assert open(f"{out}/classes.txt").read() == "agriculture\nurban\nrangeland\nforest\nwater\nbarren\n"
    image = cv2.imread(str(src / "100_sat.jpg"))
    for cls, colour in [("urban", URBAN), ("water", WATER), ("forest", FOREST)]:
        for t in KEPT[cls]:
            i, j = int(t[0]), int(t[1])
            with Image.open(f"{out}/{cls}/100_sat_{t}.png") as im:
                assert im.mode == "L"
                got = np.asarray(im)
            want = np.all(mask[i * T:(i + 1) * T, j * T:(j + 1) * T] == colour, axis=-1).astype(np.uint8)
            assert np.array_equal(got, want)
            tile = cv2.imencode(".jpg", image[i * T:(i + 1) * T, j * T:(j + 1) * T], [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
            assert open(f"{out}/{cls}/100_sat_{t}.jpg", "rb").read() == tile.tobytes()
    assert np.asarray(Image.open(f"{out}/urban/100_sat_02.png")).sum() == 31
    assert np.asarray(Image.open(f"{out}/water/100_sat_05.png")).sum() == 325
    printed = capsys.readouterr().out
    assert "  urban: 2 images\n" in printed and f"{out}/classes.txt: 6 class(es) in the benchmark's order" in printed
    before = stamps(out)
    again = prepare_cdfss("deepglobe", str(src), out, workers=1)
    assert again["written"] == 0 and again["unchanged"] == 16 and stamps(out) == before
    # a second source image: only its files are written; then the benchmark's 600 episodes, class e % 6 + 1
    write_deepglobe(src, "101", mask, seed=5)
    more = prepare_cdfss("deepglobe", str(src), out, workers=1)
    assert (more["written"], more["unchanged"]) == (16, 16) and stamps(out).items() >= before.items()
    ds = FolderEvalDataset(out, f"{out}/classes.txt", shot=1, episode_rule="balanced", num_episodes=600,
                           image_size=8, check_sizes=True)
    assert len(ds) == 600 and Counter(e.class_id for e in ds.all_episodes) == {c: 100 for c in range(1, 7)}


def test_deepglobe_errors_one_line_and_nothing_half_written(tmp_path, capsys):
    src, out = tmp_path / "train", str(tmp_path / "deepglobe")
    write_deepglobe(src, "100", deepglobe_mask())
    cv2.imwrite(str(src / "300_sat.jpg"), np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(PrepError) as e:
        prepare_cdfss("deepglobe", str(src), out, workers=1)
    assert str(e.value) == (f"image '{src}/300_sat.jpg' has no mask '{src}/300_mask.png'; --src must be DeepGlobe "
                            f"land cover's train/ folder, holding <id>_sat.jpg with <id>_mask.png (as extracted "
                            f"from the download)")
    os.rename(src / "300_sat.jpg", src / "300_sat.jpeg")
    cv2.imwrite(str(src / "400_mask.png"), np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(PrepError, match=f"^mask '{src}/400_mask.png' has no image '{src}/400_sat.jpg'; "):
        prepare_cdfss("deepglobe", str(src), out, workers=1)
    assert not os.path.exists(out)
    os.remove(src / "400_mask.png")
    # a red pixel (no DeepGlobe class): that image fails whole, the other one is written, no class list
    bad = deepglobe_mask()
    bad[40, 40] = (255, 0, 0)
    write_deepglobe(src, "200", bad, seed=1)
    with pytest.raises(PrepError) as e:
        prepare_cdfss("deepglobe", str(src), out, workers=1)
    assert str(e.value) == (f"mask '{src}/200_mask.png' has 1 pixel(s) of colour (255,0,0), which is no DeepGlobe "
                            f"class (classes: agriculture (255, 255, 0), urban (0, 255, 255), rangeland (255, 0, 255), "
                            f"forest (0, 255, 0), water (0, 0, 255), barren (255, 255, 255), unknown (0, 0, 0)); "
                            f"re-extract the download")
    written = files_under(out)
    assert written == sorted(f"{c}/100_sat_{t}.{e}" for c, ts in KEPT.items() for t in ts for e in ("jpg", "png"))
    with pytest.raises(FileNotFoundError, match="class list .*classes.txt' does not exist"):
        FolderIndex(out, f"{out}/classes.txt")
    # a grey mask, a mask of another size
    cv2.imwrite(str(src / "200_mask.png"), np.zeros((150, 150), np.uint8))
    with pytest.raises(PrepError, match=f"^mask '{src}/200_mask.png' has 1 channel\\(s\\); a DeepGlobe mask is an RGB"):
        prepare_cdfss("deepglobe", str(src), out, workers=1)
    cv2.imwrite(str(src / "200_mask.png"), np.zeros((150, 120, 3), np.uint8))
    with pytest.raises(PrepError, match=f"^mask '{src}/200_mask.png' is 120x150 but its image '{src}/200_sat.jpg' "
                                        f"is 150x150; re-extract the download$"):
        prepare_cdfss("deepglobe", str(src), out, workers=1)
    # the command line: one line, exit status 2
    with pytest.raises(SystemExit) as code:
        run(main, ["deepglobe", "--src", str(src), "--out", out, "--workers", "1"], prog="prepare_cdfss.py")
    assert code.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"prepare_cdfss.py: error: mask '{src}/200_mask.png' is 120x150")
    os.remove(src / "200_mask.png")
    os.remove(src / "200_sat.jpg")
    assert prepare_cdfss("deepglobe", str(src), out, workers=1)["written"] == 0      # completes, lists written
    assert os.path.isfile(f"{out}/classes.txt")


# ------------------------------------------------------------------ isic

ISIC_ROWS = [("ISIC_0000000", "nevus"), ("ISIC_0000001", "melanoma"), ("ISIC_0000003", "nevus"),
             ("ISIC_0000004", "seborrheic_keratosis"), ("ISIC_0000006", "melanoma")]


def write_isic(tmp_path, rows=ISIC_ROWS):
    src = tmp_path / "isic"
    images, masks = src / "ISIC2018_Task1-2_Training_Input", src / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True)
    masks.mkdir()
    for k, (image_id, _) in enumerate(rows + [("ISIC_0000099", None)]):
        Image.fromarray(np.full((6, 8, 3), 30 * k, np.uint8)).save(images / f"{image_id}.jpg")
        m = np.zeros((6, 8), np.uint8)
        m[:k + 1, 2:] = 255
        if image_id == "ISIC_0000003":
            m = np.kron(m, np.ones((2, 2), np.uint8))            # twice the size: resized
        Image.fromarray(m).save(masks / f"{image_id}_segmentation.png")
    (images / "ATTRIBUTION.txt").write_text("ignored\n")
    table = tmp_path / "class_id.csv"
    with open(table, "w", encoding="utf-8-sig", newline="") as f:               # BOM and CRLF
        f.write("ID,Class\r\n" + "".join(f"{i},{c}\r\n" for i, c in rows))
    return src, str(table)


def test_shipped_isic_class_list_is_patnets():
    with open(os.path.join(ROOT, "lists", "cdfss", "isic_class_id.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Class"] and len(rows) == 2595
    assert Counter(c for _, c in rows[1:]) == {"nevus": 1867, "melanoma": 519, "seborrheic_keratosis": 208}
    assert len({i for i, _ in rows[1:]}) == 2594 and rows[1] == ["ISIC_0000000", "nevus"]


def test_isic_by_class_list_with_resized_mask_and_rerun(tmp_path, capsys):
    src, table = write_isic(tmp_path)
    out = str(tmp_path / "out")
    summary = prepare_cdfss("isic", str(src), out, table, workers=1)
    assert summary["per_class"] == {"nevus": 2, "melanoma": 2, "seborrheic_keratosis": 1}
    assert summary["written"] == 10
    printed = capsys.readouterr().out
    assert "warning: 1 x images absent from the class list, left out (first: " \
           f"{src}/ISIC2018_Task1-2_Training_Input/ISIC_0000099.jpg)" in printed
    assert ("warning: 1 x masks of another size than their image, resized to it (nearest neighbour) (first: "
            f"'{src}/ISIC2018_Task1_Training_GroundTruth/ISIC_0000003_segmentation.png' 16x12, image 8x6)") in printed
    assert files_under(out) == sorted(["classes.txt", "melanoma/ISIC_0000001.jpg", "melanoma/ISIC_0000001.png",
                                       "melanoma/ISIC_0000006.jpg", "melanoma/ISIC_0000006.png",
                                       "nevus/ISIC_0000000.jpg", "nevus/ISIC_0000000.png", "nevus/ISIC_0000003.jpg",
                                       "nevus/ISIC_0000003.png", "seborrheic_keratosis/ISIC_0000004.jpg",
                                       "seborrheic_keratosis/ISIC_0000004.png"])
    assert open(f"{out}/classes.txt").read() == "nevus\nseborrheic_keratosis\nmelanoma\n"
    want = np.zeros((6, 8), np.uint8)
    want[:3, 2:] = 1
    assert np.array_equal(np.asarray(Image.open(f"{out}/nevus/ISIC_0000003.png")), want)
    assert open(f"{out}/nevus/ISIC_0000003.jpg", "rb").read() == \
        open(f"{src}/ISIC2018_Task1-2_Training_Input/ISIC_0000003.jpg", "rb").read()
    index = FolderIndex(out, f"{out}/classes.txt")
    assert index.sizes == [2, 1, 2] and index.class_names == {1: "nevus", 2: "seborrheic_keratosis", 3: "melanoma"}
    before = stamps(out)
    assert prepare_cdfss("isic", str(src), out, table, workers=1)["written"] == 0 and stamps(out) == before


def test_isic_errors(tmp_path):
    src, table = write_isic(tmp_path)
    out = str(tmp_path / "out")
    gt = f"{src}/ISIC2018_Task1_Training_GroundTruth"
    os.remove(f"{gt}/ISIC_0000004_segmentation.png")
    with pytest.raises(PrepError) as e:
        prepare_cdfss("isic", str(src), out, table, workers=1)
    assert str(e.value) == (f"mask '{gt}/ISIC_0000004_segmentation.png' of image 'ISIC_0000004' (listed in '{table}') "
                            f"does not exist; --src must be the folder holding ISIC2018_Task1-2_Training_Input/ and "
                            f"ISIC2018_Task1_Training_GroundTruth/ as extracted from the ISIC 2018 Task 1 training "
                            f"archives")
    assert not os.path.exists(out)
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Class\nISIC_0000000,nevus\nISIC_0000001,basal_cell\n")
    with pytest.raises(PrepError, match=f"^{bad}:3: class 'basal_cell' is not one of nevus, seborrheic_keratosis, "
                                        f"melanoma$"):
        prepare_cdfss("isic", str(src), out, str(bad), workers=1)
    bad.write_text("image,label\n")
    with pytest.raises(PrepError, match="the first line must be the header 'ID,Class'"):
        prepare_cdfss("isic", str(src), out, str(bad), workers=1)
    # a class that receives no image: no class list (it would name a missing folder)
    no_sk = tmp_path / "no_sk.csv"
    no_sk.write_text("ID,Class\nISIC_0000000,nevus\nISIC_0000001,melanoma\nISIC_0000003,nevus\n")
    with pytest.raises(PrepError) as e:
        prepare_cdfss("isic", str(src), out, str(no_sk), workers=1)
    assert str(e.value).startswith(f"class(es) seborrheic_keratosis received no image from '{src}', so '{out}' was "
                                   f"left without classes.txt; --src must be the folder holding")
    assert not os.path.exists(f"{out}/classes.txt") and os.path.isfile(f"{out}/nevus/ISIC_0000000.png")
    os.rename(gt, gt + "_old")
    with pytest.raises(PrepError, match=f"^folder '{gt}' does not exist; --src must be the folder holding"):
        prepare_cdfss("isic", str(src), out, table, workers=1)


# ------------------------------------------------------------------ chest x-ray

def write_chest(tmp_path):
    src = tmp_path / "Lung Segmentation"
    (src / "CXR_png").mkdir(parents=True)
    (src / "masks").mkdir()
    for k, name in enumerate(["CHNCXR_0001_0", "CHNCXR_0002_1", "MCUCXR_0001_0", "MCUCXR_0002_0"]):
        Image.fromarray(np.full((10, 7), 40 * k, np.uint8)).save(src / "CXR_png" / f"{name}.png")   # grey PNGs
    for k, mask_name in enumerate(["CHNCXR_0001_0_mask.png", "CHNCXR_0002_1_mask.png", "MCUCXR_0001_0.png"]):
        m = np.zeros((10, 7), np.uint8)
        m[2:8, 1 + k:5] = 255
        Image.fromarray(m).save(src / "masks" / mask_name)
    return src


def test_chest_both_mask_namings_png_images_and_rerun(tmp_path, capsys):
    src = write_chest(tmp_path)
    out = str(tmp_path / "chest")
    summary = prepare_cdfss("chest", str(src), out, workers=1)
    assert summary["per_class"] == {"lung": 3} and summary["written"] == 6
    assert (f"warning: 1 x images without a mask, left out (first: {src}/CXR_png/MCUCXR_0002_0.png)"
            in capsys.readouterr().out)
    assert files_under(out) == ["classes.txt", "lung/CHNCXR_0001_0.png", "lung/CHNCXR_0001_0_mask.png",
                                "lung/CHNCXR_0002_1.png", "lung/CHNCXR_0002_1_mask.png",
                                "lung/MCUCXR_0001_0.png", "lung/MCUCXR_0001_0_mask.png"]
    assert open(f"{out}/classes.txt").read() == "lung\n"
    assert open(f"{out}/lung/MCUCXR_0001_0.png", "rb").read() == open(f"{src}/CXR_png/MCUCXR_0001_0.png", "rb").read()
    want = np.zeros((10, 7), np.uint8)
    want[2:8, 3:5] = 1
    assert np.array_equal(np.asarray(Image.open(f"{out}/lung/MCUCXR_0001_0_mask.png")), want)
    index = FolderIndex(out, f"{out}/classes.txt")
    assert [(os.path.basename(i), os.path.basename(m)) for i, m in index.pairs] == [
        ("CHNCXR_0001_0.png", "CHNCXR_0001_0_mask.png"), ("CHNCXR_0002_1.png", "CHNCXR_0002_1_mask.png"),
        ("MCUCXR_0001_0.png", "MCUCXR_0001_0_mask.png")]
    image, mask = index.load(2)
    assert image.shape == (10, 7, 3) and np.array_equal(mask, want)
    before = stamps(out)
    assert prepare_cdfss("chest", str(src), out, workers=1)["written"] == 0 and stamps(out) == before
    linked = str(tmp_path / "linked")
    prepare_cdfss("chest", str(src), linked, link=True, workers=1)
    assert os.readlink(f"{linked}/lung/CHNCXR_0001_0.png") == os.path.abspath(f"{src}/CXR_png/CHNCXR_0001_0.png")


def test_chest_errors(tmp_path, capsys):
    src = write_chest(tmp_path)
    out = str(tmp_path / "chest")
    Image.fromarray(np.zeros((10, 7), np.uint8)).save(src / "masks" / "MCUCXR_0001_0_mask.png")
    with pytest.raises(PrepError) as e:
        prepare_cdfss("chest", str(src), out, workers=1)
    assert str(e.value) == (f"image '{src}/CXR_png/MCUCXR_0001_0.png' has two masks, '{src}/masks/MCUCXR_0001_0.png' "
                            f"and '{src}/masks/MCUCXR_0001_0_mask.png'; keep one")
    os.remove(src / "masks" / "MCUCXR_0001_0_mask.png")
    Image.fromarray(np.zeros((10, 7), np.uint8)).save(src / "masks" / "CHNCXR_0009_1_mask.png")
    with pytest.raises(PrepError) as e:
        prepare_cdfss("chest", str(src), out, workers=1)
    assert str(e.value) == (f"mask '{src}/masks/CHNCXR_0009_1_mask.png' has no image "
                            f"'{src}/CXR_png/CHNCXR_0009_1.png'; "
                            f"--src must be the folder holding CXR_png/ and masks/ (the Kaggle chest X-ray masks and "
                            f"labels download, folder 'Lung Segmentation')")
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as code:
        run(main, ["chest", "--src", str(tmp_path / "none"), "--out", out], prog="prepare_cdfss.py")
    assert code.value.code == 2
    assert capsys.readouterr().err == (f"prepare_cdfss.py: error: folder '{tmp_path}/none' does not exist; --src must "
                                       f"be the folder holding CXR_png/ and masks/ (the Kaggle chest X-ray masks and "
                                       f"labels download, folder 'Lung Segmentation')\n")
