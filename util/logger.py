"""Logging to the console (rank 0) and to a log file in the experiment folder."""
from __future__ import annotations

import logging
import os
import sys

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
