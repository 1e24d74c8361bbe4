"""Pieces shared by tools/prepare_pascal.py and tools/prepare_coco.py.

Both tools follow one pattern: check the inputs, build one task per image, run the tasks
over a process pool (each task links the JPEG and writes the label PNG, skipping what is
already correct), gather every problem, and write the lists only when nothing failed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from util.errors import DataError
from util.fileio import atomic_path, atomic_write, atomic_write_text
from util.logger import progress

IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClassAug"
IGNORE = 255
MAX_SHOWN = 10  # problems printed in full; the rest are counted


class PrepError(DataError):
    """Broken or missing input; the message names the file and how to fix it."""


@dataclass
class ItemResult:
    """What one task did to one image."""
    name: str
    label_written: bool = False
    image_written: bool = False
    source: str = ""                                         # where the label came from
    errors: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)   # (kind, detail)


def require_dir(path: str, hint: str) -> None:
    if not os.path.isdir(path):
        raise PrepError(f"folder '{os.path.abspath(path)}' does not exist; {hint}")


def require_file(path: str, hint: str) -> None:
    if not os.path.isfile(path):
        raise PrepError(f"file '{os.path.abspath(path)}' does not exist; {hint}")


def list_line(name: str) -> str:
    """The list-file line of image ``name`` (no extension), relative to data_root."""
    return f"{IMAGE_DIR}/{name}.jpg {LABEL_DIR}/{name}.png"


def write_list(path: str, names: Iterable[str]) -> int:
    """Write the sorted, de-duplicated list of ``names``; returns the number of lines."""
    names = sorted(set(names))
    atomic_write_text(path, "".join(list_line(n) + "\n" for n in names))
    return len(names)


def image_hw(path: str) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.height, im.width


def link_or_copy(src: str, dst: str, copy: bool) -> bool:
    """Put ``src`` at ``dst`` as an absolute symlink (or a copy); False if already in place.

    In place means: ``dst`` is ``src`` itself (e.g. --out is the source folder), a link to
    it when linking, or a regular file of the same size (a copy; links are replaced by
    copies when ``copy`` is asked for, copies are kept when linking).
    """
    src = os.path.abspath(src)
    if os.path.lexists(dst):
        if os.path.exists(dst) and os.path.samefile(src, dst) and not (copy and os.path.islink(dst)):
            return False
        if not os.path.islink(dst) and os.path.isfile(dst) and os.path.getsize(dst) == os.path.getsize(src):
            return False
    if copy:
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    else:
        with atomic_path(dst) as tmp:
            os.remove(tmp)  # atomic_path made a placeholder file; the link takes its name
            os.symlink(src, tmp)
    return True


def read_label_png(path: str) -> np.ndarray | None:
    """The single-channel content of ``path``, or None if absent, unreadable or not 1-channel."""
    try:
        with Image.open(path) as im:
            if im.mode != "L":
                return None
            return np.asarray(im)
    except (OSError, ValueError):
        return None


def write_label(path: str, label: np.ndarray) -> bool:
    """Write ``label`` (uint8 HxW) as a grayscale PNG unless ``path`` already holds exactly it.

    Grayscale ("L"), not palette: cv2.imread(..., IMREAD_GRAYSCALE) would turn palette
    entries into luminance and corrupt the class ids. Returns True when written.
    """
    existing = read_label_png(path)
    if existing is not None and existing.shape == label.shape and np.array_equal(existing, label):
        return False
    atomic_write(path, lambda tmp: Image.fromarray(label.astype(np.uint8, copy=False)).save(tmp, format="PNG"))
    return True


class _Guarded:
    """Picklable wrapper of a module-level task function: one unreadable file must not kill
    the pool, it becomes a problem reported with the image's name."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, task) -> ItemResult:
        try:
            return self.fn(task)
        except PrepError as e:
            return ItemResult(task.name, errors=[str(e)])
        except Exception as e:  # noqa: BLE001 - reported, never swallowed
            return ItemResult(task.name, errors=[f"{task.name}: {type(e).__name__}: {e}"])


def resolve_workers(workers: int | None) -> int:
    """Project convention: 0 or None means every core."""
    return workers if workers and workers > 0 else (os.cpu_count() or 1)


def run_tasks(fn: Callable, tasks: Sequence, workers: int, desc: str, unit: str = "img") -> list[ItemResult]:
    """Run ``fn`` on every task, in order, showing progress counted in ``unit`` (util/logger.py
    ``progress``: a bar on a terminal, plain lines otherwise); 1 worker runs in-process."""
    workers = min(resolve_workers(workers), max(1, len(tasks)))
    call = _Guarded(fn)
    if workers == 1:
        return [call(t) for t in progress(tasks, desc=desc, unit=unit)]
    chunksize = max(1, min(64, len(tasks) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        return list(progress(pool.imap(call, tasks, chunksize=chunksize), total=len(tasks), desc=desc, unit=unit))


def summarise(results: Sequence[ItemResult], what: str) -> dict:
    """Print written/kept counts and counted warnings; raise PrepError if any task failed."""
    labels_written = sum(r.label_written for r in results)
    images_written = sum(r.image_written for r in results)
    failed = sum(bool(r.errors) for r in results)          # neither written nor correct: not counted as kept
    print(f"{what}: {len(results)} images; labels written {labels_written}, already correct "
          f"{sum(not r.label_written and not r.errors for r in results)}; images placed {images_written}, "
          f"already in place {sum(not r.image_written and not r.errors for r in results)}"
          + (f"; failed {failed}" if failed else ""))
    warnings = Counter(kind for r in results for kind, _ in r.warnings)
    for kind, count in sorted(warnings.items()):
        first = next(d for r in results for k, d in r.warnings if k == kind)
        print(f"warning: {count} x {kind} (first: {first})")
    errors = [e for r in results for e in r.errors]
    if errors:
        shown = "\n  ".join(errors[:MAX_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_SHOWN} more" if len(errors) > MAX_SHOWN else ""
        raise PrepError(f"{len(errors)} problem(s) in {what}; no list was written. Fix these and "
                        f"re-run (what is already written is kept):\n  {shown}{more}")
    return {"images": len(results), "labels_written": labels_written,
            "images_written": images_written, "warnings": dict(warnings)}


def add_output_args(parser: argparse.ArgumentParser, dataset: str) -> None:
    """--out, --lists, --copy, --workers; defaults are where the configs of ``dataset`` look."""
    parser.add_argument("--out", default=f"data/{dataset}", help=f"data_root to write (default: data/{dataset})")
    parser.add_argument("--lists", default=os.path.join("lists", dataset),
                        help=f"folder of the list files (default: lists/{dataset})")
    parser.add_argument("--copy", action="store_true", help="copy the JPEGs instead of symlinking them")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")

