"""dataset/image.py beyond tests/test_dataset.py: the exact episodes a seed draws (a second
implementation of docs/protocol.md's rules written here), the episode label, what reaches the
training and evaluation indexes (exclude_novel_images, the lists, the class-id check, the
cache), the seed-addressed training items, collation, and the messages of bad input."""
import math
import os
import re
import signal

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataset.image as image_module
from dataset.class_index import cache_path_for
from dataset.image import (EpisodeSampler, FewShotEvalDataset, FewShotTrainDataset, binarize, close_loader,
                           collate_keeping_lists, draw_episodes, eval_collate, load_split, load_split_rank0_first,
                           read_image, read_label, read_pair, worker_init)
from dataset.transform import IMAGENET_MEAN, IMAGENET_STD, hue_rotation_matrix
from tests.conftest import label_with, write_tree
from engine.tasks import task_for
from util.config import defaults
from util.distributed import DistInfo
from util.errors import DataError, DataFileMissing


# ---------------------------------------------------------------- the episode label and file reading
def test_binarize_maps_the_class_to_one_every_other_class_to_zero_and_keeps_255():
    label = np.array([[0, 3, 5, 255], [3, 3, 7, 0]], np.uint8)
    out = binarize(label, 3)                      # default ignore label: 255
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 0, 255], [1, 1, 0, 0]]
    assert binarize(label, 5, ignore_label=7).tolist() == [[0, 0, 1, 0], [0, 0, 7, 0]]


def test_files_are_read_as_rgb_float_and_grey_labels_with_errors_naming_them(tmp_path):
    bgr = np.zeros((3, 4, 3), np.uint8)
    bgr[..., 0] = 10                              # OpenCV writes B, G, R
    bgr[..., 2] = 200
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    cv2.imwrite(str(tmp_path / "l.png"), np.full((3, 4), 7, np.uint8))
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((2, 4), np.uint8))
    image = read_image(str(tmp_path / "a.png"))
    assert image.dtype == np.float32 and image.shape == (3, 4, 3)
    assert image[0, 0].tolist() == [200.0, 0.0, 10.0]
    assert read_label(str(tmp_path / "l.png")).tolist() == [[7] * 4] * 3
    image, label = read_pair(str(tmp_path / "a.png"), str(tmp_path / "l.png"))
    assert image.shape[:2] == label.shape == (3, 4)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError) as e:
        read_image(str(tmp_path / "empty.png"))
    assert str(e.value) == (f"cannot read image '{tmp_path}/empty.png': the file is empty, corrupt or not an image "
                            f"format OpenCV and PIL read; re-export it as JPEG or PNG")
    with pytest.raises(DataError) as e:
        read_label(str(tmp_path / "none.png"))
    assert str(e.value) == (f"label '{tmp_path}/none.png' does not exist; check the path, the list that names it "
                            f"or data_root")
    with pytest.raises(DataError) as e:
        read_pair(str(tmp_path / "a.png"), str(tmp_path / "small.png"))
    assert str(e.value) == (f"image '{tmp_path}/a.png' is 4x3 but its label '{tmp_path}/small.png' is 4x2; "
                            f"they must match")


# ---------------------------------------------------------------- the evaluation episodes, drawn by hand
def episodes_by_hand(images, classes_of, images_of, n, shot, seed):
    """docs/protocol.md's evaluation rule: queries run through seeded permutations of the eligible
    images (each image once before any repeats); the class uniform among the query's; K
    distinct supports of that class, never the query; one generator for everything, in that order."""
    rng = np.random.default_rng(seed)
    out, queue = [], []
    for _ in range(n):
        if not queue:
            queue = [images[i] for i in rng.permutation(len(images))]
        query = queue.pop(0)
        classes = classes_of[query]
        c = classes[rng.integers(len(classes))]
        others = [i for i in images_of[c] if i != query]
        out.append((query, c, tuple(others[i] for i in rng.choice(len(others), shot, replace=False))))
    return out


