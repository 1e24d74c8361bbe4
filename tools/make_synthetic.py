"""Write the synthetic few-shot segmentation dataset (VOC layout, no download needed).

    python tools/make_synthetic.py --out data/synthetic [--train 2000 --val 500 --size 80]

20 classes (util.classes.SYNTHETIC_CLASSES: label value i+1 is class i), each a shape with a
texture (5 shapes x 4 textures); colours come from a palette all classes share. An image shows
one object of its main class beside 1-3 objects of other classes about as large (distractors,
half of them in the main object's colours) on a textured background with clutter, and a 255
band around every outline as in VOC. Every image comes from its own generator
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
from util.logger import progress

SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ClassSpec:
    name: str
    shape: str
    texture: str                 # solid | stripes | dots | checkers


SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("solid", "stripes", "dots", "checkers")
_ADJECTIVE = {"solid": "solid", "stripes": "striped", "dots": "dotted", "checkers": "checkered"}
# Every (shape, texture) pair is one class. The order is chosen so that every fold of either
# kind (classes 5i+1..5i+5 for images, i+1, i+5, ... for videos) holds out at least 4 shapes
# and 3 textures, while its training classes still show every shape and every texture: a
# held-out class is a new combination of parts the network has seen.
_PAIRS = ((1, 0), (2, 1), (3, 3), (1, 2), (4, 1), (3, 2), (4, 0), (2, 0), (0, 1), (4, 3),
          (0, 0), (3, 1), (2, 2), (0, 3), (4, 2), (0, 2), (1, 3), (3, 0), (1, 1), (2, 3))
CLASS_SPECS: tuple[ClassSpec, ...] = tuple(
    ClassSpec(f"{_ADJECTIVE[TEXTURES[t]]} {SHAPES[s]}", SHAPES[s], TEXTURES[t]) for s, t in _PAIRS)
assert tuple(s.name for s in CLASS_SPECS) == tuple(SYNTHETIC_CLASSES), "class order must match util/classes.py"
NUM_CLASSES = len(CLASS_SPECS)

# Colours belong to no class: every object draws its own from this palette (RGB), so colour
# tells nothing about the class and a distractor may wear exactly the target's colours.
PALETTE = np.array([(215, 35, 35), (40, 165, 55), (35, 65, 215), (240, 220, 40), (40, 215, 225),
                    (215, 45, 205), (245, 135, 25), (245, 245, 245), (30, 30, 35), (115, 45, 170)], np.float32)


def draw_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct palette colours: the fill (or texture ground) and the texture's marks."""
    i, j = rng.choice(len(PALETTE), 2, replace=False)
    return PALETTE[i], PALETTE[j]


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
        # a thick ring so it keeps enough pixels for the class-pixel rule
        return _circle(), _circle() * rng.uniform(0.45, 0.55)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), None
    if shape == "triangle":
        return _regular(3), None
    if shape == "cross":
        w = rng.uniform(0.34, 0.42)
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


def texture_mask(rng, texture: str, xx, yy, theta: float) -> np.ndarray | None:
    """Where a texture's marks are (bool, xx's shape; None for 'solid'). Its axes turn with
    the object; periods are a few pixels, as the network sees them at stride 8."""
    if texture == "solid":
        return None
    a = theta + rng.uniform(-0.3, 0.3)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    if texture == "stripes":
        return ((u / rng.uniform(5, 8) + rng.random()) % 1.0) < 0.5
    if texture == "dots":
        p = rng.uniform(6, 8)
        du = (u / p + rng.random()) % 1.0 - 0.5
        dv = (v / p + rng.random()) % 1.0 - 0.5
        return du * du + dv * dv < rng.uniform(0.27, 0.32) ** 2
    if texture == "checkers":
        p = rng.uniform(4, 6)
        return (np.floor(u / p + rng.random()) + np.floor(v / p + rng.random())) % 2 == 0
    raise ValueError(f"unknown texture '{texture}'")


def _object_texture(rng, texture: str, colours, xx, yy, theta: float, scale: float) -> np.ndarray:
    """The object's pixels (float RGB): ``colours`` (fill, marks) jittered, the texture, a
    soft directional light."""
    c1 = _jitter(rng, colours[0])
    marks = texture_mask(rng, texture, xx, yy, theta)
    if marks is None:
        tex = np.broadcast_to(c1, xx.shape + (3,)).copy()
    else:
        tex = np.where(marks[..., None], _jitter(rng, colours[1]), c1)
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


