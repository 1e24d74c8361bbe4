"""End-to-end truth: a model trained for a few iterations is tested with ``save_pred True``, and
the saved predictions are scored again here, from the PNGs and the label files alone, by an
implementation written in this file (numpy; not dataset/metrics.py nor dataset/video_metrics.py).
The figures must equal the result JSON's. The all-foreground baseline has an exact value,
Σ foreground / Σ valid pixels per class, computed here from the labels."""
import json
import math
import os
from collections import defaultdict

import cv2
import numpy as np
import pytest

from engine.tester import run_test
from engine.trainer import Trainer
from tests.conftest import tiny_cfg
from util.classes import SYNTHETIC_CLASSES
from tests.test_video_ddp import tiny_video_cfg
from tests.test_video_metrics import davis_f, davis_j
from tests.video_fixtures import synthetic_video_tree  # noqa: F401 (fixture)
from tools.baseline import AllForeground
from util.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def read_gray(path):
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    assert image is not None, path
    return image


def image_sums(pred_dir):
    """Per episode of ``pred_dir/episodes.json``: (class name, [bg I, bg U, fg I, fg U], scored
    pixels predicted foreground) from the saved prediction and the query's label file (the
    class → 1, 255 ignored, the rest 0)."""
    index = json.loads(open(os.path.join(pred_dir, "episodes.json")).read())
    rows = []
    for e in index["episodes"]:
        pred = read_gray(os.path.join(pred_dir, e["prediction"]))
        label = read_gray(os.path.join(index["data_root"], e["query_label"]))
        assert pred.shape == label.shape and set(np.unique(pred)) <= {0, 1}
        valid = label != 255
        target = label == e["class"]
        sums = []
        for p, t in ((pred == 0, ~target), (pred == 1, target)):
            sums += [int((p & t & valid).sum()), int(((p | t) & valid).sum())]
        rows.append((e["class_name"], sums, int(((pred == 1) & valid).sum())))
    return index, rows


# the held-out classes of the synthetic set's fold 0 (label values 1..5)
FOLD0 = list(SYNTHETIC_CLASSES[:5])     # fold 0's held-out classes, ids 1..5


def pooled(rows):
    """Class IoU (percent) pooled per class over its episodes, their mean over the fold's classes,
    and FB-IoU. A class no episode drew counts 0 (PFENet's I / (U + 1e-10) of empty sums)."""
    per_class = {name: [0, 0] for name in FOLD0}
    fb = [0, 0, 0, 0]
    for name, (bi, bu, fi, fu), _ in rows:
        per_class[name][0] += fi
        per_class[name][1] += fu
        fb = [a + b for a, b in zip(fb, (bi, bu, fi, fu))]
    class_iou = {name: 100 * i / u if u else 0.0 for name, (i, u) in per_class.items()}
    return class_iou, sum(class_iou.values()) / len(class_iou), 100 * (fb[0] / fb[1] + fb[2] / fb[3]) / 2


@pytest.fixture(scope="module")
def trained_image_model(synth_root, tmp_path_factory):
    """Four SGD steps of the tiny network on the tiny synthetic set: ``last.pth``."""
    exp = tmp_path_factory.mktemp("rescore_image")
    Trainer.from_cfg(tiny_cfg(synth_root, exp, epochs=1, epoch_size=16, evaluate=False), DistInfo()).train()
    return exp


def test_saved_image_predictions_rescore_to_the_result_json(synth_root, trained_image_model):
    exp = trained_image_model
    summary = run_test(tiny_cfg(synth_root, exp, weight="last", save_pred=True), DistInfo())
    result = json.loads(open(summary["json_path"]).read())
    assert [r["seed"] for r in result["per_seed"]] == [5, 6]
    foreground_predicted = 0
    for run in result["per_seed"]:
        index, rows = image_sums(str(exp / "result" / f"pred_seed{run['seed']}"))
        assert [e["episode"] for e in index["episodes"]] == list(range(12)) and run["episodes"] == 12
        class_iou, miou, fbiou = pooled(rows)
        assert list(run["class_iou"]) == FOLD0
        for name, value in class_iou.items():
            assert run["class_iou"][name] == pytest.approx(value, abs=1e-6), name
        assert run["miou"] == pytest.approx(miou, abs=1e-6)
        assert run["fbiou"] == pytest.approx(fbiou, abs=1e-6)
        foreground_predicted += sum(n for _, _, n in rows)
    mious = [r["miou"] for r in result["per_seed"]]
    assert result["miou_mean"] == pytest.approx(sum(mious) / 2, abs=1e-9)
    assert result["miou_std"] == pytest.approx(abs(mious[0] - mious[1]) / math.sqrt(2), abs=1e-9)
    assert foreground_predicted > 0     # the check saw foreground predicted, not only empty masks