def test_a_seed_draws_exactly_the_episodes_of_the_written_rule(tiny_pascal):
    cfg, _ = tiny_pascal
    index = load_split(cfg, train=False).index
    for seed, shot in ((7, 2), (0, 1)):
        drawn = draw_episodes(index, 37, shot, seed)
        expected = episodes_by_hand(index.images, index.classes_of, index.images_of, 37, shot, seed)
        assert [(e.query, e.class_id, e.supports) for e in drawn] == expected
        assert [e.episode_id for e in drawn] == list(range(37))


# ---------------------------------------------------------------- the training order, drawn by hand
def order_by_hand(num_images, epoch_size, seed, epoch, replicas, shuffle=True):
    """The sampler's documented global order: ceil(epoch_size / replicas) per rank, shuffled passes
    over the images from torch's generator seeded seed * 100003 + epoch, episode seeds 64-bit
    words of numpy's SeedSequence([seed, epoch])."""
    total = math.ceil(epoch_size / replicas) * replicas
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = []
    while len(order) < total:
        order += torch.randperm(num_images, generator=g).tolist() if shuffle else list(range(num_images))
    seeds = np.random.SeedSequence([seed, epoch]).generate_state(total, np.uint64)
    return [(order[i], int(seeds[i])) for i in range(total)]


def test_the_sampler_yields_the_documented_order_and_seeds():
    s = EpisodeSampler(7, epoch_size=10, seed=3, num_replicas=2, rank=1)
    s.set_epoch(4)
    assert list(s) == order_by_hand(7, 10, 3, 4, 2)[1::2] and len(s) == 5
    s.set_epoch(4, start=2)
    assert list(s) == order_by_hand(7, 10, 3, 4, 2)[1::2][2:] and len(s) == 3
    fresh = EpisodeSampler(5)                    # defaults: one pass, seed 0, epoch 0, one process, shuffled
    assert list(fresh) == order_by_hand(5, 5, 0, 0, 1) and len(fresh) == 5
    plain = EpisodeSampler(3, epoch_size=7, seed=2, shuffle=False)
    assert [i for i, _ in plain] == [0, 1, 2, 0, 1, 2, 0]
    assert list(plain) == order_by_hand(3, 7, 2, 0, 1, shuffle=False)
    assert len(list(EpisodeSampler(1, epoch_size=3))) == 3          # one image is enough to train on
    with pytest.raises(DataError) as e:
        EpisodeSampler(0)
    assert str(e.value) == "no training images serve any training class; check the list and the split"


# ---------------------------------------------------------------- what reaches the indexes
@pytest.fixture
def novel_tree(tmp_path):
    """PASCAL fold 0 (held out: 1..5). Training list: two images of each training class 6..20
    (positions 0-29); images 30 and 31 hold training class 6 or 7 and a few pixels of held-out
    class 2; image 32 only held-out class 3. Evaluation list: classes 1, 1, 2, 2, 3, 3 and one of
    class 1 with a few pixels of training class 9."""
    labels = [label_with((64, 64), {c: 2100}) for c in range(6, 21) for _ in range(2)]
    labels += [label_with((64, 64), {6: 2100, 2: 30}), label_with((64, 64), {7: 2100, 2: 30})]
    labels += [label_with((64, 64), {3: 2500})]
    root = str(tmp_path / "data")
    train_list = write_tree(root, labels, "train.txt")
    val_list = write_tree(root, [label_with((64, 64), {c: 2100}) for c in (1, 1, 2, 2, 3, 3)] +
                          [label_with((64, 64), {1: 2100, 9: 50})], "val.txt", prefix="val")
    cfg = defaults()
    cfg.update(dataset="pascal", data_root=root, train_list=train_list, val_list=val_list, train_h=33, train_w=33,
               val_size=41, class_index_workers=1, min_class_pixels=2048)
    return cfg


def test_exclude_novel_images_drops_training_images_showing_a_held_out_class(novel_tree):
    cfg = novel_tree
    kept = load_split(cfg, train=True)
    assert kept.classes == list(range(6, 21))
    assert kept.index.images == list(range(32)) and kept.index.images_of[6] == [0, 1, 30]
    cfg.exclude_novel_images = True
    dropped = load_split(cfg, train=True)
    assert dropped.index.images == list(range(30))
    assert dropped.index.images_of[6] == [0, 1] and dropped.index.images_of[7] == [2, 3]
    # and it reaches the training episodes, as train.py builds them
    assert task_for(cfg).train_dataset(cfg, DistInfo()).split.index.images == list(range(30))
    assert FewShotTrainDataset(cfg, shot=1).split.index.images == list(range(30))
    cfg.exclude_novel_images = False
    assert task_for(cfg).train_dataset(cfg, DistInfo()).split.index.images == list(range(32))
    # evaluation is untouched by the switch
    cfg.exclude_novel_images = True
    held_out = load_split(cfg, train=False)
    assert held_out.classes == [1, 2, 3, 4, 5] and held_out.index.images == [0, 1, 2, 3, 4, 5, 6]


