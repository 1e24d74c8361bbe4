"""Atomic file writes and list files.

Everything the project writes that a crash could corrupt (checkpoints, caches, labels,
lists, results) goes through here: write to a temporary file in the same folder, flush,
then rename over the target, so a reader sees the old file or the new one, never half.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from util.errors import DataError, DataFileMissing

log = logging.getLogger("ntrenetpp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (a power cut after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass            # not every file system syncs a directory
    finally:
        os.close(fd)


def keep_as(path: str, previous: str) -> None:
    """Make ``previous`` the current content of ``path`` (if any) without a moment where
    ``path`` is missing: a hard link renamed onto ``previous``; where the file system has
    no hard links, ``path`` itself is renamed (the caller puts the new one in place next)."""
    if not os.path.exists(path):
        return
    link = f"{previous}.{os.getpid()}.link"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        os.replace(path, previous)


@contextlib.contextmanager
def atomic_path(path: str, keep_previous: str | None = None) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    ``keep_previous``: the file ``path`` held until now is kept under that name (a rotation:
    something to fall back to if the new one is found damaged later)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # keep the extension: some writers (cv2.imwrite) choose the format from it
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should follow the umask like open()
    try:
        yield tmp
        if keep_previous:
            keep_as(path, keep_previous)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write(path: str, writer: Callable[[str], Any], keep_previous: str | None = None) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path, keep_previous) as tmp:
        writer(tmp)


def atomic_write_image(path: str, image: np.ndarray, params=()) -> None:
    """Write an image atomically, in the format of ``path``'s extension (PNG, JPEG, ...).
    ``image`` is as OpenCV takes it: H×W grey or H×W×3 BGR; ``params`` are ``cv2.imwrite``'s.
    A failed encode is an OSError naming the file."""
    def write(tmp):
        if not cv2.imwrite(tmp, image, list(params)):
            raise OSError(f"could not write image '{path}'")
    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def atomic_write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str, keep_previous: str | None = None) -> None:
    import torch

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write, keep_previous)


def read_list(list_path: str, data_root: str = "", check_files: bool = True) -> list[tuple[str, str]]:
    """Read a list file of ``image_path label_path`` lines.

    Paths are relative to ``data_root`` (absolute paths are kept). Returns (image, label)
    pairs joined with ``data_root``. With ``check_files`` every file must exist, otherwise
    the error says how many are missing, the first few, and the list's path.
    """
    if not os.path.isfile(list_path):
        raise DataFileMissing(
            f"list file '{os.path.abspath(list_path)}' does not exist; build it with tools/prepare_pascal.py, "
            f"tools/prepare_coco.py or tools/make_synthetic.py, or fix the list key in the config")
    pairs = []
    with open(list_path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(f"{list_path}:{lineno}: expected 'image_path label_path', got {line!r}")
            pairs.append((os.path.join(data_root, parts[0]), os.path.join(data_root, parts[1])))
    if not pairs:
        raise DataError(f"list file '{list_path}' names no images")
    if check_files:
        missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(missing[:5])
            raise DataFileMissing(
                f"{list_path}: {len(missing)} listed file(s) do not exist (data_root='{os.path.abspath(data_root)}'); "
                f"first ones: {shown}. Check data_root in the config or rebuild the list.")
    return pairs


def candidate_names(stem: str, suffix: str) -> Iterator[str]:
    """``stem + suffix``, then ``stem-2 + suffix``, ``stem-3 + suffix``, ..."""
    yield f"{stem}{suffix}"
    k = 2
    while True:
        yield f"{stem}-{k}{suffix}"
        k += 1


def create_new(stem: str, suffix: str, writer: Callable[[str], Any]) -> str:
    """Write a new file under the first of :func:`candidate_names` that no other writer holds and
    return its path. ``writer(tmp)`` writes the whole content into a hidden temporary file beside
    it, which is then hard-linked under the name (a link fails when the name exists: exclusive
    and atomic, so two processes that start in the same second keep one file each) and removed.
    No empty or partial file ever holds the name, whenever the process dies; a kill leaves at
    most the hidden temporary file. Where the file system has no hard links, the name is
    reserved by creating it exclusively and the content renamed onto it: a kill in between
    leaves that empty file (the readers skip and name it, :func:`read_json_result`)."""
    folder = os.path.dirname(os.path.abspath(stem))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(stem) + ".", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        writer(tmp)
        for path in candidate_names(stem, suffix):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                continue
            except OSError:        # no hard links here: reserve the name, then rename onto it
                path = reserve_name(stem, suffix)
                os.replace(tmp, path)
                break
        fsync_dir(folder)
        return path
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def reserve_name(stem: str, suffix: str) -> str:
    """The first of :func:`candidate_names` not taken, reserved by creating it exclusively (an
    empty file, for a writer that replaces it at once)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    for path in candidate_names(stem, suffix):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue


def create_new_json(stem: str, obj: Any, indent: int | None = 2, suffix: str = ".json") -> str:
    """:func:`create_new` of ``stem + suffix`` holding ``obj``."""
    text = json.dumps(obj, indent=indent) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return create_new(stem, suffix, write)


def read_json_result(path: str, what: str = "result") -> dict | None:
    """A JSON file written whole by :func:`create_new_json`, or None (with a warning naming it)
    when it is empty or cut short: a partial file (a write cut off on a file system without hard
    links, or a copy interrupted) is skipped, not a crash of the tool that reads it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        log.warning("skipping %s '%s': %s", what, os.path.abspath(path),
                    "empty (a write that was cut off)" if size == 0 else f"not complete JSON ({e})")
        return None
