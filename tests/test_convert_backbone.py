"""tools/convert_backbone.py on files laid out as torchvision's and timm's (built here from our
own backbones with the other projects' key names, so nothing is downloaded)."""
import json
import struct

import pytest
import torch

from model.backbone import VGG_SLICES, ResNet, VGG16BN, load_backbone_weights
from tools.convert_backbone import main

DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path, state):
    header, blobs, offset = {}, [], 0
    for name, t in state.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def torchvision_vgg_keys(state):
    """Our VGG16BN keys (layerN.i.*) back in torchvision's features.<index>.* numbering."""
    out = {}
    for key, value in state.items():
        name, i, rest = key.split(".", 2)
        out[f"features.{VGG_SLICES[name][0] + int(i)}.{rest}"] = value
    return out


def test_torchvision_resnet_in_a_wrapped_pth_converts_exactly(tmp_path, capsys):
    torch.manual_seed(0)
    source = ResNet(18, deep_stem=False).state_dict()
    wrapped = {"state_dict": {"module." + k: v for k, v in source.items()}}
    wrapped["state_dict"].update({"module.fc.weight": torch.randn(1000, 512), "module.fc.bias": torch.zeros(1000)})
    torch.save(wrapped, tmp_path / "resnet18.pth")
    out = tmp_path / "initmodel" / "resnet18.pth"
    assert main([str(tmp_path / "resnet18.pth"), str(out)]) == {"vgg": False, "layers": 18, "deep_stem": False}
    assert capsys.readouterr().out == f"wrote {out}: ResNet-18 (7x7 stem); train with: pretrained {out} layers 18 deep_stem False\n"
    written = torch.load(out, weights_only=True)
    assert set(written) == set(source) and all(torch.equal(written[k], source[k]) for k in source)
    report = load_backbone_weights(ResNet(18, deep_stem=False), str(out))
    assert report.loaded == len(source) and not report.missing and not report.classifier_unused


def test_timm_vgg16_bn_safetensors_converts_exactly(tmp_path):
    torch.manual_seed(0)
    ours = VGG16BN().state_dict()
    timm = torchvision_vgg_keys(ours)
    timm.update({"pre_logits.fc1.weight": torch.randn(8, 512, 7, 7), "pre_logits.fc1.bias": torch.zeros(8),
                 "head.fc.weight": torch.randn(10, 8), "head.fc.bias": torch.zeros(10)})
    write_safetensors(tmp_path / "model.safetensors", timm)
    out = tmp_path / "vgg16_bn.pth"
    assert main([str(tmp_path / "model.safetensors"), str(out)]) == {"vgg": True}
    written = torch.load(out, weights_only=True)
    assert set(written) == set(ours) and all(torch.equal(written[k], ours[k]) for k in ours)


def test_refusals_are_one_line_and_exit_2(tmp_path, capsys):
    from util.cli import run
    deep = {"conv1.0.weight": torch.zeros(32, 3, 3, 3), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    torch.save(deep, tmp_path / "resnet50d.pth")
    write_safetensors(tmp_path / "cut.safetensors", {"a": torch.zeros(100)})
    raw = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-40])
    partial = {k: v for k, v in ResNet(18, deep_stem=False).state_dict().items() if k != "layer4.1.bn2.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    cases = {"resnet50d.pth": "timm deep-stem ResNet", "cut.safetensors": "truncated",
             "partial.pth": "lacks backbone keys", "absent.pth": "does not exist"}
    for name, message in cases.items():
        with pytest.raises(SystemExit) as e:
            run(main, [str(tmp_path / name), str(tmp_path / "out.pth")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.pth").exists()
