"""Pictures of what the model does: one panel per episode.

A panel is a row of tiles — each support with its mask outline, the query, the ground
truth, the prediction, the mined background (BG probability as a heat map) and the mined
distracting-object (DO) mask — under a title with the class name and the episode IoU.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from util.fileio import atomic_write
from util.transform import IMAGENET_MEAN, IMAGENET_STD

TILE = 160
TITLE_H = 22
FG_COLOUR = (255, 64, 64)     # RGB
DO_COLOUR = (255, 0, 255)
OUTLINE_COLOUR = (0, 255, 0)


def denormalize(img: torch.Tensor) -> np.ndarray:
    """3×H×W normalised tensor → H×W×3 uint8 RGB."""
    arr = img.detach().float().cpu().numpy().transpose(1, 2, 0)
    arr = arr * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def tint(image: np.ndarray, mask: np.ndarray, colour=FG_COLOUR, alpha: float = 0.5) -> np.ndarray:
    """``image`` with pixels where ``mask == 1`` blended towards ``colour``."""
    out = image.astype(np.float32)
    sel = mask == 1
    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray, colour=OUTLINE_COLOUR, thickness: int = 2) -> np.ndarray:
    contours, _ = cv2.findContours((mask == 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image.copy())
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def heatmap(prob: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] as an RGB heat map."""
    grey = np.clip(prob * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def _fit(tile: np.ndarray, size: int = TILE) -> np.ndarray:
    h, w = tile.shape[:2]
    scale = size / max(h, w)
    resized = cv2.resize(tile, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_NEAREST)
    canvas = np.full((size, size, 3), 255, np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return canvas


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    out = tile.copy()
    cv2.rectangle(out, (0, 0), (len(text) * 7 + 6, 14), (0, 0, 0), -1)
    cv2.putText(out, text, (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _as_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def panel_image(sample: dict, tile: int = TILE) -> np.ndarray:
    """Render one episode (the dict evaluate() keeps per sample) as an H×W×3 uint8 RGB array.

    Keys: ``support_imgs`` K×3×H×W, ``support_masks`` K×H×W, ``query_img`` 3×H×W, ``pred``
    H×W (0/1); optional ``query_mask`` (ground truth, 0/1/255), ``bg_map`` (BG probability
    H×W), ``do_mask`` (H×W 0/1), ``class_name``, ``iou`` (percent).
    """
    tiles = []
    for k, (img, mask) in enumerate(zip(sample["support_imgs"], sample["support_masks"])):
        tiles.append(_label(_fit(outline(denormalize(img), _as_np(mask)), tile), f"support {k + 1}"))
    query = denormalize(sample["query_img"])
    tiles.append(_label(_fit(query, tile), "query"))
    if sample.get("query_mask") is not None:
        gt = _as_np(sample["query_mask"])
        tiles.append(_label(_fit(tint(query, gt), tile), "ground truth"))
    tiles.append(_label(_fit(tint(query, _as_np(sample["pred"])), tile), "prediction"))
    if sample.get("bg_map") is not None:
        blend = (0.5 * query + 0.5 * heatmap(_as_np(sample["bg_map"]))).astype(np.uint8)
        tiles.append(_label(_fit(blend, tile), "mined BG"))
    if sample.get("do_mask") is not None:
        tiles.append(_label(_fit(tint(query, _as_np(sample["do_mask"]), DO_COLOUR), tile), "mined DO"))
    row = np.concatenate(tiles, axis=1)
    title = np.full((TITLE_H, row.shape[1], 3), 255, np.uint8)
    text = str(sample.get("class_name", ""))
    if sample.get("iou") is not None:
        text += f"   IoU {sample['iou']:.1f}"
    cv2.putText(title, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([title, row], axis=0)


def save_panel(path: str, sample: dict, tile: int = TILE) -> np.ndarray:
    """Render and write a panel PNG atomically; returns the RGB array."""
    image = panel_image(sample, tile)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    atomic_write(path, lambda tmp: cv2.imwrite(tmp, bgr))
    return image
