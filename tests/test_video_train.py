"""The video task end to end on a tiny synthetic video set: train.sh and test.sh as a user
runs them, exact resume with both optimisers, and the report's figures."""
import json
import os
import re
import subprocess
import sys

import cv2
import pytest
import torch

from util.classes import class_name, fold_classes
from util.errors import PredictInputError
from dataset.video_index import load_video_index

from tests.video_fixtures import synthetic_video_tree  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """DATA:
  dataset: synthetic_video
  data_root: {root}
  split: 0
  workers: 0
VIDEO:
  clip_len: 2
  video_h: 17
  video_w: 29
  samples_per_class: 4
  val_samples_per_class: 1
MODEL:
  layers: 18
  pretrained: ''
  freeze_backbone: False
  fix_bn: False
  reduce_dim: 8
  ppm_scales: [1.0, 0.5]
  support_mode: paired
  video_bg_dim: 8
LOSS:
  main_weight: 5.0
  iou_weight: 1.0
  contrast_weight: 0.0
TRAIN:
  shot: 2
  batch_size: 2
  epochs: 1
  epoch_size: 4
  base_lr: 0.005
  power: 0.0
  manual_seed: 11
  print_freq: 1
TEST:
  batch_size_val: 3
  test_seeds: 2
"""


@pytest.fixture(scope="module")
def tiny_repo(synthetic_video_tree, tmp_path_factory):  # noqa: F811
    """A checkout-shaped folder (the launchers and entry points, linked) whose config points
    at the tiny synthetic video tree, so the launchers' exp/ lands in a temporary folder."""
    _, root = synthetic_video_tree
    repo = tmp_path_factory.mktemp("repo")
    for name in ("train.sh", "test.sh", "train.py", "test.py", "scripts", "model", "engine", "util", "tools"):
        os.symlink(os.path.join(REPO, name), repo / name)
    (repo / "config" / "synthetic_video").mkdir(parents=True)
    (repo / "config" / "synthetic_video" / "synthetic_video_tiny.yaml").write_text(TINY.format(root=root))
    return repo, root


