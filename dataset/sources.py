"""Where the image task's episodes come from, by dataset family (the config's ``dataset``):
one table, :data:`SOURCES`, instead of a switch in every place that needs a dataset.

* list datasets (pascal, coco, synthetic): list files of images and class-id labels, the
  classes of a fold (dataset/image.py);
* class-folder datasets (folder, fss1000, cdfss): one folder per class, the classes named by
  class-list files (dataset/folder.py, docs/data.md).

An evaluation is described by an :class:`EvalSet` (:func:`evaluation_set`): which family, root
and classes, under which scoring protocol and size, how many episodes. A config tests on its
held-out classes (``test_classes`` for class folders) and validates on them (``val_classes``),
or, with ``val_dataset``, on the class folders of another family (``val_root``,
``val_classes``): the cross-domain benchmark's PASCAL training validates on FSS-1000.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset

from dataset.folder import FolderEvalDataset, FolderIndex, FolderTrainDataset
from dataset.image import FewShotEvalDataset, FewShotTrainDataset, load_split_rank0_first
from dataset.transform import train_transform
from util.classes import ALL_CLASSES, FOLDER_DATASETS
from util.config import AUTO_EVAL, PFENET
from util.errors import ConfigError

log = logging.getLogger("ntrenetpp")

HOW_TO_LIST = "a text file naming one class folder per line, docs/data.md section 8"


@dataclass(frozen=True)
class EvalSet:
    """One evaluation's data: the dataset ``family`` scored, ``part`` ('val' or 'test'), the
    scoring ``protocol`` and input ``size`` (val_size), ``num_episodes`` per seed (0: one per
    image of the classes), and for class folders their ``root`` and ``class_list``."""
    family: str
    part: str
    protocol: str
    size: int
    num_episodes: int
    root: str
    class_list: str = ""

    def describe(self) -> str:
        count = "one episode per image" if self.num_episodes == 0 else f"{self.num_episodes} episodes"
        where = f"{self.root} ({self.class_list})" if self.class_list else self.family
        return f"{where}, {count} per seed, {self.protocol} protocol at {self.size} px"


def evaluation_set(cfg, part: str) -> EvalSet:
    """The :class:`EvalSet` a validated image config validates (``part`` 'val') or tests on."""
    if part not in ("val", "test"):
        raise ValueError(f"part must be 'val' or 'test', got {part!r}")
    if part == "val" and cfg.val_dataset:
        # another family's class folders: its own episode count unless val_num says
        _, pfenet, hsnet = AUTO_EVAL[cfg.val_dataset]
        count = cfg.val_num or (pfenet if cfg.eval_protocol == PFENET else hsnet)[1]
        return EvalSet(cfg.val_dataset, part, cfg.eval_protocol, cfg.val_size, count, cfg.val_root, cfg.val_classes)
    count = cfg.test_num if part == "test" else (cfg.val_num or cfg.test_num)
    if cfg.dataset not in FOLDER_DATASETS:
        return EvalSet(cfg.dataset, part, cfg.eval_protocol, cfg.val_size, count, cfg.data_root)
    classes, root = cfg.test_classes, cfg.data_root
    if part == "val":
        root = cfg.val_root or cfg.data_root
        if cfg.val_classes:
            classes = cfg.val_classes
        else:
            log.warning("val_classes is empty: validating on the test classes (%s), so best.pth is chosen on "
                        "the classes it is then tested on; name other classes in val_classes for a fair test",
                        cfg.test_classes or "none named")
    if not classes:
        raise ConfigError(f"dataset {cfg.dataset} {'validates' if part == 'val' else 'tests'} on the classes named "
                          f"by {'val_classes or ' if part == 'val' else ''}test_classes: set test_classes FILE "
                          f"({HOW_TO_LIST})")
    return EvalSet(cfg.dataset, part, cfg.eval_protocol, cfg.val_size, count, root, classes)


class ListSource:
    """pascal, coco, synthetic: list files and folds (dataset/image.py)."""

    def train_dataset(self, cfg, info) -> Dataset:
        return FewShotTrainDataset(cfg, split=load_split_rank0_first(cfg, True))

    def eval_datasets(self, cfg, info, es: EvalSet) -> Callable[[int], Dataset]:
        if cfg.split == ALL_CLASSES:
            raise ConfigError(f"split '{ALL_CLASSES}' holds out no {cfg.dataset} class, so there is nothing to "
                              f"{'validate' if es.part == 'val' else 'test'} on: evaluate the model on the "
                              f"cross-domain sets (python tools/cdfss_table.py --weight CKPT, docs/data.md "
                              f"section 10)")
        split = load_split_rank0_first(cfg, train=False)
        return lambda seed: FewShotEvalDataset(cfg, seed=seed, num_episodes=es.num_episodes, split=split,
                                               rank=info.rank, world_size=info.world_size, protocol=es.protocol)


class FolderSource:
    """folder, fss1000, cdfss: class folders and class lists (dataset/folder.py). Episodes: one
    per image (``num_episodes`` 0, HSNet's FSS-1000 rule) or class-balanced (PATNet's)."""

    def train_dataset(self, cfg, info) -> Dataset:
        if not cfg.train_classes:
            raise ConfigError(f"dataset {cfg.dataset} trains on the classes named by train_classes: set "
                              f"train_classes FILE ({HOW_TO_LIST})"
                              + ("; the cdfss configs only evaluate, a model trained on PASCAL "
                                 "(config/pascal/pascal_all_resnet50.yaml)" if cfg.dataset == "cdfss" else ""))
        return FolderTrainDataset(cfg.data_root, cfg.train_classes, train_transform(cfg), cfg.shot,
                                  cfg.hue_jitter, cfg.tint_jitter)

    def eval_datasets(self, cfg, info, es: EvalSet) -> Callable[[int], Dataset]:
        index = FolderIndex(es.root, es.class_list)
        rule = "per_image" if es.num_episodes == 0 else "balanced"
        return lambda seed: FolderEvalDataset(es.root, es.class_list, cfg.shot, seed, rule, es.num_episodes,
                                              es.protocol, image_size=es.size, val_size=es.size,
                                              ignore_label=cfg.ignore_label, rank=info.rank,
                                              world_size=info.world_size, index=index)


LISTS, FOLDERS = ListSource(), FolderSource()
SOURCES = {"pascal": LISTS, "coco": LISTS, "synthetic": LISTS, "folder": FOLDERS, "fss1000": FOLDERS,
           "cdfss": FOLDERS}


def train_dataset(cfg, info) -> Dataset:
    """The training episodes of a validated image config (``info``: rank and world size)."""
    return SOURCES[cfg.dataset].train_dataset(cfg, info)


def eval_datasets(cfg, info, part: str) -> tuple[EvalSet, Callable[[int], Dataset]]:
    """The :class:`EvalSet` of ``part`` ('val' or 'test') and a function seed → its episodes
    (this process's shard); the class index is built once for every seed."""
    es = evaluation_set(cfg, part)
    return es, SOURCES[es.family].eval_datasets(cfg, info, es)
