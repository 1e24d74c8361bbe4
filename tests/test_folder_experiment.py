"""Your own class folders end to end, as a user runs them: train.py and test.py (commands.train,
commands.test) with config/folder/folder_resnet50.yaml and KEY VALUE overrides for a tiny network,
predict.py with the trained checkpoint, and one-line errors for bad class lists."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from commands import predict
from commands import test as test_entry
from commands import train
from util.cli import run
from util.config import config_with_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "config/folder/folder_resnet50.yaml"
CLASSES = {"ant": 4, "bee": 4, "cow": 4, "dog": 4, "eel": 3, "fox": 3}
# a tiny network and run: seconds on one core
TINY = ["layers", "18", "backbone_width", "0.25", "reduce_dim", "8", "pretrained", "", "train_h", "33",
        "train_w", "33", "val_size", "41", "batch_size", "2", "epochs", "1", "epoch_size", "4", "workers", "0",
        "memory_size", "8", "num_negatives", "4", "test_seeds", "2", "tb_images", "0", "print_freq", "1"]


def write_pair(folder, stem, k, h=24, w=20):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 11 + k * 29) % 256, (y * 9 + k * 17) % 256, np.full((h, w), (k * 53) % 256)], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(os.path.join(folder, f"{stem}.jpg"))
    mask = np.zeros((h, w), np.uint8)
    mask[2 + k % 5: 16 + k % 7, 3 + k % 4: 15] = 255
    Image.fromarray(mask).save(os.path.join(folder, f"{stem}.png"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Six classes in FSS-1000's layout (<n>.jpg + <n>.png) and the three class lists."""
    base = tmp_path_factory.mktemp("folders")
    root = base / "data"
    for c, (name, n) in enumerate(CLASSES.items()):
        os.makedirs(root / name)
        for i in range(n):
            write_pair(str(root / name), str(i), 10 * c + i)
    lists = {}
    for part, names in (("train", "ant bee cow"), ("val", "dog"), ("test", "eel fox")):
        lists[part] = str(base / f"{part}.txt")
        (base / f"{part}.txt").write_text("\n".join(names.split()) + "\n")
    data = ["data_root", str(root), "train_classes", lists["train"], "val_classes", lists["val"],
            "test_classes", lists["test"]]
    return base, root, lists, data


@pytest.fixture(scope="module")
def trained(tree):
    base, _, _, data = tree
    exp = str(base / "exp")
    metrics = train.main(["--config", TEMPLATE, *data, *TINY, "save_path", exp])
    return exp, metrics


def test_the_template_is_an_experiment_of_its_own():
    assert config_with_overrides(TEMPLATE, ["data_root", "x"]).save_path == "exp/folder/resnet50"
    assert config_with_overrides(TEMPLATE, ["shot", "5"]).save_path == "exp/folder/resnet50_shot5"


def test_train_validates_on_the_val_classes_and_keeps_a_bank_row_per_training_class(trained):
    exp, metrics = trained
    assert metrics["episodes"] == 4 and set(metrics["class_iou"]) == {"dog"}    # one episode per val image
    state = torch.load(os.path.join(exp, "model", "best.pth"), weights_only=True)
    assert state["architecture"]["bank_classes"] == 3 and state["iteration"] == 2
    assert state["model"]["memory_bank.prototypes"].shape == (4, 8, 8)          # row 0 + ant, bee, cow


def test_test_scores_every_test_image_once_per_seed_under_hsnet(tree, trained):
    _, root, lists, data = tree
    exp, _ = trained
    summary = test_entry.main(["--config", TEMPLATE, *data, *TINY, "save_path", exp, "save_pred", "True"])
    result = json.loads(open(summary["json_path"]).read())
    assert (result["eval_protocol"], result["test_num"], result["episodes"]) == ("hsnet", 0, 6)
    assert [r["seed"] for r in result["per_seed"]] == [0, 1] and result["weight"].endswith("best.pth")
    assert set(result["per_seed"][0]["class_iou"]) == {"eel", "fox"}
    assert result["data_root"] == str(root) and result["test_classes"] == lists["test"]
    assert result["scoring"] == "41x41 resized label" and result["dataset"] == "folder"
    listing = json.loads(open(os.path.join(exp, "result", "pred_seed0", "episodes.json")).read())
    assert listing["data_root"] == str(root)
    assert [(e["class_name"], e["query_label"]) for e in listing["episodes"]] == \
        [("eel", "eel/0.png"), ("eel", "eel/1.png"), ("eel", "eel/2.png"),
         ("fox", "fox/0.png"), ("fox", "fox/1.png"), ("fox", "fox/2.png")]
    pred = np.asarray(Image.open(os.path.join(exp, "result", "pred_seed0", listing["episodes"][0]["prediction"])))
    assert pred.shape == (41, 41) and set(np.unique(pred).tolist()) <= {0, 1}   # at the scored (resized) size


