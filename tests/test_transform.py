import numpy as np
import pytest
import torch

from util.config import defaults
from dataset.transform import (IMAGENET_MEAN, IMAGENET_STD, EvalResize, RandomCrop, RandomGaussianBlur,
                               RandomHorizontalFlip, RandRotate, ToTensorNormalize, eval_resized_hw, eval_transform,
                               train_transform)


def ramp(h=20, w=30):
    """An image whose every channel equals the label value, so geometry can be compared."""
    label = (np.arange(h * w) % 2).reshape(h, w).astype(np.uint8)
    label[:, :5] = 255
    return np.repeat(label[..., None].astype(np.float32), 3, axis=2), label


def test_flip_moves_image_and_label_together():
    image, label = ramp()
    out_img, out_lab = RandomHorizontalFlip(p=1.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_lab, label[:, ::-1])
    np.testing.assert_array_equal(out_img[..., 0], out_lab.astype(np.float32))
    same_img, same_lab = RandomHorizontalFlip(p=0.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(same_lab, label)


def test_rotation_pads_label_with_255_and_image_with_mean():
    image = np.full((40, 40, 3), 7.0, np.float32)
    label = np.ones((40, 40), np.uint8)
    rot = RandRotate(30, 30, IMAGENET_MEAN, 255, p=1.0)
    out_img, out_lab = rot(image, label, np.random.default_rng(0))
    assert out_lab[0, 0] == 255 and out_lab[20, 20] == 1
    np.testing.assert_allclose(out_img[0, 0], IMAGENET_MEAN, rtol=1e-6)
    assert set(np.unique(out_lab)) == {1, 255}


def test_crop_pads_centred_with_255_then_crops_exact_size():
    image = np.full((10, 12, 3), 5.0, np.float32)
    label = np.zeros((10, 12), np.uint8)
    out_img, out_lab = RandomCrop(14, 12, IMAGENET_MEAN, 255)(image, label, np.random.default_rng(0))
    assert out_lab.shape == (14, 12) and out_img.shape == (14, 12, 3)
    # 4 rows of padding split 2 above, 2 below
    assert (out_lab[:2] == 255).all() and (out_lab[-2:] == 255).all() and (out_lab[2:12] == 0).all()
    np.testing.assert_allclose(out_img[0, 0], IMAGENET_MEAN, rtol=1e-6)


def test_train_transform_keeps_only_valid_label_values_and_is_driven_by_its_generator():
    cfg = defaults()
    cfg.update(train_h=33, train_w=41, rotate_p=1.0, scale_min=0.5, scale_max=1.5)
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 255, (50, 60, 3)).astype(np.float32)
    label = rng.choice(np.array([0, 1, 255], np.uint8), (50, 60))
    t = train_transform(cfg)
    a_img, a_lab = t(image, label, np.random.default_rng(11))
    b_img, b_lab = t(image, label, np.random.default_rng(11))
    assert a_img.shape == (3, 33, 41) and a_lab.shape == (33, 41) and a_lab.dtype == torch.int64
    assert set(a_lab.unique().tolist()) <= {0, 1, 255}
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    c_img, _ = t(image, label, np.random.default_rng(12))
    assert not torch.equal(a_img, c_img)


@pytest.mark.parametrize("hw,expected", [((375, 500), (352, 472)), ((500, 333), (472, 312)),
                                         ((473, 473), (472, 472)), ((100, 50), (472, 232))])
def test_eval_resize_floors_sides_to_multiples_of_8(hw, expected):
    assert eval_resized_hw(*hw, 473) == expected


def test_eval_resize_pastes_top_left_on_a_padded_canvas():
    image = np.full((30, 60, 3), 9.0, np.float32)
    label = np.ones((30, 60), np.uint8)
    out_img, out_lab = EvalResize(41, 255)(image, label)
    # longer side 60 -> 41 -> floored 40; shorter 30*41/60 = 20.5 -> 20 -> 16
    assert out_lab.shape == (41, 41)
    assert (out_lab[:16, :40] == 1).all() and (out_lab[16:] == 255).all() and (out_lab[:, 40:] == 255).all()
    assert (out_img[:16, :40] == 9).all() and (out_img[16:] == 0).all()


