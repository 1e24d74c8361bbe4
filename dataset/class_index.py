"""Which image serves which class: built once in parallel, cached beside the list.

The slow part of start-up in the PFENet family is reading every label to find which
classes each image holds (82k labels on COCO, per run). Here the scan produces an *area
table* — for every listed image, the pixel count of every class id present — which is
cached atomically in ``<list>.classindex.npz``. The table does not depend on the fold,
the threshold or the filtering switch, so changing those needs no rescan: the filtered
index (:func:`build_class_index`) is derived from the table in milliseconds, and is
therefore never stale. The cache is keyed by the list's content, ``data_root`` and the
size and modification time of every label file; any change rebuilds it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from util.errors import DataError, missing_or_unreadable
from util.fileio import atomic_write

log = logging.getLogger(__name__)

CACHE_VERSION = 2   # 2: written only by scans that checked each label's format
CACHE_SUFFIX = ".classindex.npz"


@dataclass
class AreaTable:
    """Sparse per-image class areas: image ``image[i]`` has ``area[i]`` pixels of ``cls[i]``."""
    num_images: int
    image: np.ndarray   # int64, ascending
    cls: np.ndarray     # int64, class ids 1..254
    area: np.ndarray    # int64 pixel counts (> 0)


LABEL_FORMAT = ("labels are single-channel 8-bit PNGs of class ids (0 background, 1..N the classes, "
                "255 ignore)")


def label_class_areas(label_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, pixel counts) of one label file, ignoring 0 (background) and 255.

    The label must be single-channel 8-bit: a colour or palette PNG (VOC's original
    ``SegmentationClass``, a colour-coded label) or a 16-bit one is a DataError, never read
    as grey levels."""
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)   # OpenCV expands a palette to 3 channels
    if label is None:
        raise DataError(missing_or_unreadable("label", label_path))
    if label.ndim != 2 or label.dtype != np.uint8:
        kind = [f"{label.shape[2]}-channel (colour or palette)"] if label.ndim == 3 else []
        kind += [] if label.dtype == np.uint8 else [f"{label.dtype.itemsize * 8}-bit"]
        raise DataError(f"label '{label_path}' is a {', '.join(kind)} image; {LABEL_FORMAT}")
    counts = np.bincount(label.ravel(), minlength=256)
    counts[0] = counts[255] = 0
    ids = np.flatnonzero(counts)
    return ids, counts[ids]


