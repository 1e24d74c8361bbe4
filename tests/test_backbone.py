"""Backbones: feature sizes and channels, dilation, and weight loading in both key layouts."""
import os
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backbone import (README_HINT, BackboneWeightsError, ResNet, VGG16BN, build_backbone, load_backbone_weights,
                            read_state_dict)
from util.config import defaults


@pytest.mark.parametrize("layers, vgg, channels", [
    (18, False, (128, 256, 512)), (34, False, (128, 256, 512)),
    (50, False, (512, 1024, 2048)), (101, False, (512, 1024, 2048)), (0, True, (256, 512, 512)),
])
def test_feature_sizes_and_channels(layers, vgg, channels):
    torch.manual_seed(0)
    net = build_backbone(layers, vgg).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        layer2, layer3 = net.mid_level(x)
        layer4 = net.high_level(layer3)
    # ResNet: stride 8, 65 → 33 → 17 → 9; VGG: ceil-mode pools 65 → 33 → 17 → 9 (layer2) → 5
    # (layer3, layer4: stride 16), layer2 resized to layer3's 5×5
    side = 5 if vgg else 9
    assert layer2.shape == (1, channels[0], side, side)
    assert layer3.shape == (1, channels[1], side, side)
    assert layer4.shape == (1, channels[2], side, side)
    assert (net.layer2_channels, net.layer3_channels, net.layer4_channels) == channels


@pytest.mark.parametrize("layers, width, channels, params", [
    (18, 0.5, (64, 128, 256), 2_834_208), (50, 0.25, (128, 256, 512), 1_487_344),
])
def test_backbone_width_scales_every_channel(layers, width, channels, params):
    """``backbone_width`` multiplies every channel count (the stem's too): a narrower network of
    the same depth, stride and dilation for training from scratch. ResNet-18 at 0.5, by hand:
    stem 28,768 + layer1 48,448 + layer2 131,712 + layer3 525,568 + layer4 2,099,712."""
    from engine.networks import build_model

    net = build_backbone(layers, False, True, width).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        layer2, layer3 = net.mid_level(x)
        layer4 = net.high_level(layer3)
    assert [t.shape[1:] for t in (layer2, layer3, layer4)] == [(c, 9, 9) for c in channels]
    assert (net.layer2_channels, net.layer3_channels, net.layer4_channels) == channels
    assert net.conv1.out_channels == round(64 * width) and net.bn3.num_features == round(128 * width)
    assert sum(p.numel() for p in net.parameters()) == params
    cfg = defaults()
    cfg.update(pretrained="", layers=layers, backbone_width=width, reduce_dim=8, ppm_scales=[1.0, 0.5])
    model = build_model(cfg).eval()
    assert model.down_query[0].in_channels == channels[0] + channels[1]    # the head reads the widths
    with pytest.raises(ValueError, match="backbone_width"):
        build_backbone(0, True, True, 0.5)


def test_a_standard_weight_file_does_not_fit_a_narrow_backbone(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_backbone(18).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="backbone_width"):
        load_backbone_weights(build_backbone(18, False, True, 0.5), str(path))