def test_normalisation_uses_imagenet_statistics():
    image = np.broadcast_to(np.asarray(IMAGENET_MEAN, np.float32), (2, 2, 3)).copy()
    image[0, 0] += np.asarray(IMAGENET_STD, np.float32)
    img, lab = ToTensorNormalize()(image, np.zeros((2, 2), np.uint8))
    assert img.shape == (3, 2, 2)
    torch.testing.assert_close(img[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(img[:, 1, 1], torch.zeros(3))


def test_hue_rotation_turns_primaries_and_keeps_greys():
    from dataset.transform import hue_rotate
    image = np.array([[[255, 0, 0], [0, 255, 0], [90, 90, 90]]], np.float32)
    turned = hue_rotate(image, 120)
    assert np.allclose(turned, [[[0, 255, 0], [0, 0, 255], [90, 90, 90]]], atol=1e-3)
    assert np.allclose(hue_rotate(image, -120), [[[0, 0, 255], [255, 0, 0], [90, 90, 90]]], atol=1e-3)
    assert hue_rotate(image, 0) is image
    soft = np.array([[[120, 100, 90], [95, 110, 100]]], np.float32)   # no clipping on the way
    assert np.allclose(hue_rotate(hue_rotate(soft, 50), -50), soft, atol=1e-3)
    mixed = np.array([[[200, 40, 10]]], np.float32)
    assert hue_rotate(mixed, 33).min() >= 0 and hue_rotate(mixed, 33).max() <= 255


def episode_before_and_after(cfg, key, **keys):
    """Training episode ``key`` (position, seed) of a 2-shot set without geometric augmentation,
    drawn before and after ``cfg.update(keys)``: ``(before, after, dataset after)``. A colour
    augmentation must leave the episode drawn and its labels as they were."""
    from dataset.image import FewShotTrainDataset
    cfg.update(scale_min=1.0, scale_max=1.0, rotate_p=0.0, blur_p=0.0, flip_p=0.0, train_h=64, train_w=64)
    before = FewShotTrainDataset(cfg, shot=2)[key]
    cfg.update(keys)
    ds = FewShotTrainDataset(cfg, shot=2)
    after = ds[key]
    assert torch.equal(before["query_mask"], after["query_mask"]) and before["class_id"] == after["class_id"]
    assert torch.equal(before["support_masks"], after["support_masks"])
    return before, after, ds


def test_hue_jitter_turns_query_and_supports_by_one_angle(tiny_pascal):
    """The episode's images are turned alike; labels and the episode drawn are untouched, and
    with hue_jitter 0 the episode is the one drawn before the key existed."""
    cfg, _ = tiny_pascal
    plain, turned, ds = episode_before_and_after(cfg, (3, 77), hue_jitter=180.0)
    assert not torch.allclose(plain["query_img"], turned["query_img"])
    rng = np.random.default_rng(77)
    ds.draw(3, rng)
    angle = rng.uniform(-180.0, 180.0)                                   # drawn right after the episode
    from dataset.transform import hue_rotation_matrix
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    matrix = torch.from_numpy(hue_rotation_matrix(angle))
    for a, b in [(plain["query_img"], turned["query_img"])] + list(zip(plain["support_imgs"], turned["support_imgs"])):
        rgb = a * std + mean
        expected = (torch.einsum("ij,jhw->ihw", matrix, rgb).clamp(0, 255) - mean) / std
        assert torch.allclose(expected, b, atol=1e-3)


def test_tint_jitter_scales_each_channel_of_the_whole_episode_alike(tiny_pascal):
    """One gain per RGB channel for the query and every support, drawn right after the hue turn;
    labels and the episode are untouched, and white becomes a colour (a hue turn leaves it white;
    black, a product with zero, stays black)."""
    from util.config import validate
    from util.errors import ConfigError
    from dataset.transform import hue_rotate
    cfg, _ = tiny_pascal
    cfg.update(hue_jitter=90.0)
    plain, tinted, ds = episode_before_and_after(cfg, (5, 31), tint_jitter=0.6)
    rng = np.random.default_rng(31)
    ds.draw(5, rng)
    rng.uniform(-90.0, 90.0)                                             # the hue angle
    gains = rng.uniform(0.4, 1.0, 3).astype(np.float32)
    assert gains.min() >= 0.4 and not np.allclose(gains, gains[0])
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    gain = torch.from_numpy(gains).view(3, 1, 1)
    for a, b in [(plain["query_img"], tinted["query_img"])] + list(zip(plain["support_imgs"], tinted["support_imgs"])):
        expected = ((a * std + mean) * gain - mean) / std                # the hue-turned image, tinted
        assert torch.allclose(expected, b, atol=1e-3)
    white = np.full((1, 1, 3), 255.0, np.float32)
    assert np.allclose(hue_rotate(white, 77), 255.0, atol=1e-2)           # no hue turn colours white
    with pytest.raises(ConfigError, match="tint_jitter"):
        cfg.update(tint_jitter=1.0)
        validate(cfg)


# ---------------------------------------------------------------- geometry and defaults, by hand
def test_eval_resize_keeps_8_pixels_for_a_very_thin_image():
    assert eval_resized_hw(1000, 10, 473) == (472, 8)      # 10 * 473 / 1000 = 4 -> 0 -> at least 8
    assert eval_resized_hw(10, 1000, 473) == (8, 472)
    assert eval_resized_hw(64, 64, 41) == (40, 40)


def test_eval_resize_is_linear_for_the_image_and_nearest_for_the_label():
    """Halving 16 -> 8: OpenCV's linear resize samples between two source pixels (the mean of a
    2×2 block), nearest takes the top-left one; the canvas is padded with the ignore label."""
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (16, 16, 3)).astype(np.float32)
    label = rng.choice(np.array([0, 1, 255], np.uint8), (16, 16))
    out_img, out_lab = EvalResize(9)(image, label)           # 16 -> 9 -> floored to 8, canvas 9
    assert out_lab.shape == (9, 9) and out_img.shape == (9, 9, 3)
    assert out_img.dtype == np.float32 and out_lab.dtype == np.uint8   # what the next transform takes
    blocks = image.reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out_img[:8, :8], blocks, rtol=1e-5)
    assert (out_img[8] == 0).all() and (out_img[:, 8] == 0).all()
    assert out_lab[:8, :8].tolist() == label[::2, ::2].tolist()
    assert (out_lab[8] == 255).all() and (out_lab[:, 8] == 255).all()
    _, seven = EvalResize(9, ignore_label=7)(image, label)
    assert (seven[8] == 7).all()


