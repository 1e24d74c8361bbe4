import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import label_with, write_tree
from dataset.image import available_cores, loader_workers
from dataset.image import (EpisodeSampler, FewShotEvalDataset, FewShotTrainDataset, draw_episodes,
                          eval_collate, load_split, shard)
from util.fileio import read_list


def test_list_with_missing_files_is_an_error_naming_count_first_files_and_list(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\nJPEGImages/b.jpg SegmentationClassAug/b.png\n")
    with pytest.raises(FileNotFoundError) as e:
        read_list(str(lst), str(tmp_path))
    assert str(e.value) == (f"{lst}: 4 listed file(s) do not exist (data_root='{tmp_path}'); first ones: "
                            f"{tmp_path}/JPEGImages/a.jpg, {tmp_path}/SegmentationClassAug/a.png, "
                            f"{tmp_path}/JPEGImages/b.jpg, {tmp_path}/SegmentationClassAug/b.png. "
                            f"Check data_root in the config or rebuild the list.")           # one line
    lst.write_text("only_one_column\n")
    with pytest.raises(ValueError, match=r"l.txt:1: expected 'image_path label_path'"):
        read_list(str(lst), str(tmp_path))


def test_eval_episodes_exact_count_valid_and_deterministic(tiny_pascal):
    cfg, _ = tiny_pascal
    split = load_split(cfg, train=False)
    assert split.classes == [1, 2, 3, 4, 5]
    # 15 single-class images + the two-class image serving class 1
    assert len(split.index.images) == 16 and len(split.index.images_of[1]) == 4
    episodes = draw_episodes(split.index, 37, shot=2, seed=7)
    assert len(episodes) == 37 and [e.episode_id for e in episodes] == list(range(37))
    for e in episodes:
        assert e.class_id in split.index.classes_of[e.query]
        assert len(set(e.supports)) == 2 and e.query not in e.supports
        assert all(e.class_id in split.index.classes_of[s] for s in e.supports)
    # every eligible image is a query before any image repeats
    assert sorted(e.query for e in episodes[:16]) == split.index.images
    assert episodes == draw_episodes(split.index, 37, shot=2, seed=7)
    assert episodes != draw_episodes(split.index, 37, shot=2, seed=8)


def test_shards_partition_the_episode_list(tiny_pascal):
    cfg, _ = tiny_pascal
    split = load_split(cfg, train=False)
    full = FewShotEvalDataset(cfg, seed=3, num_episodes=25, split=split)
    shards = [FewShotEvalDataset(cfg, seed=3, num_episodes=25, split=split, rank=r, world_size=3)
              for r in range(3)]
    assert [len(s) for s in shards] == [9, 8, 8]
    ids = sorted(e.episode_id for s in shards for e in s.episodes)
    assert ids == list(range(25))
    by_id = {e.episode_id: e for s in shards for e in s.episodes}
    assert [by_id[i] for i in range(25)] == full.episodes
    assert shard(full.episodes, 1, 3) == shards[1].episodes


def test_eval_items_identical_whatever_the_number_of_workers(tiny_pascal):
    cfg, _ = tiny_pascal
    ds = FewShotEvalDataset(cfg, seed=1, num_episodes=6, shot=2)
    item = ds[0]
    assert item["query_img"].shape == (3, 41, 41) and item["query_mask"].shape == (41, 41)
    assert item["support_imgs"].shape == (2, 3, 41, 41) and item["support_masks"].shape == (2, 41, 41)
    assert item["query_mask_ori"].shape == (64, 64)
    assert set(item["query_mask_ori"].unique().tolist()) <= {0, 1, 255}
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=eval_collate)
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["query_img"], b["query_img"]) and torch.equal(a["support_masks"], b["support_masks"])
        assert a["episode_id"].tolist() == b["episode_id"].tolist()
        assert all(torch.equal(x, y) for x, y in zip(a["query_mask_ori"], b["query_mask_ori"]))


def test_class_with_too_few_images_is_a_clear_error(tiny_pascal):
    cfg, _ = tiny_pascal
    cfg.shot = 3   # classes 2..5 have exactly 3 images, so no query + 3 distinct supports
    with pytest.raises(ValueError, match=r"3-shot episodes need at least 4 images per class.*class 2: 3.*covers "
                                         r"min_class_pixels of it, and with exclude_novel_images True a training image "
                                         r"showing any held-out class is left out"):
        FewShotEvalDataset(cfg, seed=0, num_episodes=5)


def test_train_episodes_distinct_supports_never_the_query(tiny_pascal):
    cfg, _ = tiny_pascal
    ds = FewShotTrainDataset(cfg, shot=2)
    assert ds.split.classes == list(range(6, 21))
    for seed in range(50):
        rng = np.random.default_rng(seed)
        query, class_id, supports = ds.draw(seed % len(ds), rng)
        assert class_id in ds.split.index.classes_of[query]
        assert len(set(supports)) == 2 and query not in supports
    item = ds[(0, 123)]
    assert item["query_img"].shape == (3, 33, 33) and item["support_masks"].shape == (2, 33, 33)
    assert set(item["query_mask"].unique().tolist()) <= {0, 1, 255}
    again = ds[(0, 123)]
    assert torch.equal(item["query_img"], again["query_img"])
    assert torch.equal(item["support_imgs"], again["support_imgs"])


def test_train_batches_do_not_depend_on_worker_count(tiny_pascal):
    cfg, _ = tiny_pascal
    ds = FewShotTrainDataset(cfg, shot=1)
    out = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=4, sampler=ds.sampler(epoch_size=8, seed=5), num_workers=workers)
        out[workers] = list(loader)
    for a, b in zip(out[0], out[2]):
        for k in ("query_img", "query_mask", "support_imgs", "support_masks", "class_id"):
            assert torch.equal(a[k], b[k])


def test_episode_sampler_shards_the_global_order():
    single = EpisodeSampler(10, epoch_size=12, seed=3)
    single.set_epoch(2)
    whole = list(single)
    assert len(whole) == 12 and sorted(i for i, _ in whole[:10]) == list(range(10))
    parts = []
    for rank in range(2):
        s = EpisodeSampler(10, epoch_size=12, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(2)
        parts.append(list(s))
        assert len(s) == 6
    merged = [x for pair in zip(*parts) for x in pair]
    assert merged == whole
    single.set_epoch(3)
    assert list(single) != whole


def test_episode_sampler_resumes_mid_epoch():
    s = EpisodeSampler(10, seed=1)
    s.set_epoch(4)
    whole = list(s)
    s.set_epoch(4, start=6)
    assert list(s) == whole[6:] and len(s) == 4


def test_loader_workers_are_capped_at_the_cores_available_and_it_is_said_once(caplog):
    """The configs' ``workers: 8`` on a 2-core machine: 2 loader processes (torch would warn about
    8 at every loader), one log line saying so; fewer than the cores are kept."""
    cores = available_cores()
    caplog.set_level(logging.INFO, logger="dataset.image")
    assert [loader_workers(cores + 6) for _ in range(3)] == [cores] * 3
    assert loader_workers(0) == 0 and loader_workers(cores) == cores
    said = [r.getMessage() for r in caplog.records if "loader processes" in r.getMessage()]
    assert said == [f"workers {cores + 6}: {cores} loader processes, the cores available here"]
