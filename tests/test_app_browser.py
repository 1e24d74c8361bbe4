"""The page in a real browser: headless Chromium from the system's packages (.ci/run installs it
and its chromedriver) drives the page served in this process. It loads the page, runs an
example, uploads a support with its mask and a query and compares the downloaded mask with
predict.py's, and reads the messages of two bad inputs.

Without Chromium these tests are skipped, saying so; under CI (``CI`` set) a missing Chromium
fails them instead. With ``APP_SCREENSHOT=PATH`` the example's result is saved there as a PNG.
"""
import os

import cv2
import numpy as np
import pytest

from app import server
from commands import predict
from tests.test_app import DEMO, make_checkpoints, write_image
from tools.measure.app_browser import PageDriver, browser_paths, free_port

PATHS = browser_paths()
if PATHS is None and os.environ.get("CI"):
    pytest.fail("CI must have Chromium and its chromedriver (.ci/run installs them with apt-get)",
                pytrace=False)
pytestmark = pytest.mark.skipif(PATHS is None, reason="no Chromium with chromedriver on PATH "
                                                      "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page on a free port of 127.0.0.1 with the tiny checkpoints, and a browser on it."""
    root = tmp_path_factory.mktemp("app_browser")
    exp = make_checkpoints(root)
    blocks, url = server.serve(server.parse(["--exp", exp, "--port", str(free_port())]), block=False)
    page = PageDriver(url, PATHS)
    try:
        yield page, root
    finally:
        page.close()
        blocks.close()


def test_the_page_runs_an_example_with_one_click_and_loads_nothing_from_outside(served):
    page, _ = served
    page.load()
    assert page.text("#checkpoint-info") == "Segments images: upload one or more query images."
    status = page.run_example()
    assert status.startswith("2 query(ies), 1-shot: ") and status.endswith(" s per query (reading and network, "
                                                                           "on cpu)")
    page._wait(lambda: page.gallery_count() == 8, "8 result pictures")
    assert sorted(page.downloads()) == ["masks.zip", "query1_mask.png", "query2_mask.png"]
    assert page.outside_requests() == []
    if os.environ.get("APP_SCREENSHOT"):
        page.screenshot(os.environ["APP_SCREENSHOT"])


def test_an_uploaded_support_and_query_give_predict_pys_mask(served, tmp_path):
    page, root = served
    rng = np.random.default_rng(1)
    support = write_image(tmp_path / "cat.png", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = np.zeros((48, 64), np.uint8)
    mask[8:40, 12:44] = 255
    cv2.imwrite(str(tmp_path / "cat_mask.png"), mask)
    query = write_image(tmp_path / "street.png", rng.integers(0, 256, (60, 45, 3), dtype=np.uint8))
    predict.main(["--config", str(root / "image.yaml"), "--weight", str(root / "exp" / DEMO), "--support",
                  support, str(tmp_path / "cat_mask.png"), "--query", query, "--out", str(tmp_path / "cli")])

    page.load()
    page.upload("#support-1", support)
    page.upload("#support-1-mask", str(tmp_path / "cat_mask.png"))
    page.upload("#queries", query)
    status = page.segment()
    assert status.startswith("1 query(ies), 1-shot: "), status
    links = page.downloads()
    assert sorted(links) == ["street_mask.png"]
    downloaded = cv2.imdecode(np.frombuffer(page.fetch(links["street_mask.png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    expected = cv2.imread(str(tmp_path / "cli" / "street_mask.png"), cv2.IMREAD_UNCHANGED)
    assert downloaded.shape == expected.shape == (60, 45) and np.array_equal(downloaded, expected)


def test_two_bad_inputs_read_as_one_line_each_and_the_page_goes_on(served, tmp_path):
    page, _ = served
    rng = np.random.default_rng(2)
    support = write_image(tmp_path / "dog.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    query = write_image(tmp_path / "park.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")

    page.load()
    page.upload("#support-1", support)                  # nothing painted, no mask file
    page.upload("#queries", query)
    assert page.segment() == ("Error: support 1 has an empty mask: paint over the object with the brush, or "
                              "upload a mask (white or 1 = the object)")
    page.load()
    page.upload("#queries", str(tmp_path / "notes.txt"))
    assert page.run_example().startswith("2 query(ies)")        # the server still serves
    assert page.segment() == ("Error: cannot read image query 'notes.txt': the file is empty, corrupt or not "
                              "an image format OpenCV and PIL read; re-export it as JPEG or PNG")
