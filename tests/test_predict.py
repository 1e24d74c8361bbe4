"""predict.py and engine/predictor.py: user images of any size through a tiny random model."""
import os
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from commands import predict
from engine.checkpoint import save_checkpoint
from engine.predictor import Prediction, Predictor, binary_mask, read_mask_values
from engine.networks import build_model
from util.cli import run
from util.config import defaults
from dataset.image import read_image
from util.errors import CheckpointError, PredictInputError
from dataset.metrics import score_episodes, to_original_size
from dataset.transform import eval_transform
from util.vis import TILE, TITLE_H

TINY = dict(layers=18, pretrained="", reduce_dim=8, ppm_scales=[1.0, 0.5], val_size=41, dataset="synthetic",
            memory_size=8, num_negatives=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**over):
    cfg = defaults()
    cfg.update(TINY)
    cfg.update(over)
    return cfg


def write_config(path, **over):
    """A sectioned YAML of the tiny network, for predict.py --config."""
    import yaml
    values = dict(TINY, **over)
    path.write_text(yaml.safe_dump({"MODEL": values}))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint, its config, and generated images and masks of different sizes."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg)
    save_checkpoint(str(root / "tiny.pth"), model, cfg)
    rng = np.random.default_rng(0)
    out = {"root": root, "cfg": cfg, "model": model, "weight": str(root / "tiny.pth"),
           "config": write_config(root / "tiny.yaml")}
    mask01 = np.zeros((50, 70), np.uint8)
    mask01[10:35, 15:50] = 1
    mask01[0, :] = 255                                      # ignored row
    image_a = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "a.png"), cv2.cvtColor(image_a, cv2.COLOR_RGB2BGR))   # lossless: exact reuse
    cv2.imwrite(str(root / "a_mask01.png"), mask01)
    cv2.imwrite(str(root / "a_mask0255.png"), np.where(mask01 == 1, 255, 0).astype(np.uint8))
    # palette PNG with class ids 0, 3, 7 and 255: class 7 marks the same pixels as mask01
    ids = np.where(mask01 == 1, 7, 0).astype(np.uint8)
    ids[40:, :20] = 3
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    palette.save(str(root / "a_palette.png"))
    image_b = rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)
    mask_b = np.zeros((64, 40), np.uint8)
    mask_b[20:50, 5:30] = 255
    cv2.imwrite(str(root / "b.png"), cv2.cvtColor(image_b, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "b_mask.png"), mask_b)
    for name, (h, w) in {"q1": (50, 70), "q2": (64, 40), "q3": (375, 500)}.items():
        cv2.imwrite(str(root / f"{name}.jpg"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out.update(image_a=image_a, mask01=mask01, image_b=image_b, mask_b=mask_b)
    return out


def path(files, name):
    return str(files["root"] / name)


def test_predictions_have_the_query_size_and_binary_values(files):
    predictor = Predictor(files["model"], files["cfg"])
    queries = [path(files, "q1.jpg"), path(files, "q2.jpg"), files["image_b"][:33]]   # 50x70, 64x40, 33x40
    preds = predictor.predict([(path(files, "a.png"), path(files, "a_mask01.png")),
                               (path(files, "b.png"), path(files, "b_mask.png"))], queries)
    assert [p.name for p in preds] == ["q1", "q2", "query3"]
    for pred, size in zip(preds, [(50, 70), (64, 40), (33, 40)]):
        assert isinstance(pred, Prediction)
        assert pred.mask.shape == pred.probability.shape == pred.bg_map.shape == pred.do_mask.shape == size
        assert pred.mask.dtype == np.uint8 and set(np.unique(pred.mask)) <= {0, 1}
        assert set(np.unique(pred.do_mask)) <= {0, 1}
        assert 0 <= pred.probability.min() and pred.probability.max() <= 1
        assert 0 <= pred.bg_map.min() and pred.bg_map.max() <= 1
        assert np.all(pred.mask[pred.probability > 0.5 + 1e-6] == 1)
        assert np.all(pred.mask[pred.probability < 0.5 - 1e-6] == 0)
        # two supports and no ground truth: supports, query, prediction, BG, DO
        assert pred.panel().shape == (TITLE_H + TILE, 6 * TILE, 3)


def test_prediction_equals_the_evaluation_pipeline_and_ori_resize_scoring(files):
    """Same preprocessing as evaluation (read, EvalResize, normalise) and the same mapping
    back to the original size as ori_resize scoring."""
    cfg, model = files["cfg"], files["model"]
    [pred] = Predictor(model, cfg).predict([(path(files, "a.png"), path(files, "a_mask01.png"))],
                                           [path(files, "q2.jpg")])
    transform = eval_transform(cfg)
    support, support_mask = transform(read_image(path(files, "a.png")), files["mask01"])
    query_image = read_image(path(files, "q2.jpg"))
    query, _ = transform(query_image, np.zeros(query_image.shape[:2], np.uint8))
    with torch.no_grad():
        logits = model.eval()(query[None], support[None, None], support_mask[None, None])
    label = torch.zeros(64, 40, dtype=torch.long)
    _, _, [scored] = score_episodes(logits, {"query_mask_ori": [label]}, cfg.ignore_label, cfg.ori_resize)
    assert np.array_equal(pred.mask, scored.numpy())
    expected = to_original_size(logits, 64, 40).softmax(1)[0, 1].numpy()
    assert np.array_equal(pred.probability, expected)


def test_to_original_size_crops_the_longer_side_square():
    logits = torch.arange(2 * 5 * 5, dtype=torch.float32).view(1, 2, 5, 5)
    out = to_original_size(logits, 9, 3)
    square = torch.nn.functional.interpolate(logits, size=(9, 9), mode="bilinear", align_corners=True)
    assert out.shape == (1, 2, 9, 3) and torch.equal(out, square[:, :, :, :3])
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 8, 0] == 20          # corners are kept (align_corners)


def test_mask_formats_read_to_the_same_binary_mask(files):
    expected = files["mask01"]
    assert np.array_equal(binary_mask(read_mask_values(path(files, "a_mask01.png")), None, "m"), expected)
    from_0255 = binary_mask(read_mask_values(path(files, "a_mask0255.png")), None, "m")
    assert np.array_equal(from_0255, (expected == 1).astype(np.uint8))   # 0/255: 255 is the target
    palette = read_mask_values(path(files, "a_palette.png"))
    assert set(np.unique(palette)) == {0, 3, 7}                           # indices, not colours
    assert np.array_equal(binary_mask(palette, 7, "m"), (expected == 1).astype(np.uint8))
    assert binary_mask(palette, 3, "m").sum() == 10 * 20
    ids = np.array([[0, 7, 255], [3, 7, 0]])
    assert binary_mask(ids, 7, "m").tolist() == [[0, 1, 255], [0, 1, 0]]  # 255 stays ignore
    assert binary_mask(np.array([[True, False]]), None, "m").tolist() == [[1, 0]]


def test_equivalent_masks_give_identical_predictions(files):
    predictor = Predictor(files["model"], files["cfg"])
    query = [path(files, "q1.jpg")]
    image = path(files, "a.png")
    a = predictor.predict([(image, path(files, "a_mask01.png"))], query)[0]
    b = predictor.predict([(image, path(files, "a_mask0255.png"))], query)[0]
    c = predictor.predict([(image, path(files, "a_palette.png"))], query, class_id=7)[0]
    d = predictor.predict([(files["image_a"], files["mask01"])], query)[0]    # arrays, not paths
    # ignored pixels (the 255 row of the 0/1 mask) are simply not target, as in evaluation
    for other in (b, c, d):
        assert np.array_equal(a.probability, other.probability) and np.array_equal(a.mask, other.mask)
    assert c.class_name == "class 7"


def test_predict_py_writes_mask_overlay_and_panel_per_query(files, tmp_path):
    out = tmp_path / "out"
    written = predict.main(["--config", files["config"], "--weight", files["weight"],
                            "--support", path(files, "a.png"), path(files, "a_mask01.png"),
                            "--support", path(files, "b.png"), path(files, "b_mask.png"),
                            "--query", path(files, "q1.jpg"), path(files, "q3.jpg"),
                            "--query", path(files, "q2.jpg"), "--out", str(out), "--panels",
                            "--device", "cpu", "--class-name", "noise"])
    assert len(written) == 9
    api = Predictor.from_checkpoint(files["cfg"], files["weight"]).predict(
        [(path(files, "a.png"), path(files, "a_mask01.png")), (path(files, "b.png"), path(files, "b_mask.png"))],
        [path(files, "q1.jpg"), path(files, "q3.jpg"), path(files, "q2.jpg")])
    for stem, (h, w), pred in zip(["q1", "q3", "q2"], [(50, 70), (375, 500), (64, 40)], api):
        mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask, pred.mask)                      # the CLI is the API
        assert cv2.imread(str(out / f"{stem}_overlay.jpg")).shape == (h, w, 3)
        assert cv2.imread(str(out / f"{stem}_panel.png")).shape == (TITLE_H + TILE, 6 * TILE, 3)


