"""Checkpoints: written atomically, verified on load, loaded with errors that say what is wrong.

A training checkpoint holds the model (the DO memory bank included, it is in the model's
buffers), optimizer, GradScaler, epoch, iteration, RNG states, the config and the best
validation score, so a resumed run continues exactly as the uninterrupted one would.

Everything in it is a tensor or a plain value (numbers, strings, lists, tuples, dicts), so
every load uses ``torch.load(weights_only=True)``: a shared file crafted to run code when
unpickled is refused, and nothing is allowlisted. A content checksum (util/digest.py) is
stored with it and verified on load, so a damaged file is an error naming it, not weights
silently wrong. ``last.pth`` is rotated: the one it replaces is kept as ``last.prev.pth``,
which ``resume auto`` falls back to when ``last.pth`` is damaged (:func:`pick_resume`).
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

from engine.networks import build_model
from util.classes import NUM_CLASSES
from util.config import ARCH_KEYS, KEYS, CfgNode, check_value, defaults, resolved, task_of
from util.digest import content_digest
from util.errors import CheckpointError, ConfigError
from util.fileio import atomic_torch_save
from util.torchload import load_tensors

log = logging.getLogger(__name__)

FORMAT = "ntrenetpp-checkpoint-v2"    # v2: RNG states as tensors (weights_only), a checksum
PREVIOUS_SUFFIX = ".prev.pth"           # last.pth -> last.prev.pth
# keys derived from the dataset (util/config.py validate): a model evaluated on another dataset
# keeps its own without a warning
DERIVED_ARCH_KEYS = ("bank_classes",)


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, folder not writable)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict:
    """Every generator's state, in types ``weights_only`` loading accepts (numpy's key array
    as an int64 tensor; Python's state is a tuple of ints already)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_position(iteration: int, iters_per_epoch: int | None, epoch: int | None = None) -> str:
    """Where iteration ``iteration`` (counted from 1, as every log line counts) falls, with epochs
    counted from 1 too: 'at the end of epoch 2' or 'in epoch 3, 32/60 into it'. The one wording of
    the stop line, the resume line and test.py's checkpoint line. Without ``iters_per_epoch``
    (a checkpoint from before it was recorded), from ``epoch``, the epochs completed."""
    if not iters_per_epoch:
        return "before epoch 1" if not epoch else f"after epoch {epoch}"
    done, into = divmod(iteration, iters_per_epoch)
    if into == 0:
        return "before epoch 1" if done == 0 else f"at the end of epoch {done}"
    return f"in epoch {done + 1}, {into}/{iters_per_epoch} into it"


def checkpoint_position(state: dict) -> str:
    """'iteration 92, in epoch 2, 32/60 into it' for a checkpoint's state."""
    iteration = state.get("iteration", 0)
    ipe = (state.get("metrics") or {}).get("iters_per_epoch")
    return f"iteration {iteration}, {training_position(iteration, ipe, state.get('epoch'))}"


def previous_path(path: str) -> str:
    return path[:-len(".pth")] + PREVIOUS_SUFFIX if path.endswith(".pth") else path + PREVIOUS_SUFFIX


def save_checkpoint(path: str, model, cfg, optimizer=None, scaler=None, epoch: int = 0,
                    iteration: int = 0, best_miou: float = -1.0, metrics: dict | None = None,
                    run: dict | None = None, keep_previous: bool = False) -> None:
    """Write a checkpoint atomically (a crash leaves the previous file intact), with its
    checksum. ``run``: facts about the run (its TensorBoard folder); ``keep_previous``: keep
    the file replaced as ``*.prev.pth``. Any OSError (disk full, folder not writable) is a
    CheckpointError naming the file; the previous one is untouched."""
    state = {
        "format": FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch, "iteration": iteration, "best_miou": best_miou,
        "metrics": metrics or {}, "rng": rng_state(), "config": dict(cfg), "run": dict(run or {}),
        "architecture": {k: v for k, v in resolved(cfg).items() if k in ARCH_KEYS},
    }
    state["checksum"] = content_digest(state)
    try:
        atomic_torch_save(state, path, previous_path(path) if keep_previous else None)
    except OSError as e:
        kept = (f"the previous {os.path.basename(path)} is intact" if os.path.isfile(path)
                else "no earlier checkpoint was there")
        raise CheckpointWriteError(
            f"could not write checkpoint '{path}' ({e.strerror or e}); {kept}. Free space or make "
            f"{os.path.dirname(path) or '.'} writable, then continue with resume auto") from None


