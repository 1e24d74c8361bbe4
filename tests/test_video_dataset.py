"""Video episodes (dataset/video.py): clips, class balance, the exactly-once evaluation
list, shards, worker independence, errors."""
import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.video_fixtures import box, synthetic_video_tree, video_cfg, write_ytvis  # noqa: F401 (fixture)
from tools.prepare_ytvis import prepare_ytvis
from util.classes import fold_classes
from dataset.image import worker_init
from util.errors import DataError
from dataset.video import (VideoEvalDataset, VideoTrainDataset, build_chunks, chunk_spans, draw_video_episodes,
                                query_clip, video_eval_collate)
from dataset.video_index import load_video_index
from dataset.video_transform import letterbox

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_chunk_spans_exact():
    assert chunk_spans(7, 5) == [([0, 1, 2, 3, 4], [True] * 5), ([2, 3, 4, 5, 6], [False, False, False, True, True])]
    assert chunk_spans(3, 5) == [([0, 1, 2, 2, 2], [True, True, True, False, False])]
    assert chunk_spans(5, 5) == [([0, 1, 2, 3, 4], [True] * 5)]
    assert chunk_spans(10, 5) == [(list(range(5)), [True] * 5), (list(range(5, 10)), [True] * 5)]
    assert chunk_spans(1, 1) == [([0], [True])]
    for n in range(1, 14):
        for t in range(1, 6):
            scored = [p for positions, flags in chunk_spans(n, t) for p, f in zip(positions, flags) if f]
            assert sorted(scored) == list(range(n)), (n, t)
            assert all(len(p) == t for p, _ in chunk_spans(n, t))


def test_query_clip_is_consecutive_class_frames_ending_at_a_random_one():
    frames = [2, 3, 5, 8, 9, 11]
    windows = collections.Counter(tuple(query_clip(frames, 3, np.random.default_rng(s))) for s in range(400))
    assert set(windows) == {(2, 3, 5), (3, 5, 8), (5, 8, 9), (8, 9, 11)}
    # an end among the first T-1 frames gives the first window (the reference's rule): 3/6 vs 1/6 each
    assert windows[(2, 3, 5)] > 1.8 * windows[(8, 9, 11)]
    assert query_clip([4, 7], 3, np.random.default_rng(0)) == [4, 7, 7]


def test_training_epoch_is_class_balanced_and_clips_are_class_frames(synthetic_video_tree):  # noqa: F811
    _, root = synthetic_video_tree
    cfg = video_cfg(root)
    ds = VideoTrainDataset(cfg)
    train_classes = fold_classes("synthetic_video", 0)[0]
    assert ds.classes == train_classes and len(ds) == 15 * 4
    counts = collections.Counter()
    for position, seed in ds.sampler(seed=3):
        ep = ds.draw(position, np.random.default_rng(seed))
        counts[ep.class_id] += 1
        class_frames = ds.index.videos[ep.video].class_frames[ep.class_id]
        assert len(ep.frames) == 3 and set(ep.frames) <= set(class_frames)
        assert len(ep.supports) == 2 and len({v for v, _ in ep.supports}) == 2
        assert all(v != ep.video and f in ds.index.videos[v].class_frames[ep.class_id] for v, f in ep.supports)
    assert counts == {c: 4 for c in train_classes}
    item = ds[next(iter(ds.sampler(seed=3)))]
    assert item["query_imgs"].shape == (3, 3, 17, 29) and item["query_imgs"].dtype == torch.float32
    assert item["query_masks"].shape == (3, 17, 29) and item["query_masks"].dtype == torch.int64
    assert item["support_imgs"].shape == (2, 3, 17, 29) and item["support_masks"].shape == (2, 17, 29)
    assert set(item["query_masks"].unique().tolist()) <= {0, 1} and isinstance(item["class_id"], int)
    val = VideoTrainDataset(cfg, train=False)
    assert val.classes == fold_classes("synthetic_video", 0)[1] and val.augment is None
    assert len(val) == 5 * cfg.val_samples_per_class


def batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_training_items_do_not_depend_on_workers_or_processes(synthetic_video_tree):  # noqa: F811
    _, root = synthetic_video_tree
    ds = VideoTrainDataset(video_cfg(root, samples_per_class=1))
    one = batches(DataLoader(ds, batch_size=3, sampler=ds.sampler(seed=5)))
    # spawned workers: a forked one can inherit a lock another thread of this test process
    # (tqdm's monitor, OpenCV's pool) holds; worker_init as the engine's loaders use
    two = batches(DataLoader(ds, batch_size=3, sampler=ds.sampler(seed=5), num_workers=2, worker_init_fn=worker_init,
                             multiprocessing_context="spawn"))
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # two processes: rank r serves global positions r, r+2, ...; the items are the same
    full = [ds[k] for k in ds.sampler(seed=5, num_replicas=2).global_order()]
    for rank in (0, 1):
        for i, key in enumerate(ds.sampler(seed=5, num_replicas=2, rank=rank)):
            assert torch.equal(ds[key]["query_imgs"], full[2 * i + rank]["query_imgs"])


def test_one_augmentation_for_every_frame_of_a_clip(tmp_path):
    # three still videos of giant_panda (a fold-0 training class): every clip frame is the same
    m = box(12, 20, 3, 9, 4, 15)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_ytvis(src, {f"s{i}": (4, 12, 20, [(2, [m] * 4, "c")]) for i in range(3)}, static=True)
    prepare_ytvis(src, out, workers=1)
    cfg = video_cfg(out, dataset="ytvis", clip_len=4, video_h=24, video_w=40)
    ds = VideoTrainDataset(cfg, classes=[2])
    plain = VideoTrainDataset(cfg, classes=[2], augment=False)
    for key in list(ds.sampler(seed=0))[:6]:
        item = ds[key]
        q = item["query_imgs"]
        assert all(torch.equal(q[0], q[t]) for t in range(4))
        assert all(torch.equal(item["query_masks"][0], item["query_masks"][t]) for t in range(4))
        assert 0 < item["query_masks"][0].sum() < 24 * 40
        # the same episode without augmentation: the same clip, letterboxed only
        assert not torch.equal(q[0], plain[key]["query_imgs"][0])
        assert item["class_id"] == plain[key]["class_id"] == 2


def scored_pairs(ds):
    out = collections.Counter()
    for chunk in ds.all_chunks:
        ep = ds.episodes[chunk.episode_id]
        for f, s in zip(chunk.frames, chunk.scored):
            if s:
                out[(ep.video, ep.class_id, f)] += 1
    return out


@pytest.mark.parametrize("support_per", ["video", "class"])
def test_evaluation_scores_every_class_frame_of_every_held_out_video_once(synthetic_video_tree, support_per):  # noqa: F811
    _, root = synthetic_video_tree
    cfg = video_cfg(root, support_per=support_per)
    ds = VideoEvalDataset(cfg, seed=7)
    index = ds.index
    held_out = fold_classes("synthetic_video", 0)[1]
    expected = {(v, c, f) for c in held_out for v in index.videos_of[c] for f in index.videos[v].class_frames[c]}
    got = scored_pairs(ds)
    assert set(got) == expected and set(got.values()) == {1}
    assert ds.num_frames == len(expected) and ds.num_videos == len({v for c in held_out for v in index.videos_of[c]})
    assert [(ep.class_id, ep.video) for ep in ds.episodes] == [(c, v) for c in held_out for v in index.videos_of[c]]
    by_class = collections.defaultdict(list)
    for ep in ds.episodes:
        vids = [v for v, _ in ep.supports]
        assert len(vids) == 2 and len(set(vids)) == 2 and ep.video not in vids
        assert all(f in index.videos[v].class_frames[ep.class_id] for v, f in ep.supports)
        by_class[ep.class_id].append(frozenset(ep.supports))
    if support_per == "class":
        # one set per class; a query inside it swaps itself for the spare video
        assert all(len(set(sets)) <= 3 for sets in by_class.values())
    else:
        assert any(len(set(sets)) > 3 for sets in by_class.values())


