"""Segment your own video from a few annotated frames: the code behind predict.py for a
video checkpoint (a config with ``dataset: ytvis`` or ``synthetic_video``).

    predictor = VideoPredictor.from_checkpoint(cfg, "exp/ytvis/split0_resnet50/model/best.pth")
    frames = read_video("clip.mp4")                 # or read_frames("frames_folder/")
    result = predictor.predict(supports, frames)    # supports: (image, mask) pairs
    result.masks[t]                                 # H×W uint8 0/1 at the frame's size

Frames and supports go through the evaluation preprocessing (letterbox onto the
``video_h × video_w`` canvas, ImageNet normalisation); the query passes in chunks of
``clip_len`` frames exactly as evaluation does (dataset.video.chunk_spans: every frame
predicted once, the last chunk the video's last T frames, short videos padded); each
prediction is cropped to the letterboxed frame and resized back to the frame's size.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engine.checkpoint import build_model_from_checkpoint
from engine.predictor import read_supports, resolve_device
from util.amp import autocast, to_device
from util.errors import PredictInputError, unreadable_image
from util.fileio import atomic_path, atomic_write_image
from dataset.video import chunk_spans
from dataset.video_transform import frames_to_tensors, letterbox, letterbox_geometry
from util.vis import overlay, video_strip_image

log = logging.getLogger("ntrenetpp")

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_frames(folder: str) -> tuple[list[np.ndarray], list[str]]:
    """The images of ``folder`` in name order, as RGB uint8 arrays, with their stems."""
    if not os.path.isdir(folder):
        raise PredictInputError(f"query '{folder}' is neither a folder of frames nor a video file OpenCV can read")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS))
    if not names:
        raise PredictInputError(f"folder '{folder}' holds no frames ({', '.join(FRAME_EXTENSIONS)} files)")
    frames = []
    for name in names:
        image = cv2.imread(os.path.join(folder, name), cv2.IMREAD_COLOR)
        if image is None:
            raise PredictInputError(unreadable_image("frame", os.path.join(folder, name)))
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    if len({f.shape for f in frames}) > 1:
        raise PredictInputError(f"the frames of '{folder}' differ in size; a video's frames must all be one size")
    return frames, [os.path.splitext(n)[0] for n in names]


def read_video(path: str) -> tuple[list[np.ndarray], list[str], float]:
    """Every frame of a video file as RGB uint8 arrays, their names (``00000``, ...) and the fps."""
    capture = cv2.VideoCapture(path)
    frames = []
    while capture.isOpened():
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    capture.release()
    if not frames:
        raise PredictInputError(f"cannot read any frame of '{path}': not a video OpenCV can decode "
                                f"(try an .mp4/.avi, or pass a folder of frames)")
    return frames, [f"{t:05d}" for t in range(len(frames))], fps


def read_query(source: str) -> tuple[list[np.ndarray], list[str], float | None]:
    """A folder of frames (fps None) or a video file."""
    if os.path.isdir(source):
        return (*read_frames(source), None)
    if not os.path.isfile(source):
        raise PredictInputError(f"query '{os.path.abspath(source)}' does not exist; pass a folder of frames or a video file")
    return read_video(source)


@dataclass
class VideoPrediction:
    masks: list[np.ndarray]        # per frame, H×W uint8 0/1 at the frame's size
    bg_maps: list[np.ndarray]      # per frame, the mined BG probability (same size)
    do_masks: list[np.ndarray]     # per frame, the mined DO mask 0/1 (same size)
    priors: list[np.ndarray] = field(default_factory=list)   # per frame, the prior mask in [0, 1] (same size)


class VideoPredictor:
    """A video model ready to segment frame sequences; :meth:`from_checkpoint` builds one."""

    def __init__(self, model: torch.nn.Module, cfg, device="cpu", amp: str = "none"):
        self.device = resolve_device(device, amp)
        self.cfg, self.amp = cfg, amp
        self.model = to_device(model, self.device, cfg.channels_last).eval()

    @classmethod
    def from_checkpoint(cls, cfg, weight_path: str, device="cpu", amp: str = "none",
                        state: dict | None = None) -> "VideoPredictor":
        resolve_device(device, amp)
        model, _ = build_model_from_checkpoint(weight_path, cfg, state)
        return cls(model, cfg, device, amp)

    @staticmethod
    def read_inputs(args, cfg, opts) -> dict:
        """predict.py's inputs: the ``--support`` pairs and one ``--query`` (a folder of frames or
        a video file), read and checked before any checkpoint is loaded."""
        if len(args.query) != 1:
            raise PredictInputError(f"a video model takes one --query (a folder of frames or a video file); "
                                    f"got {len(args.query)}")
        supports = read_supports([tuple(s) for s in args.support], args.class_id, cfg.ignore_label)
        frames, names, fps = read_query(args.query[0])
        return {"supports": supports, "frames": frames, "names": names, "fps": fps}

    def write_outputs(self, inputs: dict, args) -> list[str]:
        """``<out>/<frame>_mask.png`` per frame, ``<out>/strip.png`` (frames with the prediction,
        mined BG and DO) and ``<out>/overlay.mp4`` where OpenCV can encode it; the paths written."""
        supports, frames, names = inputs["supports"], inputs["frames"], inputs["names"]
        t0 = time.perf_counter()
        prediction = self.predict(supports, frames, args.class_id)
        seconds = time.perf_counter() - t0
        written = []
        for name, mask in zip(names, prediction.masks):
            written.append(os.path.join(args.out, f"{name}_mask.png"))
            atomic_write_image(written[-1], mask)
        strip = os.path.join(args.out, "strip.png")
        atomic_write_image(strip, cv2.cvtColor(strip_image(frames, prediction, supports, names,
                                                           title=args.class_name), cv2.COLOR_RGB2BGR))
        written.append(strip)
        video = os.path.join(args.out, "overlay.mp4")
        if write_video(video, overlay_frames(frames, prediction.masks), inputs["fps"] or 10.0):
            written.append(video)
        else:
            log.warning("this OpenCV build cannot encode MP4: no overlay.mp4 (the masks and strip.png are written)")
        log.info("%d frames, %d-shot, %s on %s: %.3f s per frame (network and preprocessing); wrote %d masks, %s",
                 len(frames), len(supports), args.weight, self.device, seconds / len(frames), len(names),
                 ", ".join(written[len(names):]))
        return written

    def _canvas(self, pairs):
        return frames_to_tensors([letterbox(image.astype(np.float32), mask, self.cfg.video_h, self.cfg.video_w)
                                  for image, mask in pairs])

    @torch.no_grad()
    def predict(self, supports: Sequence, frames: Sequence[np.ndarray], class_id: int | None = None) -> VideoPrediction:
        """Segment every frame (RGB uint8 arrays, one size) with the K (image, mask) supports."""
        cfg = self.cfg
        support_list = read_supports(supports, class_id, cfg.ignore_label)
        T = cfg.clip_len
        if cfg.support_mode == "paired" and len(support_list) != T:
            raise PredictInputError(f"this model pairs query frame t with support t (support_mode paired), so it "
                                    f"needs clip_len = {T} supports; {len(support_list)} given. Give {T} pairs "
                                    f"or add 'support_mode mean' to the command")
        if not frames:
            raise PredictInputError("the query video has no frame")
        s_img, s_mask = self._canvas([(s.image, s.mask) for s in support_list])
        for k, s in enumerate(support_list):
            if not (s_mask[k] == 1).any():
                raise PredictInputError(f"the target in support {s.described()} vanishes on the {cfg.video_h}x"
                                        f"{cfg.video_w} canvas; use a larger object or larger video_h/video_w")
        s_img, s_mask = s_img[None].to(self.device), s_mask[None].to(self.device)
        h, w = frames[0].shape[:2]
        g = letterbox_geometry(h, w, cfg.video_h, cfg.video_w)
        empty = np.zeros((h, w), np.uint8)
        out = VideoPrediction(*([None] * len(frames) for _ in range(4)))

        def back(x, mode="bilinear"):      # canvas maps (N×C×H×W) → the frame's own size
            x = x[..., g.top:g.top + g.new_h, g.left:g.left + g.new_w].float()
            kwargs = {"align_corners": True} if mode == "bilinear" else {}
            return F.interpolate(x, size=(h, w), mode=mode, **kwargs)

        for positions, scored in chunk_spans(len(frames), T):
            q_img, _ = self._canvas([(frames[p], empty) for p in positions])
            with autocast(self.device, self.amp):
                logits, extras = self.model(q_img[None].to(self.device), s_img, s_mask, return_extras=True)
            masks = back(logits[0]).argmax(dim=1).to(torch.uint8).cpu().numpy()
            bg = back(extras["bg_logits"][0]).softmax(dim=1)[:, 1].cpu().numpy()
            do = back(extras["do_mask"][0][:, None], "nearest")[:, 0].to(torch.uint8).cpu().numpy()
            prior = back(extras["prior"][0])[:, 0].cpu().numpy()
            for t, (p, on) in enumerate(zip(positions, scored)):
                if on:
                    out.masks[p], out.bg_maps[p], out.do_masks[p], out.priors[p] = masks[t], bg[t], do[t], prior[t]
        return out


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


def overlay_frames(frames: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each frame with its predicted mask tinted and outlined (RGB uint8)."""
    return [overlay(f, m) for f, m in zip(frames, masks)]


def strip_image(frames: Sequence[np.ndarray], prediction: VideoPrediction, supports: Sequence,
                names: Sequence[str], count: int = 8, title: str = "") -> np.ndarray:
    """util.vis's video strip of up to ``count`` evenly spaced frames: the supports, then per
    frame the prediction, the mined BG and the mined DO."""
    picks = sorted({round(i * (len(frames) - 1) / max(count - 1, 1)) for i in range(min(count, len(frames)))})
    return video_strip_image({
        "query_imgs": [frames[t] for t in picks], "pred": [prediction.masks[t] for t in picks],
        "bg_map": [prediction.bg_maps[t] for t in picks], "do_mask": [prediction.do_masks[t] for t in picks],
        "frame_names": [names[t] for t in picks], "support_imgs": [s.image for s in supports],
        "support_masks": [s.mask for s in supports], "class_name": title})
