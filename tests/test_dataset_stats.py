import json

import pytest

from tests.video_fixtures import synthetic_video_tree  # noqa: F401 (fixture)
from tools.dataset_stats import format_table, main
from dataset.image import draw_episodes, load_split
from dataset.video import build_chunks, draw_video_episodes
from dataset.video_index import load_video_index


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


def test_stray_flag_is_rejected(tiny_pascal, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "config/pascal/pascal_split0_resnet50.yaml", "--epsiodes", "3"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[0].startswith("usage: ")
    assert err[-1].endswith(": error: unknown option(s) ['--epsiodes']; config overrides are written KEY VALUE "
                            "without dashes")
    assert sum("error:" in line for line in err) == 1


# the fixture prepares with pycocotools, whose decode trips numpy 2's __array__ deprecation
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_video_stats_count_videos_and_frames_per_class_and_fold(synthetic_video_tree, tmp_path):  # noqa: F811
    _, root = synthetic_video_tree
    cfg_path = tmp_path / "v.yaml"
    cfg_path.write_text(f"DATA:\n  dataset: synthetic_video\n  data_root: {root}\n  split: 2\n  shot: 2\n  clip_len: 3\nMODEL:\n  support_mode: mean\n")
    out = tmp_path / "stats.json"
    stats = main(["--config", str(cfg_path), "--episodes", "1", "--seed", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(stats))
    index = load_video_index(root, "synthetic_video")
    assert stats["val_classes"] == [11, 12, 13, 14, 15] and stats["class_names"]["13"] == "dotted triangle"
    for c in stats["val_classes"]:
        assert stats["val"]["per_class"][str(c)] == {
            "videos": len(index.videos_of[c]),
            "frames": sum(len(index.videos[v].class_frames[c]) for v in index.videos_of[c])}
    assert stats["videos"] == 60 and stats["frames"] == sum(len(v.frames) for v in index.videos)
    assert stats["folds"]["2"]["held_out"] == [11, 12, 13, 14, 15]
    assert stats["folds"]["2"]["frames"] == stats["val"]["frames"]
    assert sum(f["videos"] for f in stats["folds"].values()) == sum(len(index.videos_of[c]) for c in range(1, 21))
    episodes = draw_video_episodes(index, [11, 12, 13, 14, 15], 2, 3)
    assert len(stats["episodes"]) == len(episodes)
    assert stats["episodes"][0]["query_video"] == index.videos[episodes[0].video].name
    assert stats["chunks"] == len(build_chunks(episodes, 3))
    # no config file: the declared defaults and the overrides
    alone = main(["dataset", "synthetic_video", "data_root", root, "split", "2", "shot", "2", "clip_len", "3", "support_mode", "mean"])
    assert alone["val"] == stats["val"] and alone["folds"] == stats["folds"]


def test_the_class_column_fits_the_longest_name():
    """The synthetic dataset's 'checkered triangle' is wider than the 16 characters the table had."""
    names = {"1": "solid disc", "2": "checkered triangle"}
    stats = {"dataset": "synthetic", "split": 0, "train": {"images": 3, "per_class": {"1": 2, "2": 1}},
             "val": {"images": 0, "per_class": {}}, "train_classes": [1, 2], "val_classes": [], "class_names": names}
    rows = format_table(stats).splitlines()[3:6]
    assert rows == ["   id  class               images", "    1  solid disc               2",
                    "    2  checkered triangle       1"]
