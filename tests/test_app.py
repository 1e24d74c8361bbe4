"""The browser page (app/): its checkpoint list, the same masks as predict.py, every bad input
as one readable line, sessions kept apart, and the examples. The page itself in a browser is
tests/test_app_browser.py."""
import os
import threading
import zipfile

import cv2
import numpy as np
import pytest
import torch
import yaml

from app import server
from app.catalog import Catalog, find_checkpoints
from app.examples import example, example_names
from app.page import Page, drawn_mask, support_input
from app.segment import MAX_FRAMES, SupportInput, segment_images, segment_video
from commands import predict
from engine.checkpoint import save_checkpoint
from engine.networks import build_model
from util.config import defaults
from util.errors import CheckpointError, PredictInputError

pytestmark = pytest.mark.usefixtures("one_thread")

# a network small enough for a page test: a quarter-width ResNet-18 on 41-px canvases
IMAGE = dict(dataset="synthetic", layers=18, backbone_width=0.25, pretrained="", reduce_dim=8,
             ppm_scales=[1.0, 0.5], val_size=41, memory_size=8, num_negatives=4)
VIDEO = dict(dataset="synthetic_video", layers=18, backbone_width=0.25, pretrained="", reduce_dim=8,
             ppm_scales=[1.0, 0.5], shot=3, clip_len=3, video_h=33, video_w=57, video_bg_dim=12,
             memory_size=8, num_negatives=4)
DEMO = os.path.join("synthetic", "split0_resnet18", "model", "best.pth")


