"""Letterbox and clip augmentation (dataset/video_transform.py)."""
import numpy as np
import pytest

from dataset.video_transform import ClipAugment, ClipParams, letterbox, letterbox_geometry

IDENTITY = ClipParams(flip=False, crop=(0.0, 0.0, 0.0, 0.0), scale=1.0, shear_deg=0.0, rotate_deg=0.0,
                      contrast=1.0, brightness=0.0)


def test_letterbox_geometry_keeps_the_aspect_and_centres():
    # 720x1280 -> factor 425/1280: 239 x 425, one row of padding above
    g = letterbox_geometry(720, 1280, 241, 425)
    assert (g.new_h, g.new_w, g.top, g.left) == (239, 425, 1, 0)
    # a portrait 1280x720 frame: 241 x 135 in the middle
    g = letterbox_geometry(1280, 720, 241, 425)
    assert (g.new_h, g.new_w, g.top, g.left) == (241, 135, 0, 145)
    g = letterbox_geometry(241, 425, 241, 425)
    assert (g.new_h, g.new_w, g.top, g.left) == (241, 425, 0, 0)


def test_letterbox_pads_with_black_and_background():
    mask = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], np.uint8)
    image = np.full((2, 4, 3), 200, np.float32)
    canvas, m = letterbox(image, mask, 4, 4)
    assert np.array_equal(m, np.array([[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8))
    assert (canvas[0] == 0).all() and (canvas[3] == 0).all() and (canvas[1:3] == 200).all()
    # upscaled by 2.5 (nearest for the mask), centred horizontally
    small = np.array([[1, 0], [0, 0]], np.uint8)
    _, m = letterbox(np.zeros((2, 2, 3), np.float32), small, 5, 9)
    expected = np.zeros((5, 9), np.uint8)
    expected[0:3, 2:5] = 1
    assert np.array_equal(m, expected)


def frame(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (rng.random((h, w)) > 0.5).astype(np.uint8)


def test_identity_draw_is_the_identity_and_flip_flips():
    image, mask = frame(6, 10)
    aug = ClipAugment(6, 10)
    assert np.allclose(aug.matrix(IDENTITY, 6, 10), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    out_image, out_mask = aug.apply(IDENTITY, image, mask)
    assert np.array_equal(out_mask, mask) and np.allclose(out_image, image, atol=1e-3)
    flipped = ClipParams(**{**IDENTITY.__dict__, "flip": True})
    out_image, out_mask = aug.apply(flipped, image, mask)
    assert np.array_equal(out_mask, mask[:, ::-1]) and np.allclose(out_image, image[:, ::-1], atol=1e-3)


def test_portrait_frames_are_transposed():
    image, mask = frame(10, 6)
    out_image, out_mask = ClipAugment(6, 10).apply(IDENTITY, image, mask)
    assert np.array_equal(out_mask, mask.T) and np.allclose(out_image, image.transpose(1, 0, 2), atol=1e-3)


def test_photometric_part_and_one_draw_for_all_frames():
    image, mask = frame(6, 10)
    p = ClipParams(**{**IDENTITY.__dict__, "contrast": 1.02, "brightness": -3.0})
    out_image, _ = ClipAugment(6, 10).apply(p, image, mask)
    assert np.allclose(out_image, np.clip(image * 1.02 - 3.0, 0, 255), atol=1e-3)
    aug = ClipAugment(17, 29)
    p = aug.draw(np.random.default_rng(4))
    assert all(0 <= c <= 0.1 for c in p.crop) and 0.95 <= p.scale <= 1.05 and abs(p.rotate_deg) <= 15
    # the warp is fixed by the draw and the frame size alone: the same frame twice, the same output
    a = aug.apply(p, image, mask)
    b = aug.apply(p, image.copy(), mask.copy())
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # uncovered regions are black and background
    canvas_image, canvas_mask = aug.apply(p, np.full_like(image, 255), np.ones_like(mask))
    assert canvas_mask.min() == 0 and canvas_image.min() == 0


@pytest.mark.parametrize("h, w", [(720, 1280), (1280, 720), (480, 640)])
def test_augmented_content_stays_near_the_letterbox(h, w):
    """Small draws move the content little: the warped full mask covers most of the letterboxed one."""
    aug = ClipAugment(241, 425)
    ones = np.ones((h, w), np.uint8)
    th, tw = (w, h) if h > w else (h, w)
    _, box = letterbox(np.zeros((th, tw, 3), np.float32), np.ones((th, tw), np.uint8), 241, 425)
    for seed in range(5):
        _, m = aug.apply(aug.draw(np.random.default_rng(seed)), np.zeros((h, w, 3), np.float32), ones)
        assert (m & box).sum() / box.sum() > 0.6 and not (m & ~box.astype(bool)).any()
