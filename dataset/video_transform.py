"""Frame transforms of the video task: the letterbox and the clip augmentation.

Every frame goes onto a ``video_h × video_w`` canvas (241×425 by default) by a *letterbox*:
an aspect-preserving resize by ``min(H/h, W/w)`` (sides truncated to integers), centred,
the rest zero — black image (before normalisation), background mask. Training clips get
one augmentation drawn per clip and applied identically to each of its frames
(:class:`ClipAugment`); the geometric part and the letterbox are one affine map, so each
frame is warped once. Evaluation frames are letterboxed only. Like dataset/transform.py,
randomness comes only from the generator passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from dataset.transform import ToTensorNormalize

# The reference's clip augmentation (clip-NTRENet++ / DANet transform.py): imgaug Crop of
# 0-10% per side (size kept), Affine scale 0.95-1.05, shear +-10 deg, rotate +-15 deg;
# contrast x U(0.97, 1.03); one brightness offset U(-5, 5) (the reference's "AdditiveNoise").
CROP_MAX = 0.1
SCALE_RANGE = (0.95, 1.05)
SHEAR_DEG = 10.0
ROTATE_DEG = 15.0
CONTRAST_RANGE = (0.97, 1.03)
BRIGHTNESS = 5.0


@dataclass(frozen=True)
class Letterbox:
    """Where a ``height × width`` frame lands on the canvas: resized to ``new_h × new_w``,
    pasted at (``top``, ``left``)."""
    height: int
    width: int
    new_h: int
    new_w: int
    top: int
    left: int


def letterbox_geometry(height: int, width: int, canvas_h: int, canvas_w: int) -> Letterbox:
    factor = min(canvas_h / height, canvas_w / width)
    # the reference truncates; the epsilon keeps an exact fit (e.g. 1280 -> 425) from flooring to 424
    new_h = min(canvas_h, max(1, int(factor * height + 1e-6)))
    new_w = min(canvas_w, max(1, int(factor * width + 1e-6)))
    return Letterbox(height, width, new_h, new_w, (canvas_h - new_h) // 2, (canvas_w - new_w) // 2)


def letterbox(image: np.ndarray, mask: np.ndarray, canvas_h: int, canvas_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (H×W×3 float32) and 0/1 mask (H×W uint8) on the canvas; padding 0 in both."""
    g = letterbox_geometry(*mask.shape, canvas_h, canvas_w)
    canvas = np.zeros((canvas_h, canvas_w, 3), np.float32)
    canvas[g.top:g.top + g.new_h, g.left:g.left + g.new_w] = cv2.resize(
        image, (g.new_w, g.new_h), interpolation=cv2.INTER_LINEAR)
    mask_canvas = np.zeros((canvas_h, canvas_w), np.uint8)
    mask_canvas[g.top:g.top + g.new_h, g.left:g.left + g.new_w] = cv2.resize(
        mask, (g.new_w, g.new_h), interpolation=cv2.INTER_NEAREST)
    return canvas, mask_canvas


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _scale(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


@dataclass(frozen=True)
class ClipParams:
    """One draw of the clip augmentation (shared by every frame it is applied to)."""
    flip: bool
    crop: tuple[float, float, float, float]    # fractions cut from left, top, right, bottom
    scale: float
    shear_deg: float
    rotate_deg: float
    contrast: float
    brightness: float


class ClipAugment:
    """The training augmentation of a clip: portrait frames (H > W) transposed, then one
    drawn crop + scale/shear/rotation about the centre + horizontal flip, composed with the
    letterbox into a single affine warp, and one contrast and brightness change (before the
    warp). Regions the warp uncovers are black and background, and nothing is drawn in the
    letterbox padding, so the padding stays exactly zero."""

    def __init__(self, canvas_h: int, canvas_w: int, flip_p: float = 0.5):
        self.canvas_h, self.canvas_w, self.flip_p = canvas_h, canvas_w, flip_p

    def draw(self, rng: np.random.Generator) -> ClipParams:
        return ClipParams(
            flip=bool(rng.random() < self.flip_p),
            crop=tuple(float(v) for v in rng.uniform(0.0, CROP_MAX, 4)),
            scale=float(rng.uniform(*SCALE_RANGE)),
            shear_deg=float(rng.uniform(-SHEAR_DEG, SHEAR_DEG)),
            rotate_deg=float(rng.uniform(-ROTATE_DEG, ROTATE_DEG)),
            contrast=float(rng.uniform(*CONTRAST_RANGE)),
            brightness=float(rng.uniform(-BRIGHTNESS, BRIGHTNESS)),
        )

    def matrix(self, p: ClipParams, height: int, width: int) -> np.ndarray:
        """2×3 map from (already transposed) frame pixels to canvas pixels."""
        h, w = height, width
        l, t, r, b = p.crop
        x0, y0, x1, y1 = l * w, t * h, w * (1 - r), h * (1 - b)
        # pixel centres: a resize by s maps x to (x + 0.5) * s - 0.5
        crop = _translate(-0.5, -0.5) @ _scale(w / (x1 - x0), h / (y1 - y0)) @ _translate(0.5 - x0, 0.5 - y0)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        a, s = math.radians(p.rotate_deg), math.radians(p.shear_deg)
        rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        shear = np.array([[1, math.tan(s), 0], [0, 1, 0], [0, 0, 1]])
        affine = _translate(cx, cy) @ rot @ shear @ _scale(p.scale, p.scale) @ _translate(-cx, -cy)
        flip = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]], np.float64) if p.flip else np.eye(3)
        g = letterbox_geometry(h, w, self.canvas_h, self.canvas_w)
        box = (_translate(g.left, g.top) @ _translate(-0.5, -0.5) @ _scale(g.new_w / w, g.new_h / h)
               @ _translate(0.5, 0.5))
        return (box @ flip @ affine @ crop)[:2]

    def apply(self, p: ClipParams, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if mask.shape[0] > mask.shape[1]:            # portrait: transposed, as the reference does
            image, mask = image.transpose(1, 0, 2), mask.T
        m = self.matrix(p, *mask.shape)
        g = letterbox_geometry(*mask.shape, self.canvas_h, self.canvas_w)
        image = np.clip(image * p.contrast + p.brightness, 0, 255).astype(np.float32)
        size = (self.canvas_w, self.canvas_h)
        image = cv2.warpAffine(np.ascontiguousarray(image), m, size, flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        mask = cv2.warpAffine(np.ascontiguousarray(mask), m, size, flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        # what the rotation carries beyond the frame stays out of the padding (the reference's
        # affine output has the frame's size)
        inside = np.zeros(mask.shape, bool)
        inside[g.top:g.top + g.new_h, g.left:g.left + g.new_w] = True
        image[~inside] = 0
        mask[~inside] = 0
        return image, mask


_to_tensor = ToTensorNormalize()


def frames_to_tensors(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Canvas (image, mask) pairs → (N×3×H×W normalised float32, N×H×W int64)."""
    tensors = [_to_tensor(image, mask) for image, mask in pairs]
    return torch.stack([i for i, _ in tensors]), torch.stack([m for _, m in tensors])
