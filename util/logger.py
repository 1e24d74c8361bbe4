"""Logging to the console (rank 0) and to a log file in the experiment folder."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator

from tqdm import tqdm

FORMAT = "[%(asctime)s %(levelname)s] %(message)s"


def setup_logger(save_path: str = "", rank: int = 0, filename: str = "train.log") -> logging.Logger:
    """Configure the root logger: INFO to stdout on rank 0, everything to ``save_path/filename``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        root.addHandler(console)
        if save_path:
            os.makedirs(save_path, exist_ok=True)
            fh = logging.FileHandler(os.path.join(save_path, filename))
            fh.setFormatter(fmt)
            root.addHandler(fh)
    else:
        root.setLevel(logging.WARNING)
    return logging.getLogger("ntrenetpp")


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def progress_stream():
    """Where a progress bar may be drawn: a terminal, never a log file or a pipe.

    scripts/launch.sh pipes the output through ``tee`` into the log and hands the terminal
    over as file descriptor ``$NTRENETPP_PROGRESS_FD``; run directly, the bar goes to stderr
    when both stdout and stderr are a terminal. None: no bar."""
    fd = os.environ.get("NTRENETPP_PROGRESS_FD", "")
    if fd.isdigit():
        try:
            if os.isatty(int(fd)):
                return os.fdopen(os.dup(int(fd)), "w")
        except OSError:
            pass
    if sys.stdout.isatty() and sys.stderr.isatty():
        return sys.stderr
    return None


def progress(items: Iterable, total: int | None = None, desc: str = "", unit: str = "it",
             lines: int = 10) -> Iterator:
    """Iterate over ``items`` showing progress where someone watches: a tqdm bar on the terminal
    (:func:`progress_stream`), otherwise — a log file, a pipe, CI — about ``lines`` plain lines on
    stderr (``desc: 40/100 img (40%)``), none with a carriage return, so that a one-line error
    printed after them stays the last line."""
    total = len(items) if total is None and hasattr(items, "__len__") else total
    stream = progress_stream()
    if stream is not None:
        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
        return
    step = max(1, -(-total // lines)) if total else 0
    done = 0
    for item in items:
        yield item
        done += 1
        if step and (done % step == 0 or done == total):
            print(f"{desc}: {done}/{total} {unit} ({100 * done // total}%)", file=sys.stderr, flush=True)


class EventWriter:
    """A TensorBoard event writer for one run, created at the first value written (a run
    that fails before its first step leaves no event file).

    ``purge_step``: on a resume, TensorBoard drops the values this folder already holds
    at steps >= ``purge_step`` (written after the checkpoint by the run that was cut off),
    so no step appears twice."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter
            # the pid in the name: two writers opened in the same second must not share a file
            self._writer = SummaryWriter(self.log_dir, purge_step=self.purge_step, filename_suffix=f".{os.getpid()}")
        return self._writer

    def add_scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.writer.add_image(tag, image, step, dataformats=dataformats)

    def close(self):
        if self._writer is not None:
            self._writer.close()
