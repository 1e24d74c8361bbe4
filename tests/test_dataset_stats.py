import json

import pytest

from tools.dataset_stats import main
from util.dataset import draw_episodes, load_split


def test_stats_json_counts_and_episodes_as_evaluation_draws_them(tiny_pascal, tmp_path):
    cfg, root = tiny_pascal
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"DATA:\n  dataset: pascal\n  data_root: {root}\n  train_list: {cfg.train_list}\n"
                        f"  val_list: {cfg.val_list}\n  class_index_workers: 1\n")
    out = tmp_path / "stats.json"
    main(["--config", str(cfg_path), "split", "1", "--episodes", "7", "--seed", "4", "--json", str(out)])
    stats = json.loads(out.read_text())
    assert stats["dataset"] == "pascal" and stats["split"] == 1 and stats["shot"] == 1
    assert stats["val_classes"] == [6, 7, 8, 9, 10]
    assert stats["class_names"]["6"] == "bus" and stats["class_names"]["1"] == "aeroplane"
    # every class has 3 single-class images; the extra image serves class 1 (a training class here)
    assert stats["val"] == {"images": 15, "per_class": {str(c): 3 for c in range(6, 11)}}
    assert stats["train"]["images"] == 46 and stats["train"]["per_class"]["1"] == 4
    assert len(stats["episodes"]) == 7
    cfg.split = 1
    split = load_split(cfg, train=False)
    expected = draw_episodes(split.index, 7, 1, 4)
    for got, e in zip(stats["episodes"], expected):
        assert got["class"] == e.class_id
        assert got["query_label"] == f"SegmentationClassAug/img_{e.query:04d}.png"
        assert got["support_images"] == [f"JPEGImages/img_{s:04d}.jpg" for s in e.supports]


def test_stray_flag_is_rejected(tiny_pascal, tmp_path):
    with pytest.raises(SystemExit):
        main(["--config", "config/pascal/pascal_split0_resnet50.yaml", "--epsiodes", "3"])
