"""dataset/sources.py and the scoring protocols: which episodes a config's dataset family
evaluates, at which size and how many, and a result JSON that names its protocol."""
import json

import numpy as np
import pytest
import torch

from dataset import sources
from dataset.image import binarize, read_label
from dataset.transform import SquareResize
from engine.networks import build_model
from engine.tester import run_test
from util.config import validate
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
