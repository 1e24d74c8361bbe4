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


def check_folder(cfg, model_dir: str) -> None:
    """Refuse to start over existing checkpoints unless told (``resume`` / ``overwrite``)."""
    present = [name for name in CHECKPOINTS if os.path.isfile(os.path.join(model_dir, name))]
    if not present or cfg.resume:
        return
    if cfg.overwrite:
        for name in present:
            os.remove(os.path.join(model_dir, name))
        log.warning("overwrite True: deleted %s from %s", ", ".join(present), model_dir)
        return
    listed = ", ".join(name + saved_iteration(os.path.join(model_dir, name)) if name == "last.pth" else name
                       for name in present)
    raise ExperimentExistsError(
        f"{cfg.save_path} already holds {listed}. Continue that run with 'resume auto', train into "
        f"another folder (another exp name, or save_path DIR), or start over here with 'overwrite True' "
        f"(deletes them)")


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
