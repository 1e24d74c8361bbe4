"""Segment new images from a few annotated examples: the code behind predict.py.

    from engine.predictor import Predictor
    predictor = Predictor.from_checkpoint(cfg, "exp/pascal/split0_resnet50/model/best.pth")
    [pred] = predictor.predict([("dog1.jpg", "dog1_mask.png")], ["park.jpg"])
    pred.mask          # H×W uint8 0/1 at park.jpg's size
    pred.panel()       # supports, query, prediction, mined BG and DO as one RGB picture

Images are paths or H×W×3 RGB uint8 arrays, of any size; masks are paths or H×W arrays.
Each image goes through exactly the evaluation preprocessing (dataset.transform: longer side
to ``val_size``, sides floored to multiples of 8, top-left on a ``val_size²`` canvas,
ImageNet normalisation), and the outputs are mapped back to the query's original size as
ori_resize scoring does (dataset.metrics.score_episodes): logits upsampled bilinearly
(align_corners=True) to the square of the longer side, then cropped.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image

from engine.checkpoint import build_model_from_checkpoint
from util.amp import AMP_MODES, autocast, check_amp, to_device
from util.config import resolved
from dataset.image import binarize
from util.distributed import pick_device
from util.errors import PredictInputError, missing_file, unreadable_image
from dataset.metrics import to_original_size
from dataset.transform import eval_transform
from util.fileio import atomic_write_image
from util.vis import overlay, panel_image, save_panel

log = logging.getLogger("ntrenetpp")


ImageInput = Union[str, os.PathLike, np.ndarray]
MaskInput = Union[str, os.PathLike, np.ndarray]


# ---- reading inputs ------------------------------------------------------------------------
def _describe(source, index: int, kind: str) -> str:
    """How an error names an input: its path, or its position when it is an array."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    return f"{kind} #{index + 1} (array)"


