"""util/errors.py and util/cli.py: a user's mistake is a UserError, reported by the entry-point
wrapper as one line on stderr and exit status 2; labels are checked when the class index
scans them."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import label_with
from tools import dataset_stats
from util.cli import run
from dataset.image import load_split
from util.errors import (BackboneWeightsError, CheckpointError, ConfigError, DataError, DeviceError,
                         PredictInputError, UserError)


def test_every_kind_of_mistake_is_a_user_error():
    for kind in (ConfigError, DataError, CheckpointError, BackboneWeightsError, DeviceError, PredictInputError):
        assert issubclass(kind, UserError), kind


def test_run_reports_a_user_error_as_one_line_and_exit_2(capsys):
    def main(argv):
        raise DataError(f"list file '{argv[0]}' names no images")

    with pytest.raises(SystemExit) as exit_info:
        run(main, ["lists/x.txt"], prog="train.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "train.py: error: list file 'lists/x.txt' names no images\n"


def test_run_keeps_the_traceback_of_a_bug():
    def main(argv):
        raise KeyError("a bug, not a user mistake")

    with pytest.raises(KeyError):
        run(main, [])


# ---- labels: checked when the class index scans them ----------------------------------------
def _label_path(root, i=0):
    return os.path.join(root, "SegmentationClassAug", f"img_{i:04d}.png")


def _palette_png(path, label):
    image = Image.frombytes("P", label.shape[::-1], label.tobytes())
    image.putpalette([v for i in range(256) for v in (i, (37 * i) % 256, 255 - i)])
    image.save(path)


@pytest.mark.parametrize("kind, write, message", [
    ("3-channel", lambda p, lab: cv2.imwrite(p, np.dstack([lab, lab, lab])), r"is a 3-channel \(colour or palette\) image"),
    ("palette", _palette_png, r"is a 3-channel \(colour or palette\) image"),
    ("16-bit", lambda p, lab: cv2.imwrite(p, lab.astype(np.uint16)), "is a 16-bit image"),
    ("values", lambda p, lab: cv2.imwrite(p, np.where(lab == 1, 33, lab).astype(np.uint8)),
     r"holds the values \[33\], outside 0..20 and 255 \(1 label\(s\) in all\)"),
])
def test_a_label_that_is_not_8bit_class_ids_is_a_data_error_naming_it(tiny_pascal, kind, write, message):
    cfg, root = tiny_pascal
    path = _label_path(root)
    label = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    write(path, label)
    with pytest.raises(DataError, match=message) as err:
        load_split(cfg, train=True, use_cache=False)
    text = str(err.value)
    assert f"label '{path}'" in text
    assert "single-channel 8-bit" in text and "tools/prepare_pascal.py" in text


def test_labels_in_the_valid_range_pass_and_a_cached_table_is_checked_too(tiny_pascal):
    cfg, root = tiny_pascal
    load_split(cfg, train=True)                            # builds the cache: all labels valid
    cfg.dataset = "synthetic"                              # same 1..20 range: the cache is reused
    load_split(cfg, train=True)
    path = _label_path(root, 5)
    cv2.imwrite(path, label_with((64, 64), {21: 2048}))   # a changed file is rescanned
    cfg.dataset = "pascal"
    with pytest.raises(DataError, match=r"holds the values \[21\]"):
        load_split(cfg, train=True)


# ---- data mistakes through the entry points: one line, exit 2, no traceback -----------------
def test_too_few_images_for_k_shots_is_one_line_from_dataset_stats(tiny_pascal, tmp_path, capsys):
    cfg, root = tiny_pascal
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"DATA:\n  dataset: pascal\n  data_root: {root}\n  train_list: {cfg.train_list}\n"
                        f"  val_list: {cfg.val_list}\n  class_index_workers: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        run(dataset_stats.main, ["--config", str(cfg_path), "--episodes", "3", "shot", "5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "5-shot episodes need at least 6 images per class" in err and "class 2: 3" in err


def test_too_few_images_for_k_shots_is_one_line_from_train_py(tiny_pascal, tmp_path):
    cfg, root = tiny_pascal
    done = subprocess.run([sys.executable, "train.py", "--config", "config/pascal/pascal_split0_resnet50.yaml",
                           "data_root", root, "train_list", cfg.train_list, "val_list", cfg.val_list,
                           "class_index_workers", "1", "pretrained", "''", "shot", "5",
                           "save_path", str(tmp_path / "exp")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "train.py: error: " in done.stderr and "5-shot episodes need at least 6 images per class" in done.stderr


# ---- one wording per fault (util/errors.py builders), whichever entry point meets it -----------------
def test_an_unreadable_image_or_mask_reads_the_same_in_training_class_folders_and_predict(tmp_path):
    from dataset.folder import image_size, read_mask
    from dataset.image import read_image, read_label
    from engine.predictor import check_query_files, read_mask_values, read_rgb
    from util.errors import missing_file, unreadable_image

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    expected = (f"cannot read image '{broken}': the file is empty, corrupt or not an image format OpenCV and PIL "
                f"read; re-export it as JPEG or PNG")
    messages = []
    for reader in (read_image, image_size, read_rgb, lambda p: check_query_files([p])):
        with pytest.raises(UserError) as e:
            reader(str(broken))
        messages.append(str(e.value))
    assert messages == [expected] * 4 and unreadable_image("image", str(broken)) == expected
    mask = tmp_path / "broken.png"
    mask.write_bytes(b"")
    messages = []
    for reader in (read_mask, read_mask_values):
        with pytest.raises(UserError) as e:
            reader(str(mask))
        messages.append(str(e.value))
    assert messages == [unreadable_image("mask", str(mask))] * 2
    assert messages[0].endswith("re-export it as a PNG")
    with pytest.raises(UserError) as e:
        read_rgb(str(tmp_path / "none.jpg"))
    assert str(e.value) == missing_file("image", str(tmp_path / "none.jpg"), "check the path")
    with pytest.raises(UserError) as e:
        read_label(str(tmp_path / "none.png"))
    assert str(e.value) == missing_file("label", str(tmp_path / "none.png"),
                                        "check the path, the list that names it or data_root")


def test_too_few_images_for_k_shots_reads_alike_for_lists_folders_and_videos():
    from util.errors import too_few_for_shots
    assert too_few_for_shots(1) == "1-shot episodes need at least 2 images per class (a query and 1 support)"
    assert too_few_for_shots(5, "videos") == "5-shot episodes need at least 6 videos per class (a query and 5 supports)"