def test_evaluation_list_is_fixed_by_the_seed_and_shards_partition_it(synthetic_video_tree):  # noqa: F811
    _, root = synthetic_video_tree
    cfg = video_cfg(root)
    index = load_video_index(root, "synthetic_video")
    whole = VideoEvalDataset(cfg, seed=7, index=index)
    assert whole.episodes == VideoEvalDataset(cfg, seed=7, index=index).episodes
    assert whole.episodes != VideoEvalDataset(cfg, seed=8, index=index).episodes
    shards = [VideoEvalDataset(cfg, seed=7, index=index, rank=r, world_size=3) for r in range(3)]
    ids = [c.chunk_id for s in shards for c in s.chunks]
    assert sorted(ids) == list(range(len(whole))) and len(ids) == len(set(ids))
    i = 4
    a, b = shards[1][i], whole[shards[1].chunks[i].chunk_id]
    assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_evaluation_item_contents(synthetic_video_tree):  # noqa: F811
    _, root = synthetic_video_tree
    cfg = video_cfg(root)
    ds = VideoEvalDataset(cfg, seed=1)
    k = next(i for i, c in enumerate(ds.chunks) if not all(c.scored))
    item, chunk = ds[k], ds.chunks[k]
    ep = ds.episodes[chunk.episode_id]
    video = ds.index.videos[ep.video]
    assert item["scored"].tolist() == list(chunk.scored) and item["frame_ids"].tolist() == list(chunk.frames)
    assert item["frame_names"] == [video.frames[f] for f in chunk.frames] and item["video"] == video.name
    assert (item["class_id"], item["episode_id"], item["chunk_id"], item["video_id"]) == \
        (ep.class_id, ep.episode_id, chunk.chunk_id, ep.video)
    f = chunk.frames[-1]
    _, expected = letterbox(ds.index.read_frame(ep.video, f), ds.index.read_mask(ep.video, ep.class_id, f), 17, 29)
    assert torch.equal(item["query_masks"][-1], torch.from_numpy(expected).long())
    top, left, new_h, new_w, h, w = item["letterbox"].tolist()
    assert (h, w) == (video.height, video.width) and item["query_masks"][:, :top].sum() == 0
    batch = video_eval_collate([ds[0], ds[1]])
    assert batch["query_imgs"].shape == (2, 3, 3, 17, 29) and batch["scored"].shape == (2, 3)
    assert batch["class_id"].shape == (2,) and len(batch["frame_names"]) == 2 and len(batch["video"]) == 2


def test_too_few_videos_and_bad_index_are_data_errors(synthetic_video_tree, tmp_path):  # noqa: F811
    _, root = synthetic_video_tree
    with pytest.raises(DataError, match=r"6-shot episodes need at least 7 videos per class .*but [a-z ]+ \(id \d+\): \d"):
        VideoEvalDataset(video_cfg(root, shot=6), seed=0)
    with pytest.raises(DataError, match=r"index.json' does not exist .*prepare_ytvis.py"):
        load_video_index(str(tmp_path), "ytvis")
    with pytest.raises(DataError, match=r"prepared for dataset 'synthetic_video' .* config says dataset 'ytvis'"):
        load_video_index(root, "ytvis")
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(DataError, match="not a readable video index"):
        load_video_index(str(tmp_path), "ytvis")
    index = load_video_index(root, "synthetic_video")
    with pytest.raises(ValueError, match="support_per"):
        draw_video_episodes(index, [1], 1, 0, "episode")
    assert len(build_chunks(draw_video_episodes(index, [1], 1, 0), 3)) >= len(index.videos_of[1])
