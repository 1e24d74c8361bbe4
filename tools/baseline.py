"""Score the trivial all-foreground prediction on exactly the episodes test.py scores
(image or video experiments alike: the config's dataset decides).

    python tools/baseline.py --config CFG [KEY VALUE ...] [--compare result/test_*.json]

Any model should beat it clearly; with --compare it prints the model's result beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.tester import run_test  # noqa: E402
from engine.video import is_video  # noqa: E402
from util.cli import run  # noqa: E402
from util.config import load_cfg, parse_args_with_overrides  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.errors import ConfigError, DataFileMissing  # noqa: E402
from util.logger import setup_logger  # noqa: E402


class AllForeground(torch.nn.Module):
    """Predicts the target everywhere (foreground logit above background): B×2×H×W logits
    for B×3×H×W queries, B×T×2×H×W for B×T×3×H×W query clips (on a video canvas the
    letterbox padding is predicted too, as a model's would be)."""

    def forward(self, query_img, support_imgs, support_masks, return_extras=False, **_):
        shape = query_img.shape[:-3] + query_img.shape[-2:]
        zeros = torch.zeros(shape, device=query_img.device)
        logits = torch.stack([zeros, zeros + 1], -3)
        if return_extras:
            return logits, {"bg_logits": torch.stack([zeros + 1, zeros], -3), "do_mask": zeros.long()}
        return logits


def compare_video(res: dict, base: dict, path: str) -> None:
    print(f"\n{'':24s}{'J':>16s}{'F':>16s}{'J&F':>16s}{'class IoU':>16s}")
    for name, r in (("NTRENet++ (" + os.path.basename(res["weight"]) + ")", res), ("all-foreground", base)):
        print(f"{name:24s}" + "".join(f"{r[k + '_mean']:8.2f} ± {r[k + '_std']:5.2f}" for k in ("J", "F", "JF", "class_iou")))
    print(f"({len(res['runs'])} runs x {res['frames']} frames of {res['videos']} videos, {res['shot']}-shot, "
          f"the same episodes for both; {path})")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--compare", default="", help="a test_*.json written by test.py")
    args, opts = parse_args_with_overrides(parser, argv)
    cfg = load_cfg(args.config, opts)
    cfg.update(save_pred=False, vis=0, save_path="")
    res = None
    if args.compare:
        if not os.path.isfile(args.compare):
            raise DataFileMissing(f"--compare '{args.compare}' does not exist; pass a test_*.json written by test.py")
        with open(args.compare) as f:
            res = json.load(f)
    if res is not None:
        for key in ("dataset", "split", "val_list"):
            if key in res and res[key] != cfg[key]:
                raise ConfigError(f"{args.compare} was scored with {key} {res[key]!r}, the config has "
                                  f"{cfg[key]!r}: pass the same config and overrides as that test run")
        if is_video(cfg):
            # the very episodes the result scored: its runs, shots, clip length and support draws
            cfg.update(test_seeds=len(res["runs"]), shot=res["shot"], clip_len=res["clip_len"],
                       support_per=res["support_per"], manual_seed=res["manual_seed"])
        else:
            # score the very episodes the result scored: its seeds, count and shots
            cfg.update(test_num=res["episodes"], test_seeds=res["seeds"], shot=res["shot"],
                       manual_seed=res.get("manual_seed", cfg.manual_seed))
    setup_logger("", 0)
    base = run_test(cfg, DistInfo(), model=AllForeground(), write_json=False)
    if res is not None and is_video(cfg):
        compare_video(res, base, args.compare)
    elif res is not None:
        print(f"\n{'':24s}{'class mIoU':>18s}{'FB-IoU':>18s}")
        print(f"{'NTRENet++ (' + os.path.basename(res['weight']) + ')':24s}"
              f"{res['miou_mean']:10.2f} ± {res['miou_std']:4.2f}{res['fbiou_mean']:11.2f} ± {res['fbiou_std']:4.2f}")
        print(f"{'all-foreground':24s}{base['miou_mean']:10.2f} ± {base['miou_std']:4.2f}"
              f"{base['fbiou_mean']:11.2f} ± {base['fbiou_std']:4.2f}")
        print(f"({res['seeds']} seeds x {res['episodes']} episodes, {res['shot']}-shot, the same episodes for both)")
    return base


if __name__ == "__main__":
    run(main)
