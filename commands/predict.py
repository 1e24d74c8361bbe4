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
import os
import time

import cv2

from engine.predictor import Predictor, check_query_files, read_supports, resolve_device
from engine.video import is_video
from engine.video_predict import VideoPredictor, overlay_frames, read_query, strip_image
from util.config import KEYS, load_cfg, parse_args_with_overrides
from util.errors import PredictInputError
from util.fileio import atomic_path, atomic_write_image
from util.vis import overlay, save_panel

log = logging.getLogger("ntrenetpp")


def output_stems(queries: list[str]) -> list[str]:
    """File stems of the queries; two queries with one stem would overwrite each other."""
    stems = [os.path.splitext(os.path.basename(q))[0] for q in queries]
    seen: dict[str, str] = {}
    for stem, q in zip(stems, queries):
        if stem in seen:
            raise PredictInputError(f"queries '{seen[stem]}' and '{q}' would both write {stem}_mask.png; "
                                    f"rename one or run them with different --out folders")
        seen[stem] = q
    return stems


def split_trailing_overrides(queries: list[str], opts: list[str]) -> tuple[list[str], list[str]]:
    """``--query a.jpg b.jpg shot 5``: argparse hands every word to --query; from the first
    word that is a declared config key (and not a file) on, the words are overrides."""
    for i, word in enumerate(queries):
        if word in KEYS and not os.path.exists(word):
            return queries[:i], queries[i:] + opts
    return queries, opts


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
    """Run and return the written paths; bad input raises a UserError (``run`` reports it)."""
    args, opts = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_cfg(args.config, opts)
    if is_video(cfg):
        return predict_video(args, cfg)
    # every input is checked before the checkpoint is loaded
    stems = output_stems(args.query)
    supports = read_supports([tuple(s) for s in args.support], args.class_id, cfg.ignore_label)
    if "shot" in opts[::2] and cfg.shot != len(supports):
        log.warning("shot %d is ignored: K is the number of --support pairs given (%d)", cfg.shot, len(supports))
    check_query_files(args.query)
    device = resolve_device(args.device)
    amp = cfg.amp
    if args.amp and amp == "none":
        amp = "fp16" if device.type == "cuda" else "bf16"
    predictor = Predictor.from_checkpoint(cfg, args.weight, device=device, amp=amp)
    predictions = predictor.iter_predict(supports, args.query, args.class_id, args.class_name)
    written, seconds = [], 0.0
    for stem in stems:
        t0 = time.perf_counter()
        pred = next(predictions)
        seconds += time.perf_counter() - t0
        paths = [os.path.join(args.out, f"{stem}_mask.png"), os.path.join(args.out, f"{stem}_overlay.jpg")]
        atomic_write_image(paths[0], pred.mask)
        atomic_write_image(paths[1], cv2.cvtColor(overlay(pred.image, pred.mask), cv2.COLOR_RGB2BGR),
                           (cv2.IMWRITE_JPEG_QUALITY, 90))
        if args.panels:
            paths.append(os.path.join(args.out, f"{stem}_panel.png"))
            save_panel(paths[2], pred.panel_sample())
        log.info("%s: %.1f%% foreground -> %s", stem, 100 * pred.mask.mean(), ", ".join(paths))
        written += paths
    log.info("%d query(ies), %d-shot, %s on %s%s: %.3f s per query (reading and network)", len(stems),
             len(supports), args.weight, predictor.device, f" ({amp})" if amp != "none" else "",
             seconds / len(stems))
    return written


class _NoVideoEncoder(Exception):
    pass


def write_video(path: str, frames, fps: float) -> bool:
    """Write RGB frames as an MP4 (atomically); False where OpenCV has no MP4 encoder."""
    h, w = frames[0].shape[:2]
    try:
        with atomic_path(path) as tmp:
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not writer.isOpened():
                raise _NoVideoEncoder
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            writer.release()
    except _NoVideoEncoder:
        return False
    return True


def predict_video(args, cfg) -> list[str]:
    """The video model: one query (folder of frames or video file) → per-frame masks, an
    overlay video and a strip."""
    if len(args.query) != 1:
        raise PredictInputError(f"a video model takes one --query (a folder of frames or a video file); "
                                f"got {len(args.query)}")
    supports = read_supports([tuple(s) for s in args.support], args.class_id, cfg.ignore_label)
    frames, names, fps = read_query(args.query[0])
    device = resolve_device(args.device)
    amp = cfg.amp
    if args.amp and amp == "none":
        amp = "fp16" if device.type == "cuda" else "bf16"
    predictor = VideoPredictor.from_checkpoint(cfg, args.weight, device=device, amp=amp)
    t0 = time.perf_counter()
    prediction = predictor.predict(supports, frames, args.class_id)
    seconds = time.perf_counter() - t0
    written = []
    for name, mask in zip(names, prediction.masks):
        written.append(os.path.join(args.out, f"{name}_mask.png"))
        atomic_write_image(written[-1], mask)
    strip = os.path.join(args.out, "strip.png")
    atomic_write_image(strip, cv2.cvtColor(strip_image(frames, prediction, supports, names, title=args.class_name),
                                           cv2.COLOR_RGB2BGR))
    written.append(strip)
    video = os.path.join(args.out, "overlay.mp4")
    if write_video(video, overlay_frames(frames, prediction.masks), fps or 10.0):
        written.append(video)
    else:
        log.warning("this OpenCV build cannot encode MP4: no overlay.mp4 (the masks and strip.png are written)")
    log.info("%d frames, %d-shot, %s on %s: %.3f s per frame (network and preprocessing); wrote %d masks, %s",
             len(frames), len(supports), args.weight, predictor.device, seconds / len(frames), len(names),
             ", ".join(written[len(names):]))
    return written

