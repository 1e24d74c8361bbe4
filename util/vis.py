"""Pictures of what the model does: one panel per episode.

A panel is a row of tiles — each support with its mask outline, the query, the ground
truth, the prediction, the mined background (BG probability as a heat map) and the mined
distracting-object (DO) mask — under a title with the class name and the episode IoU.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from util.fileio import atomic_write_image
from util.imagenet import IMAGENET_MEAN, IMAGENET_STD

TILE = 160                    # side of one square tile, in pixels
TITLE_H = 22                  # height of the title band above the tiles
TILE_GAP = 2                  # white margin at each tile's right and bottom, so tiles read apart
FG_COLOUR = (255, 64, 64)     # RGB
DO_COLOUR = (255, 0, 255)
OUTLINE_COLOUR = (0, 255, 0)


def denormalize(img: torch.Tensor) -> np.ndarray:
    """3×H×W normalised tensor → H×W×3 uint8 RGB."""
    arr = img.detach().float().cpu().numpy().transpose(1, 2, 0)
    arr = arr * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def to_rgb(img) -> np.ndarray:
    """A panel image: a normalised 3×H×W tensor (what evaluation keeps) or an H×W×3 uint8
    RGB array (what the predictor keeps, at the original size)."""
    if isinstance(img, torch.Tensor):
        return denormalize(img)
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"panel images are 3×H×W normalised tensors or H×W×3 uint8 RGB arrays; "
                         f"got {arr.dtype} array of shape {arr.shape}")
    return arr


def tint(image: np.ndarray, mask: np.ndarray, colour=FG_COLOUR, alpha: float = 0.5) -> np.ndarray:
    """``image`` with pixels where ``mask == 1`` blended towards ``colour``."""
    out = image.astype(np.float32)
    sel = mask == 1
    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray, colour=OUTLINE_COLOUR, thickness: int = 2) -> np.ndarray:
    """``image`` with the outline of ``mask == 1`` drawn on it."""
    contours, _ = cv2.findContours((mask == 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image.copy())
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def heatmap(prob: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] as an RGB heat map."""
    grey = np.clip(prob * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, mask: np.ndarray, colour=FG_COLOUR, alpha: float = 0.5) -> np.ndarray:
    """The prediction as users see it: ``mask`` tinted on the image, with its outline."""
    thickness = max(1, round(max(image.shape[:2]) / 250))
    return outline(tint(image, mask, colour, alpha), mask, colour, thickness)


def result_views(image: np.ndarray, pred: np.ndarray, bg_map=None, do_mask=None,
                 prior=None) -> list[tuple[str, np.ndarray]]:
    """What the network returns for one image, as (name, RGB picture at the image's size): the
    prediction overlaid, then those of the mined BG (heat map blended), the mined DO (tinted)
    and the prior (heat map blended) that are given."""
    views = [("prediction", overlay(image, pred))]
    if bg_map is not None:
        views.append(("mined BG", (0.5 * image + 0.5 * heatmap(bg_map)).astype(np.uint8)))
    if do_mask is not None:
        views.append(("mined DO", tint(image, do_mask, DO_COLOUR)))
    if prior is not None:
        views.append(("prior", (0.5 * image + 0.5 * heatmap(prior)).astype(np.uint8)))
    return views


def _fit(tile: np.ndarray, size: int = TILE) -> np.ndarray:
    """``tile`` scaled to fit a size×size white square (less the gap), top-left."""
    h, w = tile.shape[:2]
    scale = (size - TILE_GAP) / max(h, w)
    # area averaging keeps large photos readable when shrunk; nearest keeps small masks crisp
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    resized = cv2.resize(tile, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interpolation)
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


def canvas_extent(label: np.ndarray, ignore_label: int = 255) -> tuple[int, int]:
    """Height and width of the image on an evaluation canvas. EvalResize pastes the resized
    image top-left and fills the label's remainder with ignore, so the rows and columns past
    the last one holding a non-ignore pixel are padding the network saw but nobody scores
    (all-ignore rows at the image's own bottom edge go with them; they are not scored either)."""
    valid = label != ignore_label
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return label.shape[0], label.shape[1]
    return int(rows[-1]) + 1, int(cols[-1]) + 1


