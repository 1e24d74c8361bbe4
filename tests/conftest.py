"""Shared fixtures: tiny VOC-layout trees with exactly known class areas."""
import logging
import os

import cv2
import numpy as np
import pytest
import torch

from tools.make_synthetic import main as make_synthetic
from util.config import defaults


def write_tree(root, labels, list_name="list.txt", prefix="img"):
    """Write ``labels`` (uint8 arrays) with random JPEGs under ``root`` in the VOC layout and a
    list file; return the list path."""
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, label in enumerate(labels):
        name = f"{prefix}_{i:04d}"
        image = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
        cv2.imwrite(os.path.join(root, "JPEGImages", name + ".jpg"), image)
        cv2.imwrite(os.path.join(root, "SegmentationClassAug", name + ".png"), label)
        lines.append(f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png")
    list_path = os.path.join(root, list_name)
    with open(list_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return list_path


def label_with(shape, areas):
    """A label of ``shape`` holding exactly ``areas[c]`` pixels of each class c (row-major
    runs), background elsewhere, and a short 255 run at the end."""
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    pos = 0
    for c, n in areas.items():
        flat[pos:pos + n] = c
        pos += n
    flat[-5:] = 255
    return flat.reshape(shape)


@pytest.fixture
def tiny_pascal(tmp_path):
    """A PASCAL-like tree (64x64 images = 4096 px) where every class 1..20 is served by
    exactly 3 images (>= 2048 px), plus one image serving two classes and one serving none.
    Returns (cfg, root)."""
    labels = []
    for c in range(1, 21):
        for k in range(3):
            labels.append(label_with((64, 64), {c: 2048 + 100 * k}))
    labels.append(label_with((64, 64), {1: 2048, 6: 2040}))   # serves 1 only (6 is short)
    labels.append(label_with((64, 64), {2: 1000}))            # serves nothing
    root = str(tmp_path / "data")
    list_path = write_tree(root, labels)
    cfg = defaults()
    cfg.update(dataset="pascal", data_root=root, train_list=list_path, val_list=list_path,
               train_h=33, train_w=33, val_size=41, class_index_workers=1, test_num=20)
    return cfg, root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and they thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a network and run small enough for a test: seconds on a CPU core
TINY = dict(dataset="synthetic", layers=18, pretrained="", reduce_dim=16, ppm_scales=[1.0, 0.5],
            train_h=33, train_w=33, val_size=41, batch_size=4, batch_size_val=4, workers=0,
            min_class_pixels=150, class_index_workers=1, epochs=2, epoch_size=8, print_freq=1,
            test_num=12, test_seeds=2, val_num=8, memory_size=40, num_negatives=16, tb_images=0,
            manual_seed=5)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny synthetic dataset (60 training, 80 evaluation images of 64 px), made once."""
    root = str(tmp_path_factory.mktemp("synth"))
    make_synthetic(["--out", root, "--train", "60", "--val", "80", "--size", "64", "--workers", "1"])
    return root


def tiny_cfg(root, save_path, **over):
    """A config that trains and evaluates on :func:`synth_root` in seconds."""
    cfg = defaults()
    cfg.update(TINY, data_root=root, train_list=os.path.join(root, "train.txt"),
               val_list=os.path.join(root, "val.txt"), save_path=str(save_path))
    cfg.update(over)
    return cfg


@pytest.fixture(autouse=True)
def restore_root_logging():
    """An entry point's setup_logger gives the root logger a console handler on the sys.stdout of
    its test (pytest's capture, closed after it): removed after each test, so a later test's log
    lines are not written to a closed stream."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def assert_ranks_equal_one_process(rank0: dict, rank1: dict, single: dict) -> None:
    """Two DDP ranks' weights are identical, and equal one process's with the same global batch
    (floats to reduction-order rounding, integer buffers exactly)."""
    for k in single:
        assert torch.equal(rank0[k], rank1[k]), f"ranks disagree on {k}"
        if single[k].is_floating_point():
            torch.testing.assert_close(rank0[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs from one process")
        else:
            assert torch.equal(rank0[k], single[k]), k
