"""The page itself (Gradio Blocks): a checkpoint picker, K = 1..5 supports drawn with a brush
or given a mask file, the queries, and what the network returns.

Every event handler is a function of what that browser session sent: nothing is kept between
requests or shared between sessions but the catalog's loaded models. Each request writes its
downloads to a fresh folder of its own. A user's mistake comes back as one line in the status
box; the server goes on serving.
"""
from __future__ import annotations

import logging
import tempfile

import cv2
import gradio as gr
import numpy as np

from app.catalog import Catalog
from app.examples import example, example_names
from app.segment import MAX_SHOTS, SupportInput, segment_images, segment_video
from util.errors import PredictInputError, UserError

log = logging.getLogger("ntrenetpp")

INTRO = """# Few-shot segmentation: NTRENet++
Give one to five **supports** (an image with the object painted over it, or a mask file) and
**queries**; the network marks in each query what the supports show. Beside each prediction:
the **mined background** (BG, where the network is sure the image is background, red = sure),
the **distracting objects** it eliminated (DO, magenta: things like the target that are not it)
and the **prior** (where the query's features most resemble the target's, red = alike).
Or pick an example below and press *Run example*."""

BRUSH_COLOUR = "#ff3030"
STATUS_ID = "status"


def drawn_mask(value: dict | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The union of the editor's painted layers as a 0/1 mask of ``shape`` (the image's size;
    a layer of the canvas' own size is scaled to it); None when nothing is painted."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    painted = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        alpha = layer[:, :, 3] if layer.ndim == 3 and layer.shape[2] == 4 else layer.reshape(*layer.shape[:2], -1).max(2)
        if alpha.shape == painted.shape:
            painted |= alpha > 0
    mask = painted.astype(np.uint8)
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask


def support_input(k: int, value: dict | None, mask_file: str | None) -> SupportInput | None:
    """Support ``k`` (0-based) as the editor and the mask upload hold it; None when empty."""
    image = (value or {}).get("background")
    if image is None:
        if mask_file:
            raise PredictInputError(f"support {k + 1} has a mask but no image: add the image it belongs to")
        return None
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = np.ascontiguousarray(image[:, :, :3])
    if mask_file:
        return SupportInput(image, mask_file=mask_file)
    return SupportInput(image, mask=drawn_mask(value, image.shape[:2]))


def editor_value(support: SupportInput) -> dict:
    """What the editor shows for an example support: its image, its mask as a painted layer."""
    layer = np.zeros((*support.image.shape[:2], 4), np.uint8)
    layer[support.mask == 1] = (255, 48, 48, 255)
    return {"background": support.image, "layers": [layer], "composite": None}


class Page:
    """The handlers, bound to one catalog and upload limit."""

    def __init__(self, catalog: Catalog, max_bytes: int):
        self.catalog, self.max_bytes = catalog, max_bytes

    def describe(self, key) -> tuple[str, dict]:
        """The picked checkpoint's line, and the example choices for it."""
        try:
            entry = self.catalog.entry(key)
        except UserError as e:
            return f"**Cannot use this checkpoint:** {e}", gr.update(choices=[], value=None)
        kind = ("video: upload one video file or its frames as the query" if entry.task == "video"
                else "images: upload one or more query images")
        names = example_names(entry.cfg)
        return f"Segments {kind}.", gr.update(choices=names, value=names[0])

    def _run(self, key, supports, queries):
        entry, predictor = self.catalog.predictor(key)
        out_dir = tempfile.mkdtemp(prefix="ntrenetpp-page-")
        run = segment_video if entry.task == "video" else segment_images
        return run(predictor, supports, queries, out_dir, self.max_bytes)

    def _answer(self, compute):
        """(status, gallery, downloads): a result, or a user's mistake as one line."""
        try:
            result = compute()
        except UserError as e:
            return f"**Error:** {e}", None, None
        except Exception:     # a bug: its traceback goes to the server's log, the page keeps serving
            log.exception("the page's request failed")
            return "**Internal error** (a bug): the server's log has the details", None, None
        return result.summary, result.views, result.files

    def segment(self, key, queries, *editors_and_masks):
        editors, masks = editors_and_masks[:MAX_SHOTS], editors_and_masks[MAX_SHOTS:]

        def compute():
            supports = [support_input(k, v, m) for k, (v, m) in enumerate(zip(editors, masks))]
            return self._run(key, supports, queries)
        return self._answer(compute)

    def run_example(self, key, name):
        """Run the example called ``name`` and show its supports in the editors."""
        shown = [gr.update() for _ in range(MAX_SHOTS)]

        def compute():
            entry = self.catalog.entry(key)
            names = example_names(entry.cfg)
            if name not in names:
                raise PredictInputError("pick an example from the list")
            supports, queries = example(entry.cfg, names.index(name))
            for k, s in enumerate(supports[:MAX_SHOTS]):
                shown[k] = editor_value(s)
            return self._run(key, supports, queries)
        return (*self._answer(compute), *shown)


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts: no web font is fetched from outside."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_page(catalog: Catalog, max_bytes: int) -> gr.Blocks:
    page = Page(catalog, max_bytes)
    choices = catalog.labels()
    usable = [key for (_, key), e in zip(choices, catalog.entries) if not e.problem]
    first = usable[0] if usable else (choices[0][1] if choices else None)
    with gr.Blocks(title="NTRENet++ few-shot segmentation", analytics_enabled=False) as blocks:
        gr.Markdown(INTRO)
        with gr.Row():
            checkpoint = gr.Dropdown(choices=choices, value=first, label="Checkpoint", elem_id="checkpoint", scale=3)
            info = gr.Markdown(elem_id="checkpoint-info")
        with gr.Row():
            example_pick = gr.Dropdown(choices=[], label="Example (synthetic shapes)", elem_id="example", scale=2)
            example_button = gr.Button("Run example", elem_id="run-example", scale=1)
        editors, mask_files = [], []

        def support_column(k):
            with gr.Column(min_width=260):
                editors.append(gr.ImageEditor(
                    label=f"Support {k + 1}: upload the image, then paint the object", type="numpy",
                    format="png", sources=["upload"], transforms=[], layers=False, elem_id=f"support-{k + 1}",
                    brush=gr.Brush(colors=[BRUSH_COLOUR], color_mode="fixed", default_size=12), height=300))
                mask_files.append(gr.File(label="or upload its mask (PNG, white = the object)", type="filepath",
                                          elem_id=f"support-{k + 1}-mask", height=70))
        with gr.Row():
            support_column(0)
            support_column(1)
            with gr.Column(min_width=260):
                queries = gr.File(label="Queries: images (a video file, or its frames, for a video checkpoint)",
                                  file_count="multiple", type="filepath", elem_id="queries", height=300)
        with gr.Accordion(f"Supports 3 to {MAX_SHOTS}", open=False):
            with gr.Row():
                for k in range(2, MAX_SHOTS):
                    support_column(k)
        run = gr.Button("Segment", variant="primary", elem_id="segment")
        status = gr.Markdown(elem_id=STATUS_ID)
        gallery = gr.Gallery(label="What the network returns", columns=4, height="auto", format="png",
                             elem_id="results")
        downloads = gr.File(label="Masks (0/1 PNG at each query's size)", file_count="multiple",
                            elem_id="downloads", interactive=False)

        checkpoint.change(page.describe, [checkpoint], [info, example_pick])
        blocks.load(page.describe, [checkpoint], [info, example_pick])
        run.click(page.segment, [checkpoint, queries, *editors, *mask_files], [status, gallery, downloads])
        example_button.click(page.run_example, [checkpoint, example_pick], [status, gallery, downloads, *editors])
    return blocks