def test_the_configured_ignore_label_pads_every_transform():
    cfg = defaults()
    cfg.update(ignore_label=7, val_size=9, train_h=12, train_w=12, scale_min=1.0, scale_max=1.0, rotate_p=1.0,
               rotate_min=45, rotate_max=45, blur_p=0.0, flip_p=0.0)
    image = np.full((16, 8, 3), 100.0, np.float32)
    label = np.ones((16, 8), np.uint8)
    _, lab = eval_transform(cfg)(image, label)
    assert lab[:, 8:].unique().tolist() == [7] and lab[8:].unique().tolist() == [7] and lab[:8, :8].unique().tolist() == [1]
    _, lab = train_transform(cfg)(image, label, np.random.default_rng(0))
    assert set(lab.unique().tolist()) == {1, 7}                # rotation corners and crop padding: 7, never 255


def rotated_by_hand(label, fill):
    """90° counter-clockwise about (w/2, h/2), as cv2.getRotationMatrix2D defines it: the pixel
    at (x', y') comes from (x, y) = (cx + cy - y', x' - cx + cy), an integer position here."""
    h, w = label.shape
    cx, cy = w / 2, h / 2
    out = np.full_like(label, fill)
    for yp in range(h):
        for xp in range(w):
            x, y = int(cx + cy - yp), int(xp - cx + cy)
            if 0 <= x < w and 0 <= y < h:
                out[yp, xp] = label[y, x]
    return out


