"""docs/extending.md: the example network there is examples/cosine_proto.py, and it trains,
evaluates and predicts through the entry points with `arch examples.cosine_proto:build`; the
checkpoint records the arch; a name that is neither registered nor importable is one line."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from commands import test as test_entry
from commands import train
from engine.checkpoint import read_checkpoint
from engine.networks import build_model
from examples.cosine_proto import CosinePrototypeNet
from tests.conftest import tiny_cfg
from util.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "examples.cosine_proto:build"


def test_the_documented_example_is_the_file():
    doc = open(os.path.join(ROOT, "docs", "extending.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert open(os.path.join(ROOT, "examples", "cosine_proto.py")).read() in blocks


def write_config(path, synth_root):
    path.write_text(
        "DATA:\n  dataset: synthetic\n"
        f"  data_root: {synth_root}\n  train_list: {synth_root}/train.txt\n  val_list: {synth_root}/val.txt\n"
        "  min_class_pixels: 150\n  class_index_workers: 1\n  workers: 0\n"
        "MODEL:\n  pretrained: ''\n  reduce_dim: 8\n"
        "TRAIN:\n  train_h: 33\n  train_w: 33\n  batch_size: 4\n  epochs: 2\n  epoch_size: 8\n  manual_seed: 7\n"
        "  val_num: 6\nTEST:\n  val_size: 41\n  batch_size_val: 3\n  test_num: 6\n  test_seeds: 1\n  vis: 1\n")
    return str(path)


def test_a_network_of_your_own_trains_tests_and_predicts(synth_root, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", synth_root)
    exp = tmp_path / "exp"
    metrics = train.main(["--config", config, "arch", ARCH, "save_path", str(exp)])
    assert metrics["episodes"] == 6 and 0 <= metrics["miou"] <= 100
    state = read_checkpoint(str(exp / "model" / "last.pth"))
    assert state["architecture"]["arch"] == ARCH and state["iteration"] == 4
    assert set(state["model"]) == set(CosinePrototypeNet(8).state_dict())
    # the config says ntrenetpp; the checkpoint's network is rebuilt, with a warning naming the key
    summary = test_entry.main(["--config", config, "save_path", str(exp), "weight", "last"])
    assert (f"the config has arch 'ntrenetpp', checkpoint {exp}/model/last.pth was trained with '{ARCH}'"
            in (exp / "test.log").read_text())
    result = json.loads(open(summary["json_path"]).read())
    assert result["episodes"] == 6 and 0 <= result["miou_mean"] <= 100
    assert len(os.listdir(exp / "result" / "vis_seed7")) == 1          # a panel with the prior it returns
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "s.png"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 10:40] = 1
    cv2.imwrite(str(tmp_path / "s_mask.png"), mask)
    cv2.imwrite(str(tmp_path / "q.png"), rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    done = subprocess.run([sys.executable, "predict.py", "--config", config, "--weight", str(exp / "model" / "last.pth"),
                           "--support", str(tmp_path / "s.png"), str(tmp_path / "s_mask.png"), "--query",
                           str(tmp_path / "q.png"), "--out", str(tmp_path / "out"), "--panels", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    predicted = cv2.imread(str(tmp_path / "out" / "q_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert predicted.shape == (30, 45) and set(np.unique(predicted)) <= {0, 1}
    assert (tmp_path / "out" / "q_panel.png").is_file()


@pytest.mark.parametrize("arch, message", [
    ("nosuch", r"key 'arch' is 'nosuch'; expected one of \['ntrenetpp', 'pfenet'\] or 'package.module:callable'"),
    ("examples.nosuch:build", r"module 'examples.nosuch' cannot be imported"),
    ("examples.cosine_proto:nope", r"'examples.cosine_proto' has no callable 'nope'"),
])
def test_an_arch_that_names_nothing_is_one_line(synth_root, tmp_path, arch, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_cfg(synth_root, tmp_path, arch=arch))
