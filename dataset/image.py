"""Episodic few-shot datasets (docs/protocol.md).

* :class:`FewShotTrainDataset` — random episodes. Items are addressed by
  ``(image_position, episode_seed)`` pairs from :class:`EpisodeSampler`, so an episode's
  class, supports and augmentations depend only on that seed: not on the number of
  loader workers, not on any global random state.
* :class:`FewShotEvalDataset` — a fixed list of exactly N episodes drawn up front from a
  seeded generator, optionally a disjoint shard of it for one of several processes.
"""
from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataset.class_index import ClassIndex, build_class_index, load_area_table
from util.classes import NUM_CLASSES, class_name, fold_classes
from util.distributed import barrier, is_main_process
from util.errors import DataError, DataFileMissing, missing_or_unreadable, too_few_for_shots
from util.fileio import read_list
from dataset.transform import hue_rotate, protocol_transform, train_transform

log = logging.getLogger(__name__)


def read_image(path: str) -> np.ndarray:
    """RGB float32 H×W×3 on the 0–255 scale."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(missing_or_unreadable("image", path))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)


def read_label(path: str) -> np.ndarray:
    label = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if label is None:
        raise DataError(missing_or_unreadable("label", path))
    return label


def read_pair(image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
    image, label = read_image(image_path), read_label(label_path)
    if image.shape[:2] != label.shape:
        raise DataError(f"image '{image_path}' is {image.shape[1]}x{image.shape[0]} but its label "
                         f"'{label_path}' is {label.shape[1]}x{label.shape[0]}; they must match")
    return image, label


def binarize(label: np.ndarray, class_id: int, ignore_label: int = 255) -> np.ndarray:
    """Episode label: ``class_id`` → 1, every other class → 0, ignore kept."""
    out = (label == class_id).astype(np.uint8)
    out[label == ignore_label] = ignore_label
    return out


PREPARE_COMMAND = {
    "pascal": "python tools/prepare_pascal.py --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset --out data/pascal",
    "coco": "python tools/prepare_coco.py --coco <folder with train2014/ val2014/ annotations/> --out data/coco",
    "synthetic": "python tools/make_synthetic.py --out data/synthetic",
}


@dataclass
class SplitData:
    """A list file resolved against data_root, with its filtered class index."""
    pairs: list[tuple[str, str]]
    index: ClassIndex
    classes: list[int]            # the active classes


def load_split(cfg, train: bool, use_cache: bool = True) -> SplitData:
    """Read the training or evaluation list of ``cfg`` and index it for the active classes
    (training classes when ``train``, held-out ones otherwise)."""
    list_path = cfg.train_list if train else cfg.val_list
    if not os.path.isfile(list_path):
        raise DataFileMissing(f"list file '{os.path.abspath(list_path)}' ({'train_list' if train else 'val_list'}) does not exist; "
                                f"build the {cfg.dataset} data with: {PREPARE_COMMAND[cfg.dataset]}")
    pairs = read_list(list_path, cfg.data_root, check_files=cfg.check_files)
    train_classes, val_classes = fold_classes(cfg.dataset, cfg.split, cfg.use_split_coco)
    table, cached = load_area_table(list_path, cfg.data_root, [lab for _, lab in pairs],
                                    workers=cfg.class_index_workers, use_cache=use_cache,
                                    num_classes=NUM_CLASSES[cfg.dataset],
                                    fix=f"Produce the labels with: {PREPARE_COMMAND[cfg.dataset]}")
    active = train_classes if train else val_classes
    exclude = val_classes if (train and cfg.exclude_novel_images) else []
    index = build_class_index(table, active, cfg.min_class_pixels, exclude)
    log.info("%s: %d of %d images serve the %d %s classes (class index %s)", list_path,
             len(index.images), len(pairs), len(active), "training" if train else "held-out",
             "cached" if cached else "built")
    return SplitData(pairs, index, active)


def load_split_rank0_first(cfg, train: bool) -> SplitData:
    """:func:`load_split` where rank 0 builds the class-index cache and the other processes
    then read it, instead of every process scanning the labels at once."""
    split = load_split(cfg, train) if is_main_process() else None
    barrier()
    return split if split is not None else load_split(cfg, train)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which torch's DataLoader checks too)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                        # not on Linux
        return os.cpu_count() or 1


_capped_said: set = set()


def loader_workers(requested: int) -> int:
    """``workers`` capped at the cores available: the configs' 8 loader processes on a 2-core
    machine only compete for the cores (and torch warns about it); the episodes do not depend
    on the number. Said once per process and value, in the log."""
    cores = available_cores()
    if requested <= cores:
        return requested
    if requested not in _capped_said:
        _capped_said.add(requested)
        log.info("workers %d: %d loader processes, the cores available here", requested, cores)
    return cores


def worker_init(_=None) -> None:
    """DataLoader workers: one process per core is the parallelism, so no OpenCV threads.
    They ignore Ctrl-C and SIGTERM (sent to every process of the job): the main process
    finishes its step, saves and shuts them down (util/interrupt.py)."""
    cv2.setNumThreads(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loader(loader) -> None:
    """Shut down the worker processes of a DataLoader (its persistent iterator) or of a
    DataLoader iterator now. Call it whenever a batch loop is left early (an error, a stop):
    the workers ignore SIGTERM (:func:`worker_init`), so one left to the interpreter's exit
    is waited for forever."""
    iterator = loader._iterator if isinstance(loader, DataLoader) else loader
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if isinstance(loader, DataLoader):
        loader._iterator = None


def _check_enough_images(split: SplitData, shot: int, where: str) -> None:
    short = {c: len(split.index.images_of[c]) for c in split.classes
             if len(split.index.images_of[c]) < shot + 1}
    if short:
        detail = ", ".join(f"class {c}: {n}" for c, n in short.items())
        raise DataError(
            f"{where}: {too_few_for_shots(shot)}, but {detail}. An image serves a class only when "
            f"the class covers min_class_pixels of it, and with exclude_novel_images True a training "
            f"image showing any held-out class is left out: use a fuller list, fewer shots, a lower "
            f"min_class_pixels or exclude_novel_images False.")


class EpisodeSampler(Sampler):
    """Yields ``(image_position, episode_seed)`` for one epoch of training episodes.

    Like ``DistributedSampler`` (``set_epoch``, one disjoint slice per rank, padded to an
    equal count), over ``epoch_size`` episodes (repeating shuffled passes over the images
    where it exceeds them). Each episode's seed depends on (seed, epoch, global position)
    only, so the same global batch is drawn whatever the number of processes or workers.
    """

    def __init__(self, num_images: int, epoch_size: int = 0, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True):
        if num_images < 1:
            raise DataError("no training images serve any training class; check the list and the split")
        self.num_images, self.seed, self.shuffle = num_images, seed, shuffle
        self.epoch_size = epoch_size or num_images
        self.num_replicas, self.rank, self.epoch, self.start = num_replicas, rank, 0, 0
        self.per_rank = math.ceil(self.epoch_size / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` skips this rank's first items (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def global_order(self) -> list[tuple[int, int]]:
        total = self.per_rank * self.num_replicas
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        passes = math.ceil(total / self.num_images)
        if self.shuffle:
            order = torch.cat([torch.randperm(self.num_images, generator=g) for _ in range(passes)])
        else:
            order = torch.arange(self.num_images).repeat(passes)
        order = order[:total].tolist()
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(total, np.uint64)
        return list(zip(order, (int(s) for s in seeds)))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.global_order()[self.rank::self.num_replicas][self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class FewShotTrainDataset(Dataset):
    """Training episodes: a query image, one of its eligible classes uniformly, K distinct
    support images of that class that are not the query, each transformed independently."""

    def __init__(self, cfg, split: SplitData | None = None, shot: int | None = None, transform=None):
        self.split = split or load_split(cfg, train=True)
        self.shot = shot or cfg.shot
        self.ignore_label = cfg.ignore_label
        self.hue_jitter = cfg.hue_jitter
        self.tint_jitter = cfg.tint_jitter
        self.transform = transform or train_transform(cfg)
        _check_enough_images(self.split, self.shot, cfg.train_list)

    def __len__(self) -> int:
        return len(self.split.index.images)

    def sampler(self, epoch_size=0, seed=0, num_replicas=1, rank=0) -> EpisodeSampler:
        return EpisodeSampler(len(self), epoch_size, seed, num_replicas, rank)

    def draw(self, position: int, rng: np.random.Generator) -> tuple[int, int, list[int]]:
        """(query list position, class id, support list positions) of one episode."""
        query = self.split.index.images[position]
        class_id, supports = draw_class_and_supports(self.split.index, query, self.shot, rng)
        return query, class_id, supports

    def load(self, list_pos: int, class_id: int, rng, hue: float = 0.0,
             tint: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = read_pair(*self.split.pairs[list_pos])
        image = hue_rotate(image, hue)
        if tint is not None:
            image = image * tint
        return self.transform(image, binarize(label, class_id, self.ignore_label), rng)

    def __getitem__(self, key):
        position, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        query, class_id, supports = self.draw(position, rng)
        hue, tint = episode_colour(rng, self.hue_jitter, self.tint_jitter)
        q_img, q_lab = self.load(query, class_id, rng, hue, tint)
        s = [self.load(i, class_id, rng, hue, tint) for i in supports]
        return {
            "query_img": q_img, "query_mask": q_lab,
            "support_imgs": torch.stack([im for im, _ in s]),
            "support_masks": torch.stack([m for _, m in s]),
            "class_id": class_id,
        }


def episode_colour(rng: np.random.Generator, hue_jitter: float, tint_jitter: float):
    """``(hue, tint)`` of one training episode, drawn in this order from ``rng``. One hue turn for
    the whole episode: the target keeps the support's colour, but which colour that is varies, so
    matching the support pays and memorising classes does not; and one tint (a gain per RGB
    channel), which a hue turn cannot give white, grey or black. 0 / None when off."""
    hue = rng.uniform(-hue_jitter, hue_jitter) if hue_jitter else 0.0
    tint = rng.uniform(1.0 - tint_jitter, 1.0, 3).astype(np.float32) if tint_jitter else None
    return hue, tint


def draw_class_and_supports(index: ClassIndex, query: int, shot: int,
                            rng: np.random.Generator) -> tuple[int, list[int]]:
    """The episode rule (docs/protocol.md): a class uniformly among the query's eligible ones, then
    ``shot`` distinct images of that class, never the query."""
    classes = index.classes_of[query]
    class_id = classes[int(rng.integers(len(classes)))]
    candidates = [i for i in index.images_of[class_id] if i != query]
    picks = rng.choice(len(candidates), shot, replace=False)
    return class_id, [candidates[i] for i in picks]


@dataclass(frozen=True)
class Episode:
    episode_id: int        # position in the full list (stable across shards)
    query: int             # list position of the query image
    class_id: int
    supports: tuple[int, ...]


def draw_episodes(index: ClassIndex, num_episodes: int, shot: int, seed: int) -> list[Episode]:
    """Exactly ``num_episodes`` evaluation episodes from a seeded generator.

    Queries cycle through seeded permutations of the eligible images (every image is used
    before any repeats); the class is uniform among the query's eligible classes; the K
    supports are distinct images of that class, never the query.
    """
    rng = np.random.default_rng(seed)
    images = index.images
    episodes = []
    order: list[int] = []
    for e in range(num_episodes):
        if not order:
            order = [images[i] for i in rng.permutation(len(images))][::-1]
        query = order.pop()
        class_id, supports = draw_class_and_supports(index, query, shot, rng)
        episodes.append(Episode(e, query, class_id, tuple(supports)))
    return episodes


def shard(episodes: Sequence[Episode], rank: int, world_size: int) -> list[Episode]:
    """The episodes of process ``rank``: disjoint shards whose union is the whole list."""
    return list(episodes[rank::world_size])


class FewShotEvalDataset(Dataset):
    """A fixed, seeded list of exactly ``num_episodes`` evaluation episodes.

    Items carry the query and supports at the evaluation size, the query's binary label at
    that size, the label it is scored on (``query_mask_ori``), and the episode's identity (id,
    class, query label path) for scoring and saving predictions. ``protocol``: ``pfenet``
    (``val_size²`` canvas; scored on the label at its original size) or ``hsnet`` (image and
    label resized to ``val_size × val_size``, scored on that resized label; HSNet's 400).
    ``class_ids`` (the held-out classes), ``class_names`` (id → name) and ``root`` (what the
    label paths are relative to) are what a scorer needs.
    """

    def __init__(self, cfg, seed: int, num_episodes: int | None = None, shot: int | None = None,
                 split: SplitData | None = None, rank: int = 0, world_size: int = 1, protocol: str = "pfenet"):
        self.split = split or load_split(cfg, train=False)
        self.shot = shot or cfg.shot
        self.ignore_label = cfg.ignore_label
        self.protocol = protocol
        self.transform = protocol_transform(protocol, cfg.val_size, cfg.ignore_label)
        _check_enough_images(self.split, self.shot, cfg.val_list)
        num_episodes = num_episodes or cfg.test_num
        self.all_episodes = draw_episodes(self.split.index, num_episodes, self.shot, seed)
        self.episodes = shard(self.all_episodes, rank, world_size)
        self.class_ids = list(self.split.classes)
        self.class_names = {c: class_name(cfg.dataset, c) for c in self.class_ids}
        self.root = cfg.data_root

    def __len__(self) -> int:
        return len(self.episodes)

    def _load(self, list_pos: int, class_id: int):
        image, label = read_pair(*self.split.pairs[list_pos])
        label = binarize(label, class_id, self.ignore_label)
        img_t, lab_t = self.transform(image, label)
        return img_t, lab_t, label

    def __getitem__(self, i: int) -> dict:
        ep = self.episodes[i]
        q_img, q_lab, q_ori = self._load(ep.query, ep.class_id)
        s = [self._load(j, ep.class_id)[:2] for j in ep.supports]
        # PFENet scores on the label at its own size, HSNet on the resized one
        ori = q_lab.clone() if self.protocol == "hsnet" else torch.from_numpy(q_ori).long()
        return {
            "query_img": q_img, "query_mask": q_lab,
            "query_mask_ori": ori,
            "support_imgs": torch.stack([im for im, _ in s]),
            "support_masks": torch.stack([m for _, m in s]),
            "class_id": ep.class_id, "episode_id": ep.episode_id,
            "query_label_path": self.split.pairs[ep.query][1],
        }


def collate_keeping_lists(items: list[dict], list_keys: tuple[str, ...]) -> dict:
    """Stack tensors (B×...), turn ints into B tensors; the values of ``list_keys`` (sizes or
    names that differ per item) stay Python lists."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if k in list_keys:
            out[k] = vals
        elif isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        else:
            out[k] = torch.tensor(vals)
    return out


def eval_collate(items: list[dict]) -> dict:
    """Stack the fixed-size tensors; keep original-size labels and paths as lists."""
    return collate_keeping_lists(items, ("query_mask_ori", "query_label_path"))
