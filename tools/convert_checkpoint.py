"""Turn a checkpoint released with PFENet or with the NTRENet++ authors' code into this project's.

    python tools/convert_checkpoint.py --from pfenet train_epoch_xx.pth \\
        exp/pascal/split0_resnet50_pfenet/model/best.pth --config config/pascal/pascal_split0_resnet50_pfenet.yaml
    python tools/convert_checkpoint.py --from ntrenetpp final.pth \\
        exp/pascal/split0_resnet50/model/best.pth --config config/pascal/pascal_split0_resnet50.yaml

The input is what their train.py saves: ``{"epoch", "state_dict", "optimizer"}`` with every
key prefixed ``module.`` (their DataParallel); a bare state dict is read too. The network is
built from ``--config`` (``arch`` chooses it: 'pfenet' for ``--from pfenet``, 'ntrenetpp' for
``--from ntrenetpp``; no ImageNet file is read), every tensor of the file is renamed onto it
(the backbone's ``layer0..layer4``; NTRENet++'s head blocks, see docs/method.md) and loaded
strictly: a key of the file the network lacks, a key of the network the file lacks, a tensor
of another shape, or a file of the other network is refused with one line naming the key.
Left out on purpose: the NTRENet++ authors' unused initial-prediction heads (docs/method.md,
section 9, row 27). Not in their files: the DO memory bank, which starts empty.

The result is a checkpoint of this project (engine/checkpoint.py: checksum, the config with its
``arch``), for ``test.sh`` / ``weight PATH``.
"""
from __future__ import annotations

import argparse
import os
import re

import torch

from engine.checkpoint import save_checkpoint
from engine.networks import build_model
from util.config import load_cfg
from util.errors import CheckpointError, ConfigError
from util.torchload import load_tensors

SOURCES = ("pfenet", "ntrenetpp")
NETWORK_NAMES = {"pfenet": "PFENet", "ntrenetpp": "NTRENet++"}
# a key only the other network's files have (after 'module.' is removed)
MARKERS = {"pfenet": ("init_merge.", "PFENet's"), "ntrenetpp": ("bg_prototype", "the NTRENet++ authors'")}

# the reference ResNets' deep stem: layer0 = Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, pool)
RESNET_STEM = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}

# PFENet's head keeps its names in model/pfenet.py
PFENET_HEAD = re.compile(r"(down_query|down_supp|init_merge|alpha_conv|beta_conv|inner_cls|res1|res2|cls)\..+")

