"""Few-shot video episodes (docs/video.md, "Episodes").

* :class:`VideoTrainDataset` — class-balanced training clips. Items are addressed by
  ``(position, episode_seed)`` pairs from dataset.image's :class:`EpisodeSampler` (the
  image task's keying), so an episode depends only on (seed, epoch, position): not on
  the number of loader workers or processes. Position ``p`` serves class
  ``classes[p // samples_per_class]``. With ``train=False`` the same rule over the
  held-out classes gives the reference's validation clips (no augmentation).
* :class:`VideoEvalDataset` — every held-out video as a query for each held-out class it
  has, every class frame scored exactly once, in chunks of T frames; a fixed list drawn up
  front from a seeded generator, shardable over processes.

Query clips, chunks and supports use only frames that have the episode's class; a
frame's mask is the union of the class's instances (0/1, no ignore label).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from util.classes import class_name, fold_classes
from dataset.image import EpisodeSampler, collate_keeping_lists, shard
from util.errors import DataError, too_few_for_shots
from dataset.video_index import VideoIndex, load_video_index
from dataset.video_transform import ClipAugment, frames_to_tensors, letterbox, letterbox_geometry

SUPPORT_MODES = ("video", "class")


def check_enough_videos(index: VideoIndex, classes: Sequence[int], shot: int, where: str) -> None:
    """Each class needs a query video and ``shot`` distinct other videos."""
    short = {c: len(index.videos_of[c]) for c in classes if len(index.videos_of[c]) < shot + 1}
    if short:
        detail = ", ".join(f"{class_name(index.dataset, c)} (id {c}): {n}" for c, n in short.items())
        raise DataError(
            f"{where}: {too_few_for_shots(shot, 'videos')}, but {detail}. Use fewer shots, another fold "
            f"or a dataset with more videos of these classes.")


def query_clip(class_frames: Sequence[int], clip_len: int, rng: np.random.Generator) -> list[int]:
    """T consecutive class frames ending at a random class frame (the reference's rule: an
    end among the first T-1 frames gives the first T); fewer than T: all, the last repeated."""
    n = len(class_frames)
    if n < clip_len:
        return list(class_frames) + [class_frames[-1]] * (clip_len - n)
    end = max(int(rng.integers(n)), clip_len - 1)
    return list(class_frames[end - clip_len + 1:end + 1])


@dataclass(frozen=True)
class TrainEpisode:
    class_id: int
    video: int                              # query video (position in the index)
    frames: tuple[int, ...]                 # T frame positions of the query clip
    supports: tuple[tuple[int, int], ...]   # K (video, frame) pairs from distinct other videos


def draw_train_episode(index: VideoIndex, class_id: int, shot: int, clip_len: int,
                       rng: np.random.Generator) -> TrainEpisode:
    videos = index.videos_of[class_id]
    query = videos[int(rng.integers(len(videos)))]
    others = [v for v in videos if v != query]
    supports = []
    for i in rng.choice(len(others), shot, replace=False):
        frames = index.videos[others[i]].class_frames[class_id]
        supports.append((others[i], frames[int(rng.integers(len(frames)))]))
    clip = query_clip(index.videos[query].class_frames[class_id], clip_len, rng)
    return TrainEpisode(class_id, query, tuple(clip), tuple(supports))


class VideoTrainDataset(Dataset):
    """Class-balanced training clips (or, ``train=False``, validation clips of the held-out
    classes). ``len`` is ``len(classes) * samples_per_class``: one epoch.

    Item: ``query_imgs`` T×3×H×W float32 (normalised), ``query_masks`` T×H×W int64 (0/1),
    ``support_imgs`` K×3×H×W, ``support_masks`` K×H×W int64, ``class_id`` int.
    """

    def __init__(self, cfg, index: VideoIndex | None = None, train: bool = True,
                 augment: bool | None = None, samples_per_class: int | None = None,
                 shot: int | None = None, clip_len: int | None = None, classes: Sequence[int] | None = None):
        self.index = index or load_video_index(cfg.data_root, cfg.dataset)
        train_classes, val_classes = fold_classes(cfg.dataset, cfg.split)
        self.classes = list(classes) if classes is not None else (train_classes if train else val_classes)
        self.shot = shot or cfg.shot
        self.clip_len = clip_len or cfg.clip_len
        self.samples_per_class = samples_per_class or (cfg.samples_per_class if train else cfg.val_samples_per_class)
        self.canvas = (cfg.video_h, cfg.video_w)
        augment = (cfg.video_augment and train) if augment is None else augment
        self.augment = ClipAugment(*self.canvas, cfg.flip_p) if augment else None
        check_enough_videos(self.index, self.classes, self.shot,
                            f"{cfg.data_root} ({'training' if train else 'held-out'} classes of fold {cfg.split})")

    def __len__(self) -> int:
        return len(self.classes) * self.samples_per_class

    def sampler(self, epoch_size=0, seed=0, num_replicas=1, rank=0) -> EpisodeSampler:
        return EpisodeSampler(len(self), epoch_size, seed, num_replicas, rank)

    def draw(self, position: int, rng: np.random.Generator) -> TrainEpisode:
        class_id = self.classes[position // self.samples_per_class % len(self.classes)]
        return draw_train_episode(self.index, class_id, self.shot, self.clip_len, rng)

    def _frames(self, video: int, frames: Sequence[int], class_id: int, rng) -> list:
        pairs = [(self.index.read_frame(video, f), self.index.read_mask(video, class_id, f)) for f in frames]
        if self.augment is None:
            return [letterbox(image, mask, *self.canvas) for image, mask in pairs]
        params = self.augment.draw(rng)    # one draw for the whole clip
        return [self.augment.apply(params, image, mask) for image, mask in pairs]

    def __getitem__(self, key) -> dict:
        position, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        ep = self.draw(position, rng)
        q_img, q_mask = frames_to_tensors(self._frames(ep.video, ep.frames, ep.class_id, rng))
        # each support frame gets its own augmentation draw
        s = [p for v, f in ep.supports for p in self._frames(v, [f], ep.class_id, rng)]
        s_img, s_mask = frames_to_tensors(s)
        return {"query_imgs": q_img, "query_masks": q_mask, "support_imgs": s_img, "support_masks": s_mask,
                "class_id": ep.class_id}


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoEpisode:
    episode_id: int                         # position in the full list (stable across shards)
    video: int                              # query video (position in the index)
    class_id: int
    frames: tuple[int, ...]                 # every frame of the video that has the class
    supports: tuple[tuple[int, int], ...]   # K (video, frame) pairs, never the query video


@dataclass(frozen=True)
class Chunk:
    chunk_id: int                 # position in the full chunk list
    episode_id: int
    frames: tuple[int, ...]       # T frame positions in the query video
    scored: tuple[bool, ...]      # T flags: which of them this chunk scores


def chunk_spans(n: int, clip_len: int) -> list[tuple[list[int], list[bool]]]:
    """Split positions 0..n-1 into chunks of ``clip_len``: (positions, scored flags) each.

    Chunks start at 0, T, 2T, ...; the last one is the last T positions with only those not
    yet scored flagged; n < T: one chunk padded by repeating the last position, pads not
    scored. Every position is scored exactly once.
    """
    if n < 1:
        raise ValueError("a query needs at least one frame")
    if n <= clip_len:
        return [(list(range(n)) + [n - 1] * (clip_len - n), [True] * n + [False] * (clip_len - n))]
    spans = []
    for start in range(0, n, clip_len):
        if start + clip_len <= n:
            spans.append((list(range(start, start + clip_len)), [True] * clip_len))
        else:
            first = n - clip_len
            spans.append((list(range(first, n)), [p >= start for p in range(first, n)]))
    return spans


def _support_frame(index: VideoIndex, video: int, class_id: int, rng: np.random.Generator) -> tuple[int, int]:
    frames = index.videos[video].class_frames[class_id]
    return video, frames[int(rng.integers(len(frames)))]


def draw_video_episodes(index: VideoIndex, classes: Sequence[int], shot: int, seed: int,
                        support_per: str = "video") -> list[VideoEpisode]:
    """One episode per (held-out class, video that has it), classes then videos ascending.

    ``support_per='video'``: each query's K supports come from K distinct other videos of
    the class, drawn afresh per query. ``'class'``: one set per class — K+1 distinct videos
    and one frame of each are drawn once; a query among the first K uses the (K+1)-th in
    its own place, so no query is its own support.
    """
    if support_per not in SUPPORT_MODES:
        raise ValueError(f"support_per must be one of {SUPPORT_MODES}, got {support_per!r}")
    check_enough_videos(index, classes, shot, f"{index.root} (held-out classes)")
    rng = np.random.default_rng(seed)
    episodes = []
    for c in classes:
        videos = index.videos_of[c]
        if support_per == "class":
            picks = [_support_frame(index, videos[i], c, rng) for i in rng.choice(len(videos), shot + 1, replace=False)]
        for v in videos:
            if support_per == "video":
                others = [u for u in videos if u != v]
                supports = [_support_frame(index, others[i], c, rng)
                            for i in rng.choice(len(others), shot, replace=False)]
            else:
                supports = [picks[shot] if p[0] == v else p for p in picks[:shot]]
            episodes.append(VideoEpisode(len(episodes), v, c, index.videos[v].class_frames[c], tuple(supports)))
    return episodes


def build_chunks(episodes: Sequence[VideoEpisode], clip_len: int) -> list[Chunk]:
    chunks = []
    for ep in episodes:
        for positions, scored in chunk_spans(len(ep.frames), clip_len):
            chunks.append(Chunk(len(chunks), ep.episode_id, tuple(ep.frames[p] for p in positions), tuple(scored)))
    return chunks


class VideoEvalDataset(Dataset):
    """The fixed evaluation list of one seed: every held-out (video, class) pair a query,
    its class frames in chunks of T (:func:`chunk_spans`), optionally one shard of it.

    Item: ``query_imgs`` T×3×H×W float32, ``query_masks`` T×H×W int64 (0/1),
    ``scored`` T bool, ``frame_ids`` T int64 (positions in the video's frame list),
    ``support_imgs`` K×3×H×W, ``support_masks`` K×H×W int64, ``class_id``, ``episode_id``,
    ``chunk_id``, ``video_id`` (the query video's position in the index) ints, ``letterbox`` int64 (top, left, new_h, new_w, height, width) of the
    query frames, ``video`` str (the query video's name), ``frame_names`` list of T str.
    """

    def __init__(self, cfg, seed: int, index: VideoIndex | None = None, rank: int = 0, world_size: int = 1,
                 shot: int | None = None, clip_len: int | None = None, support_per: str | None = None):
        self.index = index or load_video_index(cfg.data_root, cfg.dataset)
        self.classes = fold_classes(cfg.dataset, cfg.split)[1]
        self.shot = shot or cfg.shot
        self.clip_len = clip_len or cfg.clip_len
        self.canvas = (cfg.video_h, cfg.video_w)
        self.episodes = draw_video_episodes(self.index, self.classes, self.shot, seed,
                                            support_per or cfg.support_per)
        self.all_chunks = build_chunks(self.episodes, self.clip_len)
        self.chunks = shard(self.all_chunks, rank, world_size)

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def num_episodes(self) -> int:
        """Query (video, class) episodes of the whole list (all shards)."""
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        """Frames scored over the whole list (all shards)."""
        return sum(len(ep.frames) for ep in self.episodes)

    @property
    def num_videos(self) -> int:
        return len({ep.video for ep in self.episodes})

    def _load(self, video: int, frames: Sequence[int], class_id: int):
        return frames_to_tensors([letterbox(self.index.read_frame(video, f), self.index.read_mask(video, class_id, f),
                                            *self.canvas) for f in frames])

    def __getitem__(self, i: int) -> dict:
        chunk = self.chunks[i]
        ep = self.episodes[chunk.episode_id]
        video = self.index.videos[ep.video]
        q_img, q_mask = self._load(ep.video, chunk.frames, ep.class_id)
        s = [self._load(v, [f], ep.class_id) for v, f in ep.supports]
        g = letterbox_geometry(video.height, video.width, *self.canvas)
        return {
            "query_imgs": q_img, "query_masks": q_mask,
            "scored": torch.tensor(chunk.scored), "frame_ids": torch.tensor(chunk.frames),
            "support_imgs": torch.cat([im for im, _ in s]), "support_masks": torch.cat([m for _, m in s]),
            "class_id": ep.class_id, "episode_id": ep.episode_id, "chunk_id": chunk.chunk_id,
            "video_id": ep.video, "letterbox": torch.tensor([g.top, g.left, g.new_h, g.new_w, g.height, g.width]),
            "video": video.name, "frame_names": [video.frames[f] for f in chunk.frames],
        }


class ValidationClips(Dataset):
    """The reference's validation during training: ``val_samples_per_class`` clips per
    held-out class (no augmentation), a fixed list keyed by ``seed`` — identical whatever
    the number of workers or processes — and one disjoint shard of it per process. Every
    frame of a clip is scored."""

    def __init__(self, cfg, seed: int, rank: int = 0, world_size: int = 1):
        self.clips = VideoTrainDataset(cfg, train=False)
        keys = EpisodeSampler(len(self.clips), 0, seed, shuffle=False).global_order()
        self.num_episodes = len(keys)
        self.keys = shard(list(enumerate(keys)), rank, world_size)
        self.classes = self.clips.classes

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        position, key = self.keys[i]
        item = self.clips[key]
        item["scored"] = torch.ones(item["query_masks"].shape[0], dtype=torch.bool)
        item["episode_id"] = position
        return item


def video_eval_collate(items: list[dict]) -> dict:
    """Stack tensors (B×...), ints to B tensors; keep names as lists."""
    return collate_keeping_lists(items, ("video", "frame_names"))
