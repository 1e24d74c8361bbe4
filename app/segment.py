"""What one press of "Segment" does, apart from the page: gather the supports and queries a
session gave, run them through the predictor ``predict.py`` uses, and write what it returns
into a folder of that request's own.

Images and masks the page received as uploads are passed on as the files they are, so the
predictor reads them exactly as ``predict.py`` reads its arguments; a mask drawn with the
brush is an array. Any user mistake is a :class:`~util.errors.PredictInputError` whose message
names the inputs as the page shows them ("support 2", "query 'park.jpg'"), never a server path.
"""
from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

from engine.predictor import output_stems, read_rgb, read_supports
from engine.video_predict import overlay_frames, read_video, strip_image, write_video
from util.errors import PredictInputError, UserError
from util.fileio import atomic_path, atomic_write_image
from util.vis import result_views

MAX_SHOTS = 5
MAX_FRAMES = 300
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass
class SupportInput:
    """One support as the page holds it: the image (RGB array), and its mask either as an
    array (drawn with the brush: 0/1 of the image's size; the examples: 0/1/255) or uploaded
    (a file)."""
    image: np.ndarray
    mask: np.ndarray | None = None
    mask_file: str | None = None


@dataclass
class Result:
    views: list[tuple[np.ndarray, str]] = field(default_factory=list)   # (picture, caption) for the gallery
    files: list[str] = field(default_factory=list)                      # the downloads
    summary: str = ""


def upload_name(path: str) -> str:
    """The name a file had on the user's side (the page keeps it as the upload's file name)."""
    return os.path.basename(path)


def readable(error: UserError, uploads: dict[str, str]) -> str:
    """The message with every upload's server path replaced by how the page names it."""
    text = str(error)
    for path, name in sorted(uploads.items(), key=lambda item: -len(item[0])):
        text = text.replace(f"'{path}'", name).replace(path, name)
    return text


def check_size(path: str, what: str, max_bytes: int) -> None:
    size = os.path.getsize(path)
    if size > max_bytes:
        raise PredictInputError(f"{what} is {size / 2**20:.1f} MB; the page takes files up to "
                                f"{max_bytes / 2**20:g} MB (start it with --max-upload-mb to change that)")


def gather_supports(given: list[SupportInput | None], max_bytes: int) -> tuple[list, dict[str, str]]:
    """The (image, mask) pairs for the predictor, in order, and the page's names of uploaded
    masks. An uploaded mask goes to the predictor as its file, a drawn one as its array."""
    pairs, uploads = [], {}
    for k, support in enumerate(given):
        if support is None:
            continue
        label = f"support {k + 1}"
        image = read_rgb(support.image, f"the image of {label}")
        # how the predictor names the pair at this position, and how the page names it
        uploads[f"support image #{len(pairs) + 1} (array)"] = f"in {label}"
        uploads[f"support mask #{len(pairs) + 1} (array)"] = f"of {label}"
        if support.mask_file:
            uploads[support.mask_file] = f"of {label} ('{upload_name(support.mask_file)}')"
            check_size(support.mask_file, uploads[support.mask_file], max_bytes)
            pairs.append((image, support.mask_file))
            continue
        if support.mask is None or not (support.mask == 1).any():
            raise PredictInputError(f"{label} has an empty mask: paint over the object with the brush, "
                                    f"or upload a mask (white or 1 = the object)")
        pairs.append((image, support.mask))
    if not pairs:
        raise PredictInputError("no support given: add an image to support 1 and mark the object on it")
    if len(pairs) > MAX_SHOTS:
        raise PredictInputError(f"{len(pairs)} supports given; the page takes 1 to {MAX_SHOTS}")
    return pairs, uploads


def _save(folder: str, name: str, image: np.ndarray) -> str:
    path = os.path.join(folder, name)
    atomic_write_image(path, image)
    return path


def _zip(path: str, files: list[str]) -> str:
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for f in files:
                archive.write(f, os.path.basename(f))
    return path


def _query_uploads(queries: list, max_bytes: int) -> dict[str, str]:
    uploads = {}
    for path in queries:
        if isinstance(path, str):
            uploads[path] = f"query '{upload_name(path)}'"
            check_size(path, uploads[path], max_bytes)
    return uploads