def read_rgb(source: ImageInput, name: str = "image") -> np.ndarray:
    """An H×W×3 uint8 RGB image from a path (any format OpenCV reads) or an array
    (H×W×3 RGB, H×W×4 RGBA or H×W grey, uint8)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise PredictInputError(missing_file("image", path, "check the path"))
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise PredictInputError(unreadable_image("image", path))
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    arr = np.asarray(source)
    if arr.dtype != np.uint8:
        raise PredictInputError(f"{name} is a {arr.dtype} array; pass uint8 RGB values 0-255 "
                                f"(e.g. array.astype(np.uint8))")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise PredictInputError(f"{name} has shape {arr.shape}; expected H×W×3 RGB (or H×W grey)")
    return np.ascontiguousarray(arr)


def read_mask_values(source: MaskInput, name: str = "mask") -> np.ndarray:
    """The raw values of a mask: grey levels of a single-channel image, indices of a palette
    PNG (not its colours), or the array as given."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise PredictInputError(missing_file("mask", path, "check the path"))
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                if mode == "1":
                    arr = np.asarray(img, dtype=np.uint8)
                elif mode in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                    arr = np.asarray(img)          # palette: the indices, which are the class ids
                elif mode == "LA":
                    arr = np.asarray(img)[:, :, 0]
                elif mode in ("RGB", "RGBA"):
                    rgb = np.asarray(img)[:, :, :3]
                    if not ((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all()):
                        raise PredictInputError(
                            f"mask '{path}' is a colour image; save it as a single-channel 0/1 or 0/255 PNG, "
                            f"or as a palette PNG and pick the class with --class-id")
                    arr = rgb[:, :, 0]
                else:
                    raise PredictInputError(f"mask '{path}' has image mode {mode}; save it as a "
                                            f"single-channel or palette PNG")
        except PredictInputError:
            raise
        except Exception as e:  # PIL's UnidentifiedImageError, truncated files, ...
            raise PredictInputError(unreadable_image("mask", path)) from None
        return np.ascontiguousarray(arr)
    arr = np.asarray(source)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise PredictInputError(f"{name} has shape {arr.shape}; expected an H×W array of 0/1, 0/255 or class ids")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise PredictInputError(f"{name} is a {arr.dtype} array; expected integers (0/1, 0/255 or class ids)")
    return arr


def binary_mask(values: np.ndarray, class_id: int | None, name: str, ignore_label: int = 255) -> np.ndarray:
    """Target 1, not target 0, ``ignore_label`` kept.

    With ``class_id``: pixels equal to it are the target. Without: a 0/1 mask (255 = ignore)
    or a 0/255 mask (255 = target); any other values need ``class_id``.
    """
    if class_id is not None:
        return binarize(values, class_id, ignore_label)     # as the datasets turn a label into an episode's
    present = set(np.unique(values).tolist())
    if present <= {0, 255}:
        return (values == 255).astype(np.uint8)
    if present <= {0, 1, ignore_label}:
        return values.astype(np.uint8)
    shown = ", ".join(str(v) for v in sorted(present)[:8]) + (" ..." if len(present) > 8 else "")
    raise PredictInputError(
        f"mask {name} holds the values {shown}; without --class-id a mask must be 0/1 (255 = ignore) "
        f"or 0/255. For a class-id or palette mask pass --class-id (class_id=) to pick the class; a "
        f"JPEG mask is not exact, save it as PNG")


@dataclass
class Support:
    image: np.ndarray          # H×W×3 uint8 RGB
    mask: np.ndarray           # H×W uint8: 1 target, 0 not, 255 ignore
    name: str                  # the image's stem (panel titles)
    source: str = ""           # how an error names it: its image's path in quotes, or 'support image #k (array)'

    def described(self) -> str:
        return self.source or f"'{self.name}'"


@dataclass
class Prediction:
    """One query's result, every map at the query's original size."""
    name: str                  # the query's file stem, or 'query<i>' for an array
    image: np.ndarray          # H×W×3 uint8 RGB (the query as read)
    mask: np.ndarray           # H×W uint8 0/1
    probability: np.ndarray    # H×W float32 foreground probability
    bg_map: np.ndarray | None  # H×W float32 probability of the mined background (BGMM; None: the network has none)
    do_mask: np.ndarray | None  # H×W uint8 0/1 mined distracting objects (first scale; None likewise)
    supports: list[Support] = field(default_factory=list, repr=False)
    class_name: str = ""
    prior: np.ndarray | None = None  # H×W float32 in [0, 1]: the prior mask (None: the network has none)

    def panel(self) -> np.ndarray:
        """Supports with outlines, query, prediction, mined BG and DO: H×W×3 uint8 RGB."""
        return panel_image(self.panel_sample())

    def panel_sample(self) -> dict:
        return {"support_imgs": [s.image for s in self.supports],
                "support_masks": [s.mask for s in self.supports],
                "query_img": self.image, "pred": self.mask, "bg_map": self.bg_map, "do_mask": self.do_mask,
                "class_name": f"{self.name}: {self.class_name}" if self.class_name else self.name}


@dataclass
class Query:
    image: np.ndarray          # H×W×3 uint8 RGB
    name: str                  # file stem, or 'query<i>' for an array


def _stem(source, default: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.path.splitext(os.path.basename(os.fspath(source)))[0]
    return default


def read_supports(supports: Sequence, class_id: int | None = None, ignore_label: int = 255) -> list[Support]:
    """Read and check (image, mask) pairs: same size, a non-empty target (``Support``s pass through)."""
    if not supports:
        raise PredictInputError("no support given; pass at least one (image, mask) pair (--support IMG MASK)")
    if class_id is not None and not 0 <= class_id < 255:
        raise PredictInputError(f"--class-id {class_id} is not a class id; use a value 0..254 "
                                f"(255 marks ignored pixels)")
    out = []
    for k, pair in enumerate(supports):
        if isinstance(pair, Support):
            out.append(pair)
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise PredictInputError(f"support #{k + 1} is not an (image, mask) pair")
        image_src, mask_src = pair
        image_name = _describe(image_src, k, "support image")
        mask_name = _describe(mask_src, k, "support mask")
        image = read_rgb(image_src, image_name)
        values = read_mask_values(mask_src, mask_name)
        if values.shape != image.shape[:2]:
            raise PredictInputError(
                f"support mask {mask_name} is {values.shape[1]}x{values.shape[0]} (WxH) but its image "
                f"{image_name} is {image.shape[1]}x{image.shape[0]}; a mask must have its image's size")
        mask = binary_mask(values, class_id, mask_name, ignore_label)
        if not (mask == 1).any():
            which = f"class {class_id}" if class_id is not None else "the target (1 or 255)"
            hint = "" if class_id is not None else ", or pass --class-id for a class-id mask"
            raise PredictInputError(f"support mask {mask_name} has no pixel of {which}; each support needs "
                                    f"the object marked{hint}")
        out.append(Support(image, mask, _stem(image_src, f"support{k + 1}"), image_name))
    return out


def check_query_files(queries: Sequence) -> None:
    """Fail before any work if a query path is missing or not an image format OpenCV reads
    (headers only: nothing is decoded)."""
    for q in queries:
        if isinstance(q, (str, os.PathLike)):
            path = os.fspath(q)
            if not os.path.isfile(path):
                raise PredictInputError(missing_file("image", path, "check the path"))
            if not cv2.haveImageReader(path):
                raise PredictInputError(unreadable_image("image", path))


def read_query(source, index: int = 0) -> Query:
    if isinstance(source, Query):
        return source
    return Query(read_rgb(source, _describe(source, index, "query")), _stem(source, f"query{index + 1}"))




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


class Predictor:
    """A trained NTRENet++ applied to user images. ``Predictor(model, cfg, device, amp)``
    wraps a model in memory — moving it to ``device`` in the memory format ``cfg`` asks for
    there (in place: an optimizer kept on the same model sees the new layout);
    :meth:`from_checkpoint` builds and loads one."""

    def __init__(self, model: torch.nn.Module, cfg, device: str | torch.device = "cpu", amp: str = "none"):
        self.device = resolve_device(device, amp)
        self.cfg = cfg = resolved(cfg)           # val_size 'auto' is the protocol's
        self.amp = amp
        self.model = to_device(model, self.device, cfg.channels_last).eval()
        self.transform = eval_transform(cfg)

    @classmethod
    def from_checkpoint(cls, cfg, weight_path: str, device: str | torch.device = "cpu",
                        amp: str = "none", state: dict | None = None) -> "Predictor":
        """Build the network of ``cfg`` and load ``weight_path`` (a checkpoint of another
        architecture is a CheckpointError naming the keys that differ); ``state``: the
        checkpoint already read from it."""
        resolve_device(device, amp)      # a wrong device fails before the model is built
        model, _ = build_model_from_checkpoint(weight_path, cfg, state)
        return cls(model, cfg, device, amp)

    def _prepare(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        label = np.zeros(image.shape[:2], np.uint8) if mask is None else mask
        return self.transform(image.astype(np.float32), label)

    # ---- predict.py's front end --------------------------------------------------------------
    @staticmethod
    def read_inputs(args, cfg, opts) -> dict:
        """predict.py's inputs (``--support`` pairs, ``--query`` images), checked before any
        checkpoint is loaded. K is the number of supports given."""
        stems = output_stems(args.query)
        supports = read_supports([tuple(s) for s in args.support], args.class_id, cfg.ignore_label)
        if "shot" in opts[::2] and cfg.shot != len(supports):
            log.warning("shot %d is ignored: K is the number of --support pairs given (%d)", cfg.shot, len(supports))
        check_query_files(args.query)
        return {"stems": stems, "supports": supports}

    def write_outputs(self, inputs: dict, args) -> list[str]:
        """Per query ``<out>/<stem>_mask.png`` (0/1, the query's size) and ``<stem>_overlay.jpg``
        (with ``--panels`` also ``<stem>_panel.png``); returns the paths written."""
        predictions = self.iter_predict(inputs["supports"], args.query, args.class_id, args.class_name)
        written, seconds = [], 0.0
        for stem in inputs["stems"]:
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
        log.info("%d query(ies), %d-shot, %s on %s%s: %.3f s per query (reading and network)", len(inputs["stems"]),
                 len(inputs["supports"]), args.weight, self.device, f" ({self.amp})" if self.amp != "none" else "",
                 seconds / len(inputs["stems"]))
        return written

    # ---- prediction ----------------------------------------------------------------------
    def predict(self, supports: Sequence, queries: Sequence, class_id: int | None = None,
                class_name: str = "") -> list[Prediction]:
        """Segment each query with the K given supports (K = len(supports)).

        ``supports``: (image, mask) pairs; ``queries``: images (paths or RGB uint8 arrays).
        ``class_id`` picks the target in class-id / palette masks; ``class_name`` only titles
        the panels. Returns one :class:`Prediction` per query, in order.
        """
        return list(self.iter_predict(supports, queries, class_id, class_name))

    def iter_predict(self, supports: Sequence, queries: Sequence, class_id: int | None = None,
                     class_name: str = "") -> Iterator[Prediction]:
        """:meth:`predict` one query at a time (for many queries: one in memory at once).
        Inputs are checked before the first prediction is made."""
        support_list = read_supports(supports, class_id, self.cfg.ignore_label)
        if isinstance(queries, (str, os.PathLike, np.ndarray, Query)):
            queries = [queries]
        if len(queries) == 0:
            raise PredictInputError("no query given; pass at least one image (--query IMG [IMG ...])")
        check_query_files(queries)
        support_imgs, support_masks = [], []
        for s in support_list:
            img_t, mask_t = self._prepare(s.image, s.mask)
            if not (mask_t == 1).any():
                raise PredictInputError(f"the target in support {s.described()} vanishes when the image is resized "
                                        f"to val_size {self.cfg.val_size}; use a larger object or raise val_size")
            support_imgs.append(img_t)
            support_masks.append(mask_t)
        support_imgs = torch.stack(support_imgs)[None].to(self.device)    # 1×K×3×S×S
        support_masks = torch.stack(support_masks)[None].to(self.device)  # 1×K×S×S
        if not class_name and class_id is not None:
            class_name = f"class {class_id}"
        return self._predictions(support_list, support_imgs, support_masks, queries, class_name)

    @torch.no_grad()
    def _predictions(self, support_list, support_imgs, support_masks, queries, class_name):
        for i, source in enumerate(queries):
            query = read_query(source, i)
            image = query.image
            query_t, _ = self._prepare(image)
            query_t = query_t[None].to(self.device)
            with autocast(self.device, self.amp):
                logits, extras = self.model(query_t, support_imgs, support_masks, return_extras=True)
            h, w = image.shape[:2]
            logits = to_original_size(logits, h, w)
            probability = logits.softmax(dim=1)[0, 1]
            mask = logits.argmax(dim=1)[0]
            bg_map = do_mask = None              # what the network's extras hold (docs/extending.md)
            if "bg_logits" in extras:
                bg_map = to_original_size(extras["bg_logits"], h, w).softmax(dim=1)[0, 1].cpu().numpy()
            if "do_mask" in extras:
                do_mask = to_original_size(extras["do_mask"][:, None], h, w, mode="nearest")[0, 0]
                do_mask = (do_mask >= 0.5).to(torch.uint8).cpu().numpy()
            prior = None
            if "prior" in extras:
                prior = to_original_size(extras["prior"], h, w)[0, 0].float().cpu().numpy()
            yield Prediction(name=query.name, image=image, mask=mask.to(torch.uint8).cpu().numpy(),
                             probability=probability.cpu().numpy(), bg_map=bg_map, do_mask=do_mask,
                             supports=support_list, class_name=class_name, prior=prior)


def resolve_device(device: str | torch.device, amp: str = "none") -> torch.device:
    """'auto' → CUDA when available; 'cuda' without a GPU, or fp16 off CUDA, is an error
    saying what to use instead."""
    if not isinstance(device, torch.device):
        device = pick_device(device)
    if amp not in AMP_MODES:
        raise PredictInputError(f"amp {amp!r} is not a precision; use none, bf16 or fp16")
    check_amp(amp, device)
    return device