def test_rotation_turns_about_the_image_centre():
    label = np.arange(24, dtype=np.uint8).reshape(4, 6)
    image = np.repeat(label[..., None].astype(np.float32), 3, axis=2)
    out_img, out_lab = RandRotate(90, 90, IMAGENET_MEAN, 255, p=1.0)(image, label, np.random.default_rng(0))
    expected = rotated_by_hand(label, 255)
    assert out_lab.tolist() == expected.tolist()
    inside = expected != 255
    np.testing.assert_allclose(out_img[..., 0][inside], expected[inside], atol=1e-4)


def test_default_probabilities_and_ignore_labels():
    """The transforms default to p = 0.5 and ignore 255: a generator whose first draw is 0.64
    leaves the input alone, one whose first draw is 0.26 applies the transform."""
    image = np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    label = np.ones((4, 4), np.uint8)
    keep, act = 0, 2                                         # default_rng(0).random() = 0.64, (2) = 0.26
    for t in (RandomHorizontalFlip(), RandomGaussianBlur(), RandRotate(30, 30)):
        out, lab = t(image, label, np.random.default_rng(keep))
        assert np.array_equal(out, image) and np.array_equal(lab, label)
        out, _ = t(image, label, np.random.default_rng(act))
        assert not np.array_equal(out, image)
    _, lab = RandRotate(30, 30)(image, label, np.random.default_rng(act))
    assert lab[0, 0] == 255
    _, lab = RandomCrop(6, 6)(image, label, np.random.default_rng(0))
    assert lab[0, 0] == 255 and lab[1:5, 1:5].tolist() == label.tolist()


def test_blur_is_opencvs_fixed_5_tap_gaussian():
    """sigma 0 at ksize 5: OpenCV's fixed binomial kernel [1 4 6 4 1] / 16 along each axis,
    borders reflected without repeating the edge (scipy's 'mirror')."""
    from scipy import ndimage
    image = np.random.default_rng(1).uniform(0, 255, (9, 11, 3)).astype(np.float32)
    out, _ = RandomGaussianBlur(p=1.0)(image, np.zeros((9, 11), np.uint8), np.random.default_rng(0))
    kernel = np.array([1, 4, 6, 4, 1]) / 16
    expected = ndimage.correlate1d(ndimage.correlate1d(image.astype(np.float64), kernel, axis=0, mode="mirror"),
                                   kernel, axis=1, mode="mirror")
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_scale_resizes_both_sides_by_the_drawn_factor():
    from dataset.transform import RandScale
    image = np.zeros((5, 7, 3), np.float32)
    out, lab = RandScale(2.0, 2.0)(image, np.zeros((5, 7), np.uint8), np.random.default_rng(0))
    assert out.shape == (10, 14, 3) and lab.shape == (10, 14)


def test_crop_pads_both_sides_centred():
    image = np.full((3, 4, 3), 5.0, np.float32)
    label = np.zeros((3, 4), np.uint8)
    out_img, out_lab = RandomCrop(7, 9, IMAGENET_MEAN, 255)(image, label, np.random.default_rng(0))
    # 4 rows: 2 above, 2 below; 5 columns: 2 left, 3 right
    assert (out_lab[2:5, 2:6] == 0).all() and (out_lab == 0).sum() == 12
    assert (out_lab[:2] == 255).all() and (out_lab[5:] == 255).all()
    assert (out_lab[:, :2] == 255).all() and (out_lab[:, 6:] == 255).all()
    assert (out_img[2:5, 2:6] == 5.0).all()
    np.testing.assert_allclose(out_img[0, 8], IMAGENET_MEAN, rtol=1e-6)


def test_normalisation_returns_float32_whatever_the_input_float():
    image = np.zeros((2, 2, 3), np.float64)
    img, lab = ToTensorNormalize()(image, np.zeros((2, 2), np.uint8))
    assert img.dtype == torch.float32 and lab.dtype == torch.int64
    torch.testing.assert_close(img[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))