def read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        present = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
        hint = (f"{folder} holds {', '.join(present)}" if present else
                "train first (sh train.sh ...)")
        raise CheckpointError(f"checkpoint '{os.path.abspath(path)}' does not exist; {hint}. best.pth is written only when "
                              f"validation runs (evaluate True); choose with 'weight best|last|PATH'")
    state = load_tensors(
        path, CheckpointError, "checkpoint",
        fix_refused="this project's checkpoints (format v2) never hold more. Use a checkpoint you trust, "
                    "written by this version",
        fix_corrupt="re-download or re-train it",
        note=lambda detail: ("; checkpoints of this project before format v2 stored numpy RNG states and are "
                             "not read") if "numpy" in detail else "")
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"'{path}' is not a checkpoint of this project (no 'model' entry)")
    saved = state.pop("checksum", None)
    if saved is not None and content_digest(state) != saved:
        raise CheckpointError(f"checkpoint '{path}' is damaged: its content does not match its checksum "
                              f"(a disk or copy error); re-download or re-train it")
    return state


def pick_resume(path: str) -> tuple[str, dict] | None:
    """The checkpoint ``resume auto`` continues from: ``path`` (last.pth) when it reads and
    verifies, else the rotated previous one with a warning. None when neither exists; a
    CheckpointError naming both when they exist but neither is valid."""
    problems = []
    for candidate in (path, previous_path(path)):
        if not os.path.isfile(candidate):
            continue
        try:
            state = read_checkpoint(candidate)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("resume auto: skipping %s", e)
            continue
        if problems:
            log.warning("resume auto: falling back to %s (iteration %d)", candidate, state.get("iteration", -1))
        return candidate, state
    if problems:
        raise CheckpointError("resume auto found no valid checkpoint: " + " / ".join(problems))
    return None


def saved_architecture(state: dict) -> dict:
    """The architecture keys a checkpoint was trained with. One written before they were recorded
    has them in its config, where a key its config predates had its default value then, the task
    is its dataset's and the DO bank had one row per class of its dataset."""
    declared = defaults()
    if "architecture" in state:
        # a key declared after the checkpoint was written (do_mask, backbone, ...) had its default then
        recorded = dict(state["architecture"])
        return {**{k: declared[k] for k in ARCH_KEYS if k not in recorded}, **recorded}
    saved = state.get("config") or {}
    arch = {k: saved.get(k, declared[k]) for k in ARCH_KEYS}
    dataset = saved.get("dataset", declared["dataset"])
    arch["task"] = task_of(dataset)
    arch["bank_classes"] = NUM_CLASSES.get(dataset, declared["bank_classes"])
    return arch


def check_compatible(state: dict, cfg, path: str) -> None:
    """Refuse to resume a checkpoint trained with another architecture, naming the keys that differ."""
    saved, cfg = saved_architecture(state), resolved(cfg)
    diffs = [f"{k}: checkpoint {saved[k]!r}, config {cfg[k]!r}" for k in ARCH_KEYS if saved[k] != cfg[k]]
    if diffs:
        raise CheckpointError(f"checkpoint '{path}' was trained with a different network: " + "; ".join(diffs)
                              + ". Use the config it was trained with, or override these keys.")


def adopt_architecture(state: dict, cfg, path: str, quiet: bool = False):
    """``cfg`` with the checkpoint's architecture keys: the network to evaluate or predict with is
    the one trained. A config value that differs is replaced with a warning naming the key (a
    derived one, such as the DO bank's size on another dataset, quietly); one set on the command
    line is an error, as is a checkpoint of the other task. ``quiet``: no warning (a check made
    before the run, which adopts it again)."""
    saved, cfg = saved_architecture(state), resolved(cfg)
    if saved["task"] != cfg.task:
        raise CheckpointError(f"checkpoint '{path}' holds a model of the {saved['task']} task; this config "
                              f"(dataset {cfg.dataset}) is of the {cfg.task} task: use a config of the "
                              f"checkpoint's task")
    conflicts = [k for k in ARCH_KEYS if saved[k] != cfg[k] and k in cfg.overridden]
    if conflicts:
        raise CheckpointError(f"checkpoint '{path}' was trained with "
                              + ", ".join(f"{k} {saved[k]!r}" for k in conflicts) + "; the command line sets "
                              + ", ".join(f"{k} {cfg[k]!r}" for k in conflicts)
                              + ": drop the override (the network is the checkpoint's)")
    adopted = cfg.copy()
    for k in ARCH_KEYS:
        if saved[k] != cfg[k]:
            if k not in DERIVED_ARCH_KEYS and not quiet:
                log.warning("the config has %s %r, checkpoint %s was trained with %r: using the checkpoint's",
                            k, cfg[k], path, saved[k])
            adopted[k] = saved[k]
    return adopted