def test_training_and_evaluation_read_their_own_list(novel_tree):
    cfg = novel_tree
    train, val = load_split(cfg, train=True), load_split(cfg, train=False)
    assert len(train.pairs) == 33 and train.pairs[0][0].endswith("JPEGImages/img_0000.jpg")
    assert len(val.pairs) == 7 and val.pairs[0][0].endswith("JPEGImages/val_0000.jpg")
    assert os.path.isfile(cache_path_for(cfg.train_list)) and os.path.isfile(cache_path_for(cfg.val_list))


def test_load_split_errors_name_the_list_key_and_the_fix(novel_tree):
    cfg = novel_tree
    for key, train in (("train_list", True), ("val_list", False)):
        setattr(cfg, key, "nowhere.txt")
        with pytest.raises(DataFileMissing) as e:
            load_split(cfg, train=train)
        assert str(e.value) == (f"list file '{os.path.abspath('nowhere.txt')}' ({key}) does not exist; build the pascal data with: "
                                f"python tools/prepare_pascal.py --voc VOCdevkit/VOC2012 --sbd "
                                f"benchmark_RELEASE/dataset --out data/pascal")


def test_load_split_checks_the_listed_files_and_the_class_ids(novel_tree):
    cfg = novel_tree
    os.remove(os.path.join(cfg.data_root, "JPEGImages", "img_0002.jpg"))
    with pytest.raises(DataFileMissing, match=r"1 listed file\(s\) do not exist"):
        load_split(cfg, train=True)
    cfg.check_files = False
    assert len(load_split(cfg, train=True).pairs) == 33
    cv2.imwrite(os.path.join(cfg.data_root, "SegmentationClassAug", "val_0001.png"), label_with((64, 64), {25: 9}))
    with pytest.raises(DataError) as e:
        load_split(cfg, train=False)
    assert str(e.value).startswith(f"label '{cfg.data_root}/SegmentationClassAug/val_0001.png' holds the values [25]")
    assert str(e.value).endswith("255 ignore). Produce the labels with: python tools/prepare_pascal.py --voc "
                                 "VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset --out data/pascal")


def test_coco_folds_follow_use_split_coco(tmp_path):
    labels = [label_with((64, 64), {c: 2100}) for c in (1, 1, 2, 2, 5, 5, 21, 21)]
    root = str(tmp_path)
    lst = write_tree(root, labels)
    cfg = defaults()
    cfg.update(dataset="coco", data_root=root, train_list=lst, val_list=lst, class_index_workers=1)
    interleaved = load_split(cfg, train=False)             # fold 0 holds out 1, 5, 9, ..., 77
    assert interleaved.classes[:6] == [1, 5, 9, 13, 17, 21] and interleaved.index.images == [0, 1, 4, 5, 6, 7]
    cfg.use_split_coco = False                             # fold 0 holds out 1..20
    sequential = load_split(cfg, train=False)
    assert sequential.classes == list(range(1, 21)) and sequential.index.images == [0, 1, 2, 3, 4, 5]


def test_rank0_builds_the_class_index_before_the_others_read_it(novel_tree, monkeypatch):
    cfg = novel_tree
    seen = []
    monkeypatch.setattr(image_module, "barrier", lambda: seen.append(os.path.isfile(cache_path_for(cfg.val_list))))
    split = load_split_rank0_first(cfg, train=False)
    assert seen == [True] and split.index.images == [0, 1, 2, 3, 4, 5, 6]
    os.remove(cache_path_for(cfg.val_list))
    seen.clear()
    monkeypatch.setattr(image_module, "is_main_process", lambda: False)   # another rank: reads after rank 0
    split = load_split_rank0_first(cfg, train=False)
    assert seen == [False] and split.index.images == [0, 1, 2, 3, 4, 5, 6]
    assert load_split_rank0_first(cfg, train=True).classes == list(range(6, 21))


