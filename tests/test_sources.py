"""dataset/sources.py and the scoring protocols: which episodes a config's dataset family
evaluates, at which size and how many, and a result JSON that names its protocol."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import sources
from dataset.image import binarize, read_label
from dataset.transform import SquareResize
from engine.networks import build_model
from engine.tester import run_test
from util.config import load_cfg, validate
from util.distributed import DistInfo
from util.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_NET = dict(layers=18, backbone_width=0.25, reduce_dim=8, pretrained="", ppm_scales=[1.0, 0.5], memory_size=8,
                num_negatives=4, workers=0)


def test_pascal_under_hsnet_scores_1000_square_episodes_on_the_resized_label(tiny_pascal):
    cfg, root = tiny_pascal
    cfg.update(eval_protocol="hsnet", test_num="auto", val_size="auto")
    validate(cfg)
    es, make = sources.eval_datasets(cfg, DistInfo(), "test")
    assert (es.family, es.protocol, es.size, es.num_episodes) == ("pascal", "hsnet", 400, 1000)
    ds = make(0)
    assert len(ds) == 1000 and ds.class_ids == [1, 2, 3, 4, 5]
    assert ds.class_names == {1: "aeroplane", 2: "bicycle", 3: "bird", 4: "boat", 5: "bottle"}
    item = ds[0]
    assert item["query_img"].shape == (3, 400, 400) and item["support_imgs"].shape == (1, 3, 400, 400)
    assert item["support_masks"].shape == (1, 400, 400)
    # scored on the nearest-resized episode label (255 kept), the very query_mask the network sees
    episode = ds.episodes[0]
    label = binarize(read_label(item["query_label_path"]), episode.class_id)
    _, expected = SquareResize(400)(np.zeros((*label.shape, 3), np.float32), label)
    assert torch.equal(item["query_mask_ori"], torch.from_numpy(expected).long())
    assert torch.equal(item["query_mask_ori"], item["query_mask"]) and 255 in expected
    # pfenet: the canvas and the label at its own size
    cfg.update(eval_protocol="pfenet", test_num="auto", val_size="auto")
    validate(cfg)
    es, make = sources.eval_datasets(cfg, DistInfo(), "test")
    assert (es.protocol, es.size, es.num_episodes) == ("pfenet", 473, 1000)
    item = make(0)[0]
    assert item["query_img"].shape == (3, 473, 473) and item["query_mask_ori"].shape == (64, 64)


def test_a_split_all_model_has_no_held_out_class_to_test_on(tiny_pascal):
    cfg, _ = tiny_pascal
    cfg.update(split="all", evaluate=False)
    validate(cfg)
    with pytest.raises(ConfigError) as e:
        sources.eval_datasets(cfg, DistInfo(), "test")
    assert str(e.value) == ("split 'all' holds out no pascal class, so there is nothing to test on: evaluate the "
                            "model on the cross-domain sets (python tools/cdfss_table.py --weight CKPT, "
                            "docs/data.md section 10)")
    assert sources.train_dataset(cfg, DistInfo()).split.classes == list(range(1, 21))


@pytest.mark.parametrize("protocol, seeds, scoring", [("hsnet", [0, 1], "41x41 resized label"),
                                                      ("pfenet", [321, 322], "ori_resize")])
def test_the_result_json_names_the_protocol_and_its_seeds(tiny_pascal, tmp_path, protocol, seeds, scoring):
    cfg, _ = tiny_pascal
    cfg.update(TINY_NET, eval_protocol=protocol, val_size=41, test_num=6, test_seeds=2, batch_size_val=3,
               save_path=str(tmp_path / "exp"))
    torch.manual_seed(0)
    summary = run_test(cfg, DistInfo(), model=build_model(cfg, warn_random_backbone=False))
    result = json.loads(open(summary["json_path"]).read())
    assert result["eval_protocol"] == protocol and result["scoring"] == scoring and result["val_size"] == 41
    assert [r["seed"] for r in result["per_seed"]] == seeds and result["manual_seed"] == 321
    assert result["episodes"] == result["test_num"] == 6 and result["seeds"] == 2
    assert set(result["per_seed"][0]["class_iou"]) == {"aeroplane", "bicycle", "bird", "boat", "bottle"}
    assert set(result) >= {"dataset", "split", "shot", "weight", "checkpoint_epoch", "miou_mean", "miou_std",
                           "fbiou_mean", "fbiou_std", "use_split_coco", "val_list", "ms_per_episode"}


def fill_classes(root, names, per_class):
    """``per_class`` (image, mask) pairs in each class folder: links to one tiny pair, named as
    FSS-1000's (1.jpg + 1.png, ...)."""
    os.makedirs(root, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(os.path.join(root, "pair.jpg"))
    Image.fromarray(np.eye(4, dtype=np.uint8)).save(os.path.join(root, "pair.png"))
    for name in names:
        os.makedirs(os.path.join(root, name))
        for i in range(1, per_class + 1):
            for ext in (".jpg", ".png"):
                os.symlink(os.path.join(root, "pair" + ext), os.path.join(root, name, f"{i}{ext}"))


def test_fss1000_tests_one_episode_per_image_of_its_240_test_classes(tmp_path):
    """The shipped config on a stand-in tree of the real test classes, 10 images each: 2400 episodes,
    class by class in list order, images in file-name order (1, 10, 2, ...)."""
    with open("lists/fss1000/test.txt") as f:
        names = f.read().split()
    root = str(tmp_path / "fss")
    fill_classes(root, names, 10)
    cfg = load_cfg("config/fss1000/fss1000_resnet50.yaml", ["data_root", root])
    es, make = sources.eval_datasets(cfg, DistInfo(), "test")
    assert (es.protocol, es.size, es.num_episodes, es.class_list) == ("hsnet", 400, 0, "lists/fss1000/test.txt")
    ds = make(0)
    assert len(names) == 240 and len(ds) == 2400
    assert [ds.episodes[e].class_id for e in (0, 9, 10, 2399)] == [1, 1, 2, 240]
    assert ds.class_names[1] == names[0] and ds.class_names[240] == names[-1]
    assert [os.path.basename(ds.index.pairs[ds.episodes[e].query][0]) for e in range(3)] == ["1.jpg", "10.jpg", "2.jpg"]


@pytest.mark.parametrize("target, classes, per_class", [("deepglobe", 6, 100), ("isic", 3, 200), ("chest", 1, 600)])
def test_a_cross_domain_target_scores_600_class_balanced_episodes(tmp_path, target, classes, per_class):
    root = str(tmp_path / target)
    fill_classes(root, [f"c{i}" for i in range(classes)], 3)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(f"c{i}\n" for i in range(classes)))
    cfg = load_cfg(f"config/cdfss/cdfss_{target}_resnet50.yaml",
                   ["data_root", root, "test_classes", os.path.join(root, "classes.txt")])
    es, make = sources.eval_datasets(cfg, DistInfo(), "test")
    assert (es.family, es.protocol, es.size, es.num_episodes) == ("cdfss", "hsnet", 400, 600)
    ds = make(0)
    assert len(ds) == 600
    assert np.bincount([e.class_id for e in ds.episodes]).tolist()[1:] == [per_class] * classes


