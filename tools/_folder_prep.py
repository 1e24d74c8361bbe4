"""Pieces shared by the class-folder preparation tools (prepare_fss1000.py, prepare_cdfss.py).

They write the layout dataset/folder.py reads, ``<out>/<class>/<stem>.<ext>`` images with
0/1 grayscale PNG masks, following the pattern of tools/_prep_common.py: check the whole
input layout first (nothing is written when a file is missing or unpaired), then one task
per source item over a process pool, each file written atomically and skipped when it
already holds exactly what would be written, every problem gathered, and the class lists
written last, only when nothing failed, so a failed run leaves no list to load.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tools._prep_common import PrepError, resolve_workers, write_label
from util.fileio import atomic_path, atomic_write, atomic_write_text
from util.logger import progress

MASK_RESIZED = "masks of another size than their image, resized to it (nearest neighbour)"
EMPTY_MASK = "masks with no foreground pixel (none >= 128)"


@dataclass
class PrepResult:
    """What one task did: files written or already correct, items per class, problems."""
    name: str
    written: int = 0
    unchanged: int = 0
    per_class: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)   # (kind, detail)

    def count(self, written: bool) -> None:
        if written:
            self.written += 1
        else:
            self.unchanged += 1


ALSO_PRINTED = 5     # problems printed above the error line, at most


def raise_problems(problems: Sequence[str]) -> None:
    """One line for the first problem; the next few (if any) printed above it, and a count."""
    if not problems:
        return
    others = problems[1:]
    for p in others[:ALSO_PRINTED]:
        print(f"  also: {p}", file=sys.stderr)
    more = ""
    if len(others) > ALSO_PRINTED:
        more = f" ({len(others)} more problem(s), the first {ALSO_PRINTED} printed above)"
    elif others:
        more = f" ({len(others)} more problem(s) printed above)"
    raise PrepError(f"{problems[0]}{more}")


def binarize_mask(path: str) -> np.ndarray:
    """0/1 uint8 mask of a source mask file: grey level (PIL's ``L`` conversion) ``>= 128``."""
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise PrepError(f"cannot read mask '{path}' ({e}); re-extract the archive") from e
    return (grey >= 128).astype(np.uint8)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(mode='nearest')``, the resize the reference code
    applies to every mask."""
    t = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
    return F.interpolate(t, size=(height, width), mode="nearest")[0, 0].to(torch.uint8).numpy()


def image_wh(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise PrepError(f"cannot read image '{path}' ({e}); re-extract the archive") from e


def mask_for_image(mask_path: str, image_path: str, result: PrepResult) -> np.ndarray:
    """The 0/1 mask of ``mask_path`` at the size of ``image_path`` (resized and counted as a
    warning where the sizes differ; counted when it has no foreground)."""
    mask = binarize_mask(mask_path)
    width, height = image_wh(image_path)
    if mask.shape != (height, width):
        result.warnings.append((MASK_RESIZED, f"'{mask_path}' {mask.shape[1]}x{mask.shape[0]}, "
                                              f"image {width}x{height}"))
        mask = resize_nearest(mask, height, width)
    if not mask.any():
        result.warnings.append((EMPTY_MASK, mask_path))
    return mask


def same_bytes(path: str, data: bytes) -> bool:
    if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) != len(data):
        return False
    with open(path, "rb") as f:
        return f.read() == data


def write_bytes(path: str, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly it; True when written."""
    if same_bytes(path, data):
        return False

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)
    return True


def place_file(src: str, dst: str, link: bool = False) -> bool:
    """A copy of ``src`` at ``dst`` (or, with ``link``, an absolute symlink to it); False when
    ``dst`` already is one (a copy with the same bytes / a link to ``src``)."""
    src = os.path.abspath(src)
    if link:
        if os.path.islink(dst) and os.readlink(dst) == src:
            return False
        with atomic_path(dst) as tmp:
            os.remove(tmp)   # atomic_path made a placeholder file; the link takes its name
            os.symlink(src, tmp)
        return True
    if os.path.isfile(dst) and not os.path.islink(dst) and os.path.getsize(dst) == os.path.getsize(src):
        with open(src, "rb") as a, open(dst, "rb") as b:
            if a.read() == b.read():
                return False
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    return True


def put_mask(path: str, mask: np.ndarray, result: PrepResult) -> None:
    result.count(write_label(path, mask))


class _Guarded:
    """Picklable wrapper: a task's problem becomes a reported error, not a dead pool."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, task) -> PrepResult:
        try:
            return self.fn(task)
        except PrepError as e:
            return PrepResult(task.name, errors=[str(e)])
        except Exception as e:  # noqa: BLE001 - reported, never swallowed
            return PrepResult(task.name, errors=[f"{task.name}: {type(e).__name__}: {e}"])


def run_tasks(fn: Callable, tasks: Sequence, workers: int, desc: str, unit: str) -> list[PrepResult]:
    """``fn`` on every task, in order, showing progress (a bar on a terminal, plain lines
    otherwise); 1 worker runs in-process."""
    workers = min(resolve_workers(workers), max(1, len(tasks)))
    call = _Guarded(fn)
    if workers == 1:
        return [call(t) for t in progress(tasks, desc=desc, unit=unit)]
    chunksize = max(1, min(16, len(tasks) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        return list(progress(pool.imap(call, tasks, chunksize=chunksize), total=len(tasks), desc=desc, unit=unit))


def summarise(results: Sequence[PrepResult], what: str, unit: str,
              extra_warnings: Sequence[tuple[str, str]] = ()) -> dict:
    """Print the counts and counted warnings (the tasks' and ``extra_warnings``, found
    before them); raise the problems (one line) if any."""
    written = sum(r.written for r in results)
    unchanged = sum(r.unchanged for r in results)
    per_class = sum((r.per_class for r in results), Counter())
    print(f"{what}: {len(results)} {unit}; files written {written}, already correct {unchanged}")
    all_warnings = list(extra_warnings) + [w for r in results for w in r.warnings]
    warnings = Counter(kind for kind, _ in all_warnings)
    for kind, count in sorted(warnings.items()):
        first = next(d for k, d in all_warnings if k == kind)
        print(f"warning: {count} x {kind} (first: {first})")
    raise_problems([e for r in results for e in r.errors])
    return {"sources": len(results), "written": written, "unchanged": unchanged,
            "per_class": dict(per_class), "warnings": dict(warnings)}


def write_class_list(path: str, names: Sequence[str]) -> bool:
    """The class list (one name a line); True when written, False when already identical."""
    text = "".join(n + "\n" for n in names)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return False
    atomic_write_text(path, text)
    return True