def test_load_split_without_the_cache_neither_reads_nor_writes_it(novel_tree):
    cfg = novel_tree
    split = load_split(cfg, train=False, use_cache=False)
    assert split.index.images == [0, 1, 2, 3, 4, 5, 6] and not os.path.exists(cache_path_for(cfg.val_list))


def test_too_few_images_lists_every_short_class(tiny_pascal):
    cfg, _ = tiny_pascal
    with pytest.raises(DataError) as e:
        FewShotEvalDataset(cfg, seed=0, num_episodes=5, shot=3)
    assert str(e.value).startswith(f"{cfg.val_list}: 3-shot episodes need at least 4 images per class (a query "
                                   f"and 3 supports), but class 2: 3, class 3: 3, class 4: 3, class 5: 3. ")
    with pytest.raises(DataError, match=rf"^{re.escape(cfg.train_list)}: 3-shot episodes need"):
        FewShotTrainDataset(cfg, shot=3)


# ---------------------------------------------------------------- items
def test_eval_items_binarize_query_and_supports_for_the_episode_class(tiny_pascal):
    cfg, root = tiny_pascal
    ds = FewShotEvalDataset(cfg, seed=2, num_episodes=4, shot=2)
    ep = ds.episodes[0]
    item = ds[0]
    label = read_label(ds.split.pairs[ep.query][1])
    assert torch.equal(item["query_mask_ori"], torch.from_numpy(binarize(label, ep.class_id)).long())
    assert item["query_mask_ori"].eq(1).sum() == (label == ep.class_id).sum() > 0
    assert item["class_id"] == ep.class_id and item["episode_id"] == 0
    assert item["query_label_path"] == ds.split.pairs[ep.query][1]
    for k, s in enumerate(ep.supports):
        support = read_label(ds.split.pairs[s][1])
        resized = cv2.resize(binarize(support, ep.class_id), (40, 40), interpolation=cv2.INTER_NEAREST)
        assert item["support_masks"][k, :40, :40].tolist() == resized.tolist()


def test_a_training_item_is_its_seed_applied_to_the_written_draws(tiny_pascal):
    """Item (position, seed): the generator seeded ``seed`` draws the episode, then (only when the
    jitters are on) the hue angle and the tint, then each image's augmentation in turn. An
    int key k is (k, k). Here the augmentation is a flip (p 0.5) and a 48² crop of the 64² image."""
    cfg, _ = tiny_pascal
    cfg.update(scale_min=1.0, scale_max=1.0, rotate_p=0.0, blur_p=0.0, flip_p=0.5, train_h=48, train_w=48)
    ds = FewShotTrainDataset(cfg, shot=2)
    sampler = ds.sampler()
    assert (sampler.num_images, sampler.epoch_size, sampler.seed, sampler.num_replicas, sampler.rank) == (
        len(ds), len(ds), 0, 1, 0)
    sampler = ds.sampler(10, 4, 2, 1)
    assert (sampler.epoch_size, sampler.seed, sampler.num_replicas, sampler.rank) == (10, 4, 2, 1)
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)

    def augmented(image, label, rng):
        rng.uniform(1.0, 1.0), rng.random(), rng.random()             # scale 1; rotation and blur off
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        y, x = int(rng.integers(0, 17)), int(rng.integers(0, 17))
        image, label = image[y:y + 48, x:x + 48], label[y:y + 48, x:x + 48]
        return torch.from_numpy(((image - mean) / std).transpose(2, 0, 1).copy()), label

    for key, hue, tint in (((3, 77), 0.0, 0.0), ((3, 77), 40.0, 0.5), ((5, 5), 0.0, 0.0), ((0, 8), 0.0, 0.0)):
        cfg.update(hue_jitter=hue, tint_jitter=tint)
        ds = FewShotTrainDataset(cfg, shot=2)
        item = ds[key[0]] if key[0] == key[1] else ds[key]
        rng = np.random.default_rng(key[1])
        query, class_id, supports = ds.draw(key[0], rng)
        angle = rng.uniform(-hue, hue) if hue else 0.0
        gains = rng.uniform(1 - tint, 1.0, 3).astype(np.float32) if tint else np.ones(3, np.float32)
        assert item["class_id"] == class_id
        for pos, img, mask in [(query, item["query_img"], item["query_mask"])] + list(
                zip(supports, item["support_imgs"], item["support_masks"])):
            image, label = read_pair(*ds.split.pairs[pos])
            if hue:
                image = np.clip(image.reshape(-1, 3) @ hue_rotation_matrix(angle).T, 0, 255).reshape(image.shape)
            expected, label = augmented((image * gains).astype(np.float32), binarize(label, class_id), rng)
            assert torch.allclose(img, expected, atol=1e-5)
            assert mask.tolist() == label.tolist()
    # loading one image without a hue turn or a tint: the plain image, augmented
    image, label = read_pair(*ds.split.pairs[query])
    img, mask = ds.load(query, class_id, np.random.default_rng(1))
    expected, label = augmented(image, binarize(label, class_id), np.random.default_rng(1))
    assert torch.allclose(img, expected, atol=1e-5) and mask.tolist() == label.tolist() and (mask == 1).any()