def _scan_chunk(paths: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    cv2.setNumThreads(0)  # one process per core already
    return [label_class_areas(p) for p in paths]


def scan_areas(label_paths: list[str], workers: int = 0) -> AreaTable:
    """Read every label (in ``workers`` processes; 0 = all cores) into an :class:`AreaTable`."""
    workers = workers or os.cpu_count() or 1
    n = len(label_paths)
    chunk = max(1, min(256, n // (workers * 4) or 1))
    chunks = [label_paths[i:i + chunk] for i in range(0, n, chunk)]
    if workers == 1 or n < 64:
        results = [r for c in chunks for r in _scan_chunk(c)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = [r for part in pool.map(_scan_chunk, chunks) for r in part]
    image = np.concatenate([np.full(len(ids), i, np.int64) for i, (ids, _) in enumerate(results)] or
                           [np.zeros(0, np.int64)])
    cls = np.concatenate([ids for ids, _ in results] or [np.zeros(0, np.int64)]).astype(np.int64)
    area = np.concatenate([a for _, a in results] or [np.zeros(0, np.int64)]).astype(np.int64)
    return AreaTable(n, image, cls, area)


def cache_key(list_path: str, data_root: str, label_paths: list[str]) -> str:
    """Fingerprint of what the area table depends on: list bytes, data_root, label stats."""
    h = hashlib.sha1()
    h.update(f"v{CACHE_VERSION}\0{os.path.abspath(data_root)}\0".encode())
    with open(list_path, "rb") as f:
        h.update(f.read())
    for p in label_paths:
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        except FileNotFoundError:
            h.update(b"missing;")
    return h.hexdigest()


def cache_path_for(list_path: str) -> str:
    return list_path + CACHE_SUFFIX


def check_class_ids(table: AreaTable, label_paths: list[str], num_classes: int) -> None:
    """Every class id in the table is 1..``num_classes`` (0 and 255 are not in it): a
    DataError naming the first label holding another value."""
    bad = table.cls > num_classes
    if bad.any():
        first = int(table.image[bad][0])
        values = sorted(set(table.cls[table.image == first].tolist()) - set(range(1, num_classes + 1)))
        raise DataError(f"label '{label_paths[first]}' holds the values {values}, outside 0..{num_classes} "
                        f"and 255 ({int(np.unique(table.image[bad]).size)} label(s) in all); {LABEL_FORMAT}")


def read_cache(path: str, key: str) -> AreaTable | None:
    """The cached table if its key is ``key``, None if it is another list's; raises on any
    damage (a truncated zip, flipped bytes, missing or inconsistent arrays)."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            return None
        table = AreaTable(int(z["num_images"]), z["image"], z["cls"], z["area"])
    n = len(table.image)
    if not (table.image.ndim == table.cls.ndim == table.area.ndim == 1 and len(table.cls) == len(table.area) == n):
        raise ValueError("arrays of different lengths")
    if n and (table.image.min() < 0 or table.image.max() >= table.num_images or np.any(np.diff(table.image) < 0)):
        raise ValueError("image positions out of range or unsorted")
    return table


def load_area_table(list_path: str, data_root: str, label_paths: list[str], workers: int = 0,
                    use_cache: bool = True, num_classes: int | None = None,
                    fix: str = "") -> tuple[AreaTable, bool]:
    """The area table of a list, from the cache when it is valid. Returns (table, from_cache).

    Labels are checked as they are scanned (:func:`label_class_areas`) and, with
    ``num_classes``, for class ids beyond it (:func:`check_class_ids`); a bad label is a
    DataError naming the file, followed by ``fix`` (how to produce proper labels)."""
    try:
        table, cached = _area_table(list_path, data_root, label_paths, workers, use_cache)
        if num_classes is not None:
            check_class_ids(table, label_paths, num_classes)
    except DataError as e:
        raise DataError(f"{e}. {fix}" if fix else str(e)) from None
    return table, cached


def _area_table(list_path: str, data_root: str, label_paths: list[str], workers: int,
                use_cache: bool) -> tuple[AreaTable, bool]:
    key = cache_key(list_path, data_root, label_paths)
    path = cache_path_for(list_path)
    if use_cache and os.path.isfile(path):
        try:
            table = read_cache(path, key)
        except Exception as e:  # noqa: BLE001 — truncated, garbage, hand-edited: rebuilt, never trusted
            log.warning("ignoring damaged class-index cache %s (%s: %s); rebuilding it", path, type(e).__name__, e)
        else:
            if table is not None:
                return table, True
    t0 = time.perf_counter()
    table = scan_areas(label_paths, workers)
    log.info("scanned %d labels of %s in %.1f s", len(label_paths), list_path, time.perf_counter() - t0)
    if use_cache:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), num_images=np.array(table.num_images),
                         image=table.image, cls=table.cls, area=table.area)
        try:
            atomic_write(path, write)
        except OSError as e:
            log.warning("could not write class-index cache %s (%s); the next start will rescan", path, e)
    return table, False


@dataclass
class ClassIndex:
    """The filtered index: which listed images take part, and which serve each class."""
    images: list[int]                  # list positions of images that serve >= 1 active class
    classes_of: dict[int, list[int]]   # list position -> its eligible active classes (ascending)
    images_of: dict[int, list[int]]    # class id -> list positions serving it (ascending)


def build_class_index(table: AreaTable, active_classes: list[int], min_pixels: int = 2048,
                      exclude_classes: list[int] = ()) -> ClassIndex:
    """Filter the area table (docs/protocol.md): an image serves class c of ``active_classes``
    if it has at least ``min_pixels`` pixels of c; images serving none are dropped. With
    ``exclude_classes`` (BAM convention), images containing any pixel of those are dropped."""
    active = np.isin(table.cls, np.asarray(active_classes, np.int64))
    keep = active & (table.area >= min_pixels)
    if len(exclude_classes):
        banned = np.unique(table.image[np.isin(table.cls, np.asarray(exclude_classes, np.int64))])
        keep &= ~np.isin(table.image, banned)
    classes_of: dict[int, list[int]] = {}
    for img, c in zip(table.image[keep].tolist(), table.cls[keep].tolist()):
        classes_of.setdefault(img, []).append(c)
    images_of: dict[int, list[int]] = {c: [] for c in active_classes}
    for img in sorted(classes_of):
        for c in classes_of[img]:
            images_of[c].append(img)
    return ClassIndex(sorted(classes_of), classes_of, images_of)