def test_all_foreground_scores_foreground_over_valid_pixels(synth_root, trained_image_model, tmp_path):
    """All-foreground predicts 1 on every pixel: a class's IoU is Σ fg / Σ valid over its
    episodes, the background IoU 0, so FB-IoU is half the pooled Σ fg / Σ valid."""
    exp = trained_image_model
    # the episodes of the same config's test (its saved index names their query labels)
    run_test(tiny_cfg(synth_root, exp, weight="last", save_pred=True, test_seeds=1), DistInfo(), write_json=False)
    index = json.loads((exp / "result" / "pred_seed5" / "episodes.json").read_text())
    fg, valid = defaultdict(int), defaultdict(int)
    for e in index["episodes"]:
        label = read_gray(os.path.join(index["data_root"], e["query_label"]))
        fg[e["class_name"]] += int((label == e["class"]).sum())
        valid[e["class_name"]] += int((label != 255).sum())
    expected = {name: 100 * fg[name] / valid[name] if valid[name] else 0.0 for name in FOLD0}
    r = run_test(tiny_cfg(synth_root, tmp_path, test_seeds=1), DistInfo(), model=AllForeground(),
                 write_json=False)["per_seed"][0]
    assert r["class_iou"].keys() == expected.keys()
    for name in expected:
        assert r["class_iou"][name] == pytest.approx(expected[name], abs=1e-9), name
    assert r["miou"] == pytest.approx(sum(expected.values()) / len(expected), abs=1e-9)
    assert r["fbiou"] == pytest.approx(100 * sum(fg.values()) / sum(valid.values()) / 2, abs=1e-9)


# ---------------------------------------------------------------- video: J and F by the DAVIS rules
def letterboxed_mask(path, box, canvas):
    """A prepared mask on the evaluation canvas, from predictions.json's letterbox fields."""
    top, left, new_h, new_w, height, width = box
    mask = read_gray(path)
    assert mask.shape == (height, width)
    out = np.zeros(canvas, np.uint8)
    out[top:top + new_h, left:left + new_w] = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return out.astype(bool)


def test_saved_video_predictions_rescore_to_the_result_json(synthetic_video_tree, tmp_path):  # noqa: F811
    _, root = synthetic_video_tree
    Trainer.from_cfg(tiny_video_cfg(root, tmp_path), DistInfo()).train()
    summary = run_test(tiny_video_cfg(root, tmp_path, weight="last", save_pred=True, test_seeds=1,
                                      batch_size_val=3), DistInfo())
    result = json.loads(open(summary["json_path"]).read())
    [run] = result["runs"]
    pred_dir = tmp_path / "result" / f"pred_seed{run['seed']}"
    index = json.loads((pred_dir / "predictions.json").read_text())
    assert index["canvas"] == [17, 29] and index["letterbox_fields"] == ["top", "left", "new_h", "new_w",
                                                                          "height", "width"]
    per_class = defaultdict(lambda: {"J": 0.0, "F": 0.0, "tp": 0, "fp": 0, "fn": 0, "frames": 0, "videos": set()})
    for ep in index["episodes"]:
        c = per_class[ep["class_name"]]
        c["videos"].add(ep["video"])
        for frame in ep["frames"]:
            pred = read_gray(str(pred_dir / ep["video"] / str(ep["class_id"]) / f"{frame}.png"))
            assert pred.shape == (17, 29) and set(np.unique(pred)) <= {0, 1}
            pred = pred.astype(bool)
            gt = letterboxed_mask(os.path.join(index["data_root"], "Masks", ep["video"], str(ep["class_id"]),
                                               f"{frame}.png"), ep["letterbox"], index["canvas"])
            c["J"] += davis_j(pred, gt)
            c["F"] += davis_f(pred, gt)
            c["tp"] += int((pred & gt).sum())
            c["fp"] += int((pred & ~gt).sum())
            c["fn"] += int((~pred & gt).sum())
            c["frames"] += 1
    assert set(per_class) == set(run["per_class"])
    js, fs, ious = [], [], []
    for name, c in per_class.items():
        j, f, iou = 100 * c["J"] / c["frames"], 100 * c["F"] / c["frames"], 100 * c["tp"] / (c["tp"] + c["fp"] + c["fn"])
        reported = run["per_class"][name]
        assert reported["J"] == pytest.approx(j, abs=1e-6) and reported["F"] == pytest.approx(f, abs=1e-6), name
        assert reported["IoU"] == pytest.approx(iou, abs=1e-6), name
        assert reported["frames"] == c["frames"] and reported["videos"] == len(c["videos"]), name
        js, fs, ious = js + [j], fs + [f], ious + [iou]
    assert run["J"] == pytest.approx(sum(js) / len(js), abs=1e-6)
    assert run["F"] == pytest.approx(sum(fs) / len(fs), abs=1e-6)
    assert run["JF"] == pytest.approx((sum(js) + sum(fs)) / len(js) / 2, abs=1e-6)
    assert run["class_iou"] == pytest.approx(sum(ious) / len(ious), abs=1e-6)
    assert run["frames"] == sum(c["frames"] for c in per_class.values())
    assert result["J_mean"] == run["J"] and result["J_std"] == 0.0
