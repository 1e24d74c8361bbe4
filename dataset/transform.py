"""Image/label transforms of the PFENet family, driven by an explicit random generator.

Each transform is called as ``t(image, label, rng)`` with ``image`` an H×W×3 float32 RGB
array on the 0–255 scale, ``label`` an H×W uint8 array, and ``rng`` a
``numpy.random.Generator``; nothing here touches a global random state, so an episode's
augmentation is fixed by the generator it is given.
"""
from __future__ import annotations

import numpy as np
import cv2
import torch
import torch.nn.functional as F
from PIL import Image

from util.config import HSNET_SIZE, PROTOCOLS
# ImageNet statistics on the 0–255 scale (RGB).
from util.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label, rng=None):
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label


class RandScale:
    """Resize by one factor drawn uniformly from ``[scale_min, scale_max]`` (aspect kept)."""

    def __init__(self, scale_min: float, scale_max: float):
        self.scale_min, self.scale_max = scale_min, scale_max

    def __call__(self, image, label, rng):
        s = rng.uniform(self.scale_min, self.scale_max)
        image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
        return image, label


class RandRotate:
    """With probability ``p`` rotate by an angle from ``[rotate_min, rotate_max]`` degrees.

    The image is padded with ``padding`` (the image mean), the label with ``ignore_label``.
    """

    def __init__(self, rotate_min, rotate_max, padding=IMAGENET_MEAN, ignore_label=255, p=0.5):
        self.rotate_min, self.rotate_max = rotate_min, rotate_max
        self.padding, self.ignore_label, self.p = tuple(padding), ignore_label, p

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            angle = rng.uniform(self.rotate_min, self.rotate_max)
            h, w = label.shape
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
            image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=self.padding)
            label = cv2.warpAffine(label, matrix, (w, h), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=self.ignore_label)
        return image, label


class RandomGaussianBlur:
    """With probability ``p`` blur the image with a 5×5 Gaussian kernel (label untouched)."""

    def __init__(self, radius: int = 5, p: float = 0.5):
        self.radius, self.p = radius, p

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            image = cv2.GaussianBlur(image, (self.radius, self.radius), 0)
        return image, label


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            image = np.ascontiguousarray(image[:, ::-1])
            label = np.ascontiguousarray(label[:, ::-1])
        return image, label