def test_vgg_geometry_is_pfenets_30x30_at_473():
    """PFENet's VGG-16-bn: the 4th max-pool kept (ceil mode), layer3/layer4 at stride 16 — 30×30 at
    473 — and layer2 (60×60, stride 8) resized to layer3's size. Shapes on the meta device: no arithmetic."""
    net = VGG16BN().to("meta").eval()
    x = torch.empty(1, 3, 473, 473, device="meta")
    raw_layer2 = net.layer2(net.layer1(net.layer0(x)))
    layer2, layer3 = net.mid_level(x)
    assert raw_layer2.shape == (1, 256, 60, 60)
    assert layer2.shape == (1, 256, 30, 30) and layer3.shape == (1, 512, 30, 30)
    assert net.high_level(layer3).shape == (1, 512, 30, 30)
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(p.ceil_mode and p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert isinstance(net.layer3[-1], nn.MaxPool2d) and not isinstance(net.layer4[-1], nn.MaxPool2d)


def test_vgg_layer2_is_resized_bilinearly_to_layer3():
    torch.manual_seed(0)
    net = VGG16BN().eval()
    x = torch.randn(1, 3, 41, 41)          # 41 → 21 → 11 → 6 (layer2) → 3 (layer3)
    with torch.no_grad():
        raw_layer2 = net.layer2(net.layer1(net.layer0(x)))
        layer2, layer3 = net.mid_level(x)
    assert raw_layer2.shape[-2:] == (6, 6) and layer3.shape[-2:] == (3, 3)
    assert torch.equal(layer2, F.interpolate(raw_layer2, size=(3, 3), mode="bilinear", align_corners=True))


def test_resnet_dilation_and_stem():
    net = ResNet(50, deep_stem=True)
    assert [net.conv1.kernel_size, net.conv2.kernel_size, net.conv3.kernel_size] == [(3, 3)] * 3
    assert net.conv3.out_channels == 128
    for block in net.layer3:
        assert block.conv2.dilation == (2, 2) and block.conv2.stride == (1, 1)
    for block in net.layer4:
        assert block.conv2.dilation == (4, 4) and block.conv2.stride == (1, 1)
    assert net.layer3[0].downsample[0].stride == (1, 1)
    assert ResNet(50, deep_stem=False).conv1.kernel_size == (7, 7)
    basic = ResNet(18)
    assert basic.layer4[1].conv1.dilation == (4, 4) and basic.layer4[0].conv1.stride == (1, 1)


# ---- weight files in the published key layouts, generated from the architectures' definitions ----
def _bn(prefix, ch, counters=True):
    out = {f"{prefix}.weight": torch.rand(ch), f"{prefix}.bias": torch.rand(ch),
           f"{prefix}.running_mean": torch.rand(ch), f"{prefix}.running_var": torch.rand(ch) + 0.5}
    if counters:
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(7)
    return out


def resnet_file(depth, deep_stem, counters=True):
    """A state dict with the key names and shapes of semseg's resnet{depth}_v2.pth (deep stem)
    or torchvision's resnet{depth} (7×7 stem), fc included, random values."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    sd = {}
    if deep_stem:
        sd["conv1.weight"] = torch.randn(64, 3, 3, 3)
        sd["conv2.weight"] = torch.randn(64, 64, 3, 3)
        sd["conv3.weight"] = torch.randn(128, 64, 3, 3)
        for i, ch in ((1, 64), (2, 64), (3, 128)):
            sd.update(_bn(f"bn{i}", ch, counters))
        inplanes = 128
    else:
        sd["conv1.weight"] = torch.randn(64, 3, 7, 7)
        sd.update(_bn("bn1", 64, counters))
        inplanes = 64
    for layer, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(count):
            p = f"layer{layer}.{b}"
            sd[f"{p}.conv1.weight"] = torch.randn(planes, inplanes, 1, 1)
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3)
            sd[f"{p}.conv3.weight"] = torch.randn(planes * 4, planes, 1, 1)
            for i, ch in ((1, planes), (2, planes), (3, planes * 4)):
                sd.update(_bn(f"{p}.bn{i}", ch, counters))
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = torch.randn(planes * 4, inplanes, 1, 1)
                sd.update(_bn(f"{p}.downsample.1", planes * 4, counters))
            inplanes = planes * 4
    sd["fc.weight"] = torch.randn(1000, 2048)
    sd["fc.bias"] = torch.randn(1000)
    return sd


def vgg16_bn_file():
    """torchvision's vgg16_bn key layout: features.N (conv, bn, relu triples and pools) + classifier."""
    sd, index, in_ch = {}, 0, 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            index += 1
            continue
        sd[f"features.{index}.weight"] = torch.randn(v, in_ch, 3, 3)
        sd[f"features.{index}.bias"] = torch.randn(v)
        sd.update(_bn(f"features.{index + 1}", v))
        index, in_ch = index + 3, v
    sd["classifier.0.weight"] = torch.randn(8, 8)       # shape irrelevant: classifier keys are unused
    sd["classifier.6.bias"] = torch.randn(8)
    return sd


def test_semseg_v2_layout_loads_into_deep_stem_resnet(tmp_path):
    sd = resnet_file(50, deep_stem=True)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(sd, path)
    net = ResNet(50, deep_stem=True)
    report = load_backbone_weights(net, str(path))
    assert report.missing == [] and report.unexpected == []
    assert report.classifier_unused == ["fc.bias", "fc.weight"]
    assert report.loaded == len(sd) - 2 == len(net.state_dict())
    assert torch.equal(net.conv3.weight, sd["conv3.weight"])
    assert torch.equal(net.layer4[2].bn3.running_var, sd["layer4.2.bn3.running_var"])


def test_torchvision_layout_loads_into_7x7_stem_resnet():
    sd = resnet_file(101, deep_stem=False)
    net = ResNet(101, deep_stem=False)
    report = load_backbone_weights(net, sd)
    assert report.missing == [] and report.loaded == len(sd) - 2
    assert torch.equal(net.layer3[22].conv2.weight, sd["layer3.22.conv2.weight"])


def test_torchvision_vgg16_bn_layout_is_sliced_into_layers():
    sd = vgg16_bn_file()
    net = VGG16BN()
    report = load_backbone_weights(net, sd)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.classifier_unused) == ["classifier.0.weight", "classifier.6.bias"]
    # features.24 is the first conv of layer3, features.34 the first of layer4 (pools 33, 43 dropped)
    assert torch.equal(net.layer3[0].weight, sd["features.24.weight"])
    assert torch.equal(net.layer4[0].weight, sd["features.34.weight"])
    assert torch.equal(net.layer2[21 - 14].running_mean, sd["features.21.running_mean"])