def segment_images(predictor, supports: list, queries: list, out_dir: str, max_bytes: int) -> Result:
    """An image checkpoint: every query (uploaded files, or arrays for the examples) with the
    K supports; per query ``<stem>_mask.png`` (0/1 at the query's size, as predict.py writes
    it), and one zip of them when there are several."""
    queries = list(queries or [])
    pairs, uploads = gather_supports(supports, max_bytes)
    if not queries:
        raise PredictInputError("no query given: upload one or more images to segment")
    uploads.update(_query_uploads(queries, max_bytes))
    for path in queries:
        if isinstance(path, str) and path.lower().endswith(VIDEO_EXTENSIONS):
            raise PredictInputError(f"{uploads[path]} is a video, and this checkpoint segments images: pick a "
                                    f"video checkpoint, or upload frames as images")
    result, seconds = Result(), []
    try:
        stems = output_stems([q if isinstance(q, str) else f"query{i + 1}" for i, q in enumerate(queries)])
        predictions = predictor.iter_predict(pairs, queries)
        for stem in stems:
            t0 = time.perf_counter()
            pred = next(predictions)
            seconds.append(time.perf_counter() - t0)
            result.files.append(_save(out_dir, f"{stem}_mask.png", pred.mask))
            for name, view in result_views(pred.image, pred.mask, pred.bg_map, pred.do_mask, pred.prior):
                result.views.append((view, f"{stem}: {name}"))
    except UserError as e:
        raise PredictInputError(readable(e, uploads)) from None
    if len(result.files) > 1:
        result.files.insert(0, _zip(os.path.join(out_dir, "masks.zip"), result.files))
    result.summary = (f"{len(stems)} query(ies), {len(pairs)}-shot: {sum(seconds) / len(seconds):.3f} s per "
                      f"query (reading and network, on {predictor.device})")
    return result


def read_video_query(queries: list, uploads: dict[str, str]) -> tuple[list[np.ndarray], list[str], float | None]:
    """A video query: one video file, or two or more frames (images, in name order, one size);
    arrays (the examples) are frames already."""
    videos = [q for q in queries if isinstance(q, str) and q.lower().endswith(VIDEO_EXTENSIONS)]
    if videos:
        if len(queries) > 1:
            raise PredictInputError("a video checkpoint takes one video file, or the frames of one video as "
                                    "images; remove the other files")
        frames, names, fps = read_video(videos[0])
    else:
        if len(queries) < 2:
            raise PredictInputError("this checkpoint segments videos: upload a video file or two or more frames "
                                    "of one, or pick an image checkpoint to segment a single image")
        order = sorted(range(len(queries)), key=lambda i: upload_name(queries[i]) if isinstance(queries[i], str)
                       else f"{i:05d}")
        frames = [read_rgb(queries[i], f"frame {i + 1}") for i in order]
        names = [os.path.splitext(upload_name(queries[i]))[0] if isinstance(queries[i], str) else f"{i:05d}"
                 for i in order]
        fps = None
        if len({f.shape for f in frames}) > 1:
            raise PredictInputError("the frames differ in size; a video's frames must all be one size")
    if len(frames) > MAX_FRAMES:
        raise PredictInputError(f"the video has {len(frames)} frames; the page takes up to {MAX_FRAMES} "
                                f"(use predict.py for longer ones)")
    return frames, names, fps


def segment_video(predictor, supports: list, queries: list, out_dir: str, max_bytes: int) -> Result:
    """A video checkpoint: the frames of one video with the supports; per frame
    ``<frame>_mask.png``, all of them in one zip, and ``overlay.mp4`` where OpenCV encodes MP4."""
    queries = list(queries or [])
    pairs, uploads = gather_supports(supports, max_bytes)
    if not queries:
        raise PredictInputError("no query given: upload a video file or its frames")
    uploads.update(_query_uploads(queries, max_bytes))
    try:
        frames, names, fps = read_video_query(queries, uploads)
        t0 = time.perf_counter()
        prediction = predictor.predict(pairs, frames)
        seconds = time.perf_counter() - t0
    except UserError as e:
        raise PredictInputError(readable(e, uploads)) from None
    result = Result()
    masks = [_save(out_dir, f"{name}_mask.png", mask) for name, mask in zip(names, prediction.masks)]
    result.files.append(_zip(os.path.join(out_dir, "masks.zip"), masks))
    video = os.path.join(out_dir, "overlay.mp4")
    if write_video(video, overlay_frames(frames, prediction.masks), fps or 10.0):
        result.files.append(video)
    shown = read_supports(pairs, None, predictor.cfg.ignore_label)
    result.views.append((strip_image(frames, prediction, shown, names), "supports; frames: prediction, mined BG, mined DO"))
    for t in sorted({0, len(frames) // 2, len(frames) - 1}):
        for name, view in result_views(frames[t], prediction.masks[t], prediction.bg_maps[t],
                                       prediction.do_masks[t], prediction.priors[t]):
            result.views.append((view, f"frame {names[t]}: {name}"))
    result.summary = (f"{len(frames)} frames, {len(pairs)}-shot: {seconds / len(frames):.3f} s per frame "
                      f"(network and preprocessing, on {predictor.device})")
    return result
