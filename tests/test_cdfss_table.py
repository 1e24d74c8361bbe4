"""tools/cdfss_table.py: one PASCAL-trained checkpoint through run_test on four class-folder targets
at 1 and 5 shots (tiny trees, a tiny network), the mean of the four, the published rows of
docs/data.md beside it, and the JSON."""
import json
import os
import re
import shutil
import statistics

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from engine.checkpoint import save_checkpoint
from engine.networks import build_model
from engine.tester import run_test
from tools import cdfss_table
from util.cli import run
from util.config import config_with_overrides, defaults
from util.distributed import DistInfo
from util.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

NET = dict(layers=18, backbone_width=0.25, reduce_dim=8, ppm_scales=[1.0, 0.5])
SIZES = {"deepglobe": 2, "isic": 2, "chest": 1, "fss1000": 2}      # classes per target, 6 images each


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint of a network 'trained' on every PASCAL class, four tiny targets and their configs."""
    base = tmp_path_factory.mktemp("cdfss")
    cfg = defaults()
    cfg.update(NET, dataset="pascal", split="all", evaluate=False, pretrained="", memory_size=8, num_negatives=4)
    torch.manual_seed(0)
    weight = str(base / "pascal_all" / "model" / "best.pth")
    save_checkpoint(weight, build_model(cfg, warn_random_backbone=False), cfg, epoch=3)
    configs = base / "configs"
    configs.mkdir()
    rng = np.random.default_rng(0)
    for target, classes in SIZES.items():
        root = base / "data" / target
        names = [f"{target}{c}" for c in range(classes)]
        for name in names:
            os.makedirs(root / name)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
                Image.fromarray((rng.random((20, 18)) > 0.6).astype(np.uint8)).save(root / name / f"{i}.png")
        (root / "classes.txt").write_text("\n".join(names) + "\n")
        (configs / f"cdfss_{target}_tiny.yaml").write_text(yaml.safe_dump({
            "DATA": {"dataset": "cdfss", "data_root": str(root), "test_classes": str(root / "classes.txt"),
                     "workers": 0},
            "MODEL": NET,
            "TEST": {"val_size": 41, "test_num": 0 if target == "fss1000" else 4, "test_seeds": 1,
                     "batch_size_val": 2}}))
    return base, weight, str(configs)


def test_the_table_runs_each_target_and_shot_through_run_test(setup, capsys):
    base, weight, configs = setup
    out = str(base / "table.json")
    opts = ["save_path", str(base / "runs")]
    table = cdfss_table.main(["--weight", weight, "--exp", "tiny", "--configs", configs, "--out", out, *opts])
    assert table["shots"] == [1, 5] and table["eval_protocol"] == "hsnet"
    assert [t for t in table["targets"]] == ["deepglobe", "isic", "chest", "fss1000"]
    for target, classes in SIZES.items():
        for shot in ("1", "5"):
            r = table["targets"][target][shot]
            assert r["episodes"] == (6 * classes if target == "fss1000" else 4) and r["seeds"] == 1
            assert r["eval_protocol"] == "hsnet" and os.path.isfile(r["json_path"])
    for shot in ("1", "5"):
        assert table["mean"][shot] == statistics.fmean(table["targets"][t][shot]["miou_mean"] for t in SIZES)
    # the very figure test.py gives for that config, checkpoint and shot
    again = run_test(config_with_overrides(os.path.join(configs, "cdfss_isic_tiny.yaml"),
                                           ["weight", weight, "shot", "5", *opts]), DistInfo(), write_json=False)
    assert again["miou_mean"] == table["targets"]["isic"]["5"]["miou_mean"]
    saved = json.loads(open(out).read())
    assert saved == {k: v for k, v in table.items() if k != "json_path"} and table["json_path"] == out
    assert saved["published"]["PATNet (ECCV 2022)"]["isic"] == [41.16, 53.58]
    printed = capsys.readouterr().out
    assert "class mIoU (%), 1-shot / 5-shot (hsnet protocol)" in printed
    measured = [f"{table['targets'][t][k]['miou_mean']:.2f}" for t in SIZES for k in ("1", "5")]
    row = next(line for line in printed.splitlines() if line.startswith("this model (best.pth)"))
    assert re.findall(r"\d+\.\d\d", row) == measured + [f"{table['mean'][k]:.2f}" for k in ("1", "5")]
    assert re.search(r"^PATNet +37\.89 / 42\.97 +41\.16 / 53\.58 +66\.61 / 70\.20 +78\.59 / 81\.23 +56\.06 / 61\.99$",
                     printed, re.M)
    assert "Published rows: docs/data.md section 12" in printed


def test_the_published_rows_are_those_of_the_docs():
    text = open("docs/data.md").read()
    for name, _, figures in cdfss_table.PUBLISHED:
        [line] = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        cells = [c.strip() for c in line.strip("|").split("|")][1:6]
        assert [tuple(c.split(" / ")) for c in cells] == list(figures)


def test_defaults_point_at_the_shipped_configs_and_a_missing_weight_is_one_line(capsys):
    args, opts = cdfss_table.parse(["--weight", "w.pth", "workers", "2"])
    assert [os.path.join(args.configs, f"cdfss_{t}_{args.exp}.yaml") for t, _ in cdfss_table.TARGETS] == \
        [f"config/cdfss/cdfss_{t}_resnet50.yaml" for t in ("deepglobe", "isic", "chest", "fss1000")]
    assert args.shots == [1, 5] and opts == ["workers", "2"]
    assert cdfss_table.default_out("exp/pascal/all_resnet50/model/best.pth").startswith(
        os.path.abspath("exp/pascal/all_resnet50/result/cdfss_table_"))
    with pytest.raises(SystemExit) as e:
        run(cdfss_table.main, ["--weight", "nowhere/best.pth"], prog="cdfss_table.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"cdfss_table.py: error: --weight '{os.path.abspath('nowhere/best.pth')}' "
                                       "does not exist; train "
                                       "the PASCAL model first (sh train.sh pascal all_resnet50) or give the path "
                                       "of its best.pth\n")


def test_overrides_may_follow_the_shots_as_with_every_entry_point():
    args, opts = cdfss_table.parse(["--weight", "w.pth", "--shots", "1", "data_root", "d", "workers", "2"])
    assert args.shots == [1] and opts == ["data_root", "d", "workers", "2"]
    args, opts = cdfss_table.parse(["workers", "2", "--shots", "1", "5", "--weight", "w.pth"])
    assert args.shots == [1, 5] and opts == ["workers", "2"]
    for bad in (["--shots", "workers", "2"], ["--shots", "0"]):
        with pytest.raises(SystemExit) as e:
            cdfss_table.parse(["--weight", "w.pth", *bad])
        assert e.value.code == 2


def edited_configs(setup, tmp_path, target, **data):
    """The four tiny configs, ``target``'s DATA section changed by ``data``."""
    _, _, configs = setup
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in os.listdir(configs):
        cfg = yaml.safe_load(open(os.path.join(configs, name)))
        if name.startswith(f"cdfss_{target}_"):
            cfg["DATA"].update(data)
        (folder / name).write_text(yaml.safe_dump(cfg))
    return str(folder)


