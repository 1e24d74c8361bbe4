"""Segment your own images: python predict.py --config CFG --weight CKPT \\
    --support a.jpg a_mask.png [--support b.jpg b_mask.png ...] --query q1.jpg [q2.jpg ...] --out DIR [KEY VALUE ...]

A video checkpoint (config dataset ytvis / synthetic_video) takes one --query: a folder of
frames or a video file; it writes <out>/<frame>_mask.png per frame, <out>/overlay.mp4 and
<out>/strip.png (frames with the prediction, mined BG and DO).

K is the number of --support pairs. Masks are 0/1 or 0/255 single-channel PNGs (255 in a
0/1 mask is ignored), or class-id / palette PNGs with --class-id C. Writes per query
<out>/<stem>_mask.png (0/1, the query's size), <out>/<stem>_overlay.jpg and, with --panels,
<out>/<stem>_panel.png (supports, query, prediction, mined BG and DO).
"""
import argparse
import logging

from engine.preflight import preflight
from engine.predictor import resolve_device
from engine.tasks import task_for
from util.config import load_cfg, parse_args_with_overrides, split_trailing_overrides


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config the checkpoint was trained with")
    parser.add_argument("--weight", required=True, help="checkpoint file (e.g. exp/<dataset>/<exp>/model/best.pth)")
    parser.add_argument("--support", nargs=2, action="append", required=True, metavar=("IMAGE", "MASK"),
                        help="an annotated example; repeat for K shots")
    parser.add_argument("--query", nargs="+", action="extend", required=True, metavar="IMAGE",
                        help="image(s) to segment")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--class-id", type=int, default=None,
                        help="target class in class-id / palette masks (pixels == C are the target)")
    parser.add_argument("--class-name", default="", help="name shown in the panel titles")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: fp16 on CUDA, bf16 on the CPU (or set the key: amp bf16)")
    parser.add_argument("--panels", action="store_true", help="also write <stem>_panel.png per query")
    args, opts = parse_args_with_overrides(parser, argv)
    args.query, opts = split_trailing_overrides(args.query, opts)
    if not args.query:
        parser.error("--query needs at least one image before the KEY VALUE overrides")
    return args, opts


def main(argv=None) -> list[str]:
    """Run and return the written paths; bad input raises a UserError (``run`` reports it).
    What needs no image (the device, the checkpoint and its architecture, the output folder) is
    checked first, then every input, before the network is built; nothing is written before."""
    args, opts = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_cfg(args.config, opts)
    device = resolve_device(args.device)
    state = preflight(cfg, "predict", weight=args.weight, out_dir=args.out)
    predictor_cls = task_for(cfg).predictor
    inputs = predictor_cls.read_inputs(args, cfg, opts)
    amp = cfg.amp
    if args.amp and amp == "none":
        amp = "fp16" if device.type == "cuda" else "bf16"
    predictor = predictor_cls.from_checkpoint(cfg, args.weight, device=device, amp=amp, state=state)
    return predictor.write_outputs(inputs, args)
