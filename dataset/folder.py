"""Class-folder datasets: your own data, FSS-1000 and the cross-domain benchmark (docs/data.md).

Layout: ``<root>/<class>/`` holds the images of one class and their binary masks. In a
class folder

1. ``<stem>_mask.png`` is always a mask: the mask of the image ``<stem>.jpg``,
   ``<stem>.jpeg`` or ``<stem>.png``;
2. ``<stem>.png`` beside ``<stem>.jpg`` (or ``.jpeg``) is that image's mask (FSS-1000's
   layout);
3. every other ``.jpg``, ``.jpeg`` or ``.png`` file is an image, and must have exactly one
   mask by rule 1 or 2. So an image stored as PNG has its mask as ``<stem>_mask.png``.

Other files (and names starting with a dot) are ignored. Masks are read as grey levels
(a palette PNG as its indices): a mask whose values are all 0 or 1 is used as it is, any
other mask is binarised at ``>= 128`` (0/255 masks, anti-aliased edges). A class list is a text file of class-folder
names, one per line (blank lines skipped, ``\\r`` stripped); a class's id is its 1-based
line number among the names.

Episodes (plain functions of the class sizes and a seed, numpy ``Generator`` draws):

* :func:`hsnet_episodes` — HSNet's FSS-1000 rule: one episode per image, classes in list
  order, images in name order; each support drawn uniformly from the query's class,
  one at a time, redrawn only when it is the query (so a K-shot set may repeat an image);
* :func:`balanced_episodes` — PATNet's cross-domain rule: episode ``e`` is of class
  ``e % nclass``; its query is drawn uniformly (with replacement across episodes) from
  that class, its supports as above.

Datasets: :class:`FolderEvalDataset` gives items in exactly the format of
:class:`dataset.image.FewShotEvalDataset` (so ``eval_collate`` and the evaluation loop take
them unchanged); :class:`FolderTrainDataset` those of
:class:`dataset.image.FewShotTrainDataset`, addressed by the same :class:`EpisodeSampler`.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset.image import Episode, EpisodeSampler, episode_colour, read_image, shard
from dataset.transform import HSNET_SIZE, PROTOCOLS, Compose, hue_rotate, protocol_transform
from util.errors import DataError, DataFileMissing, missing_or_unreadable, too_few_for_shots

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = "_mask"
EPISODE_RULES = ("per_image", "balanced")


# ----------------------------------------------------------------------------- reading

def read_class_list(path: str) -> list[str]:
    """Class-folder names of a class list file, in order (``\\r`` stripped, blanks skipped)."""
    if not os.path.isfile(path):
        raise DataFileMissing(f"class list '{os.path.abspath(path)}' does not exist; give a text file naming one "
                              f"class folder per line (a relative class list is read under the classes' root, "
                              f"data_root or val_root, else from the folder the command was typed in)")
    with open(path, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f.read().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"class list '{path}' names no class; write one class folder name per line")
    seen = set()
    for n in names:
        if n in seen:
            raise DataError(f"class list '{path}' names class '{n}' twice; each class once")
        if "/" in n or "\\" in n or n in (".", ".."):
            raise DataError(f"class list '{path}': '{n}' is not a folder name; name the class "
                            f"folders directly under the data root, one per line")
        seen.add(n)
    return names


def read_mask(path: str) -> np.ndarray:
    """A binary (0/1 uint8) mask: grey levels (PIL's ``L`` conversion; a palette PNG's
    indices, not its colours), kept as they are when all are 0 or 1, otherwise ``>= 128`` → 1."""
    try:
        with Image.open(path) as im:
            grey = np.asarray(im if im.mode == "P" else im.convert("L"))
    except (OSError, ValueError) as e:
        raise DataError(missing_or_unreadable("mask", path)) from e
    if grey.max(initial=0) <= 1:
        return grey.astype(np.uint8)
    return (grey >= 128).astype(np.uint8)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise DataError(missing_or_unreadable("image", path)) from e


def check_same_size(image_path: str, mask_path: str) -> None:
    iw, ih = image_size(image_path)
    mw, mh = image_size(mask_path)
    if (iw, ih) != (mw, mh):
        raise DataError(f"mask '{mask_path}' is {mw}x{mh} but its image '{image_path}' is {iw}x{ih}; "
                        f"a mask must have its image's size (resize it with nearest neighbour)")


def pair_files(folder: str, names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(image path, mask path) pairs of one class folder by the module's naming rules,
    sorted by image file name."""
    if names is None:
        names = os.listdir(folder)
    files = sorted(n for n in names if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTS
                   and os.path.isfile(os.path.join(folder, n)))
    by_stem: dict[str, list[str]] = {}
    for n in files:
        by_stem.setdefault(os.path.splitext(n)[0], []).append(n)

    def mask_of_jpg(stem):  # rule 2: '<stem>.png' beside '<stem>.jpg|.jpeg'
        return [n for n in by_stem.get(stem, []) if os.path.splitext(n)[1].lower() == ".png"]

    masks = set()
    for n in files:
        stem, ext = os.path.splitext(n)
        if ext.lower() == ".png" and stem.endswith(MASK_SUFFIX):
            masks.add(n)                                          # rule 1
        elif ext.lower() in (".jpg", ".jpeg"):
            masks.update(mask_of_jpg(stem))                       # rule 2
    pairs, owner = [], {}
    for n in files:
        if n in masks:
            continue
        stem, ext = os.path.splitext(n)
        candidates = [m for m in by_stem.get(stem + MASK_SUFFIX, []) if os.path.splitext(m)[1].lower() == ".png"]
        if ext.lower() != ".png":
            candidates += mask_of_jpg(stem)
        image = os.path.join(folder, n)
        if not candidates:
            raise DataError(f"image '{image}' has no mask: expected '{os.path.join(folder, stem)}.png' "
                            f"(beside a .jpg) or '{os.path.join(folder, stem + MASK_SUFFIX)}.png'; add the "
                            f"mask or remove the image")
        if len(candidates) > 1:
            shown = "' and '".join(os.path.join(folder, c) for c in candidates)
            raise DataError(f"image '{image}' has two masks, '{shown}'; keep one")
        mask = candidates[0]
        if mask in owner:
            raise DataError(f"mask '{os.path.join(folder, mask)}' belongs to two images, "
                            f"'{os.path.join(folder, owner[mask])}' and '{image}'; rename one image")
        owner[mask] = n
        pairs.append((image, os.path.join(folder, mask)))
    for m in sorted(masks - set(owner)):
        stem = os.path.splitext(m)[0]
        if stem.endswith(MASK_SUFFIX):
            base = os.path.join(folder, stem[:-len(MASK_SUFFIX)])
            raise DataError(f"mask '{os.path.join(folder, m)}' has no image: expected '{base}.jpg', "
                            f"'{base}.jpeg' or '{base}.png'; add the image or remove the mask")
    stems = [os.path.splitext(os.path.basename(i))[0] for i, _ in pairs]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(f"class folder '{folder}' holds two images named '{dup}' (e.g. .jpg and .jpeg); "
                        f"keep one")
    return pairs


