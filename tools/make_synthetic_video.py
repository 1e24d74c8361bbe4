"""Write a miniature YouTube-VIS: synthetic videos of the 20 synthetic classes (no download).

    python tools/make_synthetic_video.py --out data/synthetic_video [--videos 240 --size 64]

writes ``<out>/train/JPEGImages/<video>/<frame>.jpg`` and ``<out>/train/instances.json`` in
the YouTube-VIS 2019 format (videos, per-instance ``segmentations`` per frame as RLE or
null, categories), so that tools/prepare_ytvis.py prepares it like the real data:

    python tools/prepare_ytvis.py --ytvis data/synthetic_video --out data/synthetic_video

Each video shows 1-3 objects of distinct classes (util.classes.SYNTHETIC_VIDEO_CLASSES,
drawn with tools/make_synthetic.py's shapes, textures and shared colour palette; most videos
have distractors, half of them in the main object's colours) moving, rotating and scaling
over a panning textured background with clutter; objects pass in front of each other (masks are the visible
parts), enter late and leave the frame (their segmentation is then null). About a tenth
of the videos are portrait. Instance masks are stored as uncompressed RLE (as YouTube-VIS
ships them) for some instances and compressed RLE for the others. Each video comes from
its own generator seeded by (--seed, video index), so the bytes do not depend on --workers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import cv2
import numpy as np
from pycocotools import mask as mask_utils


from tools.make_synthetic import (CLASS_SPECS, NUM_CLASSES, _background, _fill, _init_worker,
                                  _object_texture, _poly_area, _shape_contours, add_clutter, draw_colours)
from util.classes import SYNTHETIC_VIDEO_CLASSES
from util.cli import run
from util.fileio import atomic_write_image, atomic_write_text
from util.logger import progress

FRAME_STEP = 5   # YouTube-VIS frame names step by 5 (00000, 00005, ...)


def video_name(index: int) -> str:
    return f"vid{index:05d}"


def frame_name(t: int) -> str:
    return f"{t * FRAME_STEP:05d}"


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary mask: column-major run lengths starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]]))) if flat.size else []
    return {"counts": np.diff(np.concatenate([[0], change])).astype(int).tolist(), "size": list(mask.shape)}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": list(mask.shape)}


def main_class_of(seed: int, index: int) -> int:
    """Class (0-based) of a video's main object: each block of 20 consecutive videos has
    every class once, so classes stay balanced even in small sets."""
    block, pos = divmod(index, NUM_CLASSES)
    return int(np.random.default_rng((seed, 7, block)).permutation(NUM_CLASSES)[pos])


def _trajectories(rng, n_obj: int, n_frames: int, h: int, w: int) -> list[dict]:
    """Per object: centre, angle and scale at every frame (arrays of n_frames)."""
    t = np.arange(n_frames, dtype=np.float64)
    side = math.sqrt(h * w)
    objects = []
    for k in range(n_obj):
        main = k == 0
        frac = rng.uniform(0.10, 0.18) if main else rng.uniform(0.05, 0.11)
        speed = rng.uniform(0.01, 0.05) * side
        direction = rng.uniform(0, 2 * np.pi)
        velocity = speed * np.array([math.cos(direction), math.sin(direction)])
        if main or rng.random() < 0.5:
            start = np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h])
        else:
            # enter from outside: start beyond an edge, head for a point inside
            angle = rng.uniform(0, 2 * np.pi)
            start = np.array([w / 2 + 0.75 * w * math.cos(angle), h / 2 + 0.75 * h * math.sin(angle)])
            target = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
            velocity = (target - start) / max(n_frames * rng.uniform(0.4, 0.8), 1.0)
        if not main and objects and rng.random() < 0.5:
            # cross the main object's path (occlusion) at a random frame
            meet = rng.uniform(0.3, 0.9) * (n_frames - 1)
            velocity = (objects[0]["centre"][int(meet)] - start) / max(meet, 1.0)
        centre = start[None] + t[:, None] * velocity[None]
        theta = rng.uniform(0, 2 * np.pi) + t * rng.uniform(-0.25, 0.25)
        growth = rng.uniform(-0.5, 0.5) / max(n_frames - 1, 1)
        scale_factor = np.clip(1.0 + growth * t, 0.4, 2.0)
        objects.append({"frac": frac, "centre": centre, "theta": theta, "scale": scale_factor})
    return objects


def render_video(seed, n_frames: int, size: int, portrait: bool, main_class: int):
    """(frames as BGR uint8 arrays, classes (0-based) in drawing order, visible masks
    [object][frame] as bool arrays). Later objects are drawn over earlier ones."""
    rng = np.random.default_rng(seed)
    h = int(round(size * rng.uniform(0.85, 1.15)))
    w = int(round(h * rng.uniform(1.5, 1.9)))
    if portrait:
        h, w = w, h
    n_obj = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    others = rng.permutation(np.delete(np.arange(NUM_CLASSES), main_class))
    classes = [main_class] + [int(c) for c in others[:n_obj - 1]]
    # a larger background, cropped at a slowly drifting offset: the camera pans
    margin = max(4, size // 6)
    backdrop = _background(rng, h + 2 * margin, w + 2 * margin)
    add_clutter(rng, backdrop, int(rng.integers(4, 10)))
    main_colours = draw_colours(rng)
    pan = rng.uniform(-1, 1, 2) * margin / max(n_frames - 1, 1)
    tracks = _trajectories(rng, n_obj, n_frames, h, w)
    shapes = []
    for k, (cls, track) in enumerate(zip(classes, tracks)):
        spec = CLASS_SPECS[cls]
        # half the distractors wear the main object's colours
        colours = main_colours if k == 0 or rng.random() < 0.5 else draw_colours(rng)
        outer, hole = _shape_contours(spec.shape, rng)
        stretch = np.array([1.0, rng.uniform(0.85, 1.0)])
        unit_area = _poly_area(outer * stretch) - (_poly_area(hole * stretch) if hole is not None else 0.0)
        base = math.sqrt(track["frac"] * h * w / unit_area)
        shapes.append((spec, colours, outer * stretch, None if hole is None else hole * stretch, base,
                       int(rng.integers(1 << 62))))   # the object's texture seed, fixed over frames
    frames, visible = [], [[None] * n_frames for _ in classes]
    for t in range(n_frames):
        oy = int(round(margin + pan[1] * t))
        ox = int(round(margin + pan[0] * t))
        img = backdrop[oy:oy + h, ox:ox + w].copy()
        inst = np.zeros((h, w), np.uint8)
        for k, ((spec, colours, outer, hole, base, tex_seed), track) in enumerate(zip(shapes, tracks), 1):
            scale = base * track["scale"][t]
            theta = float(track["theta"][t])
            cx, cy = track["centre"][t]
            rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            mask = np.zeros((h, w), np.uint8)
            _fill(mask, (outer * scale) @ rot.T + [cx, cy], 1)
            if hole is not None:
                _fill(mask, (hole * scale) @ rot.T + [cx, cy], 0)
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, h)
            x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, w)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            tex = _object_texture(np.random.default_rng(tex_seed), spec.texture, colours, xx - cx, yy - cy, theta,
                                  scale)
            alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.float32), (3, 3), 0.6)[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + tex * alpha
            inst[mask > 0] = k
        img += rng.normal(0, 2.0, img.shape).astype(np.float32)
        frames.append(np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)[..., ::-1]))
        for k in range(len(classes)):
            visible[k][t] = inst == k + 1
    return frames, classes, visible


def _write_video(task) -> dict:
    """Render one video, write its frames; return its video entry and instance annotations
    (ids are assigned in video order by the caller)."""
    out, index, seed, size, frames_min, frames_max, portrait_p, quality = task
    rng = np.random.default_rng((seed, 11, index))
    n_frames = int(rng.integers(frames_min, frames_max + 1))
    portrait = bool(rng.random() < portrait_p)
    frames, classes, visible = render_video((seed, 13, index), n_frames, size, portrait, main_class_of(seed, index))
    name = video_name(index)
    for t, img in enumerate(frames):
        atomic_write_image(os.path.join(out, "train", "JPEGImages", name, frame_name(t) + ".jpg"), img,
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    h, w = frames[0].shape[:2]
    annotations = []
    for k, cls in enumerate(classes):
        # both RLE forms appear in every set: alternate by video and object
        encode = uncompressed_rle if (index + k) % 2 == 0 else compressed_rle
        segs, areas, boxes = [], [], []
        for m in visible[k]:
            if not m.any():
                segs.append(None)
                areas.append(None)
                boxes.append(None)
                continue
            ys, xs = np.nonzero(m)
            segs.append(encode(m))
            areas.append(int(m.sum()))
            boxes.append([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])
        if any(s is not None for s in segs):
            annotations.append({"category_id": cls + 1, "segmentations": segs, "areas": areas, "bboxes": boxes,
                                "iscrowd": 0, "width": w, "height": h, "length": 1})
    video = {"width": w, "height": h, "length": len(frames),
             "file_names": [f"{name}/{frame_name(t)}.jpg" for t in range(len(frames))],
             "license": 1, "flickr_url": "", "coco_url": "", "date_captured": ""}
    return {"index": index, "video": video, "annotations": annotations}


def build_annotation_file(results: list[dict]) -> dict:
    """The instances.json document; ids follow the video order (1-based)."""
    videos, annotations = [], []
    for r in sorted(results, key=lambda r: r["index"]):
        vid = len(videos) + 1
        videos.append({"id": vid, **r["video"]})
        for a in r["annotations"]:
            annotations.append({"id": len(annotations) + 1, "video_id": vid, **a})
    return {
        "info": {"description": "synthetic videos in the YouTube-VIS 2019 format (tools/make_synthetic_video.py)",
                 "version": "1.0"},
        "licenses": [{"id": 1, "name": "generated"}],
        "videos": videos,
        "categories": [{"supercategory": "shape", "id": i, "name": n} for i, n in enumerate(SYNTHETIC_VIDEO_CLASSES, 1)],
        "annotations": annotations,
    }


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/synthetic_video", help="output folder (holds train/)")
    p.add_argument("--videos", type=int, default=240, help="number of videos")
    p.add_argument("--frames-min", type=int, default=3, help="fewest frames per video")
    p.add_argument("--frames-max", type=int, default=14, help="most frames per video")
    p.add_argument("--size", type=int, default=64, help="nominal frame height (width about 1.7x; portrait swapped)")
    p.add_argument("--portrait", type=float, default=0.1, help="fraction of portrait videos")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (non-negative)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = p.parse_args(argv)
    if args.videos < 1:
        p.error("--videos must be at least 1")
    if not 1 <= args.frames_min <= args.frames_max:
        p.error("need 1 <= --frames-min <= --frames-max")
    if args.size < 16:
        p.error("--size must be at least 16")
    if args.seed < 0:
        p.error("--seed must be non-negative")
    if not 0 <= args.portrait <= 1:
        p.error("--portrait must be in [0, 1]")
    return args


def main(argv=None) -> dict:
    """Generate the set; returns the annotation document written."""
    args = _parse(argv)
    t0 = time.perf_counter()
    tasks = [(args.out, i, args.seed, args.size, args.frames_min, args.frames_max, args.portrait, args.quality)
             for i in range(args.videos)]
    workers = max(1, min(args.workers, len(tasks)))
    if workers == 1:
        results = list(progress(map(_write_video, tasks), total=len(tasks), desc="synthetic video", unit="video"))
    else:
        import multiprocessing as mp

        with mp.Pool(workers, initializer=_init_worker) as pool:
            results = list(progress(pool.imap_unordered(_write_video, tasks, chunksize=4), total=len(tasks),
                                    desc="synthetic video", unit="video"))
    doc = build_annotation_file(results)
    atomic_write_text(os.path.join(args.out, "train", "instances.json"), json.dumps(doc) + "\n")

    frames = sum(v["length"] for v in doc["videos"])
    print(f"wrote {len(doc['videos'])} videos ({frames} frames, {len(doc['annotations'])} instances) to "
          f"{args.out}/train in {time.perf_counter() - t0:.1f} s ({workers} worker(s))")
    per_class = np.zeros(NUM_CLASSES + 1, np.int64)
    for vid in {(a["video_id"], a["category_id"]) for a in doc["annotations"]}:
        per_class[vid[1]] += 1
    print("videos per class: " + ", ".join(f"{k} {int(per_class[k])}" for k in range(1, NUM_CLASSES + 1)))
    print(f"next: python tools/prepare_ytvis.py --ytvis {args.out} --out {args.out}")
    return doc


if __name__ == "__main__":
    run(main)
