"""Panels (util/vis.py) and where they are made: test.py vis N, TensorBoard at validation."""
import os

import cv2
import numpy as np
import pytest
import torch

from dataset.transform import ToTensorNormalize
from util.vis import (DO_COLOUR, FG_COLOUR, OUTLINE_COLOUR, TILE, TILE_GAP, TITLE_H, canvas_extent, denormalize,
                      heatmap, outline, overlay, panel_image, save_panel, tint, to_rgb)


pytestmark = pytest.mark.usefixtures("one_thread")


def normalised(image):
    return ToTensorNormalize()(image.astype(np.float32), np.zeros(image.shape[:2], np.uint8))[0]


def evaluation_sample(K=2, size=41, seed=0):
    """What engine.evaluate keeps per episode: canvas tensors, 0/1/255 masks, extras, IoU."""
    rng = np.random.default_rng(seed)
    images = [normalised(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(K + 1)]
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[8:30, 10:25] = 1
    mask[-3:] = 255
    return {"support_imgs": torch.stack(images[1:]), "support_masks": mask.expand(K, size, size),
            "query_img": images[0], "query_mask": mask, "pred": (mask == 1).long(),
            "bg_map": torch.rand(size, size, generator=torch.Generator().manual_seed(seed)),
            "do_mask": (mask == 0).long(), "class_name": "red disc", "iou": 61.25}


def test_panel_file_has_one_tile_per_view_and_a_title(tmp_path):
    sample = evaluation_sample(K=2)
    path = str(tmp_path / "panels" / "p.png")
    image = save_panel(path, sample)
    # 2 supports, query, ground truth, prediction, mined BG, mined DO
    assert image.shape == (TITLE_H + TILE, 7 * TILE, 3)
    on_disk = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    assert np.array_equal(on_disk, image)                       # PNG: exactly what was rendered
    title = image[:TITLE_H]
    assert (title < 128).any() and (title == 255).mean() > 0.8  # dark text on white


def test_optional_views_are_left_out_and_tile_size_is_honoured():
    sample = evaluation_sample(K=1)
    for key in ("query_mask", "bg_map", "do_mask", "iou"):
        del sample[key]
    assert panel_image(sample).shape == (TITLE_H + TILE, 3 * TILE, 3)        # support, query, prediction
    assert panel_image(evaluation_sample(K=3), tile=64).shape == (TITLE_H + 64, 8 * 64, 3)


def test_panel_of_original_size_arrays_of_different_sizes():
    """The predictor's panels: uint8 RGB arrays, supports and query each at their own size."""
    rng = np.random.default_rng(1)
    supports = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (64, 40))]
    masks = [np.zeros((50, 70), np.uint8), np.zeros((64, 40), np.uint8)]
    masks[0][10:30, 20:50] = 1
    masks[1][17:47, 17:37] = 1
    query = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    zeros = np.zeros((375, 500), np.uint8)
    sample = {"support_imgs": supports, "support_masks": masks, "query_img": query, "pred": zeros,
              "bg_map": np.full((375, 500), 0.5, np.float32), "do_mask": zeros, "class_name": "q"}
    panel = panel_image(sample)
    assert panel.shape == (TITLE_H + TILE, 6 * TILE, 3)
    # the 500x375 query is shrunk to fit its tile (less the gap), top-left; white below and right
    width, height = TILE - TILE_GAP, round(375 * (TILE - TILE_GAP) / 500)
    query_tile = panel[TITLE_H:, 2 * TILE:3 * TILE]
    assert (query_tile[height:] == 255).all() and (query_tile[:, width:] == 255).all()
    assert not (query_tile[20:height, :width] == 255).all(axis=-1).any()     # random pixels: none pure white
    with pytest.raises(ValueError, match="uint8 RGB"):
        to_rgb(query.astype(np.float32))


def test_evaluation_canvas_is_cropped_to_the_image_on_it():
    """A 70x50 image on a 41² canvas is 40x24 (dataset.transform.eval_resized_hw) with ignore
    below; the panel shows those 40x24 pixels, not the black padding."""
    from dataset.transform import EvalResize, eval_resized_hw
    rng = np.random.default_rng(3)
    image = rng.integers(30, 226, (50, 70, 3), dtype=np.uint8)
    label = np.zeros((50, 70), np.uint8)
    label[10:40, 20:60] = 1
    canvas, canvas_label = EvalResize(41)(image.astype(np.float32), label)
    assert eval_resized_hw(50, 70, 41) == (24, 40) and canvas_extent(canvas_label) == (24, 40)
    canvas_label[10, :] = 255                     # an all-ignore row inside the image is kept
    assert canvas_extent(canvas_label) == (24, 40)
    assert canvas_extent(np.full((5, 5), 255, np.uint8)) == (5, 5)
    query = normalised(canvas.astype(np.uint8))
    mask = torch.from_numpy(canvas_label).long()
    sample = {"support_imgs": query[None], "support_masks": mask[None], "query_img": query, "query_mask": mask,
              "pred": (mask == 1).long(), "bg_map": torch.zeros(41, 41), "do_mask": torch.zeros(41, 41)}
    panel = panel_image(sample)
    height = round(24 * (TILE - TILE_GAP) / 40)   # 95 rows of image in every tile, white below
    for t in range(6):
        tile = panel[TITLE_H:, t * TILE:(t + 1) * TILE]
        assert (tile[height:] == 255).all()
        assert not (tile[height - 1, :TILE - TILE_GAP] == 0).all()      # the image's last row, not padding