class FolderIndex:
    """The classes of a class list under ``root``, each with its (image, mask) pairs.

    ``pairs`` is the flat list (classes in list order, images sorted by file name within a
    class); ``positions[c]`` the flat positions of the c-th class (0-based); ``class_ids``
    the 1-based ids, ``class_names`` id → name. With ``check_sizes`` every mask's size is
    compared with its image's (file headers only).
    """

    def __init__(self, root: str, class_list: str | Sequence[str], check_sizes: bool = True):
        self.root = root
        if isinstance(class_list, str):
            self.list_path = os.path.abspath(class_list)
            self.classes = read_class_list(class_list)
        else:
            self.list_path = "<class list>"
            self.classes = list(class_list)
        if not os.path.isdir(root):
            raise DataFileMissing(f"data root '{os.path.abspath(root)}' does not exist; prepare the data (docs/data.md) "
                                  f"or fix the path")
        self.pairs: list[tuple[str, str]] = []
        self.class_of: list[int] = []
        self.positions: list[list[int]] = []
        for cid, name in enumerate(self.classes, 1):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                raise DataFileMissing(f"class '{name}' listed in '{self.list_path}' has no folder "
                                      f"'{os.path.abspath(folder)}'; fix the class list or the data root")
            pairs = pair_files(folder)
            if not pairs:
                raise DataError(f"class folder '{folder}' holds no image (.jpg, .jpeg or .png with its mask); "
                                f"add its images or remove the class from '{self.list_path}'")
            if check_sizes:
                for image, mask in pairs:
                    check_same_size(image, mask)
            start = len(self.pairs)
            self.positions.append(list(range(start, start + len(pairs))))
            self.pairs += pairs
            self.class_of += [cid] * len(pairs)
        self.class_ids = list(range(1, len(self.classes) + 1))
        self.class_names = {cid: name for cid, name in zip(self.class_ids, self.classes)}

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.positions]

    def __len__(self) -> int:
        return len(self.pairs)

    def require_images(self, shot: int) -> None:
        """Every class must hold a query and ``shot`` other images."""
        for name, n in zip(self.classes, self.sizes):
            if n < shot + 1:
                raise DataError(f"class '{name}' ('{os.path.abspath(os.path.join(self.root, name))}') has {n} "
                                f"image(s); {too_few_for_shots(shot)}: "
                                f"add images, use fewer shots or remove the class from '{self.list_path}'")

    def load(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB float32 image, 0/1 uint8 mask) of a flat position, sizes checked."""
        image_path, mask_path = self.pairs[position]
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(f"mask '{mask_path}' is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"'{image_path}' is {image.shape[1]}x{image.shape[0]}; a mask must have its "
                            f"image's size (resize it with nearest neighbour)")
        return image, mask


# ----------------------------------------------------------------------------- episodes

def draw_supports(rng: np.random.Generator, n: int, query: int, shot: int) -> list[int]:
    """``shot`` indices in ``range(n)``, each ``rng.integers(n)``, redrawn while it equals
    ``query``: HSNet's and PATNet's rule (repeats allowed)."""
    if n < 2:
        raise DataError(f"{too_few_for_shots(shot)}; a class has {n}")
    supports: list[int] = []
    while len(supports) < shot:
        s = int(rng.integers(n))
        if s != query:
            supports.append(s)
    return supports


def _offsets(class_sizes: Sequence[int]) -> list[int]:
    return [0] + list(np.cumsum(class_sizes)[:-1].tolist())


def hsnet_episodes(class_sizes: Sequence[int], shot: int, seed: int) -> list[Episode]:
    """One episode per image, in order (class by class, images in order); positions are flat
    (class-major) indices, class ids 1-based. Draws: for each query, its supports by
    :func:`draw_supports` from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    episodes = []
    for c, (n, off) in enumerate(zip(class_sizes, _offsets(class_sizes))):
        for q in range(n):
            supports = draw_supports(rng, n, q, shot)
            episodes.append(Episode(len(episodes), off + q, c + 1, tuple(off + s for s in supports)))
    return episodes