def launch(repo, script, *args):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["sh", script, "synthetic_video", "tiny", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


def test_train_and_test_through_the_launchers(tiny_repo):
    repo, root = tiny_repo
    r = launch(repo, "train.sh")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = repo / "exp" / "synthetic_video" / "tiny"
    assert (exp / "model" / "best.pth").is_file() and (exp / "model" / "last.pth").is_file()
    assert any(f.name.startswith("events.out.tfevents") for f in (exp / "tb").rglob("*"))   # one folder per run
    assert "iou" in r.stdout and "validation after epoch 1: J" in r.stdout
    index = load_video_index(root, "synthetic_video")
    train_classes = fold_classes("synthetic_video", 0)[0]
    videos = len(set().union(*(index.videos_of[c] for c in train_classes)))
    assert re.search(rf"training episodes/epoch class-balanced clips of {len(train_classes)} classes "
                     rf"\(\d+ per class, from {videos} videos\)", r.stdout)
    state = torch.load(exp / "model" / "last.pth", weights_only=True)   # video checkpoints load safely too
    assert set(state["optimizer"]) == {"sgd", "adam"} and state["iteration"] == 2

    r = launch(repo, "test.sh", "weight", "last", "save_pred", "True", "vis", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    held_out = fold_classes("synthetic_video", 0)[1]
    names = [class_name("synthetic_video", c) for c in held_out]
    for name in names:                          # the per-class table names every class
        assert name in r.stdout
    assert "J&F" in r.stdout and "±" in r.stdout and "ms/frame" in r.stdout
    result = json.loads(open(sorted((exp / "result").glob("test_*.json"))[-1]).read())
    index = load_video_index(root, "synthetic_video")
    frames = sum(index.frames_of(c) for c in held_out)
    assert result["frames"] == frames and len(result["runs"]) == 2
    assert [run["seed"] for run in result["runs"]] == [11, 12]
    for run in result["runs"]:
        assert list(run["per_class"]) == names
        assert sum(v["frames"] for v in run["per_class"].values()) == frames
        assert sum(v["frames"] for v in run["per_video"]) == frames
        assert 0 <= run["J"] <= 100 and 0 <= run["F"] <= 100 and run["JF"] == pytest.approx((run["J"] + run["F"]) / 2)
    js = [run["J"] for run in result["runs"]]
    assert result["J_mean"] == pytest.approx(sum(js) / 2)
    assert result["J_std"] == pytest.approx(abs(js[0] - js[1]) / 2 ** 0.5)
    # save_pred: one 0/1 mask per scored frame, named in predictions.json, on the canvas
    listing = json.loads((exp / "result" / "pred_seed11" / "predictions.json").read_text())
    assert sum(len(e["frames"]) for e in listing["episodes"]) == frames
    first = listing["episodes"][0]
    mask = cv2.imread(str(exp / "result" / "pred_seed11" / first["video"] / str(first["class_id"])
                          / f"{first['frames'][0]}.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (17, 29) and set(mask.ravel().tolist()) <= {0, 1}
    assert len(os.listdir(exp / "result" / "vis_seed11")) == 1


def test_resumed_video_run_equals_the_uninterrupted_one(tiny_repo, tmp_path):
    from commands import train
    repo, _ = tiny_repo
    config = str(repo / "config" / "synthetic_video" / "synthetic_video_tiny.yaml")
    common = ["--config", config, "evaluate", "False", "epochs", "2", "epoch_size", "2"]
    train.main(common + ["save_path", str(tmp_path / "a")])
    train.main(common + ["save_path", str(tmp_path / "b"), "stop_iter", "1"])
    train.main(common + ["save_path", str(tmp_path / "b"), "resume", "auto"])
    a = torch.load(tmp_path / "a" / "model" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "model" / "last.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for part in ("sgd", "adam"):
        sa, sb = a["optimizer"][part]["state"], b["optimizer"][part]["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if isinstance(sa[i][k], torch.Tensor))


def test_predict_on_a_folder_of_frames_and_a_video_file(tiny_repo, tmp_path):
    from commands import predict
    from engine.checkpoint import save_checkpoint
    from engine.networks import build_model
    from util.config import load_cfg

    repo, root = tiny_repo
    config = str(repo / "config" / "synthetic_video" / "synthetic_video_tiny.yaml")
    cfg = load_cfg(config)
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "model.pth"), build_model(cfg), cfg)
    index = load_video_index(root, "synthetic_video")
    c = fold_classes("synthetic_video", 0)[1][0]
    # per video of the class, its frame with the largest mask (tiny objects vanish on the canvas)
    area = {v: max((int(index.read_mask(v, c, f).sum()), f) for f in index.videos[v].class_frames[c])
            for v in index.videos_of[c]}
    ranked = sorted(area, key=lambda v: -area[v][0])
    supports = []
    for v in ranked[:2]:
        supports += ["--support", index.image_path(v, area[v][1]), index.mask_path(v, c, area[v][1])]
    query = index.videos[ranked[2]]
    folder = os.path.join(root, "JPEGImages", query.name)
    written = predict.main(["--config", config, "--weight", str(tmp_path / "model.pth"), *supports,
                            "--query", folder, "--out", str(tmp_path / "out")])
    masks = sorted(p for p in written if p.endswith("_mask.png"))
    assert [os.path.basename(p) for p in masks] == [f"{name}_mask.png" for name in query.frames]
    for path in masks:
        mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (query.height, query.width) and set(mask.ravel().tolist()) <= {0, 1}
    assert (tmp_path / "out" / "strip.png").is_file()

    # a video file as the query: one mask per decoded frame
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (query.width, query.height))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write a test video")
    for t in range(len(query.frames)):
        writer.write(cv2.imread(os.path.join(folder, f"{query.frames[t]}.jpg")))
    writer.release()
    written = predict.main(["--config", config, "--weight", str(tmp_path / "model.pth"), *supports,
                            "--query", video, "--out", str(tmp_path / "from_video")])
    assert sum(p.endswith("_mask.png") for p in written) == len(query.frames)

    # paired supports need clip_len of them: a user error (one line and exit 2 through util.cli.run)
    with pytest.raises(PredictInputError, match="needs clip_len = 2 supports; 1 given"):
        predict.main(["--config", config, "--weight", str(tmp_path / "model.pth"), *supports[:3],
                      "--query", folder, "--out", str(tmp_path / "bad")])
