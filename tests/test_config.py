import glob
import os
import re

import pytest

from util.classes import FOLDER_DATASETS
from util.config import (ARCH_KEYS, AUTO_EVAL, ConfigError, KEYS, defaults, load_cfg, load_cfg_from_yaml,
                         merge_cfg_from_list, validate)


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


def test_sections_are_flattened_and_defaults_filled(tmp_path):
    cfg = load_cfg(write(tmp_path, "DATA:\n  split: 2\n  data_root: /d\nTRAIN:\n  shot: 5\n  base_lr: 1\n"))
    assert cfg.split == 2 and cfg.data_root == "/d" and cfg.shot == 5
    assert cfg.base_lr == 1.0 and isinstance(cfg.base_lr, float)   # an int is a valid float
    assert cfg.ppm_scales == [60, 30, 15, 8]                          # declared default
    assert set(cfg) == set(KEYS)


def test_unknown_key_names_the_nearest_declared_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'shots'.*did you mean 'shot'"):
        load_cfg_from_yaml(write(tmp_path, "TRAIN:\n  shots: 1\n"))
    with pytest.raises(ConfigError, match=r"command line: unknown key 'base_rl'.*'base_lr'"):
        load_cfg(write(tmp_path, "TRAIN:\n  shot: 1\n"), ["base_rl", "0.1"])
    with pytest.raises(AttributeError, match="did you mean 'split'"):
        load_cfg_from_yaml(write(tmp_path, "DATA:\n  split: 1\n")).splt


def test_wrong_type_names_key_value_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'shot' has value 'one' \(str\); expected an int"):
        load_cfg_from_yaml(write(tmp_path, "TRAIN:\n  shot: one\n"))
    with pytest.raises(ConfigError, match=r"key 'fix_bn' has value 1 \(int\); expected a bool"):
        load_cfg_from_yaml(write(tmp_path, "TRAIN:\n  fix_bn: 1\n"))
    with pytest.raises(ConfigError, match=r"key 'amp' has value 'fp8'; expected one of"):
        load_cfg_from_yaml(write(tmp_path, "TRAIN:\n  amp: fp8\n"))
    with pytest.raises(ConfigError, match=r"key 'split' is 7"):
        load_cfg(write(tmp_path, "DATA:\n  split: 7\n"))
    with pytest.raises(ConfigError, match=r"key 'base_lr' is 0.0; it must be positive"):
        load_cfg(write(tmp_path, "TRAIN:\n  base_lr: 0\n"))   # the video recipe divides by it


def test_command_line_overrides_are_python_literals(tmp_path):
    path = write(tmp_path, "TRAIN:\n  shot: 1\n")
    cfg = load_cfg(path, ["shot", "5", "base_lr", "0.01", "ppm_scales", "[1.0, 0.5]",
                          "fix_bn", "False", "weight", "exp/x/best.pth", "resume", "auto"])
    assert (cfg.shot, cfg.base_lr, cfg.ppm_scales, cfg.fix_bn) == (5, 0.01, [1.0, 0.5], False)
    assert cfg.weight == "exp/x/best.pth" and cfg.resume == "auto"
    # a string key keeps the text even when it would parse as a number
    assert merge_cfg_from_list(cfg, ["pretrained", "123"]).pretrained == "123"
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_cfg(path, ["shot"])
    with pytest.raises(ConfigError, match="key 'shot' has value 'five'"):
        load_cfg(path, ["shot", "five"])


