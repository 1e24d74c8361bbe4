"""The page's examples: supports and queries drawn by the synthetic data generator, in memory
(the same renderer ``make demo`` writes its data with), so the page shows a result with one
click and no upload. Each example is a class the checkpoint's fold holds out (fold 0's for a
checkpoint of another dataset, on which synthetic shapes are only a smoke test)."""
from __future__ import annotations

import cv2
import numpy as np

from app.segment import SupportInput
from tools.make_synthetic import render_image
from tools.make_synthetic_video import render_video
from util.classes import SYNTHETIC_CLASSES, fold_classes

COUNT = 3                    # examples offered
QUERIES = 2                  # query images per image example
VIDEO_FRAMES = 8


def example_classes(cfg) -> list[int]:
    """The 1-based synthetic class ids of the examples for a checkpoint's config."""
    split = cfg.split if cfg.dataset in ("synthetic", "synthetic_video") and cfg.split in (0, 1, 2, 3) else 0
    return fold_classes("synthetic", split)[1][:COUNT]


def example_names(cfg) -> list[str]:
    return [SYNTHETIC_CLASSES[c - 1] for c in example_classes(cfg)]


def _rgb(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_example(class_id: int, shot: int = 1) -> tuple[list[SupportInput], list[np.ndarray]]:
    """``shot`` supports and QUERIES queries whose main object is of ``class_id``; the support
    masks as the dataset labels them (1 the object, 255 its outline band, 0 the rest)."""
    supports, queries = [], []
    for k in range(shot + QUERIES):
        image, label = render_image([2026, class_id, k], main_class=class_id - 1)
        if k < shot:
            mask = np.where(label == 255, 255, label == class_id).astype(np.uint8)
            supports.append(SupportInput(_rgb(image), mask=mask))
        else:
            queries.append(_rgb(image))
    return supports, queries


def video_example(class_id: int, shot: int) -> tuple[list[SupportInput], list[np.ndarray]]:
    """``shot`` support frames of one video of ``class_id`` with its masks, and the frames of
    another video of that class as the query."""
    frames, _, visible = render_video([2026, class_id, 0], max(shot, 1), 64, False, class_id - 1)
    supports = [SupportInput(_rgb(f), mask=visible[0][t].astype(np.uint8)) for t, f in enumerate(frames)]
    query, _, _ = render_video([2026, class_id, 1], VIDEO_FRAMES, 64, False, class_id - 1)
    return supports, [_rgb(f) for f in query]


def example(cfg, index: int) -> tuple[list[SupportInput], list[np.ndarray]]:
    """Example ``index`` for a checkpoint of config ``cfg``: image or video as its task is.
    A video checkpoint that pairs frames with supports gets ``clip_len`` supports."""
    class_id = example_classes(cfg)[index]
    if cfg.task == "video":
        shot = cfg.clip_len if cfg.support_mode == "paired" else cfg.shot
        return video_example(class_id, shot)
    return image_example(class_id, 1)
