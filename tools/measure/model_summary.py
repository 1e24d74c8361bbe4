"""Print the trainable and frozen parameter counts of the network a config builds.

    python tools/measure/model_summary.py --config config/pascal/pascal_split0_resnet50.yaml pretrained ''
    python tools/measure/model_summary.py layers 101 pretrained ''        # no --config: the defaults

Trailing ``KEY VALUE`` pairs override the config as in train.py. ``pretrained ''`` builds
the backbone without a weight file (the counts do not depend on the weights).
"""
from __future__ import annotations

import argparse
import logging


from engine.networks import build_model
from model import parameter_counts
from model.vit import VIT_VARIANTS, default_blocks
from util.cli import run
from util.config import defaults, load_cfg, merge_cfg_from_list, validate


def backbone_name(cfg) -> str:
    if cfg.backbone != "resnet":
        blocks = cfg.vit_blocks or list(default_blocks(VIT_VARIANTS[cfg.backbone].depth))
        return f"{VIT_VARIANTS[cfg.backbone].title} (blocks {blocks[0]} and {blocks[1]})"
    if cfg.vgg:
        return "VGG-16-bn"
    width = "" if cfg.backbone_width == 1.0 else f", width x{cfg.backbone_width:g}"
    return f"ResNet-{cfg.layers}" + (" (deep stem" if cfg.deep_stem else " (7x7 stem") + width + ")"


def summary(cfg) -> str:
    model = build_model(cfg)
    rows = parameter_counts(model)
    lines = [f"{backbone_name(cfg)}, reduce_dim {cfg.reduce_dim}, {len(cfg.ppm_scales)} scales, "
             f"freeze_backbone {cfg.freeze_backbone}",
             f"{'module':14s} {'trainable':>12s} {'frozen':>12s}"]
    for name, trainable, frozen in rows:
        lines.append(f"{name:14s} {trainable:12,d} {frozen:12,d}")
    lines.append(f"{'total':14s} {sum(r[1] for r in rows):12,d} {sum(r[2] for r in rows):12,d}")
    bank = getattr(model, "memory_bank", None)
    if bank is not None:
        bank = bank.prototypes
        lines.append(f"DO memory bank buffer: {tuple(bank.shape)} = {bank.numel():,d} values "
                     f"({bank.numel() * bank.element_size() / 2**20:.1f} MiB in the checkpoint)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="YAML config (default: the declared defaults)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    if args.config:
        cfg = load_cfg(args.config, args.opts)
    else:
        cfg = merge_cfg_from_list(defaults(), args.opts)
        validate(cfg)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    print(summary(cfg))


if __name__ == "__main__":
    run(main)
