"""The checks a run makes before it reads any data or creates any folder.

Everything that can be refused without data is refused here, so a mistake is reported at once
(not after the data lists are read and indexed) and a refused run leaves nothing behind:

- ``arch`` names a network that can be built (a registered name, or an importable
  ``package.module:callable``);
- training: the backbone weight file (``pretrained``) and the checkpoint ``resume`` names exist,
  and that checkpoint was trained with this architecture; the experiment folder holds no
  checkpoints unless the run resumes or overwrites them;
- evaluating and predicting: the checkpoint exists, reads, is of the config's task and no
  command-line override conflicts with its architecture;
- the folders the run writes into can be created and written.

The config itself (keys, types, cross-key checks) is checked when it is loaded (util/config.py).
``python -m commands.folder`` (what train.sh and test.sh ask before creating the experiment
folder) and train.py, test.py and predict.py call :func:`preflight` first.
"""
from __future__ import annotations

import os

from engine.checkpoint import adopt_architecture, check_compatible, read_checkpoint, resolve_weight
from engine.experiment import refuse_existing_checkpoints
from engine.networks import resolve_arch
from model.backbone import missing_weights_error
from util.errors import ConfigError

MODES = ("train", "test", "predict")


def check_writable(path: str, what: str) -> None:
    """``path`` (a folder) exists and is writable, or can be created: its nearest existing
    ancestor is a writable folder. Nothing is created."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{what} '{os.path.abspath(path)}' cannot be created: '{probe}' is a file; "
                          f"choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "written" if probe == os.path.abspath(path) else "created"
        raise ConfigError(f"{what} '{os.path.abspath(path)}' cannot be {verb}: '{probe}' is not writable; "
                          f"make it writable or choose another folder")


def preflight(cfg, mode: str, weight: str | None = None, out_dir: str = "") -> dict | None:
    """Every check of ``cfg`` (validated, ``save_path`` set for train and test) that needs no
    data, for ``mode`` 'train', 'test' or 'predict'. ``weight``: predict.py's checkpoint (test
    takes ``cfg.weight``); ``out_dir``: predict.py's output folder. Returns the checkpoint read
    (test, predict), so that it is read once; None when training."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "train":
        resolve_arch(cfg.arch)
        if cfg.pretrained and not os.path.isfile(cfg.pretrained):
            raise missing_weights_error(cfg.pretrained)
        if cfg.resume and cfg.resume != "auto":
            check_compatible(read_checkpoint(cfg.resume), cfg, cfg.resume)
        refuse_existing_checkpoints(cfg, os.path.join(cfg.save_path, "model"))
        check_writable(cfg.save_path, "experiment folder (save_path)")
        return None
    path = weight if mode == "predict" else resolve_weight(cfg.weight, cfg.save_path)
    state = read_checkpoint(path)
    resolve_arch(adopt_architecture(state, cfg, path, quiet=True).arch)
    if mode == "test":
        check_writable(os.path.join(cfg.save_path or ".", "result"), "result folder")
    else:
        check_writable(out_dir, "output folder (--out)")
    return state