def test_wrapped_checkpoint_with_module_prefix_and_no_bn_counters(tmp_path):
    sd = resnet_file(50, deep_stem=True, counters=False)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    net = ResNet(50)
    report = load_backbone_weights(net, str(path))
    assert report.missing == [] and len(report.benign_missing) == 3 + 16 * 3 + 4   # BN layers
    assert torch.equal(net.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_missing_backbone_key_is_reported_and_refused(caplog):
    sd = resnet_file(50, deep_stem=True)
    del sd["layer2.1.conv2.weight"]
    with pytest.raises(BackboneWeightsError, match=r"layer2\.1\.conv2\.weight.*allow_missing_backbone_keys"):
        load_backbone_weights(ResNet(50), sd)
    with caplog.at_level(logging.WARNING):
        report = load_backbone_weights(ResNet(50), sd, allow_missing=True)
    assert report.missing == ["layer2.1.conv2.weight"]
    assert "missing: layer2.1.conv2.weight" in caplog.text


def test_file_of_another_architecture_is_refused():
    with pytest.raises(BackboneWeightsError, match=r"layer3\.6\..*306 in all.*another architecture"):
        load_backbone_weights(ResNet(50), resnet_file(101, deep_stem=True))      # ResNet-101 file
    with pytest.raises(BackboneWeightsError, match="deep_stem False"):
        load_backbone_weights(ResNet(50, deep_stem=True), resnet_file(50, deep_stem=False))
    with pytest.raises(BackboneWeightsError, match="deep_stem True"):
        load_backbone_weights(ResNet(50, deep_stem=False), resnet_file(50, deep_stem=True))


def test_missing_file_names_it_and_points_to_the_readme():
    with pytest.raises(BackboneWeightsError, match=r"initmodel/nope\.pth.*Pretrained backbones"):
        load_backbone_weights(ResNet(18), "initmodel/nope.pth")


def test_build_model_loads_the_configured_file(tmp_path):
    from engine.networks import build_model

    path = tmp_path / "resnet50_v2.pth"
    sd = resnet_file(50, deep_stem=True)
    torch.save(sd, path)
    cfg = defaults()
    cfg.update(pretrained=str(path), reduce_dim=16, memory_size=4, num_negatives=2)
    model = build_model(cfg)
    assert torch.equal(model.backbone.layer1[0].conv2.weight, sd["layer1.0.conv2.weight"])
    cfg.pretrained = str(tmp_path / "absent.pth")
    with pytest.raises(BackboneWeightsError, match="absent.pth"):
        build_model(cfg)


def test_parameter_counts_match_the_published_architectures():
    # torchvision's counts without the classifier, plus the deep stem's extra convs
    # (3x3 3→64, 64→64, 64→128 + 3 BN instead of 7x7 3→64 + BN) and layer1 reading 128 channels
    stem_delta = (3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 2 * (64 + 64 + 128)) - (3 * 64 * 49 + 2 * 64)
    counts = {}
    for layers in (18, 50):
        counts[layers] = sum(p.numel() for p in ResNet(layers).parameters())
    assert counts[18] == 11_689_512 - 513_000 + stem_delta + 64 * 64 * 9 + (128 * 64 + 2 * 64)
    assert counts[50] == 25_557_032 - 2_049_000 + stem_delta + 64 * 64 + 64 * 256
    assert sum(p.numel() for p in ResNet(50, deep_stem=False).parameters()) == 25_557_032 - 2_049_000
    assert sum(p.numel() for p in VGG16BN().parameters()) == 14_723_136


def test_model_summary_tool(capsys):
    from tools.measure.model_summary import main

    main(["layers", "18", "reduce_dim", "16", "pretrained", "", "memory_size", "4"])
    out = capsys.readouterr().out
    assert "ResNet-18 (deep stem)" in out
    assert "backbone                  0   11,324,992" in out      # frozen by default
    assert "(21, 4, 16)" in out                                    # the bank: 20 PASCAL classes + sink


@pytest.mark.parametrize("content, detail", [
    (b"", "is unreadable or corrupt, truncated perhaps (EOFError)"),
    (b"not a zip file at all" * 10, "is unreadable or corrupt, truncated perhaps (UnpicklingError)"),
    ("pickle", "is refused: it holds objects other than tensors and plain values (unsupported GLOBAL posix.getcwd). A crafted"),
])
def test_an_unreadable_backbone_file_is_one_line_naming_it(tmp_path, content, detail):
    """torch's multi-line error (with its advice to load with weights_only=False) is not passed on."""
    path = tmp_path / "resnet.pth"
    if content == "pickle":
        torch.save({"conv1.weight": torch.zeros(1), "extra": os.getcwd}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(BackboneWeightsError) as e:
        read_state_dict(str(path))
    message = str(e.value)
    assert message.startswith(f"backbone weight file '{path}' {detail}") and "\n" not in message
    assert "weights_only" not in message and message.endswith(README_HINT)
