"""tools/pretrain_backbone.py: the labels it learns, what it writes, determinism, bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

from model.backbone import build_backbone, load_backbone_weights
from tools import pretrain_backbone as pb
from util.classes import fold_classes
from util.errors import ConfigError



def _config(tmp_path, root, **over) -> str:
    cfg = {"DATA": {"dataset": "synthetic", "data_root": root, "train_list": os.path.join(root, "train.txt"),
                    "val_list": os.path.join(root, "val.txt"), "split": 0, "min_class_pixels": 150,
                    "exclude_novel_images": True, "class_index_workers": 1, "workers": 0},
           "MODEL": {"layers": 18, "backbone_width": 0.5, "pretrained": str(tmp_path / "backbone.pth")},
           "TRAIN": {"train_h": 33, "train_w": 33, "manual_seed": 3}}
    for key, value in over.items():
        for section in cfg.values():
            if key in section:
                section[key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_labels_are_the_training_classes_in_order_and_held_out_pixels_are_ignored(synth_root, tmp_path):
    from util.config import load_cfg
    cfg = load_cfg(_config(tmp_path, synth_root, exclude_novel_images=False))
    data = pb.BaseClassImages(cfg)
    train, held_out = fold_classes("synthetic", 0)
    assert data.num_classes == len(train) + 1 == 16
    assert data.lut[0] == 0 and data.lut[255] == 255
    assert [int(data.lut[c]) for c in train] == list(range(1, 16))
    assert all(data.lut[c] == 255 for c in held_out)
    image, label = data[(0, 7)]
    assert image.shape == (3, 33, 33) and set(np.unique(label.numpy())) <= set(range(16)) | {255}


def test_writes_a_backbone_file_the_config_loads_and_is_deterministic(synth_root, tmp_path, one_thread):
    config = _config(tmp_path, synth_root)
    out = pb.main(["--config", config, "--iters", "3", "--batch", "2", "--print-freq", "1"])
    assert out == str(tmp_path / "backbone.pth")
    first = torch.load(out)
    backbone = build_backbone(18, False, True, 0.5)
    report = load_backbone_weights(backbone, out)
    assert not report.missing and not report.unexpected
    torch.manual_seed(3)
    untouched = build_backbone(18, False, True, 0.5).state_dict()
    assert any(not torch.equal(first[k], untouched[k]) for k in untouched if untouched[k].is_floating_point())
    again = pb.main(["--config", config, "--iters", "3", "--batch", "2", "--out", str(tmp_path / "again.pth")])
    second = torch.load(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = torch.load(pb.main(["--config", config, "--iters", "3", "--batch", "2", "--out",
                                str(tmp_path / "seed4.pth"), "manual_seed", "4"]))
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_batches_are_whole_shuffled_epochs_from_the_seed_alone():
    plan = pb.batches(5, 4, 3, seed=1)
    assert [len(b) for b in plan] == [3, 3, 3, 3]
    order = [i for b in plan for i, _ in b]
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert plan == pb.batches(5, 4, 3, seed=1) and plan != pb.batches(5, 4, 3, seed=2)


def test_bad_input_is_one_clear_error(synth_root, tmp_path):
    with pytest.raises(ConfigError, match="'pretrained' is '' and no --out is given"):
        pb.main(["--config", _config(tmp_path, synth_root, pretrained="")])
    with pytest.raises(ConfigError, match="--iters and --batch must be at least 1"):
        pb.main(["--config", _config(tmp_path, synth_root), "--iters", "0"])
    video = tmp_path / "video.yaml"
    video.write_text(yaml.safe_dump({"DATA": {"dataset": "synthetic_video", "data_root": str(tmp_path)},
                                     "MODEL": {"pretrained": "x.pth", "support_mode": "mean"}}))
    with pytest.raises(ConfigError, match="pretrains on images; this is a video config"):
        pb.main(["--config", str(video)])


def test_a_vit_pretrains_with_adamw_and_its_file_loads(synth_root, tmp_path, one_thread):
    """The synthetic ViT's pretraining: 'backbone vit_tiny8', '--optimizer adamw'; every tensor
    the backbone runs moves, the blocks it never runs (none here) and the unused mask token stay."""
    config = _config(tmp_path, synth_root)
    out = pb.main(["--config", config, "--iters", "2", "--batch", "2", "--optimizer", "adamw", "--lr", "0.001",
                   "backbone", "vit_tiny8", "backbone_width", "1.0", "train_h", "32", "train_w", "32"])
    state = torch.load(out)
    from model.vit import DINOv2
    vit = DINOv2("vit_tiny8")
    report = load_backbone_weights(vit, out)
    assert not report.missing and not report.unexpected
    torch.manual_seed(3)
    untouched = DINOv2("vit_tiny8").state_dict()
    assert not torch.equal(state["blocks.5.mlp.fc2.weight"], untouched["blocks.5.mlp.fc2.weight"])
    assert torch.equal(state["mask_token"], untouched["mask_token"])