def write_image(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def make_checkpoints(root):
    """exp/ with the demo's path (a tiny image network), a tiny video network and a file that
    is not a checkpoint; the image network's config for predict.py."""
    exp = root / "exp"
    for rel, values in ((DEMO, IMAGE), (os.path.join("synthetic_video", "tiny", "model", "best.pth"), VIDEO)):
        cfg = defaults()
        cfg.update(values)
        torch.manual_seed(0)
        save_checkpoint(str(exp / rel), build_model(cfg, warn_random_backbone=False), cfg)
    (exp / "broken").mkdir()
    (exp / "broken" / "notes.pth").write_text("not a checkpoint")
    (root / "image.yaml").write_text(yaml.safe_dump({"MODEL": IMAGE}))
    return str(exp)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    exp = make_checkpoints(root)
    rng = np.random.default_rng(0)
    out = {"root": root, "exp": exp, "config": str(root / "image.yaml")}
    out["support"] = write_image(root / "a.png", rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    mask = np.zeros((50, 70), np.uint8)
    mask[10:35, 15:50] = 255
    cv2.imwrite(str(root / "a_mask.png"), mask)
    cv2.imwrite(str(root / "empty_mask.png"), np.zeros((50, 70), np.uint8))
    cv2.imwrite(str(root / "small_mask.png"), mask[:40, :60])
    out.update(mask=str(root / "a_mask.png"), empty_mask=str(root / "empty_mask.png"),
               small_mask=str(root / "small_mask.png"))
    out["queries"] = [write_image(root / "q1.png", rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)),
                      write_image(root / "q2.jpg", rng.integers(0, 256, (30, 90, 3), dtype=np.uint8))]
    (root / "notes.txt").write_text("not an image")
    (root / "clip.mp4").write_bytes(b"\0" * 64)
    out.update(text=str(root / "notes.txt"), video_file=str(root / "clip.mp4"))
    return out


@pytest.fixture(scope="module")
def catalog(files):
    return Catalog.scan(files["exp"])


def key_of(catalog, task):
    return next(str(i) for i, e in enumerate(catalog.entries) if e.task == task)


def rgb(path):
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


def page_supports(files, mask=None):
    return [SupportInput(rgb(files["support"]), mask_file=mask or files["mask"])]


# ---- the checkpoint list -----------------------------------------------------------------
def test_the_demo_checkpoint_comes_first_and_each_says_what_it_holds(files, catalog):
    exp = files["exp"]
    assert find_checkpoints(exp) == [os.path.join(exp, DEMO), os.path.join(exp, "broken", "notes.pth"),
                                     os.path.join(exp, "synthetic_video", "tiny", "model", "best.pth")]
    labels = [e.label for e in catalog.entries]
    assert labels[0] == f"{os.path.join(exp, DEMO)}: ntrenetpp, image task, ResNet-18 x0.25, synthetic fold 0"
    assert labels[2].endswith(": ntrenetpp, video task, ResNet-18 x0.25, synthetic_video fold 0")
    assert labels[1].endswith("notes.pth (cannot be used)")


def test_a_file_that_is_not_a_checkpoint_is_listed_with_the_loaders_reason(files, catalog):
    with pytest.raises(CheckpointError, match=r"notes.pth' is unreadable or corrupt.*re-download or re-train"):
        catalog.predictor("1")
    status, _, _ = Page(catalog, 2**20).segment("1", files["queries"], *([None] * 10))
    assert status.startswith("**Error:** checkpoint ") and "is unreadable or corrupt" in status


@pytest.mark.parametrize("key", ["7", "-1", "01", "/etc/passwd", None])
def test_only_a_listed_checkpoint_is_opened(catalog, key):
    with pytest.raises(CheckpointError, match="pick a checkpoint from the list"):
        catalog.entry(key)


# ---- one inference path ------------------------------------------------------------------
def test_the_pages_masks_equal_predict_py_pixel_for_pixel(files, catalog, tmp_path):
    predict.main(["--config", files["config"], "--weight", os.path.join(files["exp"], DEMO), "--support",
                  files["support"], files["mask"], "--query", *files["queries"], "--out", str(tmp_path / "cli")])
    _, predictor = catalog.predictor("0")
    (tmp_path / "page").mkdir()
    result = segment_images(predictor, page_supports(files), files["queries"], str(tmp_path / "page"), 2**20)
    assert [os.path.basename(f) for f in result.files] == ["masks.zip", "q1_mask.png", "q2_mask.png"]
    for name in ("q1_mask.png", "q2_mask.png"):
        cli = cv2.imread(str(tmp_path / "cli" / name), cv2.IMREAD_UNCHANGED)
        page = cv2.imread(str(tmp_path / "page" / name), cv2.IMREAD_UNCHANGED)
        assert page.shape == cli.shape and np.array_equal(page, cli)
    assert [caption for _, caption in result.views] == [
        f"{q}: {view}" for q in ("q1", "q2") for view in ("prediction", "mined BG", "mined DO", "prior")]
    assert result.summary.startswith("2 query(ies), 1-shot: ")


def test_a_painted_mask_is_the_same_support_as_its_png(files, catalog, tmp_path):
    """The brush layer (RGBA, painted where alpha > 0) is the mask predict.py reads from a PNG."""
    image = rgb(files["support"])
    layer = np.zeros((50, 70, 4), np.uint8)
    layer[10:35, 15:50] = (255, 48, 48, 255)
    support = support_input(0, {"background": np.dstack([image, np.full((50, 70), 255, np.uint8)]),
                                "layers": [layer]}, None)
    assert np.array_equal(support.image, image) and np.array_equal(support.mask, (layer[:, :, 3] > 0) * 1)
    _, predictor = catalog.predictor("0")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    painted = segment_images(predictor, [support], files["queries"][:1], str(tmp_path / "a"), 2**20)
    uploaded = segment_images(predictor, page_supports(files), files["queries"][:1], str(tmp_path / "b"), 2**20)
    assert np.array_equal(cv2.imread(painted.files[0], cv2.IMREAD_UNCHANGED),
                          cv2.imread(uploaded.files[0], cv2.IMREAD_UNCHANGED))


def test_a_layer_of_the_canvas_size_is_scaled_to_the_image():
    layer = np.zeros((100, 140, 4), np.uint8)
    layer[20:70, 30:100, 3] = 255
    mask = drawn_mask({"layers": [layer]}, (50, 70))
    expected = np.zeros((50, 70), np.uint8)
    expected[10:35, 15:50] = 1
    assert np.array_equal(mask, expected)
    assert drawn_mask({"layers": []}, (50, 70)) is None


# ---- bad input: one readable line, and the page goes on --------------------------------------
def bad(catalog, key, supports, queries, max_bytes=2**20):
    """The status line of a request that must fail, after checking nothing else came back."""
    page = Page(catalog, max_bytes)
    status, gallery, downloads = page._answer(lambda: page._run(key, supports, queries))
    assert gallery is None and downloads is None
    assert status.startswith("**Error:** ") and "\n" not in status and "Traceback" not in status
    return status[len("**Error:** "):]


def test_an_empty_painted_mask(files, catalog):
    supports = [SupportInput(rgb(files["support"]), mask=np.zeros((50, 70), np.uint8))]
    assert bad(catalog, "0", supports, files["queries"]) == (
        "support 1 has an empty mask: paint over the object with the brush, or upload a mask (white or 1 = "
        "the object)")
    assert bad(catalog, "0", [SupportInput(rgb(files["support"]))], files["queries"]).startswith(
        "support 1 has an empty mask")


def test_an_empty_uploaded_mask_names_the_upload_not_the_server_path(files, catalog):
    message = bad(catalog, "0", page_supports(files, files["empty_mask"]), files["queries"])
    assert message.startswith("support mask of support 1 ('empty_mask.png') has no pixel of the target")
    assert str(files["root"]) not in message


def test_a_mask_of_another_size_than_its_image(files, catalog):
    message = bad(catalog, "0", page_supports(files, files["small_mask"]), files["queries"])
    assert message == ("support mask of support 1 ('small_mask.png') is 60x40 (WxH) but its image in support 1 "
                       "is 70x50; a mask must have its image's size")


def test_a_non_image_upload(files, catalog):
    message = bad(catalog, "0", page_supports(files), [files["queries"][0], files["text"]])
    assert message == ("cannot read image query 'notes.txt': the file is empty, corrupt or not an image format "
                       "OpenCV and PIL read; re-export it as JPEG or PNG")


def test_a_video_for_an_image_checkpoint_and_an_image_for_a_video_checkpoint(files, catalog):
    assert bad(catalog, "0", page_supports(files), [files["video_file"]]) == (
        "query 'clip.mp4' is a video, and this checkpoint segments images: pick a video checkpoint, or "
        "upload frames as images")
    assert bad(catalog, key_of(catalog, "video"), page_supports(files) * 3, files["queries"][:1]) == (
        "this checkpoint segments videos: upload a video file or two or more frames of one, or pick an "
        "image checkpoint to segment a single image")
    assert bad(catalog, key_of(catalog, "video"), page_supports(files) * 3, [files["video_file"]]) == (
        "cannot read any frame of query 'clip.mp4': not a video OpenCV can decode (try an .mp4/.avi, or "
        "pass a folder of frames)")


def test_a_too_large_upload(files, catalog):
    limit = os.path.getsize(files["queries"][0]) - 1
    assert bad(catalog, "0", page_supports(files), files["queries"], max_bytes=limit) == (
        f"query 'q1.png' is {(limit + 1) / 2**20:.1f} MB; the page takes files up to {limit / 2**20:g} MB "
        f"(start it with --max-upload-mb to change that)")


def test_a_mask_without_an_image_and_no_support_at_all(files, catalog):
    with pytest.raises(PredictInputError, match="support 2 has a mask but no image"):
        support_input(1, None, files["mask"])
    assert bad(catalog, "0", [None, None], files["queries"]) == (
        "no support given: add an image to support 1 and mark the object on it")
    assert bad(catalog, "0", page_supports(files), []) == "no query given: upload one or more images to segment"


def test_the_page_keeps_serving_after_a_bug(files, catalog, caplog):
    page = Page(catalog, 2**20)
    assert page._answer(lambda: 1 / 0) == ("**Internal error** (a bug): the server's log has the details",
                                           None, None)
    assert "ZeroDivisionError" in caplog.text
    status, views, downloads = page.segment("0", files["queries"], *([None] * 5), files["mask"], *([None] * 4))
    assert status == "**Error:** support 1 has a mask but no image: add the image it belongs to"


# ---- sessions ----------------------------------------------------------------------------------
def test_two_sessions_at_once_get_their_own_results_from_one_loaded_model(files, tmp_path):
    catalog = Catalog.scan(files["exp"])
    page = Page(catalog, 2**20)
    image = rgb(files["support"])
    left, right = np.zeros((50, 70), np.uint8), np.zeros((50, 70), np.uint8)
    left[5:45, 2:30] = 1
    right[5:45, 40:68] = 1
    asks = {"left": [SupportInput(image, mask=left)], "right": [SupportInput(image, mask=right)]}
    alone = {name: page._run("0", s, files["queries"]) for name, s in asks.items()}
    together, barrier = {}, threading.Barrier(2)

    def session(name):
        barrier.wait()
        together[name] = page._run("0", asks[name], files["queries"])
    threads = [threading.Thread(target=session, args=(name,)) for name in asks]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert catalog.loads == 1
    for name in asks:
        assert os.path.dirname(together[name].files[0]) != os.path.dirname(alone[name].files[0])
        for a, b in zip(alone[name].files[1:], together[name].files[1:]):
            assert np.array_equal(cv2.imread(a, cv2.IMREAD_UNCHANGED), cv2.imread(b, cv2.IMREAD_UNCHANGED))
        for (a, caption), (b, same) in zip(alone[name].views, together[name].views):
            assert caption == same and np.array_equal(a, b)
    # the two asks differ, so a result handed to the wrong session would show: the priors differ
    prior = {name: [v for v, caption in alone[name].views if caption.endswith("prior")] for name in asks}
    assert not np.array_equal(prior["left"][0], prior["right"][0])


# ---- examples ----------------------------------------------------------------------------------
def test_an_image_example_runs_with_one_click(files, catalog):
    page = Page(catalog, 2**20)
    assert example_names(catalog.entries[0].cfg) == ["solid square", "striped triangle", "checkered ring"]
    status, views, downloads, *editors = page.run_example("0", "striped triangle")
    assert status.startswith("2 query(ies), 1-shot: ") and len(views) == 8
    assert [os.path.basename(f) for f in downloads] == ["masks.zip", "query1_mask.png", "query2_mask.png"]
    supports, _ = example(catalog.entries[0].cfg, 1)
    assert np.array_equal(editors[0]["background"], supports[0].image)
    assert np.array_equal(editors[0]["layers"][0][:, :, 3] > 0, supports[0].mask == 1)


def test_a_video_example_segments_every_frame(files, catalog):
    status, views, downloads, *editors = Page(catalog, 2**20).run_example(key_of(catalog, "video"), "solid square")
    assert status.startswith("8 frames, 3-shot: ") and status.endswith(" s per frame (network and "
                                                                       "preprocessing, on cpu)")
    assert os.path.basename(downloads[0]) == "masks.zip"
    with zipfile.ZipFile(downloads[0]) as archive:
        assert sorted(archive.namelist()) == [f"{t:05d}_mask.png" for t in range(8)]
    assert views[0][1] == "supports; frames: prediction, mined BG, mined DO"
    assert [c for _, c in views[1:5]] == [f"frame 00000: {v}" for v in ("prediction", "mined BG", "mined DO",
                                                                         "prior")]
    assert all(isinstance(e, dict) for e in editors[:3])


def test_video_frames_as_images_and_the_frame_limit(files, catalog, tmp_path):
    _, predictor = catalog.predictor(key_of(catalog, "video"))
    supports, frames = example(predictor.cfg, 0)
    paths = [write_image(tmp_path / f"f{t}.png", f) for t, f in enumerate(frames[:4])]
    (tmp_path / "out").mkdir()
    result = segment_video(predictor, supports, paths[::-1], str(tmp_path / "out"), 2**20)
    direct = predictor.predict([(s.image, s.mask) for s in supports], frames[:4])
    for t in range(4):
        assert np.array_equal(cv2.imread(str(tmp_path / "out" / f"f{t}_mask.png"), cv2.IMREAD_UNCHANGED),
                              direct.masks[t])
    with pytest.raises(PredictInputError, match=f"the video has {MAX_FRAMES + 1} frames; the page takes up to"):
        segment_video(predictor, supports, [frames[0]] * (MAX_FRAMES + 1), str(tmp_path / "out"), 2**20)


# ---- the server's command line -------------------------------------------------------------
def test_the_server_binds_this_machine_only_by_default():
    args = server.parse([])
    assert (args.host, args.port, args.exp, args.max_upload_mb) == ("127.0.0.1", 7860, "exp", 20.0)


def test_no_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    from util.cli import run
    with pytest.raises(SystemExit) as stop:
        run(server.main, ["--exp", str(tmp_path), "--checkpoint", str(tmp_path / "missing.pth")], prog="app")
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"app: error: checkpoint '{tmp_path / 'missing.pth'}' (--checkpoint) "
                                       f"does not exist; check the path\n")
    with pytest.raises(SystemExit):
        run(server.main, ["--exp", str(tmp_path)], prog="app")
    assert "no checkpoint under" in capsys.readouterr().err