# the NTRENet++ authors' head → model/ntrenet.py: (pattern, our name from the match)
NTRENETPP_HEAD = [(re.compile(pattern), name) for pattern, name in [
    (r"down_query\.0\.(\w+)", lambda m: f"down_query.0.{m[1]}"),
    (r"down_query\.3\.layer6_0\.0\.(\w+)", lambda m: f"aspp.image_pool.0.{m[1]}"),
    (r"down_query\.3\.layer6_1\.0\.(\w+)", lambda m: f"aspp.pointwise.0.{m[1]}"),
    (r"down_query\.3\.layer6_([234])\.0\.(\w+)", lambda m: f"aspp.atrous.{int(m[1]) - 2}.0.{m[2]}"),
    (r"down_query\.3\.down_dim\.0\.(\w+)", lambda m: f"aspp.fuse.0.{m[1]}"),
    (r"down_supp\.0\.(\w+)", lambda m: f"down_supp.0.{m[1]}"),
    (r"bg_prototype", lambda m: "bgmm.bg_prototype"),
    (r"down_bg\.0\.(\w+)", lambda m: f"bgmm.fuse.0.{m[1]}"),
    (r"bg_res1\.([02])\.(\w+)", lambda m: f"bgmm.residual.body.{m[1]}.{m[2]}"),
    (r"bg_cls\.([03])\.(\w+)", lambda m: f"bgmm.head.body.{m[1]}.{m[2]}"),
    (r"init_merge1\.(\d+)\.0\.(\w+)", lambda m: f"scales.{m[1]}.bg_eliminating.fuse.0.{m[2]}"),
    (r"init_merge2\.(\d+)\.0\.(\w+)", lambda m: f"scales.{m[1]}.target_matching.support_merge.0.{m[2]}"),
    (r"inital_beta_conv\.(\d+)\.([02])\.(\w+)",
     lambda m: f"scales.{m[1]}.target_matching.support_residual.body.{m[2]}.{m[3]}"),
    (r"inital_inner_cls\.(\d+)\.([03])\.(\w+)",
     lambda m: f"scales.{m[1]}.target_matching.init_head.body.{m[2]}.{m[3]}"),
    (r"init_merge4\.(\d+)\.0\.(\w+)", lambda m: f"scales.{m[1]}.target_matching.self_merge.0.{m[2]}"),
    (r"second_beta_conv\.(\d+)\.([02])\.(\w+)",
     lambda m: f"scales.{m[1]}.target_matching.self_residual.body.{m[2]}.{m[3]}"),
    (r"second_inner_cls\.(\d+)\.([03])\.(\w+)",
     lambda m: f"scales.{m[1]}.target_matching.second_head.body.{m[2]}.{m[3]}"),
    (r"init_merge3\.(\d+)\.0\.(\w+)", lambda m: f"scales.{m[1]}.do_eliminating.fuse.0.{m[2]}"),
    # their alpha_conv[i] fuses bin i+1 with bin i
    (r"alpha_conv\.(\d+)\.0\.(\w+)", lambda m: f"scales.{int(m[1]) + 1}.enrichment.inter_scale.0.{m[2]}"),
    (r"beta_conv\.(\d+)\.([02])\.(\w+)", lambda m: f"scales.{m[1]}.enrichment.residual.body.{m[2]}.{m[3]}"),
    (r"inner_cls\.(\d+)\.([03])\.(\w+)", lambda m: f"scales.{m[1]}.enrichment.aux_head.body.{m[2]}.{m[3]}"),
    (r"res1\.0\.(\w+)", lambda m: f"merge.fuse.0.{m[1]}"),
    (r"res2\.([02])\.(\w+)", lambda m: f"merge.residual.body.{m[1]}.{m[2]}"),
    (r"cls\.([03])\.(\w+)", lambda m: f"merge.head.body.{m[1]}.{m[2]}"),
]]
UNUSED = object()   # a reference tensor left out on purpose


def backbone_name(key: str, vgg: bool) -> str | None:
    """The reference backbone's ``layer0..layer4`` key as ours (``backbone.…``), else None."""
    if vgg:
        return "backbone." + key if re.fullmatch(r"layer[0-4]\.\d+\..+", key) else None
    match = re.fullmatch(r"layer0\.(\d+)\.(.+)", key)
    if match:
        stem = RESNET_STEM.get(match.group(1))
        return f"backbone.{stem}.{match.group(2)}" if stem else None
    return "backbone." + key if re.fullmatch(r"layer[1-4]\..+", key) else None


def our_name(key: str, source: str, vgg: bool, bins: int):
    """Our key for reference key ``key`` of a ``source`` checkpoint; :data:`UNUSED` for a tensor
    left out on purpose; None for a key the reference network does not have."""
    if key.startswith("layer"):
        return backbone_name(key, vgg)
    if source == "pfenet":
        return key if PFENET_HEAD.fullmatch(key) else None
    for pattern, name in NTRENETPP_HEAD:
        match = pattern.fullmatch(key)
        if match:
            if key.startswith("inital_inner_cls.") and int(match.group(1)) >= bins:
                return UNUSED    # the second half of their 2n initial heads is never called (row 27)
            return name(match)
    return None


