"""Write the synthetic few-shot segmentation dataset (VOC layout, no download needed).

    python tools/make_synthetic.py --out data/synthetic [--train 2000 --val 500 --size 80]

20 classes (util.classes.SYNTHETIC_CLASSES: label value i+1 is class i), each a shape with
a colour or texture, 2-4 objects of distinct classes per image on a textured background,
and a 255 band around every outline as in VOC. Every image comes from its own generator
seeded by (--seed, split, index), so the bytes do not depend on --workers.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import cv2
import numpy as np


from util.classes import SYNTHETIC_CLASSES
from util.cli import run
from util.fileio import atomic_write_image, atomic_write_text

SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ClassSpec:
    name: str
    shape: str
    texture: str                 # solid | stripes | dots | checkers
    c1: tuple[int, int, int]     # RGB: the fill (or texture ground)
    c2: tuple[int, int, int] = (0, 0, 0)  # RGB: stripes / dots / checks


CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec("red disc", "disc", "solid", (215, 35, 35)),
    ClassSpec("green square", "square", "solid", (40, 165, 55)),
    ClassSpec("blue triangle", "triangle", "solid", (35, 65, 215)),
    ClassSpec("yellow star", "star", "solid", (240, 220, 40)),
    ClassSpec("cyan ring", "ring", "solid", (40, 215, 225)),
    ClassSpec("magenta cross", "cross", "solid", (215, 45, 205)),
    ClassSpec("orange ellipse", "ellipse", "solid", (245, 135, 25)),
    ClassSpec("purple diamond", "diamond", "solid", (115, 45, 170)),
    ClassSpec("striped disc", "disc", "stripes", (245, 245, 245), (25, 25, 25)),
    ClassSpec("striped square", "square", "stripes", (245, 215, 40), (30, 40, 130)),
    ClassSpec("dotted triangle", "triangle", "dots", (240, 130, 30), (30, 20, 20)),
    ClassSpec("checkered star", "star", "checkers", (245, 245, 245), (25, 25, 25)),
    ClassSpec("white ring", "ring", "solid", (245, 245, 245)),
    ClassSpec("dark cross", "cross", "solid", (30, 30, 35)),
    ClassSpec("teal ellipse", "ellipse", "solid", (15, 125, 125)),
    ClassSpec("pink diamond", "diamond", "solid", (250, 150, 185)),
    ClassSpec("striped hexagon", "hexagon", "stripes", (220, 30, 30), (245, 245, 245)),
    ClassSpec("checkered disc", "disc", "checkers", (35, 65, 215), (240, 220, 40)),
    ClassSpec("gold hexagon", "hexagon", "solid", (205, 165, 45)),
    ClassSpec("dotted square", "square", "dots", (25, 25, 30), (245, 245, 245)),
)
assert tuple(s.name for s in CLASS_SPECS) == tuple(SYNTHETIC_CLASSES), "class order must match util/classes.py"
NUM_CLASSES = len(CLASS_SPECS)


# --------------------------------------------------------------------------------------
# Shapes: unit-size contours (outer, optional hole) before scale, rotation and translation
# --------------------------------------------------------------------------------------
def _circle(n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _regular(n: int, phase: float = np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _shape_contours(shape: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    if shape == "disc":
        return _circle(), None
    if shape == "ring":
        # a thick ring so it keeps enough pixels for the 2048-px rule
        return _circle(), _circle() * rng.uniform(0.45, 0.6)
    if shape == "ellipse":
        return _circle() * np.array([1.0, rng.uniform(0.45, 0.62)]), None
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), None
    if shape == "triangle":
        return _regular(3), None
    if shape == "hexagon":
        return _regular(6, 0.0), None
    if shape == "diamond":
        # elongated rhombus: a rotated square would otherwise be the same shape
        return np.array([[0, -1], [rng.uniform(0.5, 0.65), 0], [0, 1], [-rng.uniform(0.5, 0.65), 0]]), None
    if shape == "star":
        outer, inner = _regular(5), _regular(5, np.pi / 2 + np.pi / 5) * rng.uniform(0.42, 0.5)
        return np.stack([outer, inner], 1).reshape(-1, 2), None
    if shape == "cross":
        w = rng.uniform(0.3, 0.4)
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                         [-w, w], [-1, w], [-1, -w], [-w, -w]]), None
    raise ValueError(f"unknown shape '{shape}'")


def _poly_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


_SHIFT = 4  # sub-pixel vertex precision for cv2.fillPoly


def _fill(mask: np.ndarray, pts: np.ndarray, value: int) -> None:
    cv2.fillPoly(mask, [np.round(pts * (1 << _SHIFT)).astype(np.int32)], value, cv2.LINE_8, _SHIFT)


# --------------------------------------------------------------------------------------
# Colours and textures (float32 RGB, 0..255)
# --------------------------------------------------------------------------------------
def _jitter(rng: np.random.Generator, rgb, std: float = 10.0) -> np.ndarray:
    # mild per-object shift and brightness, so a class is not one exact pixel colour
    c = (np.asarray(rgb, np.float32) + rng.normal(0, std, 3)) * rng.uniform(0.85, 1.1)
    return np.clip(c, 0, 255).astype(np.float32)


def _muted(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(60, 200)
    return np.clip(grey + rng.normal(0, 16, 3), 0, 255).astype(np.float32)


def _object_texture(rng, spec: ClassSpec, xx, yy, theta: float, scale: float) -> np.ndarray:
    c1 = _jitter(rng, spec.c1)
    shape = xx.shape + (3,)
    if spec.texture == "solid":
        tex = np.broadcast_to(c1, shape).copy()
    else:
        c2 = _jitter(rng, spec.c2)
        # texture axes turn with the object
        a = theta + rng.uniform(-0.3, 0.3)
        u = xx * math.cos(a) + yy * math.sin(a)
        v = -xx * math.sin(a) + yy * math.cos(a)
        if spec.texture == "stripes":
            p = rng.uniform(6, 10)
            m = ((u / p + rng.random()) % 1.0) < 0.5
        elif spec.texture == "dots":
            p = rng.uniform(7, 10)
            du = (u / p + rng.random()) % 1.0 - 0.5
            dv = (v / p + rng.random()) % 1.0 - 0.5
            m = du * du + dv * dv < rng.uniform(0.26, 0.32) ** 2
        elif spec.texture == "checkers":
            p = rng.uniform(5, 8)
            m = (np.floor(u / p + rng.random()) + np.floor(v / p + rng.random())) % 2 == 0
        else:
            raise ValueError(f"unknown texture '{spec.texture}'")
        tex = np.where(m[..., None], c2, c1)
    # soft directional lighting across the object
    g = rng.uniform(-0.15, 0.15)
    b = rng.uniform(0, 2 * np.pi)
    ramp = (xx * math.cos(b) + yy * math.sin(b)) / max(scale, 1.0)
    return tex * (1.0 + g * ramp)[..., None]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = xx * math.cos(a) + yy * math.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c1, c2 = _muted(rng), _muted(rng)
    img = c1 + (c2 - c1) * t[..., None]
    # smooth large-scale blotches
    gh, gw = rng.integers(3, 9, 2)
    low = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
    img += cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(6, 18)
    if rng.random() < 0.5:  # faint stripes, so "striped" alone does not mean object
        b = rng.uniform(0, np.pi)
        u = xx * math.cos(b) + yy * math.sin(b)
        wave = np.sin(2 * np.pi * (u / rng.uniform(8, 30) + rng.random()))
        img += wave[..., None] * rng.uniform(4, 12) * rng.uniform(0.7, 1.0, 3).astype(np.float32)
    for _ in range(rng.integers(0, 5)):  # faint soft blobs
        blob = np.zeros((h, w), np.float32)
        centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = (int(rng.uniform(0.08, 0.3) * w), int(rng.uniform(0.08, 0.3) * h))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), rng.uniform(3, 8))
        img += blob[..., None] * (_muted(rng) - img) * rng.uniform(0.2, 0.45)
    img += rng.normal(0, rng.uniform(2, 6), (h, w, 3)).astype(np.float32)
    return img


# --------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------
def render_image(seed, size: int = 80, band: int = 3,
                 main_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one image from ``seed`` (anything ``np.random.default_rng`` takes).

    Returns (BGR uint8 image, uint8 label): 0 background, 1..20 class ids, 255 band of
    about ``band`` px along every object outline. Sides are drawn in [0.75, 1.25]·size.
    ``main_class`` (0-based) fixes the class of the large object; otherwise uniform.
    """
    rng = np.random.default_rng(seed)
    h, w = (int(round(size * rng.uniform(0.75, 1.25))) for _ in range(2))
    img = _background(rng, h, w)
    inst = np.zeros((h, w), np.uint8)  # 0 background, k = k-th drawn object

    n_obj = int(rng.integers(2, 5))
    if main_class is None:
        main_class = int(rng.integers(NUM_CLASSES))
    others = rng.permutation(np.delete(np.arange(NUM_CLASSES), main_class))
    classes = np.concatenate([[main_class], others[:n_obj - 1]])
    # one large main object, then smaller ones drawn on top of it
    fracs = [rng.uniform(0.14, 0.32)] + sorted(rng.uniform(0.04, 0.15, n_obj - 1), reverse=True)
    for k, (cls, frac) in enumerate(zip(classes, fracs), 1):
        spec = CLASS_SPECS[int(cls)]
        outer, hole = _shape_contours(spec.shape, rng)
        stretch = np.array([1.0, rng.uniform(0.85, 1.0)])
        unit_area = _poly_area(outer * stretch) - (_poly_area(hole * stretch) if hole is not None else 0.0)
        # a ring has two outlines, so it loses about twice the pixels to the 255 band
        scale = math.sqrt(frac * (1.25 if spec.shape == "ring" else 1.0) * h * w / unit_area)
        theta = rng.uniform(0, 2 * np.pi)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        # a few placements; keep the first that hides little of what is already drawn
        for _ in range(6):
            if k == 1:
                cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
            else:
                cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
            centre = np.array([cx, cy])
            mask = np.zeros((h, w), np.uint8)
            _fill(mask, (outer * stretch * scale) @ rot.T + centre, 1)
            if hole is not None:
                _fill(mask, (hole * stretch * scale) @ rot.T + centre, 0)
            area = int(mask.sum())
            if area and np.count_nonzero(mask & (inst > 0)) <= 0.3 * area:
                break
        if not area:
            continue
        ys, xs = np.nonzero(mask)
        y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, h)
        x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, w)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        tex = _object_texture(rng, spec, xx - cx, yy - cy, theta, scale)
        # slightly soft edges in the image; the label stays hard (the band covers the seam)
        alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.float32), (3, 3), 0.6)[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + tex * alpha
        inst[mask > 0] = k

    img += rng.normal(0, rng.uniform(1.5, 4), img.shape).astype(np.float32)
    img_bgr = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)[..., ::-1])

    lut = np.zeros(256, np.uint8)
    lut[1:n_obj + 1] = classes + 1
    label = lut[inst]
    if band > 0:
        # a pixel is on a band where its neighbourhood holds two different instances
        se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (band + 1, band + 1))
        label[cv2.dilate(inst, se) != cv2.erode(inst, se)] = 255
    return img_bgr, label