def test_predict_py_amp_and_overrides(files, tmp_path, caplog):
    """--amp (bf16 on the CPU) still writes 0/1 masks of the query size; KEY VALUE overrides apply;
    ``shot`` does not change K (the supports given do), and a warning says so."""
    out = tmp_path / "out"
    predict.main(["--config", files["config"], "--weight", files["weight"], "--amp",
                  "--support", path(files, "a.png"), path(files, "a_palette.png"), "--class-id", "7",
                  "--out", str(out), "--device", "cpu", "--query", path(files, "q2.jpg"), "shot", "5"])
    mask = cv2.imread(str(out / "q2_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 40) and set(np.unique(mask)) <= {0, 1}
    assert sorted(os.listdir(out)) == ["q2_mask.png", "q2_overlay.jpg"]
    assert "shot 5 is ignored: K is the number of --support pairs given (1)" in caplog.text


# ---- bad inputs: each gives its own error, naming the file or option ---------------------
def run_cli(files, tmp_path, capsys, *args, weight=None, config=None):
    argv = ["--config", config or files["config"], "--weight", weight or files["weight"],
            "--out", str(tmp_path / "out"), "--device", "cpu", *args]
    with pytest.raises(SystemExit) as exit_info:
        run(predict.main, argv)
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_unreadable_or_missing_image_is_an_error_naming_it(files, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    support = ["--support", path(files, "a.png"), path(files, "a_mask01.png")]
    err = run_cli(files, tmp_path, capsys, *support, "--query", str(broken))
    assert f"cannot read image '{broken}'" in err
    err = run_cli(files, tmp_path, capsys, "--support", str(broken), path(files, "a_mask01.png"),
                  "--query", path(files, "q1.jpg"))
    assert f"cannot read image '{broken}'" in err
    err = run_cli(files, tmp_path, capsys, *support, "--query", str(tmp_path / "nowhere.jpg"))
    assert "nowhere.jpg' does not exist" in err
    err = run_cli(files, tmp_path, capsys, "--support", path(files, "a.png"), str(broken),
                  "--query", path(files, "q1.jpg"))
    assert f"cannot read mask '{broken}'" in err


def test_mask_of_another_size_is_an_error_naming_both_files(files, tmp_path, capsys):
    err = run_cli(files, tmp_path, capsys, "--support", path(files, "a.png"), path(files, "b_mask.png"),
                  "--query", path(files, "q1.jpg"))
    assert f"support mask '{path(files, 'b_mask.png')}' is 40x64 (WxH) but its image '{path(files, 'a.png')}' " \
           f"is 70x50" in err
    with pytest.raises(PredictInputError, match=r"support mask support mask #1 \(array\) is 40x64"):
        Predictor(files["model"], files["cfg"]).predict([(files["image_a"], files["mask_b"])], [files["image_b"]])


def test_empty_support_mask_is_an_error(files, tmp_path, capsys):
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), np.zeros((50, 70), np.uint8))
    err = run_cli(files, tmp_path, capsys, "--support", path(files, "a.png"), str(empty),
                  "--query", path(files, "q1.jpg"))
    assert f"support mask '{empty}' has no pixel of the target" in err
    # a palette mask without that class is empty too
    err = run_cli(files, tmp_path, capsys, "--support", path(files, "a.png"), path(files, "a_palette.png"),
                  "--class-id", "9", "--query", path(files, "q1.jpg"))
    assert "has no pixel of class 9" in err


def test_class_id_mask_without_class_id_says_to_pass_it(files, tmp_path, capsys):
    err = run_cli(files, tmp_path, capsys, "--support", path(files, "a.png"), path(files, "a_palette.png"),
                  "--query", path(files, "q1.jpg"))
    assert f"mask '{path(files, 'a_palette.png')}' holds the values 0, 3, 7" in err and "--class-id" in err
    err = run_cli(files, tmp_path, capsys, "--support", path(files, "a.png"), path(files, "a_palette.png"),
                  "--class-id", "255", "--query", path(files, "q1.jpg"))
    assert "--class-id 255 is not a class id" in err


def test_the_network_is_the_checkpoints_a_conflicting_override_is_an_error(files, tmp_path, capsys, caplog):
    """A checkpoint carries its architecture: a config of another backbone builds the checkpoint's
    network (a warning names the key and the checkpoint's value); the same key set on the command
    line to another value is a one-line error."""
    cfg34 = tiny_cfg(layers=34)
    weight34 = str(tmp_path / "resnet34.pth")
    model34 = build_model(cfg34).eval()
    save_checkpoint(weight34, model34, cfg34)
    with caplog.at_level("WARNING"):
        predictor = Predictor.from_checkpoint(files["cfg"], weight34)
    assert "the config has layers 18, checkpoint " + weight34 + " was trained with 34" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(predictor.model.state_dict().values(),
                                                 model34.state_dict().values()))
    err = run_cli(files, tmp_path, capsys, "--support", path(files, "a.png"), path(files, "a_mask01.png"),
                  "--query", path(files, "q1.jpg"), "layers", "18", weight=weight34)
    assert f"checkpoint '{weight34}' was trained with layers 34; the command line sets layers 18" in err