def panel_image(sample: dict, tile: int = TILE) -> np.ndarray:
    """Render one episode (the dict evaluate() keeps per sample) as an H×W×3 uint8 RGB array.

    Keys: ``support_imgs`` (K normalised 3×H×W tensors or H×W×3 uint8 RGB arrays; supports
    may differ in size), ``support_masks`` (K H×W), ``query_img``, ``pred`` H×W (0/1), all
    maps at the query image's size; optional ``query_mask`` (ground truth, 0/1/255),
    ``bg_map`` (BG probability H×W), ``do_mask`` (H×W 0/1), ``prior`` (H×W in [0, 1]),
    ``class_name``, ``iou`` (percent).
    The panel is ``TITLE_H + tile`` high and ``tile`` wide per tile: one per support, the
    query, the prediction, and one each for the ground truth, BG map, DO mask and prior if given.
    Tensor images are evaluation canvases: each is cropped to the image on it (its label's
    extent, :func:`canvas_extent`), so the padding does not show.
    """
    tiles = []
    for k, (img, mask) in enumerate(zip(sample["support_imgs"], sample["support_masks"])):
        mask = _as_np(mask)
        if isinstance(img, torch.Tensor):
            h, w = canvas_extent(mask)
            img, mask = img[:, :h, :w], mask[:h, :w]
        tiles.append(_label(_fit(outline(to_rgb(img), mask), tile), f"support {k + 1}"))
    query_img = sample["query_img"]
    gt = _as_np(sample["query_mask"]) if sample.get("query_mask") is not None else None
    if isinstance(query_img, torch.Tensor):
        h, w = canvas_extent(gt) if gt is not None else tuple(query_img.shape[-2:])
        query = to_rgb(query_img[:, :h, :w])
    else:
        query = to_rgb(query_img)
        h, w = query.shape[:2]

    def crop(x):
        return _as_np(x)[:h, :w]
    tiles.append(_label(_fit(query, tile), "query"))
    if gt is not None:
        tiles.append(_label(_fit(overlay(query, crop(gt)), tile), "ground truth"))
    maps = {key: crop(sample[key]) if sample.get(key) is not None else None
            for key in ("pred", "bg_map", "do_mask", "prior")}
    tiles += [_label(_fit(view, tile), name) for name, view in
              result_views(query, maps["pred"], maps["bg_map"], maps["do_mask"], maps["prior"])]
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
    # full compression: a third of OpenCV's default size, for a few ms more
    atomic_write_image(path, bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return image


def video_strip_image(sample: dict, tile: int = TILE) -> np.ndarray:
    """Render one video chunk (what the video scorer (engine/tasks/video.py) keeps per sample) as an RGB array.

    Keys: ``query_imgs`` (T normalised 3×H×W canvases or H×W×3 uint8 RGB frames), ``pred``
    (T×H×W 0/1), ``bg_map`` (T×H×W BG probability), ``do_mask`` (T×H×W 0/1),
    ``support_imgs`` / ``support_masks`` (K of each, images as the frames); optional
    ``query_masks`` (T×H×W ground truth, outlined), ``scored`` (T flags; unscored frames, the
    padding of short videos or frames an earlier chunk scored, are marked), ``frame_names``,
    ``class_name``, ``video``. Rows, one tile per frame: the supports (mask outlined); the
    frames with the prediction tinted and the ground truth outlined; the mined BG as a heat
    map; the mined DO.
    """
    frames = [to_rgb(img) for img in sample["query_imgs"]]
    scored = _as_np(sample.get("scored", np.ones(len(frames), bool))).tolist()
    truth = sample.get("query_masks")
    truth = [None] * len(frames) if truth is None else [_as_np(y) for y in truth]
    names = sample.get("frame_names") or [f"frame {t + 1}" for t in range(len(frames))]
    supports = [_fit(outline(to_rgb(img), _as_np(m)), tile) for img, m in
                zip(sample["support_imgs"], sample["support_masks"])]
    rows = {
        "support": [_label(t, f"support {k + 1}") for k, t in enumerate(supports)],
        "prediction": [_label(_fit(tint(f, _as_np(p)) if y is None else outline(tint(f, _as_np(p)), y), tile),
                              name + ("" if on else " (not scored)"))
                       for f, p, y, on, name in zip(frames, sample["pred"], truth, scored, names)],
        "mined BG": [_label(_fit((0.5 * f + 0.5 * heatmap(_as_np(b))).astype(np.uint8), tile), "mined BG")
                     for f, b in zip(frames, sample["bg_map"])],
        "mined DO": [_label(_fit(tint(f, _as_np(d), DO_COLOUR), tile), "mined DO")
                     for f, d in zip(frames, sample["do_mask"])],
    }
    width = max(len(r) for r in rows.values()) * tile
    blank = np.full((tile, tile, 3), 255, np.uint8)
    body = [_trim_height(np.concatenate(r + [blank] * ((width // tile) - len(r)), axis=1)) for r in rows.values()]
    title = np.full((TITLE_H, width, 3), 255, np.uint8)
    key = "red: prediction" + (", green: ground truth" if truth[0] is not None else "")
    text = f"{sample.get('class_name', '')}   {sample.get('video', '')}   ({key})"
    cv2.putText(title, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([title] + body, axis=0)


def _trim_height(row: np.ndarray) -> np.ndarray:
    """A row of tiles without the white band below its content (wide frames fill a square
    tile's top only)."""
    used = np.flatnonzero((row != 255).any(axis=(1, 2)))
    return row[:int(used[-1]) + 1 + TILE_GAP] if used.size else row


def save_video_strip(path: str, sample: dict, tile: int = TILE) -> np.ndarray:
    """Render and write a video strip PNG atomically; returns the RGB array."""
    image = video_strip_image(sample, tile)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    atomic_write_image(path, bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return image
