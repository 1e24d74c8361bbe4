"""Pretrain a backbone on the training classes of a fold (semantic segmentation), for configs
that have no ImageNet weights: the synthetic demo's stand-in for PFENet's frozen ImageNet
backbone.

    python tools/pretrain_backbone.py --config config/synthetic/synthetic_split0_resnet18.yaml \\
        [--out initmodel/synthetic_split0_resnet18x0.5.pth] [--iters 1500] [KEY VALUE ...]

The backbone the config describes (``backbone``, ``layers``, ``vgg``, ``deep_stem``, ``backbone_width``)
learns to label every pixel of the fold's training images with its training class or
background: a 1x1 classifier on layer4 and an auxiliary one on layer3 (weight 0.4), per-pixel
cross-entropy, SGD with momentum (or ``--optimizer adamw``, for a vision transformer) and the
poly schedule. Pixels of held-out classes are ignored
(and with ``exclude_novel_images`` their images are not used), so the held-out classes stay
unseen, as the few-shot protocol requires. The training images, augmentation (``train_h``,
``scale_min``...) and ``manual_seed`` are the config's. The weight file (``--out``, default the
config's ``pretrained``) holds the backbone's state dict alone, which ``pretrained`` then loads
like an ImageNet file; it is written atomically. The run is deterministic for a seed and a
thread count.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dataset.image import load_split, loader_workers, read_pair, worker_init
from dataset.transform import train_transform
from engine.trainer import poly_lr
from model.backbone import backbone_from_cfg
from util.cli import run
from util.config import load_cfg, parse_args_with_overrides
from util.errors import ConfigError
from util.fileio import atomic_torch_save
from util.logger import setup_logger

log = logging.getLogger("pretrain")


class BaseClassImages(Dataset):
    """The fold's training images, labels mapped to 0 (background), 1..N (the training classes
    in order) and 255 (ignore: outline bands and any held-out class)."""

    def __init__(self, cfg):
        split = load_split(cfg, train=True)
        self.pairs = [split.pairs[i] for i in split.index.images]
        self.lut = np.full(256, cfg.ignore_label, np.uint8)
        self.lut[0] = 0
        for position, class_id in enumerate(split.classes, 1):
            self.lut[class_id] = position
        self.num_classes = len(split.classes) + 1
        self.transform = train_transform(cfg)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        index, seed = key
        image, label = read_pair(*self.pairs[index])
        return self.transform(image, self.lut[label], np.random.default_rng(seed))


class SegmentationNet(nn.Module):
    """Backbone with a 1x1 classifier on layer4 and an auxiliary one on layer3."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(backbone.layer4_channels, num_classes, 1))
        self.aux = nn.Conv2d(backbone.layer3_channels, num_classes, 1)

    def forward(self, images):
        _, layer3 = self.backbone.mid_level(images)
        layer4 = self.backbone.high_level(layer3)
        size = images.shape[-2:]
        return (F.interpolate(self.head(layer4), size, mode="bilinear", align_corners=True),
                F.interpolate(self.aux(layer3), size, mode="bilinear", align_corners=True))


def batches(num_images: int, iters: int, batch: int, seed: int):
    """(image index, augmentation seed) for every sample of every iteration: shuffled epochs
    drawn from ``seed`` alone, so the order does not depend on the worker count."""
    rng = np.random.default_rng((seed, 17))
    order: list[int] = []
    while len(order) < iters * batch:
        order.extend(rng.permutation(num_images).tolist())
    seeds = rng.integers(1 << 62, size=iters * batch)
    keys = list(zip(order[:iters * batch], seeds.tolist()))
    return [keys[i * batch:(i + 1) * batch] for i in range(iters)]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config: data, fold, backbone, augmentation, seed")
    p.add_argument("--out", default="", help="weight file to write (default: the config's 'pretrained')")
    p.add_argument("--iters", type=int, default=1500, help="SGD iterations")
    p.add_argument("--batch", type=int, default=16, help="images per iteration")
    p.add_argument("--lr", type=float, default=0.05, help="base learning rate (poly schedule, power 0.9)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: momentum 0.9, weight decay 1e-4 (the ResNets'); adamw: weight decay 0.05, what "
                        "vision transformers are trained with (the synthetic ViT's, with --lr 0.001)")
    p.add_argument("--print-freq", type=int, default=100, help="log every this many iterations")
    return parse_args_with_overrides(p, argv)


def main(argv=None) -> str:
    args, opts = _parse(argv)
    setup_logger()
    cfg = load_cfg(args.config, opts)
    if cfg.task != "image":
        raise ConfigError(f"{args.config}: tools/pretrain_backbone.py pretrains on images; this is a "
                          f"{cfg.task} config (pretrain with the image config of the same classes)")
    out = args.out or cfg.pretrained
    if not out:
        raise ConfigError(f"{args.config}: 'pretrained' is '' and no --out is given; say where to write the weights")
    if args.iters < 1 or args.batch < 1:
        raise ConfigError("--iters and --batch must be at least 1")
    torch.manual_seed(cfg.manual_seed)
    data = BaseClassImages(cfg)
    model = SegmentationNet(backbone_from_cfg(cfg), data.num_classes)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimiser = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.05)
    else:
        optimiser = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    plan = batches(len(data), args.iters, args.batch, cfg.manual_seed)
    loader = DataLoader(data, batch_sampler=plan, num_workers=loader_workers(cfg.workers), worker_init_fn=worker_init,
                        persistent_workers=False)
    log.info("pretraining %s on %d images of %d training classes: %d iterations of %d",
             args.config, len(data), data.num_classes - 1, args.iters, args.batch)
    t0, running, steps, correct, counted = time.perf_counter(), 0.0, 0, 0, 0
    for it, (images, labels) in enumerate(loader, 1):
        for group in optimiser.param_groups:
            group["lr"] = poly_lr(args.lr, it - 1, args.iters, 0.9)   # the rate of step it-1 of `iters`
        labels = labels.long()
        main, aux = model(images)
        loss = (F.cross_entropy(main, labels, ignore_index=cfg.ignore_label)
                + 0.4 * F.cross_entropy(aux, labels, ignore_index=cfg.ignore_label))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running, steps = running + loss.item(), steps + 1
        valid = labels != cfg.ignore_label
        correct += int((main.argmax(1) == labels)[valid].sum())
        counted += int(valid.sum())
        if it % args.print_freq == 0 or it == args.iters:
            log.info("iter %d/%d  loss %.4f  pixel accuracy %.3f  (%.0f s)", it, args.iters,
                     running / steps, correct / max(counted, 1), time.perf_counter() - t0)
            running, steps, correct, counted = 0.0, 0, 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_torch_save(model.backbone.state_dict(), out)
    log.info("wrote the backbone to %s (%.0f s)", out, time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    run(main)
