"""The experiment folder of a training run: one run at a time, never silently replaced.

:class:`ExperimentGuard` is entered by rank 0 at the start of ``Trainer.train`` (all ranks
agree on the outcome, so a refusal stops every process at once); train.py takes the lock
earlier, before anything is logged or loaded (:func:`take_lock`), and hands it to the guard:

- ``train.lock`` (util/runlock.py): a second process training into the same folder is refused;
  the lock of a crashed run is taken over.
- Checkpoints already there and no ``resume``: refused with one line naming the folder and the
  three ways on (``resume auto``, another folder, ``overwrite True``). With ``overwrite True``
  the old checkpoints are deleted first, so no stale ``best.pth`` outlives its run.
- Temporary files a killed save left behind (``.last.pth.*.tmp.pth``) are removed.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil

import torch

from engine.checkpoint import PREVIOUS_SUFFIX
from util.errors import UserError
from util.interrupt import StopAgreement
from util.runlock import RunLock

log = logging.getLogger("ntrenetpp")

CHECKPOINTS = ("last.pth", "last" + PREVIOUS_SUFFIX, "best.pth")


class ExperimentExistsError(UserError):
    """The experiment folder holds checkpoints and the run neither resumes nor overwrites."""


class ExperimentFolderError(UserError):
    """The experiment folder cannot be written."""


def saved_iteration(path: str) -> str:
    """' (iteration N)' read cheaply (memory-mapped, tensors untouched), or '' if unreadable."""
    try:
        return f" (iteration {torch.load(path, map_location='cpu', weights_only=True, mmap=True)['iteration']})"
    except Exception:  # noqa: BLE001 - only decorates a message
        return ""


def present_checkpoints(model_dir: str) -> list[str]:
    return [name for name in CHECKPOINTS if os.path.isfile(os.path.join(model_dir, name))]


def refuse_existing_checkpoints(cfg, model_dir: str) -> None:
    """Raise when ``model_dir`` holds checkpoints and the run neither resumes nor overwrites
    them (a check only: nothing is deleted)."""
    present = present_checkpoints(model_dir)
    if not present or cfg.resume or cfg.overwrite:
        return
    listed = ", ".join(name + saved_iteration(os.path.join(model_dir, name)) if name == "last.pth" else name
                       for name in present)
    raise ExperimentExistsError(
        f"{cfg.save_path} already holds {listed}. Continue that run with 'resume auto', train into "
        f"another folder (another exp name, or save_path DIR), or start over here with 'overwrite True' "
        f"(deletes them)")


def check_folder(cfg, model_dir: str) -> None:
    """Refuse to start over existing checkpoints unless told (``resume`` / ``overwrite``)."""
    refuse_existing_checkpoints(cfg, model_dir)
    present = present_checkpoints(model_dir)
    if present and cfg.overwrite and not cfg.resume:
        for name in present:
            os.remove(os.path.join(model_dir, name))
        log.warning("overwrite True: deleted %s from %s", ", ".join(present), model_dir)


def remove_temporaries(model_dir: str) -> None:
    for tmp in glob.glob(os.path.join(model_dir, ".*.pth.*.tmp.pth")):
        os.remove(tmp)
        log.info("removed %s, left by a save that was cut off", tmp)


def take_lock(cfg, info) -> RunLock | None:
    """Rank 0 takes ``<save_path>/train.lock`` (None elsewhere); every rank raises if it was
    refused. train.py calls it before anything is logged or loaded, so a run refused by a
    live one writes nothing into that run's ``train.log``."""
    error, lock = None, None
    if info.is_main:
        try:
            lock = RunLock(cfg.save_path)
            lock.acquire()
        except UserError as e:
            error, lock = e, None
    StopAgreement(info.distributed).raise_if_any_failed(error)
    return lock


def first_missing(path: str) -> str:
    """The outermost folder of ``path`` that does not exist yet (what creating ``path`` creates
    first); '' when ``path`` exists."""
    path, missing = os.path.abspath(path), ""
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class StartupCleanup:
    """What a run refused at start-up (a bad data file, a checkpoint that does not fit: before
    its work began) leaves behind: nothing. Made before anything is written; :meth:`discard`
    then removes the folders this run created for its experiment folder (here, or the launcher
    for this very run: ``$NTRENETPP_NEW_FOLDER``, the outermost it created), else only the
    launcher's log of this run (``$NTRENETPP_LOG``). Rank 0 alone removes."""

    def __init__(self, save_path: str, is_main: bool = True):
        self.is_main, self.save_path = is_main, save_path
        self.created = first_missing(save_path) if save_path else ""
        launched = os.environ.get("NTRENETPP_NEW_FOLDER", "")
        if not self.created and launched and os.path.isdir(launched) and inside(save_path, launched):
            self.created = launched

    def discard(self) -> None:
        """The experiment folder goes with all it holds; the folders above it that this run
        created go only when empty (another run may have put its own folder beside it)."""
        if not self.is_main:
            return
        if self.created:
            shutil.rmtree(self.save_path, ignore_errors=True)
            folder = os.path.dirname(os.path.abspath(self.save_path))
            while inside(folder, self.created):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                folder = os.path.dirname(folder)
            return
        launcher_log = os.environ.get("NTRENETPP_LOG", "")
        if launcher_log and os.path.isfile(launcher_log):
            os.remove(launcher_log)


class ExperimentGuard:
    """``with ExperimentGuard(cfg, model_dir):`` on rank 0 for the length of a run."""

    def __init__(self, cfg, model_dir: str, lock: RunLock | None = None):
        """``lock``: the folder's lock, already held (:func:`take_lock`); its holder releases it."""
        self.cfg, self.model_dir = cfg, model_dir
        self.own_lock = lock is None
        self.lock = RunLock(cfg.save_path) if lock is None else lock

    def __enter__(self) -> "ExperimentGuard":
        if self.own_lock:
            self.lock.acquire()
        try:
            try:
                os.makedirs(self.model_dir, exist_ok=True)
            except OSError as e:
                raise ExperimentFolderError(f"cannot create {self.model_dir} ({e.strerror or e}); make "
                                            f"{self.cfg.save_path} writable or choose another save_path") from None
            check_folder(self.cfg, self.model_dir)
            remove_temporaries(self.model_dir)
        except BaseException:
            if self.own_lock:
                self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.own_lock:
            self.lock.release()