# --------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------
def image_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def main_class_of(seed: int, split: str, index: int) -> int:
    """Class (0-based) of an image's large object.

    Each block of 20 consecutive images has every class once as its main object, in a
    shuffled order: classes stay exactly balanced even in small splits, yet the class
    still depends on (seed, split, index) alone.
    """
    block, pos = divmod(index, NUM_CLASSES)
    return int(np.random.default_rng((seed, SPLIT_IDS[split], 1 << 20, block)).permutation(NUM_CLASSES)[pos])


def _write_one(task) -> tuple[str, int, np.ndarray]:
    out, split, index, seed, size, band, quality = task
    img, label = render_image((seed, SPLIT_IDS[split], index), size, band, main_class_of(seed, split, index))
    name = image_name(split, index)
    atomic_write_image(os.path.join(out, "JPEGImages", name + ".jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    atomic_write_image(os.path.join(out, "SegmentationClassAug", name + ".png"), label)
    return split, index, np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES + 1]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool is the parallelism; avoid oversubscribing the cores


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/synthetic", help="output folder (the config's data_root)")
    p.add_argument("--train", type=int, default=2000, help="number of training images")
    p.add_argument("--val", type=int, default=500, help="number of evaluation images")
    p.add_argument("--size", type=int, default=80, help="nominal side; each side is drawn in [0.75, 1.25]x this")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (non-negative)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--band", type=int, default=3, help="width in px of the 255 band along outlines (0: none)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--min-class-pixels", type=int, default=512,
                   help="only for the printed statistics: pixels for an image to count for a class (the synthetic configs use 512)")
    args = p.parse_args(argv)
    if args.train < 0 or args.val < 0 or args.train + args.val == 0:
        p.error("--train and --val must be >= 0 and not both 0")
    if args.size < 16:
        p.error("--size must be at least 16")
    if args.seed < 0:
        p.error("--seed must be non-negative")
    if args.band < 0:
        p.error("--band must be >= 0")
    return args


def main(argv=None) -> dict:
    """Generate the dataset; returns {split: (N, 21) per-image class pixel counts}."""
    from tqdm import tqdm

    args = _parse(argv)
    t0 = time.perf_counter()
    out = args.out
    for sub in ("JPEGImages", "SegmentationClassAug"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    sizes = {"train": args.train, "val": args.val}
    tasks = [(out, split, i, args.seed, args.size, args.band, args.quality)
             for split, n in sizes.items() for i in range(n)]
    counts = {split: np.zeros((n, NUM_CLASSES + 1), np.int64) for split, n in sizes.items()}
    workers = max(1, min(args.workers, len(tasks)))
    bar = tqdm(total=len(tasks), desc="synthetic", unit="img", dynamic_ncols=True)
    if workers == 1:
        for task in tasks:
            split, i, c = _write_one(task)
            counts[split][i] = c
            bar.update()
    else:
        import multiprocessing as mp

        with mp.Pool(workers, initializer=_init_worker) as pool:
            for split, i, c in pool.imap_unordered(_write_one, tasks, chunksize=16):
                counts[split][i] = c
                bar.update()
    bar.close()

    for split, n in sizes.items():
        lines = "".join(f"JPEGImages/{image_name(split, i)}.jpg SegmentationClassAug/{image_name(split, i)}.png\n"
                        for i in range(n))
        atomic_write_text(os.path.join(out, f"{split}.txt"), lines)

    written = {image_name(split, i) for split, n in sizes.items() for i in range(n)}
    stale = [f for f in os.listdir(os.path.join(out, "JPEGImages")) if os.path.splitext(f)[0] not in written]
    if stale:
        # left from an earlier, larger run: harmless (the lists decide), but say so
        print(f"note: {len(stale)} image(s) in {out}/JPEGImages are not in the new lists")

    thr = args.min_class_pixels
    print(f"wrote {args.train} train + {args.val} val images to {out} "
          f"in {time.perf_counter() - t0:.1f} s ({workers} worker(s))")
    for split, c in counts.items():
        if len(c) == 0:
            continue
        served = (c[:, 1:] >= thr).sum(1)
        print(f"{split}: {len(c)} images; with >=1 class of >={thr} px: {(served >= 1).mean():.1%}, "
              f">=2: {(served >= 2).mean():.1%}; classes present per image: "
              f"{(c[:, 1:] > 0).sum(1).mean():.2f}")
    print(f"images per class with >= {thr} px:")
    print(f"  {'id':>2} {'class':<16}" + "".join(f" {s:>6}" for s in counts))
    for k, name in enumerate(SYNTHETIC_CLASSES, 1):
        print(f"  {k:>2} {name:<16}" + "".join(f" {int((c[:, k] >= thr).sum()):>6}" for c in counts.values()))
    return counts


if __name__ == "__main__":
    run(main)