def test_duplicate_key_and_bad_sections(tmp_path):
    with pytest.raises(ConfigError, match="'shot' appears in both 'DATA' and 'TRAIN'"):
        load_cfg_from_yaml(write(tmp_path, "DATA:\n  shot: 1\nTRAIN:\n  shot: 2\n"))
    with pytest.raises(ConfigError, match="section 'TRAIN' must map keys"):
        load_cfg_from_yaml(write(tmp_path, "TRAIN: 3\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_cfg_from_yaml(str(tmp_path / "nope.yaml"))


SHIPPED = sorted(glob.glob("config/*/*.yaml"))


def families():
    """Shipped configs grouped by name with the fold left out: {'config/pascal/pascal_split*_resnet50.yaml': [4 paths]}."""
    out = {}
    for path in SHIPPED:
        out.setdefault(re.sub(r"split\d", "split*", path), []).append(path)
    return out


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_loads(path):
    cfg = load_cfg(path)
    dataset = path.split("/")[1]
    assert cfg.dataset == dataset
    if dataset in FOLDER_DATASETS:                   # class lists decide, not folds
        assert "split" not in cfg.explicit and "split" not in path
    elif cfg.split == "all":
        assert path == f"config/{dataset}/{dataset}_all_resnet50.yaml"
    else:
        assert f"split{cfg.split}" in path


@pytest.mark.parametrize("family", sorted(families()))
def test_the_folds_of_a_family_share_one_recipe(family):
    """A family's configs differ only in the fold (and may in its lists): every fold is trained
    and tested the same way, so one fold's edited learning rate or epoch count cannot slip in."""
    paths = families()[family]
    cfgs = {path: load_cfg(path) for path in paths}
    if len(paths) > 1:                                     # a single config: a one-fold demo
        assert sorted(c.split for c in cfgs.values()) == [0, 1, 2, 3]
    first = cfgs[paths[0]]
    for path, cfg in cfgs.items():
        differing = {k for k in cfg if cfg[k] != first[k]}
        assert differing <= {"split", "train_list", "val_list", "pretrained"}, (path, sorted(differing))
        if "pretrained" in differing:          # a backbone pretrained on the fold's own training classes
            assert f"split{cfg.split}" in cfg.pretrained, (path, cfg.pretrained)


@pytest.mark.parametrize("dataset", ["pascal", "coco"])
def test_backbone_variants_differ_only_in_the_backbone(dataset):
    """Per fold, ResNet-101 and VGG configs differ from the ResNet-50 one in the backbone keys
    alone; a PFENet config differs from the NTRENet++ one of its backbone in the same keys
    whatever the backbone."""
    backbone = {"resnet101": {"layers", "pretrained"}, "vgg": {"vgg", "pretrained"}}
    for split in range(4):
        base = load_cfg(f"config/{dataset}/{dataset}_split{split}_resnet50.yaml")
        pfenet_keys = set()
        for variant in ("resnet50", "resnet101", "vgg"):
            path = f"config/{dataset}/{dataset}_split{split}_{variant}.yaml"
            if variant != "resnet50" and os.path.isfile(path):
                cfg = load_cfg(path)
                assert {k for k in cfg if cfg[k] != base[k]} == backbone[variant], path
            pfenet_path = path.replace(".yaml", "_pfenet.yaml")
            if os.path.isfile(pfenet_path):
                ntrenet = load_cfg(path) if os.path.isfile(path) else load_cfg(
                    f"config/{dataset}/{dataset}_split{split}_resnet50.yaml", [
                        "vgg", "True", "pretrained", "initmodel/vgg16_bn.pth"])
                pfenet = load_cfg(pfenet_path)
                keys = {k for k in pfenet if pfenet[k] != ntrenet[k]}
                assert pfenet.arch == "pfenet" and "arch" in keys
                assert not pfenet_keys or keys == pfenet_keys, (pfenet_path, keys, pfenet_keys)
                pfenet_keys = keys
        assert pfenet_keys


def test_yaml_float_strings_and_count_bounds(tmp_path):
    cfg = load_cfg(write(tmp_path, "TRAIN:\n  weight_decay: 1e-4\n"))   # YAML reads 1e-4 as a string
    assert cfg.weight_decay == 1e-4
    with pytest.raises(ConfigError, match="key 'print_freq' is 0; it must be at least 1"):
        load_cfg(write(tmp_path, "TRAIN:\n  print_freq: 0\n"))
    with pytest.raises(ConfigError, match="key 'workers' is -1; it must not be negative"):
        load_cfg(write(tmp_path, "TRAIN:\n  workers: -1\n"))


def test_channels_last_takes_a_bool_or_auto(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("TRAIN:\n  channels_last: true\n")
    assert load_cfg(str(path)).channels_last is True
    assert load_cfg(str(path), ["channels_last", "auto"]).channels_last == "auto"
    assert load_cfg(str(path), ["channels_last", "False"]).channels_last is False
    with pytest.raises(ConfigError, match="channels_last.*True, False or 'auto'"):
        load_cfg(str(path), ["channels_last", "yes"])


@pytest.mark.parametrize("dataset, protocol, size, episodes", [
    ("pascal", "pfenet", 473, 1000), ("coco", "pfenet", 641, 4000), ("synthetic", "pfenet", 473, 1000),
    ("fss1000", "hsnet", 400, 0), ("cdfss", "hsnet", 400, 600), ("folder", "hsnet", 400, 0)])
def test_auto_evaluation_keys_resolve_to_the_datasets_protocol(dataset, protocol, size, episodes):
    """eval_protocol 'auto' is the lineage of the dataset's published numbers; val_size and
    test_num 'auto' are that protocol's (test_num 0: one episode per image)."""
    cfg = defaults()
    cfg.dataset = dataset
    assert (cfg.eval_protocol, cfg.val_size, cfg.test_num) == ("auto", "auto", "auto")
    validate(cfg)
    assert (cfg.eval_protocol, cfg.val_size, cfg.test_num) == (protocol, size, episodes)
    assert AUTO_EVAL[dataset][0] == protocol


def test_the_other_protocol_brings_its_own_size_and_count_and_explicit_values_win(tmp_path):
    coco = "config/coco/coco_split0_resnet50.yaml"
    assert (load_cfg(coco).val_size, load_cfg(coco).test_num) == (641, 4000)
    cfg = load_cfg(coco, ["eval_protocol", "hsnet"])
    assert (cfg.eval_protocol, cfg.val_size, cfg.test_num) == ("hsnet", 400, 1000)
    cfg = load_cfg(coco, ["eval_protocol", "hsnet", "test_num", "20", "val_size", "41"])
    assert (cfg.val_size, cfg.test_num) == (41, 20)
    cfg = load_cfg(write(tmp_path, "DATA:\n  dataset: fss1000\nTEST:\n  eval_protocol: pfenet\n"))
    assert (cfg.val_size, cfg.test_num) == (473, 0)
    with pytest.raises(ConfigError, match=r"key 'test_num' has value 'many' \(str\); expected an int or 'auto'"):
        load_cfg(coco, ["test_num", "many"])
    with pytest.raises(ConfigError, match=r"key 'eval_protocol' has value 'ifa'; expected one of"):
        load_cfg(coco, ["eval_protocol", "ifa"])
    with pytest.raises(ConfigError) as e:
        load_cfg(coco, ["test_num", "0"])
    assert str(e.value) == "key 'test_num' is 0; it must be at least 1"
    with pytest.raises(ConfigError) as e:
        load_cfg(write(tmp_path, "DATA:\n  dataset: cdfss\nTEST:\n  test_num: -1\n"))
    assert str(e.value) == "key 'test_num' is -1; it must be at least 1 (0: one episode per image of the test classes)"


def test_split_all_needs_a_validation_dataset(tmp_path):
    """'all' (YAML or command line) trains every class; with nothing held out, validation must name
    class folders to use, or be off."""
    path = write(tmp_path, "DATA:\n  split: all\n  val_dataset: fss1000\n  val_root: data/fss1000\n"
                           "  val_classes: lists/fss1000/val.txt\n")
    assert load_cfg(path).split == "all"
    assert load_cfg("config/pascal/pascal_split0_resnet50.yaml", ["split", "all", "evaluate", "False"]).split == "all"
    with pytest.raises(ConfigError) as e:
        load_cfg("config/pascal/pascal_split0_resnet50.yaml", ["split", "all"])
    assert str(e.value) == ("split 'all' trains on every pascal class, so none is left to validate on: set val_dataset "
                            "fss1000 val_root data/fss1000 val_classes lists/fss1000/val.txt (as "
                            "config/pascal/pascal_all_resnet50.yaml does), or evaluate False")
    with pytest.raises(ConfigError, match=r"key 'split' has value 'every' \(str\); expected a fold 0, 1, 2, 3 or "):
        load_cfg(path, ["split", "every"])
    with pytest.raises(ConfigError) as e:
        load_cfg(path, ["val_root", ""])
    assert str(e.value) == ("val_dataset fss1000 validates on class folders: set val_root (their root, e.g. "
                            "data/fss1000) and val_classes (a class list, e.g. lists/fss1000/val.txt)")
    with pytest.raises(ConfigError, match=r"dataset fss1000 is class folders already: it validates on val_classes"):
        load_cfg(path, ["dataset", "fss1000"])
    with pytest.raises(ConfigError, match=r"key 'split' is 'all', which holds out no class; the video task"):
        load_cfg(write(tmp_path, "DATA:\n  dataset: ytvis\n  split: all\nTRAIN:\n  shot: 5\n"))


def test_bank_classes_of_a_class_folder_dataset_is_its_training_class_count(tmp_path):
    classes = tmp_path / "train.txt"
    classes.write_bytes("\ufeffbus\r\n\r\n  hotel_slipper \r\nowl".encode("utf-8"))
    path = write(tmp_path, f"DATA:\n  dataset: folder\n  train_classes: {classes}\n")
    assert load_cfg(path).bank_classes == 3
    assert load_cfg(path, ["bank_classes", "7"]).bank_classes == 7
    assert load_cfg("config/fss1000/fss1000_resnet50.yaml").bank_classes == 520
    # an evaluation-only config names no training classes: the checkpoint's bank is used
    assert load_cfg(path, ["train_classes", ""]).bank_classes == 0
    assert load_cfg("config/pascal/pascal_split0_resnet50.yaml").bank_classes == 20


def test_keys_of_another_kind_of_dataset_are_named_in_a_warning(tmp_path, caplog):
    path = write(tmp_path, "DATA:\n  dataset: fss1000\n  split: 2\n  train_list: x.txt\n")
    with caplog.at_level("WARNING"):
        load_cfg(path)
    assert "split, train_list do not apply to dataset fss1000 and are ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_cfg("config/pascal/pascal_split0_resnet50.yaml", ["test_classes", "t.txt"])
    assert "test_classes does not apply to dataset pascal and is ignored" in caplog.text


@pytest.mark.parametrize("target", ["deepglobe", "isic", "chest", "fss1000"])
def test_the_cross_domain_configs_describe_the_network_pascal_all_trains(target):
    """A cdfss config evaluates the PASCAL-all model: its architecture keys are that model's, so the
    checkpoint's network is rebuilt without a warning (bank_classes: derived, the checkpoint's)."""
    trained = load_cfg("config/pascal/pascal_all_resnet50.yaml")
    cfg = load_cfg(f"config/cdfss/cdfss_{target}_resnet50.yaml")
    assert {k: cfg[k] for k in ARCH_KEYS if k != "bank_classes"} == \
        {k: trained[k] for k in ARCH_KEYS if k != "bank_classes"}
    assert (trained.split, trained.bank_classes, trained.eval_protocol, trained.val_size) == ("all", 20, "hsnet", 400)
    assert cfg.weight == "exp/pascal/all_resnet50/model/best.pth" and cfg.test_seeds == 1
    assert (cfg.eval_protocol, cfg.val_size, cfg.test_num) == ("hsnet", 400, 0 if target == "fss1000" else 600)


@pytest.mark.parametrize("dataset", ["pascal", "coco"])
def test_vit_configs_differ_from_resnet50_in_the_backbone_crop_and_bins_only(dataset):
    """Every fold has ViT-S/14 and ViT-B/14 configs for NTRENet++ and PFENet. They keep the
    ResNet-50 recipe (untuned) but for the backbone, the training crop rounded to the 14-px
    patch, pyramid bins as fractions of the smaller feature map, and fix_bn True (a ViT has no
    BatchNorm: one pass for query and supports)."""
    crop = {"pascal": 476, "coco": 644}[dataset]
    for split in range(4):
        for arch in ("", "_pfenet"):
            base = load_cfg(f"config/{dataset}/{dataset}_split{split}_resnet50{arch}.yaml")
            for vit in ("vits14", "vitb14"):
                cfg = load_cfg(f"config/{dataset}/{dataset}_split{split}_{vit}{arch}.yaml")
                differing = {k for k in cfg if cfg[k] != base[k]}
                assert differing - {"ppm_scales", "fix_bn"} == {"backbone", "pretrained", "train_h", "train_w"}
                assert cfg.backbone == f"dinov2_{vit}" and cfg.pretrained == f"initmodel/dinov2_{vit}_pretrain.pth"
                assert cfg.train_h == cfg.train_w == crop and crop % 14 == 0
                assert cfg.ppm_scales == [1.0, 0.5, 0.25, 0.125] and cfg.fix_bn and cfg.vit_blocks == []
