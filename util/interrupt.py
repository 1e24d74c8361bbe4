"""Stopping a run on SIGINT / SIGTERM without losing it.

The first Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, ``docker stop``) only sets a
flag: the training loop finishes the step in flight, writes ``last.pth`` and exits with
128 + the signal number (130 / 143). A second SIGINT aborts at once by raising
``KeyboardInterrupt`` wherever the process is; checkpoints are written to a temporary file
and renamed (util/fileio.py), so an abort mid-write leaves the previous checkpoint intact.
Further SIGTERMs are ignored: schedulers often send the signal to every process of a job,
and a launcher may forward the same one (scripts/launch.sh), so a repeat is not a request.

Under torchrun every rank must stop at the same iteration (gradients are all-reduced at each
step): :class:`StopAgreement` sums the ranks' flags once per step on a CPU (gloo) group — no
device synchronisation is added to the step.
"""
from __future__ import annotations

import os
import shlex
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from util.errors import UserError, user_message

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving; ``exit_status`` is 128 + the signal."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class PeerFailed(UserError):
    """Another process of the job failed (its own message says why); this one stops too."""


def continue_command(argv: list[str]) -> str:
    """The command that continues this run: the one given, without ``resume``/``overwrite``,
    plus ``resume auto``. Through scripts/launch.sh (``$NTRENETPP_LAUNCHED_AS``), the
    ``sh train.sh <dataset> <exp_name> ...`` line the user typed: the launcher finds the venv's
    python and keeps the log, which ``python train.py`` would not. The launcher puts
    ``--config C`` before the user's own ``KEY VALUE`` pairs."""
    words = list(argv)
    launched = os.environ.get("NTRENETPP_LAUNCHED_AS", "")
    if launched and words[:1] == ["--config"]:
        head, words = shlex.split(launched), words[2:]
    else:
        head = ["python", "train.py"]
    kept, i = [], 0
    while i < len(words):
        if words[i] in ("resume", "overwrite") and i + 1 < len(words):
            i += 2
            continue
        kept.append(words[i])
        i += 1
    return " ".join(shlex.quote(w) if not ("=" in w and w.split("=")[0].isupper()) else w
                    for w in head + kept + ["resume", "auto"])


def restore_sigint() -> None:
    """Take Ctrl-C as usual when scripts/launch.sh started us in the background (an
    asynchronous command of a non-interactive shell starts with SIGINT ignored)."""
    if os.environ.get("NTRENETPP_LAUNCHER") and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class StopRequest:
    """The flag set by the first SIGINT/SIGTERM; ``signum`` says which (None: none yet)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signum, 128 + (self.signum or 0))

    def handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C")


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the handlers for the duration of the block (main thread only; elsewhere the
    request never fires), then restore the previous ones."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopAgreement:
    """Whether any rank was asked to stop, agreed by all ranks at the same point.

    ``any_requested(local)`` is called once per step on every rank; with one process it is
    ``local`` itself. Under torchrun it all-reduces a one-element CPU tensor (MAX) on a gloo
    group — the default group when it is gloo, else one made here (NCCL reduces only device
    tensors, and reading one back would synchronise the device)."""

    def __init__(self, distributed: bool):
        self.group = None
        self.distributed = distributed
        if distributed:
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.flag = torch.zeros(1, dtype=torch.int32)

    def any_requested(self, local: bool) -> bool:
        return bool(self.agreed_max(int(local)))

    def agreed_max(self, local: int) -> int:
        """The largest of the ranks' ``local`` values (a rank's stop status: 0, 130, 143), so
        that every rank stops with the same exit status whichever rank was signalled."""
        if not self.distributed:
            return local
        self.flag.fill_(local)
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(self.flag.item())    # a CPU tensor: no device synchronisation

    def raise_if_any_failed(self, error: BaseException | None) -> None:
        """Every rank calls this at the same point with its own error (or None): all raise
        if one failed — its own error, or PeerFailed with the failed rank's message — instead
        of the others waiting forever in the next collective."""
        if not self.any_requested(error is not None):
            return
        if error is not None and not self.distributed:
            raise error
        messages: list = [None] * dist.get_world_size()   # only on failure: who failed, and why
        mine = (user_message(error) if isinstance(error, UserError) else str(error)) if error is not None else None
        dist.all_gather_object(messages, mine, group=self.group)
        if error is not None:
            raise error
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise PeerFailed(f"stopped because process {rank} of this job failed: {message}")