def read_reference(path: str) -> tuple[dict, dict]:
    """``(state dict without 'module.', the other entries)`` of a released checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{os.path.abspath(path)}' does not exist")
    state = load_tensors(path, CheckpointError, "checkpoint", fix_refused="convert a file saved by their train.py",
                         fix_corrupt="re-download it")
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' does not hold a dict of tensors")
    if "format" in state and "model" in state:
        raise CheckpointError(f"'{path}' is already a checkpoint of this project; use it as it is (weight PATH)")
    extra = {}
    if isinstance(state.get("state_dict"), dict):
        extra = {k: v for k, v in state.items() if k != "state_dict"}
        state = state["state_dict"]
    if not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors (their train.py saves "
                              f"{{'epoch', 'state_dict', 'optimizer'}})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}, extra


def check_source(state: dict, source: str, path: str) -> None:
    """Refuse a file of the other network, naming the key that shows it."""
    for other, (marker, name) in MARKERS.items():
        if other == source:
            continue
        found = next((k for k in state if k == marker or k.startswith(marker)), None)
        if found is not None:
            raise CheckpointError(f"checkpoint '{path}' holds {name} network (key '{found}'), not "
                                  f"{NETWORK_NAMES[source]}; use --from {other}")


def build_network(cfg, source: str):
    """The network the config's ``arch`` names (checked to be ``source``'s before this is called)."""
    return build_model(cfg, warn_random_backbone=False)


def convert_state(state: dict, source: str, model: torch.nn.Module, vgg: bool, bins: int,
                  path: str) -> tuple[dict, list[str]]:
    """The file's tensors under our names, every key and shape checked against ``model``:
    ``(state dict for a strict load, reference keys left out on purpose)``."""
    own = model.state_dict()
    converted, left_out = {}, []
    for key, value in state.items():
        name = our_name(key, source, vgg, bins)
        if name is UNUSED:
            left_out.append(key)
            continue
        if name is None or name not in own:
            where = f" (ours '{name}')" if name and name != key else ""
            raise CheckpointError(f"checkpoint '{path}' has key '{key}'{where} that the configured "
                                  f"{NETWORK_NAMES[source]} lacks; check the config's layers, vgg, ppm_scales")
        if tuple(value.shape) != tuple(own[name].shape):
            note = (" (the released NTRENet++ code's final head has 1 output channel, docs/method.md section 9 "
                    "row 2; a 2-logit network cannot take it)" if source == "ntrenetpp" and key.startswith("cls.3.")
                    else "; check the config's layers, vgg, reduce_dim, ppm_scales")
            raise CheckpointError(f"checkpoint '{path}': key '{key}' has shape {tuple(value.shape)}, the network's "
                                  f"'{name}' {tuple(own[name].shape)}{note}")
        converted[name] = value
    # the DO memory bank is not in their files (a dict passed around): it starts empty
    fresh = [k for k in own if k not in converted and k.startswith("memory_bank.")]
    converted.update({k: own[k] for k in fresh})
    missing = [k for k in own if k not in converted]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint '{path}' lacks the network's key '{missing[0]}'{more}; "
                              f"check the config's layers, vgg, ppm_scales")
    return converted, left_out


def convert(source: str, src: str, out: str, config: str) -> dict:
    """Convert ``src`` into ``out`` for the network of ``config``; returns a summary."""
    if source not in SOURCES:
        raise ConfigError(f"--from {source!r}: expected one of {list(SOURCES)}")
    cfg = load_cfg(config)
    if cfg.arch != source:
        raise ConfigError(f"config '{config}' has arch {cfg.arch!r} but --from {source} needs arch {source!r}; "
                          f"use the matching config (PFENet's are config/<dataset>/*_pfenet.yaml)")
    if source == "pfenet" and not cfg.vgg and not cfg.deep_stem:
        raise ConfigError(f"config '{config}' has deep_stem False; PFENet's ResNets have the deep stem "
                          f"(set 'deep_stem True')")
    state, extra = read_reference(src)
    check_source(state, source, src)
    cfg.pretrained = ""     # the checkpoint holds the whole network; no ImageNet file is read
    model = build_network(cfg, source)
    converted, left_out = convert_state(state, source, model, cfg.vgg, len(cfg.ppm_scales), src)
    model.load_state_dict(converted, strict=True)
    epoch = extra.get("epoch")
    run = {"converted_from": source, "source_file": os.path.basename(src)}
    if isinstance(epoch, int):
        run["source_epoch"] = epoch
    save_checkpoint(out, model, cfg, run=run)
    return {"tensors": len(state) - len(left_out), "left_out": left_out, "network": NETWORK_NAMES[source]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                        help="whose checkpoint: PFENet's or the NTRENet++ authors'")
    parser.add_argument("src", help="their checkpoint (train_epoch_*.pth, final.pth)")
    parser.add_argument("out", help="checkpoint to write, e.g. exp/pascal/split0_resnet50_pfenet/model/best.pth")
    parser.add_argument("--config", required=True, help="the config of the network it belongs to")
    args = parser.parse_args(argv)
    summary = convert(args.source, args.src, args.out, args.config)
    left = f"; left out {len(summary['left_out'])} unused tensors" if summary["left_out"] else ""
    print(f"wrote {args.out}: {summary['network']}, {summary['tensors']} tensors from {args.src}{left}")
    return summary


if __name__ == "__main__":
    from util.cli import run
    run(main)