def test_the_configured_ignore_label_reaches_the_episode_labels(tiny_pascal):
    """ignore_label 7: pixels labelled 7 are ignored (kept 7), the 255 band is just another class (0)."""
    cfg, _ = tiny_pascal
    cfg.update(ignore_label=7, scale_min=1.0, scale_max=1.0, rotate_p=0.0, flip_p=0.0, train_h=64, train_w=64)
    item = FewShotEvalDataset(cfg, seed=0, num_episodes=1)[0]
    label = read_label(item["query_label_path"])
    assert item["query_mask_ori"].tolist() == binarize(label, item["class_id"], 7).tolist()
    assert (item["query_mask_ori"][label == 255] == 0).all()
    ds = FewShotTrainDataset(cfg, shot=1)
    position = ds.split.index.images.index(45)                  # an image of class 16 with a 7-free label
    train_item = ds[(position, 0)]
    label = read_label(ds.split.pairs[45][1])
    assert train_item["query_mask"].tolist() == binarize(label, 16, 7).tolist()


def test_collation_stacks_tensors_and_keeps_the_named_keys_as_lists():
    items = [{"a": torch.zeros(2), "n": 3, "ori": torch.zeros(2, 3), "path": "x"},
             {"a": torch.ones(2), "n": 4, "ori": torch.zeros(4, 1), "path": "y"}]
    out = collate_keeping_lists(items, ("ori", "path"))
    assert out["a"].tolist() == [[0, 0], [1, 1]] and out["n"].tolist() == [3, 4]
    assert [t.shape for t in out["ori"]] == [(2, 3), (4, 1)] and out["path"] == ["x", "y"]
    single = collate_keeping_lists(items[:1], ("ori", "path"))
    assert single["n"].tolist() == [3] and single["path"] == ["x"]
    evald = eval_collate([{"query_mask_ori": torch.zeros(2, 2), "query_label_path": "p", "class_id": 1},
                          {"query_mask_ori": torch.zeros(2, 2), "query_label_path": "q", "class_id": 2}])
    assert isinstance(evald["query_mask_ori"], list) and evald["query_label_path"] == ["p", "q"]
    assert evald["class_id"].tolist() == [1, 2]


# ---------------------------------------------------------------- loader workers
def test_worker_init_ignores_the_stop_signals_and_opencv_threads():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        worker_init(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert cv2.getNumThreads() == 1          # setNumThreads(0): OpenCV runs single-threaded
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        cv2.setNumThreads(threads)


def test_close_loader_shuts_the_workers_down():
    loader = DataLoader(list(range(20)), batch_size=2, num_workers=1, persistent_workers=True)
    it = iter(loader)
    next(it)
    workers = list(it._workers)
    assert loader._iterator is it and all(w.is_alive() for w in workers)
    close_loader(loader)
    assert loader._iterator is None and not any(w.is_alive() for w in workers)
    it = iter(DataLoader(list(range(20)), batch_size=2, num_workers=1))
    next(it)
    workers = list(it._workers)
    close_loader(it)
    assert not any(w.is_alive() for w in workers)