def test_a_missing_target_names_its_preparation_before_any_run(setup, tmp_path):
    base, weight, _ = setup
    configs = edited_configs(setup, tmp_path, "chest", data_root=str(tmp_path / "none"),
                             test_classes=str(tmp_path / "none" / "classes.txt"))
    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError) as e:
        cdfss_table.main(["--weight", weight, "--exp", "tiny", "--configs", configs, "save_path", str(runs)])
    assert str(e.value) == (f"class list '{tmp_path}/none/classes.txt' does not exist; give a text file naming one "
                            f"class folder per line (a relative class list is read under the classes' root, "
                            f"data_root or val_root, else from the folder the command was typed in). The chest target is prepared by python tools/prepare_cdfss.py "
                            f"chest --src <Lung Segmentation/> --out {tmp_path}/none")
    assert not runs.exists()                       # nothing ran: deepglobe and isic come before chest


def test_too_few_images_for_the_largest_shot_stop_the_table_before_the_first_run(setup, tmp_path):
    base, weight, _ = setup
    root = tmp_path / "small"
    shutil.copytree(base / "data" / "isic", root)
    for i in range(3, 6):
        for ext in ("jpg", "png"):
            os.remove(root / "isic1" / f"{i}.{ext}")
    configs = edited_configs(setup, tmp_path, "isic", data_root=str(root), test_classes=str(root / "classes.txt"))
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match=r"class 'isic1' .* has 3 image\(s\); 5-shot episodes need at least 6"):
        cdfss_table.main(["--weight", weight, "--exp", "tiny", "--configs", configs, "save_path", str(runs)])
    assert not runs.exists()