class RandomCrop:
    """Pad (centred, image with ``padding``, label with ``ignore_label``) up to the crop
    size where needed, then crop ``crop_h × crop_w`` at a random position."""

    def __init__(self, crop_h, crop_w, padding=IMAGENET_MEAN, ignore_label=255):
        self.crop_h, self.crop_w = crop_h, crop_w
        self.padding, self.ignore_label = tuple(padding), ignore_label

    def __call__(self, image, label, rng):
        h, w = label.shape
        pad_h, pad_w = max(self.crop_h - h, 0), max(self.crop_w - w, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            image = cv2.copyMakeBorder(image, top, pad_h - top, left, pad_w - left,
                                       cv2.BORDER_CONSTANT, value=self.padding)
            label = cv2.copyMakeBorder(label, top, pad_h - top, left, pad_w - left,
                                       cv2.BORDER_CONSTANT, value=self.ignore_label)
            h, w = label.shape
        y = int(rng.integers(0, h - self.crop_h + 1))
        x = int(rng.integers(0, w - self.crop_w + 1))
        return image[y:y + self.crop_h, x:x + self.crop_w], label[y:y + self.crop_h, x:x + self.crop_w]


def hue_rotation_matrix(degrees: float) -> np.ndarray:
    """3×3 matrix turning RGB colours by ``degrees`` about the grey axis (1, 1, 1): a hue
    rotation that leaves greys, and each colour's mean of R, G and B, unchanged."""
    t = np.deg2rad(degrees)
    k = np.full((3, 3), 1.0 / 3.0)
    cross = np.array([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / np.sqrt(3.0)
    return (np.cos(t) * np.eye(3) + np.sin(t) * cross + (1.0 - np.cos(t)) * k).astype(np.float32)


def hue_rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """``image`` (H×W×3 float RGB, 0–255) with every colour's hue turned by ``degrees``."""
    if degrees == 0:
        return image
    out = np.asarray(image, np.float32).reshape(-1, 3) @ hue_rotation_matrix(degrees).T
    return np.clip(out, 0.0, 255.0).reshape(image.shape)


def eval_resized_hw(h: int, w: int, val_size: int) -> tuple[int, int]:
    """Size after the evaluation resize: longer side to ``val_size``, each side floored to a
    multiple of 8 (PFENet's rule; 473 itself becomes 472)."""
    if h >= w:
        new_h, new_w = val_size, int(w * val_size / h)
    else:
        new_h, new_w = int(h * val_size / w), val_size
    return max(8, new_h // 8 * 8), max(8, new_w // 8 * 8)


class EvalResize:
    """Resize so the longer side is ``val_size`` (sides floored to multiples of 8) and paste
    top-left on a ``val_size²`` canvas: image 0 (before normalisation), label ``ignore_label``."""

    def __init__(self, val_size: int, ignore_label: int = 255):
        self.val_size, self.ignore_label = val_size, ignore_label

    def __call__(self, image, label, rng=None):
        h, w = label.shape
        new_h, new_w = eval_resized_hw(h, w, self.val_size)
        canvas = np.zeros((self.val_size, self.val_size, 3), np.float32)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        label_canvas = np.full((self.val_size, self.val_size), self.ignore_label, np.uint8)
        label_canvas[:new_h, :new_w] = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        return canvas, label_canvas


class ToTensorNormalize:
    """H×W×3 float array → 3×H×W tensor normalised with ImageNet mean/std; label → long."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = np.asarray(mean, np.float32)
        self.inv_std = 1.0 / np.asarray(std, np.float32)

    def __call__(self, image, label, rng=None):
        image = (np.asarray(image, np.float32) - self.mean) * self.inv_std
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(label)).long())


class SquareResize:
    """HSNet's evaluation resize: the image to ``size × size`` bilinearly as torchvision's
    ``Resize`` does it on a PIL image (PIL bilinear, antialiased when shrinking), the label
    to ``size × size`` with ``torch.nn.functional.interpolate(mode='nearest')`` (ignore
    values kept)."""

    def __init__(self, size: int = HSNET_SIZE):
        self.size = size

    def __call__(self, image, label, rng=None):
        pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        image = np.asarray(pil.resize((self.size, self.size), Image.BILINEAR), np.float32)
        lab = torch.from_numpy(np.ascontiguousarray(label))[None, None].float()
        label = F.interpolate(lab, size=(self.size, self.size), mode="nearest")[0, 0].to(torch.uint8).numpy()
        return image, label


def train_transform(cfg) -> Compose:
    """The training augmentation of docs/method.md §8, from config keys."""
    return Compose([
        RandScale(cfg.scale_min, cfg.scale_max),
        RandRotate(cfg.rotate_min, cfg.rotate_max, IMAGENET_MEAN, cfg.ignore_label, p=cfg.rotate_p),
        RandomGaussianBlur(5, p=cfg.blur_p),
        RandomHorizontalFlip(p=cfg.flip_p),
        RandomCrop(cfg.train_h, cfg.train_w, IMAGENET_MEAN, cfg.ignore_label),
        ToTensorNormalize(),
    ])


def protocol_transform(protocol: str, size: int, ignore_label: int = 255) -> Compose:
    """The evaluation preprocessing of a scoring protocol (docs/data.md): ``pfenet`` pastes the
    image, longer side resized to ``size``, on a ``size²`` canvas (:class:`EvalResize`);
    ``hsnet`` resizes image and label to ``size × size`` (:class:`SquareResize`)."""
    if protocol == "pfenet":
        return Compose([EvalResize(size, ignore_label), ToTensorNormalize()])
    if protocol == "hsnet":
        return Compose([SquareResize(size), ToTensorNormalize()])
    raise ValueError(f"unknown evaluation protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")


def eval_transform(cfg) -> Compose:
    """PFENet's evaluation preprocessing at ``val_size`` (the pfenet protocol, and predict.py's)."""
    return protocol_transform("pfenet", cfg.val_size, cfg.ignore_label)