def balanced_episodes(class_sizes: Sequence[int], shot: int, seed: int, num_episodes: int) -> list[Episode]:
    """``num_episodes`` episodes, episode e of class ``e % nclass``; draws from
    ``numpy.random.default_rng(seed)``: the query ``rng.integers(n_c)``, then the supports
    by :func:`draw_supports`."""
    if num_episodes < 1:
        raise DataError(f"balanced episodes: num_episodes must be at least 1, got {num_episodes}")
    rng = np.random.default_rng(seed)
    offsets = _offsets(class_sizes)
    episodes = []
    for e in range(num_episodes):
        c = e % len(class_sizes)
        n, off = class_sizes[c], offsets[c]
        q = int(rng.integers(n))
        supports = draw_supports(rng, n, q, shot)
        episodes.append(Episode(e, off + q, c + 1, tuple(off + s for s in supports)))
    return episodes


# ----------------------------------------------------------------------------- transforms

def folder_eval_transform(protocol: str = "hsnet", image_size: int = HSNET_SIZE, val_size: int = 473,
                          ignore_label: int = 255) -> Compose:
    """``hsnet``: :class:`~dataset.transform.SquareResize` to ``image_size``; ``pfenet``: the
    repository's evaluation resize (longer side ``val_size`` on a square canvas); both
    :func:`dataset.transform.protocol_transform`."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown evaluation protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    return protocol_transform(protocol, image_size if protocol == "hsnet" else val_size, ignore_label)


# ----------------------------------------------------------------------------- datasets

class FolderEvalDataset(Dataset):
    """A fixed, seeded list of evaluation episodes over a class-folder dataset.

    ``episode_rule``: ``per_image`` (:func:`hsnet_episodes`; ``num_episodes`` must be 0) or
    ``balanced`` (:func:`balanced_episodes` with ``num_episodes``). ``protocol``: ``hsnet``
    (``image_size²`` inputs and labels; ``query_mask_ori`` is that resized label) or
    ``pfenet`` (``val_size²`` canvas; ``query_mask_ori`` the label at its original size).
    ``rank``/``world_size`` keep a disjoint shard of the list (``episode_id`` stays global).
    Items: query_img 3×S×S float, query_mask S×S long, query_mask_ori H×W long,
    support_imgs K×3×S×S, support_masks K×S×S long, class_id (1-based), episode_id,
    query_label_path. ``class_ids``, ``class_names`` (id → folder name) and ``root`` are what
    a scorer needs, as on :class:`dataset.image.FewShotEvalDataset`.
    """

    def __init__(self, root: str, class_list: str | Sequence[str], shot: int = 1, seed: int = 0,
                 episode_rule: str = "per_image", num_episodes: int = 0, protocol: str = "hsnet",
                 image_size: int = HSNET_SIZE, val_size: int = 473, ignore_label: int = 255,
                 rank: int = 0, world_size: int = 1, transform: Callable | None = None,
                 index: FolderIndex | None = None, check_sizes: bool = True):
        if shot < 1:
            raise DataError(f"shot must be at least 1, got {shot}")
        if protocol not in PROTOCOLS:
            raise DataError(f"unknown evaluation protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
        self.index = index or FolderIndex(root, class_list, check_sizes)
        self.index.require_images(shot)
        self.shot, self.protocol, self.ignore_label = shot, protocol, ignore_label
        self.transform = transform or folder_eval_transform(protocol, image_size, val_size, ignore_label)
        if episode_rule == "per_image":
            if num_episodes:
                raise DataError(f"episode_rule 'per_image' draws one episode per image "
                                f"({len(self.index)} here); num_episodes must be 0, got {num_episodes}")
            self.all_episodes = hsnet_episodes(self.index.sizes, shot, seed)
        elif episode_rule == "balanced":
            self.all_episodes = balanced_episodes(self.index.sizes, shot, seed, num_episodes)
        else:
            raise DataError(f"unknown episode_rule '{episode_rule}'; use one of {', '.join(EPISODE_RULES)}")
        self.episodes = shard(self.all_episodes, rank, world_size)
        self.class_ids, self.class_names, self.root = self.index.class_ids, self.index.class_names, self.index.root

    def __len__(self) -> int:
        return len(self.episodes)

    def _load(self, position: int):
        image, mask = self.index.load(position)
        img_t, lab_t = self.transform(image, mask)
        return img_t, lab_t, mask

    def __getitem__(self, i: int) -> dict:
        ep = self.episodes[i]
        q_img, q_lab, q_ori = self._load(ep.query)
        s = [self._load(j)[:2] for j in ep.supports]
        # HSNet scores on the resized label; PFENet on the label at its own size
        ori = q_lab.clone() if self.protocol == "hsnet" else torch.from_numpy(q_ori).long()
        return {
            "query_img": q_img, "query_mask": q_lab, "query_mask_ori": ori,
            "support_imgs": torch.stack([im for im, _ in s]),
            "support_masks": torch.stack([m for _, m in s]),
            "class_id": ep.class_id, "episode_id": ep.episode_id,
            "query_label_path": self.index.pairs[ep.query][1],
        }


class FolderTrainDataset(Dataset):
    """Training episodes over a class-folder dataset, addressed by ``(position, seed)`` from
    :meth:`sampler` (:class:`EpisodeSampler`): the query is the image at ``position``, its
    class the episode's; ``shot`` supports of that class by :func:`draw_supports`; then one
    hue turn and one tint for the whole episode (when asked for) and ``transform(image,
    mask, rng)`` for each image, all from ``numpy.random.default_rng(seed)``.
    Items: query_img, query_mask, support_imgs, support_masks, class_id (1-based).
    """

    def __init__(self, root: str, class_list: str | Sequence[str], transform: Callable, shot: int = 1,
                 hue_jitter: float = 0.0, tint_jitter: float = 0.0, index: FolderIndex | None = None,
                 check_sizes: bool = True):
        if shot < 1:
            raise DataError(f"shot must be at least 1, got {shot}")
        self.index = index or FolderIndex(root, class_list, check_sizes)
        self.index.require_images(shot)
        self.shot, self.transform = shot, transform
        self.hue_jitter, self.tint_jitter = hue_jitter, tint_jitter
        self.class_ids, self.class_names = self.index.class_ids, self.index.class_names
        self._start = {cid: pos[0] for cid, pos in zip(self.class_ids, self.index.positions)}

    def __len__(self) -> int:
        return len(self.index)

    def sampler(self, epoch_size=0, seed=0, num_replicas=1, rank=0) -> EpisodeSampler:
        return EpisodeSampler(len(self), epoch_size, seed, num_replicas, rank)

    def draw(self, position: int, rng: np.random.Generator) -> tuple[int, int, list[int]]:
        """(query position, class id, support positions) of one episode."""
        class_id = self.index.class_of[position]
        start = self._start[class_id]
        n = len(self.index.positions[class_id - 1])
        supports = draw_supports(rng, n, position - start, self.shot)
        return position, class_id, [start + s for s in supports]

    def _load(self, position: int, rng, hue: float, tint):
        image, mask = self.index.load(position)
        image = hue_rotate(image, hue)
        if tint is not None:
            image = image * tint
        return self.transform(image, mask, rng)

    def __getitem__(self, key):
        position, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        query, class_id, supports = self.draw(position, rng)
        hue, tint = episode_colour(rng, self.hue_jitter, self.tint_jitter)
        q_img, q_lab = self._load(query, rng, hue, tint)
        s = [self._load(i, rng, hue, tint) for i in supports]
        return {
            "query_img": q_img, "query_mask": q_lab,
            "support_imgs": torch.stack([im for im, _ in s]),
            "support_masks": torch.stack([m for _, m in s]),
            "class_id": class_id,
        }