def config_of_checkpoint(state: dict, path: str) -> CfgNode:
    """The config a checkpoint was trained with, for a front end that is given only the
    checkpoint (the browser page): the declared defaults, the saved config's keys the schema
    still declares, then its architecture; validated. A saved value the schema now refuses is
    a CheckpointError naming the file."""
    cfg = defaults()
    saved = dict(state.get("config") or {})
    saved.update(saved_architecture(state))
    try:
        for name, value in saved.items():
            if name in KEYS:
                cfg[name] = check_value(name, value, where=f"checkpoint '{path}'")
        return resolved(cfg)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{path}' holds a config this version does not accept ({e}); "
                              f"use it with predict.py --config and a config of this version") from None


def load_model_weights(model, state: dict, path: str) -> None:
    """Load the model part strictly; a mismatch lists the missing and unexpected keys, and a
    tensor of another shape is a CheckpointError too."""
    own = unwrap(model)
    try:
        result = own.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint '{path}' does not fit the model: {e}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        raise CheckpointError(f"checkpoint '{path}' does not fit the model: {len(missing)} missing key(s) "
                              f"[{show(missing)}], {len(unexpected)} unexpected key(s) [{show(unexpected)}]")


def load_optimizer_state(optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)``, then each per-parameter state tensor (SGD's
    momentum) laid out like its parameter, and the optimizer's own implementation flags
    (``fused``, ``foreach``) as this run built them.

    A checkpoint keeps the memory layout of the run that wrote it (NCHW on CUDA, channels_last
    on the CPU with ``channels_last auto``); the fused SGD kernel walks parameter, gradient and
    buffer memory as one layout, so a mismatch would silently pair each weight with another
    weight's momentum. ``load_state_dict`` would also replace the flags with the saved ones."""
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p).copy_(v)       # empty_like keeps p's strides


def load_checkpoint(path: str, model, cfg, optimizer=None, scaler=None, restore_rng: bool = False,
                    state: dict | None = None) -> dict[str, Any]:
    """Load ``path`` into ``model`` (and optimizer/scaler when given); returns the state.
    ``state``: the checkpoint already read (and verified) from ``path``."""
    if state is None:
        state = read_checkpoint(path)
    check_compatible(state, cfg, path)
    load_model_weights(model, state, path)
    if optimizer is not None and state.get("optimizer") is not None:
        load_optimizer_state(optimizer, state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng"):
        set_rng_state(state["rng"])
    return state


def build_model_from_checkpoint(path: str, cfg, state: dict | None = None):
    """The network ``path`` holds, built from its recorded architecture (:func:`adopt_architecture`),
    with its weights loaded, and the checkpoint's state (``state``: already read from ``path``).

    The checkpoint holds the backbone, so the ImageNet weight file (``pretrained``) is not
    needed — nor read — to evaluate or predict.
    """
    if state is None:
        state = read_checkpoint(path)
    bare = adopt_architecture(state, cfg, path)
    bare.pretrained = ""
    model = build_model(bare, warn_random_backbone=False)   # the checkpoint's backbone replaces it
    load_model_weights(model, state, path)
    return model, state


def resolve_weight(weight: str, save_path: str) -> str:
    """'best' / 'last' → the experiment's model/best.pth / model/last.pth; else a path."""
    if weight in ("best", "last"):
        if not save_path:
            raise CheckpointError(f"weight '{weight}' needs save_path (the experiment folder); "
                                  f"run through test.sh or pass save_path exp/<dataset>/<exp_name>")
        return os.path.join(save_path, "model", f"{weight}.pth")
    return weight