def test_validation_sets_of_each_family(tmp_path, caplog):
    """PASCAL-all validates on FSS-1000's val class folders (one episode per image unless val_num);
    a class-folder dataset on val_classes, or, without them, on the test classes with a warning."""
    cfg = load_cfg("config/pascal/pascal_all_resnet50.yaml")
    es = sources.evaluation_set(cfg, "val")
    assert es == sources.EvalSet("fss1000", "val", "hsnet", 400, 0, "data/fss1000", "lists/fss1000/val.txt")
    assert sources.evaluation_set(load_cfg("config/pascal/pascal_all_resnet50.yaml", ["val_num", "50"]),
                                  "val").num_episodes == 50
    cfg = load_cfg("config/fss1000/fss1000_resnet50.yaml", ["val_root", "elsewhere"])
    assert sources.evaluation_set(cfg, "val") == \
        sources.EvalSet("fss1000", "val", "hsnet", 400, 0, "elsewhere", "lists/fss1000/val.txt")
    cfg = load_cfg("config/fss1000/fss1000_resnet50.yaml", ["val_classes", "", "val_num", "300"])
    with caplog.at_level("WARNING"):
        es = sources.evaluation_set(cfg, "val")
    assert (es.class_list, es.root, es.num_episodes) == ("lists/fss1000/test.txt", "data/fss1000", 300)
    assert "val_classes is empty: validating on the test classes (lists/fss1000/test.txt)" in caplog.text
    cfg = load_cfg("config/folder/folder_resnet50.yaml")
    with pytest.raises(ConfigError) as e:
        sources.evaluation_set(cfg, "test")
    assert str(e.value) == ("dataset folder tests on the classes named by test_classes: set test_classes FILE (a "
                            "text file naming one class folder per line, docs/data.md section 8)")
    with pytest.raises(ConfigError) as e:
        sources.train_dataset(load_cfg("config/cdfss/cdfss_isic_resnet50.yaml"), DistInfo())
    assert str(e.value).endswith("; the cdfss configs only evaluate, a model trained on PASCAL "
                                 "(config/pascal/pascal_all_resnet50.yaml)")