def test_tint_outline_and_overlay_touch_only_the_mask():
    image = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 1
    mask[0, 0] = 255                                              # ignore is not target
    tinted = tint(image, mask)
    expected = (0.5 * 100 + 0.5 * np.asarray(FG_COLOUR, np.float32)).astype(np.uint8)   # 177, 82, 82
    assert (tinted[mask == 1] == expected).all() and (tinted[mask != 1] == 100).all()
    assert tint(image, mask, DO_COLOUR, alpha=1.0)[15, 15].tolist() == list(DO_COLOUR)
    lined = outline(image, mask)
    assert lined[10, 20].tolist() == list(OUTLINE_COLOUR)        # on the border
    assert lined[20, 20].tolist() == [100] * 3 and lined[2, 35].tolist() == [100] * 3
    over = overlay(image, mask)
    assert over[20, 20].tolist() == expected.tolist() and over[10, 20].tolist() == list(FG_COLOUR)
    assert over[2, 35].tolist() == [100] * 3


def test_denormalize_inverts_the_evaluation_normalisation_and_heatmap_runs_blue_to_red():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert np.abs(denormalize(normalised(image)).astype(int) - image).max() <= 1
    assert to_rgb(image) is image
    colours = heatmap(np.array([[0.0, 1.0]]))
    assert colours[0, 0].tolist() == [0, 0, 128] and colours[0, 1].tolist() == [128, 0, 0]


# ---- where panels are made ----------------------------------------------------------------
TINY = dict(dataset="synthetic", layers=18, pretrained="", reduce_dim=8, ppm_scales=[1.0, 0.5],
            train_h=33, train_w=33, val_size=41, batch_size=2, batch_size_val=2, workers=0,
            min_class_pixels=150, class_index_workers=1, epochs=1, epoch_size=2, test_num=3, test_seeds=2,
            val_num=3, memory_size=8, num_negatives=4, manual_seed=5)


@pytest.fixture(scope="module")
def synthetic_cfg(tmp_path_factory):
    from tools.make_synthetic import main as make_synthetic
    from util.config import defaults
    root = str(tmp_path_factory.mktemp("synth_vis"))
    make_synthetic(["--out", root, "--train", "60", "--val", "40", "--size", "64", "--workers", "1"])
    cfg = defaults()
    cfg.update(TINY, data_root=root, train_list=os.path.join(root, "train.txt"),
               val_list=os.path.join(root, "val.txt"))
    return cfg


def test_test_py_vis_saves_n_panels_per_seed(synthetic_cfg, tmp_path):
    from engine.networks import build_model
    from util.distributed import DistInfo
    from engine.tester import run_test, test_seeds
    cfg = synthetic_cfg.copy()
    cfg.update(save_path=str(tmp_path), vis=2)
    torch.manual_seed(0)
    run_test(cfg, DistInfo(), model=build_model(cfg), write_json=False)
    for seed in test_seeds(cfg):
        folder = tmp_path / "result" / f"vis_seed{seed}"
        assert sorted(os.listdir(folder)) == ["rank0_panel000.png", "rank0_panel001.png"]
        for name in os.listdir(folder):
            # 1 support, query, ground truth, prediction, mined BG, mined DO, prior
            assert cv2.imread(str(folder / name)).shape == (TITLE_H + TILE, 7 * TILE, 3)


def test_validation_logs_panels_to_tensorboard(synthetic_cfg, tmp_path):
    from util.distributed import DistInfo
    from engine.trainer import Trainer

    class Writer:          # records what the trainer hands to TensorBoard
        def __init__(self):
            self.images, self.scalars = {}, {}

        def add_image(self, tag, image, step, dataformats):
            self.images[tag] = (image, step, dataformats)

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = value

    cfg = synthetic_cfg.copy()
    cfg.update(save_path=str(tmp_path), tb_images=2)
    writer = Writer()
    Trainer.from_cfg(cfg, DistInfo(), writer).validation.validate()
    assert sorted(writer.images) == ["val/episode_0", "val/episode_1"]
    for image, step, dataformats in writer.images.values():
        assert image.shape == (TITLE_H + TILE, 7 * TILE, 3) and image.dtype == np.uint8   # with the prior
        assert step == 0 and dataformats == "HWC"
    assert set(writer.scalars) == {"val/miou", "val/fbiou"}