def test_predict_with_the_folder_model_and_a_config_of_the_same_task(tree, trained, tmp_path, caplog):
    """predict.py needs the checkpoint and any image config: here a CD-FSS one (ResNet-50 keys): the
    network is the checkpoint's, rebuilt with a warning per key that differs."""
    _, root, _, _ = tree
    exp, _ = trained
    out = str(tmp_path / "out")
    with caplog.at_level("WARNING"):
        written = predict.main(["--config", "config/cdfss/cdfss_isic_resnet50.yaml",
                                "--weight", os.path.join(exp, "model", "best.pth"),
                                "--support", str(root / "eel" / "0.jpg"), str(root / "eel" / "0.png"),
                                "--query", str(root / "fox" / "1.jpg"), "--out", out])
    assert "checkpoint " + os.path.join(exp, "model", "best.pth") + " was trained with 18" in caplog.text
    assert written[0] == os.path.join(out, "1_mask.png")
    mask = np.asarray(Image.open(written[0]))
    assert mask.shape == (24, 20) and set(np.unique(mask).tolist()) <= {0, 1}


def one_line_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        run(main, argv, prog="train.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    return err


def test_bad_class_lists_are_one_line_naming_the_file_and_the_fix(tree, trained, tmp_path, capsys):
    base, root, lists, data = tree
    weight = ["weight", os.path.join(trained[0], "model", "best.pth")]
    bad = tmp_path / "bad.txt"
    bad.write_text("ant\nyak\n")
    exp = ["save_path", str(tmp_path / "exp")]
    err = one_line_error(capsys, train.main, ["--config", TEMPLATE, *data, *TINY, *exp, "train_classes", str(bad)])
    assert err == (f"train.py: error: class 'yak' listed in '{bad}' has no folder '{root}/yak'; fix the class "
                   f"list or the data root")
    err = one_line_error(capsys, train.main, ["--config", TEMPLATE, *TINY, *exp, "data_root", str(root)])
    assert err == ("train.py: error: dataset folder trains on the classes named by train_classes: set "
                   "train_classes FILE (a text file naming one class folder per line, docs/data.md section 8)")
    err = one_line_error(capsys, test_entry.main, ["--config", TEMPLATE, *data, *TINY, *exp, *weight,
                                                   "test_classes", str(tmp_path / "none.txt")])
    assert err == (f"train.py: error: class list '{tmp_path}/none.txt' does not exist; give a text file naming "
                   f"one class folder per line (a relative class list is read under the classes' root, data_root "
                   f"or val_root, else from the folder the command was typed in)")
    err = one_line_error(capsys, test_entry.main, ["--config", TEMPLATE, *data, *TINY, *exp, *weight,
                                                   "shot", "3"])
    assert err == (f"train.py: error: class 'eel' ('{root}/eel') has 3 image(s); 3-shot episodes need at least "
                   f"4 images per class (a query and 3 supports): add images, use fewer shots or remove the class from "
                   f"'{lists['test']}'")


def test_pascal_on_every_class_validates_on_class_folders(tiny_pascal, tree, tmp_path):
    """split 'all' (the cross-domain benchmark's training): every PASCAL class trains, the DO bank
    has its 20 rows, and validation scores the class folders of val_dataset, one episode per image."""
    from engine.trainer import Trainer
    from util.distributed import DistInfo
    cfg, _ = tiny_pascal
    _, root, lists, _ = tree
    cfg.update(split="all", val_dataset="fss1000", val_root=str(root), val_classes=lists["test"],
               eval_protocol="hsnet", save_path=str(tmp_path / "exp"), layers=18, backbone_width=0.25,
               reduce_dim=8, pretrained="", ppm_scales=[1.0, 0.5], memory_size=8, num_negatives=4, workers=0,
               batch_size=2, epochs=1, epoch_size=4, tb_images=0)
    trainer = Trainer.from_cfg(cfg, DistInfo())
    assert trainer.loader.dataset.split.classes == list(range(1, 21))
    metrics = trainer.train()
    assert metrics["episodes"] == 6 and set(metrics["class_iou"]) == {"eel", "fox"}
    state = torch.load(tmp_path / "exp" / "model" / "best.pth", weights_only=True)
    assert state["architecture"]["bank_classes"] == 20
    assert state["model"]["memory_bank.prototypes"].shape == (21, 8, 8)
