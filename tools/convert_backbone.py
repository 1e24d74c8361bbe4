"""Turn an ImageNet checkpoint from torchvision or timm into a backbone file for ``pretrained``.

    python tools/convert_backbone.py resnet50-0676ba61.pth initmodel/resnet50.pth
    python tools/convert_backbone.py model.safetensors initmodel/vgg16_bn.pth      # timm's vgg16_bn

The architecture is read from the keys: VGG-16-bn (``features.N``) or a ResNet-18/34/50/101 with
the 7×7 stem (``conv1`` 7×7) or semseg's deep stem (``conv1..3`` 3×3). Classifier keys (``fc``,
``classifier``, timm's ``head`` and ``pre_logits``) are dropped; the rest must fill our backbone
exactly (the same check training applies), and the file written holds only our backbone's
tensors, in our key layout. It prints the config keys that go with it. Reads ``.pth``/``.pt``
(tensors only, never arbitrary pickled objects) and ``.safetensors`` (read here; no extra package).

torchvision's files load as they are (``pretrained resnet50.pth deep_stem False``); converting
them just checks them and strips the classifier. timm's deep-stem ResNets (``resnet50d``...) have
a 32-32-64 stem, not semseg's 64-64-128, and are refused with that explanation.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct


import torch

from model.backbone import (RESNET_SPECS, Bottleneck, build_backbone, load_backbone_weights,
                            read_state_dict)
from util.errors import BackboneWeightsError
from util.fileio import atomic_torch_save

CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "pre_logits.", "fc_norm.")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A .safetensors file: 8-byte little-endian header length, a JSON header naming each
    tensor's dtype, shape and byte range, then the raw little-endian data."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        data = memoryview(raw)[8 + n:]
        state = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if end > len(data):
                raise ValueError("the file is shorter than its header says (truncated?)")
            flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
            state[name] = flat.reshape(info["shape"])
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise BackboneWeightsError(f"'{path}' is not a readable .safetensors file ({type(e).__name__}: {e})") from None
    return state


def read_any(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"'{os.path.abspath(path)}' does not exist")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_state_dict(path)


def infer_architecture(state: dict) -> dict:
    """Config keys (``vgg``, ``layers``, ``deep_stem``) of the backbone the keys describe."""
    if any(k.startswith("features.") for k in state):
        return {"vgg": True}
    if "conv1.0.weight" in state:
        raise BackboneWeightsError(
            "this is a timm deep-stem ResNet (resnet50d and kin: conv1.0/conv1.3/conv1.6, a 32-32-64 stem); "
            "its stem does not fit semseg's 64-64-128 deep stem. Convert the plain timm/torchvision ResNet "
            "(7x7 stem) and train with deep_stem False")
    stem = state.get("conv1.weight")
    if stem is None or stem.dim() != 4:
        raise BackboneWeightsError("neither a VGG (features.N) nor a ResNet (conv1, layer1..4) key layout")
    counts = []
    for layer in range(1, 5):
        blocks = {int(m.group(1)) for k in state for m in [re.match(rf"layer{layer}\.(\d+)\.", k)] if m}
        counts.append(max(blocks) + 1 if blocks else 0)
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, (block, spec) in RESNET_SPECS.items():
        if tuple(counts) == spec and (block is Bottleneck) == bottleneck:
            return {"vgg": False, "layers": depth, "deep_stem": stem.shape[-1] == 3}
    raise BackboneWeightsError(f"a ResNet with blocks {counts} per stage "
                               f"({'bottleneck' if bottleneck else 'basic'}): not one of {sorted(RESNET_SPECS)}")


def convert(src: str, out: str) -> dict:
    """Convert ``src`` into ``out``; returns the config keys that go with it."""
    state = read_any(src)
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    arch = infer_architecture(state)
    backbone = build_backbone(arch.get("layers", 50), arch["vgg"], arch.get("deep_stem", True))
    load_backbone_weights(backbone, state)      # every key must fit: the check training applies
    atomic_torch_save({k: v.clone() for k, v in backbone.state_dict().items()}, out)
    return arch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="torchvision/timm ImageNet checkpoint (.pth, .pt or .safetensors)")
    parser.add_argument("out", help="backbone file to write (e.g. initmodel/resnet50.pth)")
    args = parser.parse_args(argv)
    arch = convert(args.src, args.out)
    keys = "vgg True" if arch["vgg"] else f"layers {arch['layers']} deep_stem {arch['deep_stem']}"
    name = "VGG-16-bn" if arch["vgg"] else f"ResNet-{arch['layers']} ({'deep' if arch['deep_stem'] else '7x7'} stem)"
    print(f"wrote {args.out}: {name}; train with: pretrained {args.out} {keys}")
    return arch


if __name__ == "__main__":
    from util.cli import run
    run(main)
