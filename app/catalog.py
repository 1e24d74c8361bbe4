"""The checkpoints the page offers, and their models, loaded once.

The page opens no file but these: the ``.pth`` files found under the experiment folder at start
and those named on the command line. Each is read through the checkpoint loader ``test.py`` and
``predict.py`` use (tensors and plain values only, checksum verified); one it refuses stays in the
list with the reason, which the page shows when it is picked. A model is built on its first use
and kept: every session of the page shares it (the network is in eval mode; a request only
reads it).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from engine.checkpoint import config_of_checkpoint, read_checkpoint, saved_architecture
from engine.predictor import resolve_device
from engine.tasks import task_for
from util.errors import CheckpointError, UserError

# what `make demo` trains first: listed first
DEMO_CHECKPOINT = os.path.join("exp", "synthetic", "split0_resnet18", "model", "best.pth")


@dataclass
class Entry:
    """One checkpoint of the picker: its path, what it holds, or why it cannot be used."""
    path: str
    label: str
    cfg: object = None             # the config it was trained with (None: refused)
    problem: str = ""              # the loader's message when it is refused

    @property
    def task(self) -> str:
        return self.cfg.task if self.cfg is not None else ""


def describe(path: str) -> Entry:
    """Read ``path`` with the safe loader; its architecture and task, or the loader's refusal."""
    try:
        state = read_checkpoint(path)
        cfg = config_of_checkpoint(state, path)
    except UserError as e:
        return Entry(path, f"{path} (cannot be used)", problem=str(e))
    arch = saved_architecture(state)
    backbone = "VGG-16" if arch.get("vgg") else f"ResNet-{arch.get('layers')}"
    width = arch.get("backbone_width", 1.0)
    if width != 1.0:
        backbone += f" x{width:g}"
    fold = f"fold {cfg.split}" if cfg.split != "all" else "every class"
    label = f"{path}: {arch['arch']}, {cfg.task} task, {backbone}, {cfg.dataset} {fold}"
    return Entry(path, label, cfg)


def find_checkpoints(exp_root: str) -> list[str]:
    """Every ``.pth`` under ``exp_root``, the demo's ``best.pth`` first, then in name order
    (rotated ``*.prev.pth`` copies left out)."""
    found = []
    if os.path.isdir(exp_root):
        for folder, _, names in os.walk(exp_root):
            found += [os.path.join(folder, n) for n in names if n.endswith(".pth") and not n.endswith(".prev.pth")]
    found.sort()
    demo = os.path.join(exp_root, os.path.relpath(DEMO_CHECKPOINT, "exp"))
    if demo in found:
        found.remove(demo)
        found.insert(0, demo)
    return found


class Catalog:
    """The checkpoints of the page (``entries``, in picker order) and their loaded models."""

    def __init__(self, paths: list[str], device: str = "cpu"):
        self.device = resolve_device(device)
        seen, self.entries = set(), []
        for path in paths:
            if os.path.normpath(path) not in seen:
                seen.add(os.path.normpath(path))
                self.entries.append(describe(path))
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()
        self.loads = 0                 # models built so far (each checkpoint at most once)

    @classmethod
    def scan(cls, exp_root: str = "exp", extra: tuple[str, ...] = (), device: str = "cpu") -> "Catalog":
        return cls(list(extra) + find_checkpoints(exp_root), device)

    def labels(self) -> list[tuple[str, str]]:
        """(label, key) pairs for the picker; the key is the entry's position."""
        return [(e.label, str(i)) for i, e in enumerate(self.entries)]

    def entry(self, key) -> Entry:
        """The entry of a picker key; anything else (a typed path) is refused."""
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(self.entries) or str(key) != str(index):
            raise CheckpointError("pick a checkpoint from the list (the page opens only the checkpoints listed)")
        entry = self.entries[index]
        if entry.problem:
            raise CheckpointError(entry.problem)
        return entry

    def predictor(self, key):
        """The predictor of a picked checkpoint, built on first use and kept."""
        entry = self.entry(key)
        with self._lock:
            if entry.path not in self._models:
                cls = task_for(entry.cfg).predictor
                self._models[entry.path] = cls.from_checkpoint(entry.cfg, entry.path, device=self.device)
                self.loads += 1
            return entry, self._models[entry.path]