def _blob(rng: np.random.Generator, n: int = 48) -> np.ndarray:
    """A smooth irregular closed outline (unit size) that is none of the class shapes."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1.0 + sum(rng.uniform(0.1, 0.3) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.stack([np.cos(t), np.sin(t)], 1) * r[:, None] / r.max()


def add_clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Background clutter (label 0) in the objects' palette and textures: irregular blobs and
    thick strokes, smaller than the objects. A network must tell objects by their shape and
    texture together, not by being colourful or textured."""
    h, w = img.shape[:2]
    for _ in range(count):
        colours = draw_colours(rng)
        mask = np.zeros((h, w), np.uint8)
        if rng.random() < 0.5:
            scale = math.sqrt(rng.uniform(0.01, 0.04) * h * w / np.pi)
            _fill(mask, _blob(rng) * scale + [rng.uniform(0, w), rng.uniform(0, h)], 1)
        else:
            p0 = np.array([rng.uniform(0, w), rng.uniform(0, h)])
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5) * min(h, w)
            p1 = p0 + length * np.array([math.cos(angle), math.sin(angle)])
            cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, int(rng.integers(2, 5)))
        if not mask.any():
            continue
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        tex = _object_texture(rng, TEXTURES[int(rng.integers(len(TEXTURES)))], colours, xx, yy,
                              rng.uniform(0, 2 * np.pi), 10.0)
        alpha = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.6)[..., None] * rng.uniform(0.7, 1.0)
        img[:] = img * (1 - alpha) + tex * alpha


# --------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------
def render_image(seed, size: int = 80, band: int = 3,
                 main_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one image from ``seed`` (anything ``np.random.default_rng`` takes).

    Returns (BGR uint8 image, uint8 label): 0 background, 1..20 class ids, 255 band of
    about ``band`` px along every object outline. Sides are drawn in [0.75, 1.25]·size.
    ``main_class`` (0-based) fixes the class of the first, largest object; otherwise uniform.
    It shares the image with 1-3 objects of other classes about as large (distractors), half of
    them in its own colours, over a textured background with clutter.
    """
    rng = np.random.default_rng(seed)
    h, w = (int(round(size * rng.uniform(0.75, 1.25))) for _ in range(2))
    img = _background(rng, h, w)
    add_clutter(rng, img, int(rng.integers(3, 8)))
    inst = np.zeros((h, w), np.uint8)  # 0 background, k = k-th drawn object

    n_obj = int(rng.choice([2, 3, 4], p=[0.2, 0.4, 0.4]))
    if main_class is None:
        main_class = int(rng.integers(NUM_CLASSES))
    others = rng.permutation(np.delete(np.arange(NUM_CLASSES), main_class))
    classes = np.concatenate([[main_class], others[:n_obj - 1]])
    main_colours = draw_colours(rng)
    fracs = [rng.uniform(0.12, 0.24)] + sorted(rng.uniform(0.06, 0.15, n_obj - 1), reverse=True)
    order = [0] + list(rng.permutation(np.arange(1, n_obj)))     # distractors may lie on top
    for k, obj in enumerate(order, 1):
        cls, frac = int(classes[obj]), fracs[obj]
        spec = CLASS_SPECS[cls]
        colours = main_colours if obj == 0 or rng.random() < 0.5 else draw_colours(rng)
        outer, hole = _shape_contours(spec.shape, rng)
        stretch = np.array([1.0, rng.uniform(0.85, 1.0)])
        unit_area = _poly_area(outer * stretch) - (_poly_area(hole * stretch) if hole is not None else 0.0)
        # a ring has two outlines, so it loses about twice the pixels to the 255 band
        scale = math.sqrt(frac * (1.25 if spec.shape == "ring" else 1.0) * h * w / unit_area)
        theta = rng.uniform(0, 2 * np.pi)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        # a few placements; keep the first that hides little of what is already drawn
        for _ in range(8):
            cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
            centre = np.array([cx, cy])
            mask = np.zeros((h, w), np.uint8)
            _fill(mask, (outer * stretch * scale) @ rot.T + centre, 1)
            if hole is not None:
                _fill(mask, (hole * stretch * scale) @ rot.T + centre, 0)
            area = int(mask.sum())
            if area and np.count_nonzero(mask & (inst > 0)) <= 0.15 * area:
                break
        if not area:
            continue
        ys, xs = np.nonzero(mask)
        y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, h)
        x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, w)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        tex = _object_texture(rng, spec.texture, colours, xx - cx, yy - cy, theta, scale)
        # slightly soft edges in the image; the label stays hard (the band covers the seam)
        alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.float32), (3, 3), 0.6)[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + tex * alpha
        inst[mask > 0] = k

    img += rng.normal(0, rng.uniform(1.5, 4), img.shape).astype(np.float32)
    img_bgr = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)[..., ::-1])

    lut = np.zeros(256, np.uint8)
    lut[1:n_obj + 1] = classes[order] + 1
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
    if workers == 1:
        for split, i, c in progress(map(_write_one, tasks), total=len(tasks), desc="synthetic", unit="img"):
            counts[split][i] = c
    else:
        import multiprocessing as mp

        with mp.Pool(workers, initializer=_init_worker) as pool:
            for split, i, c in progress(pool.imap_unordered(_write_one, tasks, chunksize=16), total=len(tasks),
                                        desc="synthetic", unit="img"):
                counts[split][i] = c

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
    width = max(len(name) for name in SYNTHETIC_CLASSES)       # 'checkered triangle' is 18
    print(f"  {'id':>2} {'class':<{width}}" + "".join(f" {s:>6}" for s in counts))
    for k, name in enumerate(SYNTHETIC_CLASSES, 1):
        print(f"  {k:>2} {name:<{width}}" + "".join(f" {int((c[:, k] >= thr).sum()):>6}" for c in counts.values()))
    return counts


if __name__ == "__main__":
    run(main)