def test_other_usage_errors(files, tmp_path, capsys):
    support = ["--support", path(files, "a.png"), path(files, "a_mask01.png")]
    other = tmp_path / "other"
    other.mkdir()
    cv2.imwrite(str(other / "q1.jpg"), np.zeros((8, 8, 3), np.uint8))
    err = run_cli(files, tmp_path, capsys, *support, "--query", path(files, "q1.jpg"), str(other / "q1.jpg"))
    assert "would both write q1_mask.png" in err
    if not torch.cuda.is_available():
        err = run_cli(files, tmp_path, capsys, *support, "--query", path(files, "q1.jpg"), "--device", "cuda")
        assert "no CUDA device" in err and "use cpu" in err
    # overrides after --query's images are overrides, not images
    err = run_cli(files, tmp_path, capsys, *support, "--query", path(files, "q1.jpg"), "val_size", "41",
                  "reduce_dm", "8")
    assert "unknown key 'reduce_dm'; did you mean 'reduce_dim'?" in err
    predictor = Predictor(files["model"], files["cfg"])
    with pytest.raises(PredictInputError, match="no support given"):
        predictor.predict([], [files["image_a"]])
    with pytest.raises(PredictInputError, match="query #1 \\(array\\) is a float64 array"):
        predictor.predict([(files["image_a"], files["mask01"])], [files["image_a"].astype(float)])
    tiny_object = np.zeros((50, 70), np.uint8)
    tiny_object[20, 30] = 1          # one pixel: gone after resizing to 41
    with pytest.raises(PredictInputError, match="vanishes when the image is resized to val_size 41"):
        predictor.predict([(files["image_a"], tiny_object)], [files["image_a"]])
    # a support given by path is named by its path, not its stem alone (frames are all '00000'...)
    tiny_path = str(tmp_path / "tiny_object.png")
    cv2.imwrite(tiny_path, tiny_object)
    with pytest.raises(PredictInputError, match=re.escape(f"the target in support '{path(files, 'a.png')}' vanishes")):
        predictor.predict([(path(files, "a.png"), tiny_path)], [files["image_a"]])
