"""Shared fixtures: tiny VOC-layout trees with exactly known class areas."""
import os

import cv2
import numpy as np
import pytest
import torch


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
    from util.config import defaults

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
