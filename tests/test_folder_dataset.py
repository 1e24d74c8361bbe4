"""dataset/folder.py: the class-folder layout, its errors, the two episode rules, and items in
the formats of FewShotEvalDataset / FewShotTrainDataset, on tiny folders made here."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.folder import (FolderEvalDataset, FolderIndex, FolderTrainDataset, balanced_episodes, hsnet_episodes,
                            pair_files, read_class_list, read_mask)
from dataset.image import Episode, EpisodeSampler, eval_collate
from dataset.metrics import IoUAccumulator, score_episodes
from dataset.transform import Compose, IMAGENET_MEAN, IMAGENET_STD, RandomCrop, SquareResize, ToTensorNormalize
from util.errors import DataError, UserError

H, W = 12, 10


def image_of(k, h=H, w=W):
    """A distinct, smooth RGB image per k (uint8, RGB order)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 20 + k * 7) % 256, (y * 15 + k * 3) % 256, np.full((h, w), (k * 37) % 256)],
                    -1).astype(np.uint8)


def mask_of(k, h=H, w=W, scale=255):
    m = np.zeros((h, w), np.uint8)
    m[k % h:, : 1 + k % w] = scale
    return m


def save_rgb(path, rgb):
    Image.fromarray(rgb).save(path)


def make_class(root, name, n, kind="jpg", scale=255, start=0):
    """n pairs in <root>/<name>/: kind 'jpg' (i.jpg + i.png, FSS-1000's), 'png' (i.png + i_mask.png)."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for i in range(start, start + n):
        if kind == "jpg":
            save_rgb(os.path.join(folder, f"{i}.jpg"), image_of(i))
            Image.fromarray(mask_of(i, scale=scale)).save(os.path.join(folder, f"{i}.png"))
        else:
            save_rgb(os.path.join(folder, f"{i}.png"), image_of(i))
            Image.fromarray(mask_of(i, scale=scale)).save(os.path.join(folder, f"{i}_mask.png"))
    return folder


def write_list(path, text):
    with open(path, "w", newline="") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def tree(tmp_path):
    """3 classes: 'cat' 4 jpg pairs (0/255 masks), 'dog' 3 png images with _mask (0/1 masks),
    'owl' 5 jpg pairs; the list in the order dog, cat, owl."""
    root = str(tmp_path / "data")
    make_class(root, "cat", 4)
    make_class(root, "dog", 3, kind="png", scale=1)
    make_class(root, "owl", 5)
    lst = write_list(tmp_path / "classes.txt", "dog\r\n\r\ncat\r\nowl\r\n")
    return root, lst


# ------------------------------------------------------------------ layout and reading

def test_class_list_strips_cr_skips_blanks_and_rejects_duplicates_and_paths(tmp_path):
    assert read_class_list(write_list(tmp_path / "a.txt", "\ufeffbus\r\n\r\n  hotel_slipper \r\nburj_al")) == \
        ["bus", "hotel_slipper", "burj_al"]
    with pytest.raises(DataError) as e:
        read_class_list(write_list(tmp_path / "b.txt", "bus\nbus\n"))
    assert str(e.value) == f"class list '{tmp_path}/b.txt' names class 'bus' twice; each class once"
    with pytest.raises(DataError, match="'a/b' is not a folder name"):
        read_class_list(write_list(tmp_path / "c.txt", "a/b\n"))
    with pytest.raises(DataError, match="names no class"):
        read_class_list(write_list(tmp_path / "d.txt", "\n\r\n"))
    with pytest.raises(FileNotFoundError, match=f"class list '{tmp_path}/none.txt' does not exist"):
        read_class_list(str(tmp_path / "none.txt"))


def test_pairing_rules_fss_layout_mask_suffix_and_ignored_files(tmp_path):
    d = str(tmp_path)
    names = ["1.jpg", "1.png", "10.jpg", "10.png", "2.jpg", "2.png",        # FSS-1000: N.png beside N.jpg
             "x.png", "x_mask.png",                                           # a PNG image and its mask
             "y.JPEG", "y_mask.png",                                          # a jpeg with a _mask mask
             "notes.txt", ".hidden.png", "thumbs.db"]                          # ignored
    for n in names:
        open(os.path.join(d, n), "wb").close()
    os.mkdir(os.path.join(d, "sub.png"))                                     # a folder: ignored
    pairs = [(os.path.basename(i), os.path.basename(m)) for i, m in pair_files(d)]
    assert pairs == [("1.jpg", "1.png"), ("10.jpg", "10.png"), ("2.jpg", "2.png"),
                     ("x.png", "x_mask.png"), ("y.JPEG", "y_mask.png")]


@pytest.mark.parametrize("files, message", [
    (["a.jpg"], "image '{d}/a.jpg' has no mask: expected '{d}/a.png' (beside a .jpg) or '{d}/a_mask.png'; "
                "add the mask or remove the image"),
    (["a.png"], "image '{d}/a.png' has no mask: expected '{d}/a.png' (beside a .jpg) or '{d}/a_mask.png'; "
                "add the mask or remove the image"),
    (["a.jpg", "a.png", "a_mask.png"], "image '{d}/a.jpg' has two masks, '{d}/a_mask.png' and '{d}/a.png'; "
                                       "keep one"),
    (["b_mask.png", "a.jpg", "a.png"], "mask '{d}/b_mask.png' has no image: expected '{d}/b.jpg', '{d}/b.jpeg' "
                                       "or '{d}/b.png'; add the image or remove the mask"),
    (["a.jpg", "a.jpeg", "a.png"], "mask '{d}/a.png' belongs to two images, '{d}/a.jpeg' and '{d}/a.jpg'; "
                                   "rename one image"),
])
def test_pairing_errors_are_one_line_naming_the_file(tmp_path, files, message):
    d = str(tmp_path)
    for n in files:
        open(os.path.join(d, n), "wb").close()
    with pytest.raises(DataError) as e:
        pair_files(d)
    assert str(e.value) == message.format(d=d)
    assert "\n" not in str(e.value)


def test_index_order_ids_and_positions(tree):
    root, lst = tree
    index = FolderIndex(root, lst)
    assert index.classes == ["dog", "cat", "owl"] and index.class_ids == [1, 2, 3]
    assert index.class_names == {1: "dog", 2: "cat", 3: "owl"}
    assert index.sizes == [3, 4, 5] and len(index) == 12
    assert index.positions == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11]]
    assert index.class_of == [1] * 3 + [2] * 4 + [3] * 5
    assert [os.path.relpath(m, root) for _, m in index.pairs[:4]] == \
        ["dog/0_mask.png", "dog/1_mask.png", "dog/2_mask.png", "cat/0.png"]
    # a list given as names works the same
    assert FolderIndex(root, ["owl", "dog"]).sizes == [5, 3]


def test_masks_0_1_kept_others_binarised_at_128(tmp_path):
    for name, values, expected in [("a", [0, 1, 1, 0], [0, 1, 1, 0]),
                                   ("b", [0, 127, 128, 255], [0, 0, 1, 1]),
                                   ("c", [0, 0, 0, 0], [0, 0, 0, 0])]:
        Image.fromarray(np.array([values], np.uint8)).save(tmp_path / f"{name}.png")
        assert read_mask(str(tmp_path / f"{name}.png")).tolist() == [expected]
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert read_mask(str(tmp_path / "rgb.png")).tolist() == [[0, 1]]
    # a palette mask: its indices (0/1), not the luminance of its dark red foreground colour
    pal = Image.fromarray(np.array([[0, 1, 1]], np.uint8))             # putpalette makes it mode P
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert read_mask(str(tmp_path / "pal.png")).tolist() == [[0, 1, 1]]


def test_index_errors_name_the_file_and_the_fix(tree, tmp_path):
    root, lst = tree
    with pytest.raises(FileNotFoundError) as e:
        FolderIndex(root, write_list(tmp_path / "l2.txt", "dog\nbat\n"))
    assert str(e.value) == (f"class 'bat' listed in '{tmp_path}/l2.txt' has no folder '{root}/bat'; "
                            f"fix the class list or the data root")
    with pytest.raises(DataError) as e:
        FolderEvalDataset(root, lst, shot=3)
    assert str(e.value) == (f"class 'dog' ('{root}/dog') has 3 image(s); 3-shot episodes need at least 4 "
                            f"images per class (a query and 3 supports): add images, use fewer shots or remove the class "
                            f"from '{lst}'")
    with pytest.raises(DataError, match="class 'dog'"):
        FolderTrainDataset(root, lst, transform=None, shot=3)
    # a mask of another size than its image
    Image.fromarray(mask_of(0, h=H + 1)).save(os.path.join(root, "cat", "2.png"))
    with pytest.raises(DataError) as e:
        FolderIndex(root, lst)
    assert str(e.value) == (f"mask '{root}/cat/2.png' is {W}x{H + 1} but its image '{root}/cat/2.jpg' is "
                            f"{W}x{H}; a mask must have its image's size (resize it with nearest neighbour)")
    # not checked up front: found when the pair is loaded, same message
    index = FolderIndex(root, lst, check_sizes=False)
    with pytest.raises(DataError) as e2:
        index.load(5)
    assert str(e2.value) == str(e.value)
    os.remove(os.path.join(root, "cat", "2.png"))
    with pytest.raises(DataError, match=f"image '{root}/cat/2.jpg' has no mask"):
        FolderIndex(root, lst)
    with pytest.raises(FileNotFoundError, match=f"data root '{tmp_path}/nope' does not exist"):
        FolderIndex(str(tmp_path / "nope"), lst)
    assert issubclass(DataError, UserError)


# ------------------------------------------------------------------ episode rules

def reference_per_image(sizes, shot, seed):
    """The rule re-written from its description: every image a query, in order; supports drawn
    one at a time from the class, rejected only when equal to the query."""
    rng = np.random.default_rng(seed)
    out, base = [], 0
    for c, n in enumerate(sizes):
        for q in range(n):
            sup = []
            while len(sup) < shot:
                s = rng.integers(0, n)
                if s == q:
                    continue
                sup.append(base + int(s))
            out.append((base + q, c + 1, tuple(sup)))
        base += n
    return out


def reference_balanced(sizes, shot, seed, num):
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    for e in range(num):
        c = e % len(sizes)
        q = int(rng.integers(0, sizes[c]))
        sup = []
        while len(sup) < shot:
            s = int(rng.integers(0, sizes[c]))
            if s != q:
                sup.append(int(starts[c]) + s)
        out.append((int(starts[c]) + q, c + 1, tuple(sup)))
    return out


def as_tuples(episodes):
    return [(e.query, e.class_id, e.supports) for e in episodes]


def test_per_image_episodes_fss1000_test_scale_2400():
    sizes = [10] * 240                    # FSS-1000's test split: 240 classes x 10 images
    for shot in (1, 5):
        episodes = hsnet_episodes(sizes, shot, seed=0)
        assert len(episodes) == 2400
        assert [e.episode_id for e in episodes] == list(range(2400))
        assert [e.query for e in episodes] == list(range(2400))            # one per image, in order
        assert [e.class_id for e in episodes] == [c for c in range(1, 241) for _ in range(10)]
        for e in episodes:
            lo = (e.class_id - 1) * 10
            assert len(e.supports) == shot and e.query not in e.supports
            assert all(lo <= s < lo + 10 for s in e.supports)
        assert as_tuples(episodes) == reference_per_image(sizes, shot, 0)
    five = hsnet_episodes(sizes, 5, seed=0)
    assert any(len(set(e.supports)) < 5 for e in five)                     # repeats allowed, as in HSNet


def test_per_image_episodes_exact_for_seed_0():
    assert hsnet_episodes([3, 3], 2, seed=0) == [
        Episode(0, 0, 1, (2, 1)), Episode(1, 1, 1, (0, 0)), Episode(2, 2, 1, (0, 0)),
        Episode(3, 3, 2, (5, 4)), Episode(4, 4, 2, (5, 5)), Episode(5, 5, 2, (4, 4))]
    # by hand: in a class of two images the only support is the other one, whatever the draws
    assert as_tuples(hsnet_episodes([2, 2], 3, seed=123)) == [
        (0, 1, (1, 1, 1)), (1, 1, (0, 0, 0)), (2, 2, (3, 3, 3)), (3, 2, (2, 2, 2))]
    assert hsnet_episodes([3, 3], 2, seed=0) == hsnet_episodes([3, 3], 2, seed=0)
    assert hsnet_episodes([3, 3], 2, seed=0) != hsnet_episodes([3, 3], 2, seed=1)


def test_balanced_episodes_600_cdfss():
    sizes = [7, 3, 12, 5, 9, 4]          # Deepglobe: 6 classes
    episodes = balanced_episodes(sizes, 5, seed=0, num_episodes=600)
    assert len(episodes) == 600 and [e.episode_id for e in episodes] == list(range(600))
    assert [e.class_id for e in episodes] == [e % 6 + 1 for e in range(600)]
    assert [sum(e.class_id == c for e in episodes) for c in range(1, 7)] == [100] * 6
    assert as_tuples(episodes) == reference_balanced(sizes, 5, 0, 600)
    starts = [0, 7, 10, 22, 27, 36]
    for e in episodes:
        lo, n = starts[e.class_id - 1], sizes[e.class_id - 1]
        assert lo <= e.query < lo + n and e.query not in e.supports
        assert all(lo <= s < lo + n for s in e.supports)
    # queries are drawn with replacement: a 3-image class serves 100 queries
    assert len({e.query for e in episodes if e.class_id == 2}) == 3
    # Chest X-ray: one class; ISIC: three
    assert [e.class_id for e in balanced_episodes([4], 1, 0, 600)] == [1] * 600
    # seed 0, fixed: (in the 2-image class the support can only be the other image)
    assert as_tuples(balanced_episodes([5, 2, 3], 1, 0, 4)) == [(4, 1, (3,)), (6, 2, (5,)),
                                                                  (7, 3, (9,)), (3, 1, (4,))]
    with pytest.raises(DataError, match="num_episodes must be at least 1"):
        balanced_episodes(sizes, 1, 0, 0)


# ------------------------------------------------------------------ evaluation items

EVAL_KEYS = {"query_img", "query_mask", "query_mask_ori", "support_imgs", "support_masks", "class_id",
             "episode_id", "query_label_path"}


def normalised(rgb):
    return torch.from_numpy(((rgb.astype(np.float32) - np.float32(IMAGENET_MEAN)) /
                             np.float32(IMAGENET_STD)).transpose(2, 0, 1).copy())


def test_hsnet_protocol_items(tree):
    root, lst = tree
    ds = FolderEvalDataset(root, lst, shot=2, seed=0)
    assert len(ds) == 12 and ds.class_ids == [1, 2, 3]
    assert [(e.query, e.class_id, e.supports) for e in ds.episodes] == \
        reference_per_image([3, 4, 5], 2, 0)
    item = ds[4]                                                  # cat/1.jpg, the 2nd image of class 2
    assert set(item) == EVAL_KEYS
    assert item["class_id"] == 2 and item["episode_id"] == 4
    assert item["query_label_path"] == os.path.join(root, "cat", "1.png")
    assert item["query_img"].shape == (3, 400, 400) and item["query_img"].dtype == torch.float32
    assert item["support_imgs"].shape == (2, 3, 400, 400) and item["support_masks"].shape == (2, 400, 400)
    assert item["query_mask"].dtype == torch.long and item["support_masks"].dtype == torch.long
    # the label: nearest to 400x400 exactly as torch's F.interpolate does it; ori is that label
    lab = torch.from_numpy((mask_of(1) >= 128).astype(np.float32))[None, None]
    expected = F.interpolate(lab, size=(400, 400), mode="nearest")[0, 0].long()
    assert torch.equal(item["query_mask"], expected) and torch.equal(item["query_mask_ori"], expected)
    assert set(item["query_mask"].unique().tolist()) == {0, 1}
    # the image: PIL bilinear to 400x400 (torchvision's Resize on a PIL image), then normalised
    with Image.open(os.path.join(root, "cat", "1.jpg")) as im:
        resized = np.asarray(im.convert("RGB").resize((400, 400), Image.BILINEAR))
    assert torch.allclose(item["query_img"], normalised(resized), atol=1e-5)
    # 0/1 masks (class 'dog') and 0/255 masks (class 'cat') give the same labels
    dog = ds[0]
    lab = torch.from_numpy(mask_of(0, scale=1).astype(np.float32))[None, None]
    assert torch.equal(dog["query_mask"], F.interpolate(lab, size=(400, 400), mode="nearest")[0, 0].long())


def test_pfenet_protocol_items_and_eval_collate(tree):
    root, lst = tree
    ds = FolderEvalDataset(root, lst, shot=1, seed=0, protocol="pfenet", val_size=24)
    item = ds[4]
    assert set(item) == EVAL_KEYS
    assert item["query_img"].shape == (3, 24, 24) and item["query_mask"].shape == (24, 24)
    # longer side 12 -> 24, the other 10 -> 20 (floored to a multiple of 8: 16), 255 padding
    assert (item["query_mask"][:, 16:] == 255).all() and (item["query_mask"][:, :16] != 255).all()
    assert torch.equal(item["query_mask_ori"], torch.from_numpy((mask_of(1) >= 128).astype(np.int64)))
    batch = eval_collate([ds[0], ds[4], ds[9]])
    assert batch["query_img"].shape == (3, 3, 24, 24) and batch["support_imgs"].shape == (3, 1, 3, 24, 24)
    assert batch["class_id"].tolist() == [1, 2, 3] and batch["episode_id"].tolist() == [0, 4, 9]
    assert isinstance(batch["query_mask_ori"], list) and batch["query_mask_ori"][0].shape == (H, W)
    assert batch["query_label_path"][2] == os.path.join(root, "owl", "2.png")


def test_balanced_rule_shards_and_argument_errors(tree):
    root, lst = tree
    full = FolderEvalDataset(root, lst, shot=1, seed=0, episode_rule="balanced", num_episodes=600,
                             image_size=16)
    assert len(full) == 600 and as_tuples(full.all_episodes) == reference_balanced([3, 4, 5], 1, 0, 600)
    shards = [FolderEvalDataset(root, lst, shot=1, seed=0, episode_rule="balanced", num_episodes=600,
                                rank=r, world_size=4, index=full.index) for r in range(4)]
    assert [len(s) for s in shards] == [150] * 4
    assert sorted(e.episode_id for s in shards for e in s.episodes) == list(range(600))
    assert shards[1][0]["episode_id"] == 1
    with pytest.raises(DataError, match=r"episode_rule 'per_image' draws one episode per image \(12 here\); "
                                        r"num_episodes must be 0, got 5"):
        FolderEvalDataset(root, lst, num_episodes=5)
    with pytest.raises(DataError, match="unknown episode_rule 'random'"):
        FolderEvalDataset(root, lst, episode_rule="random")
    with pytest.raises(DataError, match="unknown evaluation protocol 'voc'; use one of pfenet, hsnet"):
        FolderEvalDataset(root, lst, protocol="voc")


def test_square_resize_matches_reference_operations():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 17, 3)).astype(np.float32)
    label = (rng.random((30, 17)) > 0.5).astype(np.uint8)
    out_img, out_lab = SquareResize(8)(image, label)
    ref = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((8, 8), Image.BILINEAR), np.float32)
    assert out_img.dtype == np.float32 and np.array_equal(out_img, ref)
    # torch nearest: source index floor(i * 30/8) rows, floor(j * 17/8) columns
    rows, cols = [int(np.floor(i * 30 / 8)) for i in range(8)], [int(np.floor(j * 17 / 8)) for j in range(8)]
    assert np.array_equal(out_lab, label[np.ix_(rows, cols)])


# ------------------------------------------------------------------ training items

def test_train_items_sampler_and_determinism(tree):
    root, lst = tree
    transform = Compose([RandomCrop(8, 8), ToTensorNormalize()])
    ds = FolderTrainDataset(root, lst, transform=transform, shot=2, hue_jitter=30, tint_jitter=0.2)
    assert len(ds) == 12
    sampler = ds.sampler(epoch_size=20, seed=5, num_replicas=2, rank=1)
    assert isinstance(sampler, EpisodeSampler) and len(sampler) == 10
    key = next(iter(sampler))
    item = ds[key]
    assert set(item) == {"query_img", "query_mask", "support_imgs", "support_masks", "class_id"}
    assert item["query_img"].shape == (3, 8, 8) and item["support_imgs"].shape == (2, 3, 8, 8)
    assert item["support_masks"].shape == (2, 8, 8) and item["query_mask"].dtype == torch.long
    assert item["class_id"] == ds.index.class_of[key[0]]
    again = ds[key]
    assert all(torch.equal(item[k], again[k]) for k in ("query_img", "query_mask", "support_imgs", "support_masks"))
    # supports: same class, never the query, HSNet's draw from the episode's generator
    for position in range(12):
        query, cid, supports = ds.draw(position, np.random.default_rng(99))
        lo = ds.index.positions[cid - 1][0]
        n = ds.index.sizes[cid - 1]
        assert query == position and cid == ds.index.class_of[position]
        rng, expected = np.random.default_rng(99), []
        while len(expected) < 2:
            s = int(rng.integers(0, n))
            if s != position - lo:
                expected.append(lo + s)
        assert supports == expected
    batch = torch.utils.data.default_collate([ds[k] for k in list(iter(sampler))[:4]])
    assert batch["query_img"].shape == (4, 3, 8, 8) and batch["class_id"].shape == (4,)


def test_items_score_through_the_existing_scoring(tree):
    """eval_collate -> score_episodes (ori_resize, the default) -> IoUAccumulator, unchanged. With
    the hsnet protocol the scored label is the 400x400 (here 16x16) one, so logits that are that
    label score exactly 100, and all-background logits the hand-computed pooled IoUs."""
    root, lst = tree
    cfg = SimpleNamespace(ignore_label=255, ori_resize=True)

    def score(ds, logits_of):
        batch = eval_collate([ds[i] for i in range(len(ds))])
        inter, union, preds = score_episodes(logits_of(batch), batch, cfg.ignore_label, cfg.ori_resize)
        acc = IoUAccumulator(ds.class_ids)
        acc.update(batch["class_id"], inter, union)
        return batch, preds, acc.result(ds.class_names)

    def exact(batch):
        fg = (batch["query_mask"] == 1).float()[:, None]
        return torch.cat([1 - fg, fg], 1) * 10 - 5

    ds = FolderEvalDataset(root, lst, shot=1, seed=0, image_size=16)
    batch, preds, result = score(ds, exact)
    assert result.episodes == 12 and set(result.class_iou) == {"dog", "cat", "owl"}
    assert (result.miou, result.fbiou) == pytest.approx((100.0, 100.0), abs=1e-6)   # ΣI / (ΣU + 1e-10)
    assert preds[0].shape == (16, 16)
    background = torch.zeros(12, 2, 16, 16)
    background[:, 0] = 1
    batch, _, result = score(ds, lambda b: background)
    bg = sum(int((m == 0).sum()) for m in batch["query_mask_ori"])
    assert result.miou == 0.0 and result.fbiou == pytest.approx(50 * bg / (12 * 16 * 16))
    # the pfenet protocol's items go the original-size way: predictions at each label's own size
    ds = FolderEvalDataset(root, lst, shot=1, seed=0, protocol="pfenet", val_size=24)
    _, preds, result = score(ds, exact)
    assert result.episodes == 12 and [p.shape for p in preds] == [(H, W)] * 12 and result.miou > 90
