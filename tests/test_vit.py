"""The DINOv2 backbone (model/vit.py): its features against the released code's (a fixture of
their outputs on a tiny random ViT), Meta's released key names and shapes loading as they are,
a file of another variant refused in one line naming what differs, the backbone contract, and
NTRENet++ / PFENet / the video network on it."""
import os

import pytest
import torch

from engine.networks import build_model
from model.backbone import backbone_of, load_backbone_weights
from model.vit import VIT_VARIANTS, DINOv2, ViTSpec, default_blocks, rounded_size
from util.config import VIT_BACKBONES, defaults, validate
from util.errors import BackboneWeightsError, ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dinov2_tiny_reference.pt")


@pytest.mark.parametrize("registers", [0, 4])
def test_features_equal_the_released_codes_on_a_tiny_random_vit(registers):
    """tests/fixtures/dinov2_tiny_reference.pt holds the released DINOv2 code's
    ``get_intermediate_layers(x, [0, 1], reshape=True, norm=True)`` of a width-8, 2-block, patch-14
    ViT with random weights and a 3x3 position grid (docs/method.md says how it was made): at the
    trained grid (42x42), and at grids the position embedding is interpolated to (2x4, 5x3)."""
    ref = torch.load(FIXTURE, weights_only=True)[f"registers{registers}"]
    spec = ViTSpec("tiny", 8, 2, 2, registers=registers, grid=3)
    vit = DINOv2(blocks=(1, 2), spec=spec).eval()
    report = load_backbone_weights(vit, ref["state"])
    assert report.loaded == len(ref["state"]) and not report.missing
    for size, image in ref["inputs"].items():
        with torch.no_grad():
            layer2, layer3 = vit.mid_level(image.float() / 255 - 0.5)
        assert layer2.shape == ref["layer2"][size].shape and layer3.shape == ref["layer3"][size].shape
        assert (layer2 - ref["layer2"][size]).abs().max() <= 1e-5, size
        assert (layer3 - ref["layer3"][size]).abs().max() <= 1e-5, size


def released_state(dim=384, depth=12, patch=14, registers=0, swiglu=False, grid=37, seed=0):
    """A state dict with the key names and shapes of Meta's dinov2_*_pretrain.pth files, written
    out here from the published files' layout (not from model/vit.py), random values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "ls2.gamma": (dim,)})
        if swiglu:
            shapes.update({b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                           b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)})
        else:
            shapes.update({b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                           b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def vit_cfg(backbone, pretrained="", **over):
    cfg = defaults()
    cfg.update(dataset="synthetic", backbone=backbone, pretrained=pretrained, reduce_dim=8,
               ppm_scales=[1.0, 0.5], memory_size=8, num_negatives=4, **over)
    validate(cfg)
    return cfg


def test_a_released_vits14_file_loads_as_it_is(tmp_path):
    state = released_state()
    path = str(tmp_path / "dinov2_vits14_pretrain.pth")
    torch.save(state, path)
    vit = backbone_of(vit_cfg("dinov2_vits14", path))
    own = vit.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert vit.taken == (9, 12) and vit.layer2_channels == vit.layer3_channels == vit.layer4_channels == 384


@pytest.mark.parametrize("name, spec", [("dinov2_vitb14", dict(dim=768)),
                                        ("dinov2_vitl14_reg", dict(dim=1024, depth=24, registers=4)),
                                        ("dinov2_vitg14", dict(dim=1536, depth=40, swiglu=True))])
def test_the_larger_variants_have_the_released_key_names_and_shapes(name, spec):
    """Both built on the meta device (shapes without memory)."""
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in DINOv2(name).state_dict().items()}
        released = {k: tuple(v.shape) for k, v in released_state(**spec).items()}
    assert own == released


@pytest.mark.parametrize("file_spec, message", [
    (dict(patch=16), "patch size 16 (the config's dinov2_vits14 has 14); use the file of the configured variant"),
    (dict(registers=4), "register tokens 4 (the config's dinov2_vits14 has 0); set 'backbone dinov2_vits14_reg'"),
    (dict(dim=96, depth=6, patch=8, grid=7), "width 96 (the config's dinov2_vits14 has 384), patch size 8 (the "
                                             "config's dinov2_vits14 has 14), blocks 6 (the config's "
                                             "dinov2_vits14 has 12); set 'backbone vit_tiny8'"),
])
def test_a_file_of_another_variant_is_one_line_naming_what_differs(tmp_path, file_spec, message):
    path = str(tmp_path / "other.pth")
    torch.save(released_state(**file_spec), path)
    with pytest.raises(BackboneWeightsError) as err:
        backbone_of(vit_cfg("dinov2_vits14", path))
    assert str(err.value) == f"backbone weight file '{path}' is a ViT with {message}"
    assert "\n" not in str(err.value)


def test_a_vit_file_for_a_resnet_config_names_the_backbone_to_set(tmp_path):
    path = str(tmp_path / "dinov2_vits14_pretrain.pth")
    torch.save(released_state(), path)
    cfg = vit_cfg("resnet", path, layers=18)
    with pytest.raises(BackboneWeightsError, match="is a vision transformer's \\(width 384, patch 14\\) but the "
                                                   "config asks for a ResNet/VGG backbone; set 'backbone dinov2_vits14'"):
        backbone_of(cfg)


def test_the_config_knows_every_variant_and_its_depth():
    assert VIT_BACKBONES == {name: spec.depth for name, spec in VIT_VARIANTS.items()}
    assert default_blocks(12) == (9, 12) and default_blocks(24) == (21, 24) and default_blocks(6) == (3, 6)


@pytest.mark.parametrize("over, message", [
    (dict(vgg=True), "'backbone dinov2_vits14' is a vision transformer: 'vgg' must be False"),
    (dict(backbone_width=0.5), "'backbone_width' 1.0"),
    (dict(vit_blocks=[12, 9]), r"key 'vit_blocks' is \[12, 9\]; expected \[\] or two block numbers"),
    (dict(vit_blocks=[9, 13]), r"1 <= a <= b <= 12 \(dinov2_vits14 has 12 blocks\)"),
])
def test_bad_vit_keys_are_config_errors(over, message):
    with pytest.raises(ConfigError, match=message):
        vit_cfg("dinov2_vits14", **over)


def test_vit_blocks_with_a_resnet_is_a_config_error():
    with pytest.raises(ConfigError, match="'vit_blocks' is \\[9, 12\\] but 'backbone' is resnet"):
        vit_cfg("resnet", vit_blocks=[9, 12])


def test_sides_that_are_not_multiples_of_the_patch_are_resized_to_the_nearest():
    assert [rounded_size(s, 14) for s in (473, 400, 641, 5, 476)] == [476, 406, 644, 14, 476]
    torch.manual_seed(0)
    vit = DINOv2(spec=ViTSpec("tiny", 8, 2, 2, grid=3), blocks=(1, 2)).eval()
    x = torch.randn(1, 3, 45, 60)
    resized = torch.nn.functional.interpolate(x, size=(42, 56), mode="bilinear", align_corners=False)
    with torch.no_grad():
        layer2, layer3 = vit.mid_level(x)
        expected = vit.mid_level(resized)
    assert layer3.shape == (1, 8, 3, 4)
    assert torch.equal(layer2, expected[0]) and torch.equal(layer3, expected[1])
    assert vit.high_level(layer3) is layer3           # the prior's features are layer3's


def test_blocks_after_the_last_taken_are_not_run_and_get_no_gradient():
    torch.manual_seed(0)
    vit = DINOv2(spec=ViTSpec("tiny", 8, 4, 2, grid=3), blocks=(1, 2))
    calls = []
    for i, block in enumerate(vit.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    vit.mid_level(torch.randn(1, 3, 42, 42))
    assert calls == [0, 1]
    assert not any(p.requires_grad for p in vit.blocks[2:].parameters()) and not vit.mask_token.requires_grad
    assert all(p.requires_grad for p in vit.blocks[:2].parameters())


@pytest.mark.parametrize("arch", ["ntrenetpp", "pfenet"])
def test_ntrenet_and_pfenet_train_and_evaluate_on_a_frozen_vit(arch, one_thread):
    torch.manual_seed(0)
    cfg = vit_cfg("vit_tiny8", arch=arch)
    model = build_model(cfg, warn_random_backbone=False)
    assert not any(p.requires_grad for p in model.backbone.parameters())   # frozen by default
    B, K, size = 2, 1, 45                                                   # 45: resized to 48 inside
    query, supports = torch.randn(B, 3, size, size), torch.randn(B, K, 3, size, size)
    masks = torch.zeros(B, K, size, size, dtype=torch.long)
    masks[..., 10:30, 10:30] = 1
    query_mask = torch.zeros(B, size, size, dtype=torch.long)
    query_mask[:, 15:, 15:] = 1
    model.train()
    logits, losses = model(query, supports, masks, query_mask, class_ids=torch.tensor([1, 2]))
    assert logits.shape == (B, 2, size, size) and torch.isfinite(losses["total"])
    losses["total"].backward()
    model.eval()
    with torch.no_grad():
        assert model(query, supports, masks).shape == (B, 2, size, size)


def test_the_video_network_runs_on_a_vit(one_thread):
    torch.manual_seed(0)
    cfg = defaults()
    cfg.update(dataset="synthetic_video", backbone="vit_tiny8", pretrained="", reduce_dim=8, ppm_scales=[1.0, 0.5],
               clip_len=2, shot=2, video_bg_dim=8)
    validate(cfg)
    model = build_model(cfg, warn_random_backbone=False).eval()
    query, supports = torch.randn(1, 2, 3, 40, 48), torch.randn(1, 2, 3, 40, 48)
    masks = torch.zeros(1, 2, 40, 48, dtype=torch.long)
    masks[..., 8:30, 8:30] = 1
    with torch.no_grad():
        assert model(query, supports, masks).shape == (1, 2, 2, 40, 48)


def test_train_test_baseline_and_predict_run_on_a_vit_backbone(synth_root, tmp_path, one_thread):
    """The user's commands with 'backbone vit_tiny8' on the synthetic tree: train.py, test.py,
    tools/baseline.py's prototype matcher on the checkpoint's ViT, and predict.py."""
    from commands import predict, train
    from commands import test as test_entry
    from tools import baseline
    config = "config/synthetic/synthetic_split0_resnet18.yaml"
    exp = str(tmp_path / "exp")
    opts = ["backbone", "vit_tiny8", "backbone_width", "1.0", "pretrained", "", "data_root", synth_root,
            "train_list", os.path.join(synth_root, "train.txt"), "val_list", os.path.join(synth_root, "val.txt"),
            "min_class_pixels", "150", "exclude_novel_images", "False", "class_index_workers", "1", "reduce_dim", "8", "train_h", "40", "train_w",
            "40", "val_size", "41", "batch_size", "2", "epochs", "1", "epoch_size", "4", "val_num", "4",
            "test_num", "4", "test_seeds", "1", "batch_size_val", "4", "memory_size", "8", "num_negatives", "4",
            "tb_images", "0", "print_freq", "1", "save_path", exp]
    train.main(["--config", config, *opts])
    state = torch.load(os.path.join(exp, "model", "best.pth"), weights_only=True)
    assert state["architecture"]["backbone"] == "vit_tiny8" and state["architecture"]["vit_blocks"] == []
    result = test_entry.main(["--config", config, *opts])
    rows = baseline.main(["--config", config, *opts, "--compare", result["json_path"]])
    assert list(rows) == ["NTRENet++ (exp/best.pth)", "prototype matcher (its backbone)", "all-foreground"]
    assert all(0.0 <= r["miou_mean"] <= 100.0 for r in rows.values())
    image = os.path.join(synth_root, open(os.path.join(synth_root, "val.txt")).read().split()[0])
    label = os.path.join(synth_root, open(os.path.join(synth_root, "val.txt")).read().split()[1])
    written = predict.main(["--config", config, *opts, "--weight", os.path.join(exp, "model", "best.pth"),
                            "--support", image, label, "--query", image, "--out", str(tmp_path / "pred"),
                            "--device", "cpu", "--class-id", "1"])
    assert written
