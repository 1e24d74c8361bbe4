"""Drive the browser page in headless Chromium: the code behind tests/test_app_browser.py, and a
measurement of the page (time from ``make app`` to a served page, time per query) that also
writes the README's screenshot.

    python tools/measure/app_browser.py [--checkpoint CKPT] [--screenshot docs/app.png] [--runs 3]

starts ``make app`` (with ``APP_ARGS`` for the port and ``--checkpoint``) as a user would, waits
for the page, runs the first example ``--runs`` times in the browser, prints the times and,
with ``--screenshot``, saves the page with the last result. It uses the system's Chromium and
its chromedriver (Debian: ``apt-get install chromium chromium-driver``), never a downloaded one.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from util.cli import run
from util.errors import UserError
from util.fileio import atomic_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
WINDOW = (1400, 1900)


def browser_paths() -> tuple[str, str] | None:
    """(Chromium, its chromedriver) from the system's PATH, or None when either is missing."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_opener():
    """urllib without any proxy: the page is on this machine."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PageDriver:
    """One browser session on the page at ``url``: what a user clicks, as methods."""

    def __init__(self, url: str, paths: tuple[str, str], timeout: float = 60.0):
        self.url, self.timeout = url, timeout
        options = webdriver.ChromeOptions()
        options.binary_location = paths[0]
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-proxy-server"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(executable_path=paths[1]), options=options)

    def close(self) -> None:
        self.driver.quit()

    def _find(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def _wait(self, condition, what: str):
        return WebDriverWait(self.driver, self.timeout, poll_frequency=0.1).until(
            lambda _: condition(), message=f"the page did not show {what} within {self.timeout:g} s")

    def load(self) -> None:
        """Open the page and wait until the checkpoint's line and the examples are there."""
        self.driver.get(self.url)
        self._wait(lambda: self.text("#checkpoint-info") and self._find("#run-example"), "the checkpoint's line")

    def text(self, css: str) -> str:
        found = self._find(css)
        return found[0].text.strip() if found else ""

    def status(self) -> str:
        return self.text("#status")

    def _press(self, css: str) -> str:
        """Press a button; the status line it brings (one that differs from the line before:
        each run's line holds its time, each mistake's its own words)."""
        before = self.status()
        self._find(css)[0].click()
        # Gradio overlays "processing | t/T s" on the status while a request runs: a line still
        # showing it is the previous one under the overlay, not the answer
        self._wait(lambda: self.status() not in ("", before) and "processing |" not in self.status(),
                   "a new status line")
        return self.status()

    def run_example(self) -> str:
        return self._press("#run-example")

    def segment(self) -> str:
        return self._press("#segment")

    def upload(self, css: str, *paths: str) -> None:
        """Give files to the upload field of the component ``css`` and wait until it holds them."""
        field = self._find(f"{css} input[type=file]")[0]
        field.send_keys("\n".join(os.path.abspath(p) for p in paths))
        names = [os.path.basename(p) for p in paths]
        if css.startswith("#support-") and not css.endswith("-mask"):
            self._wait(lambda: self._find(f"{css} canvas"), "the support image")
        else:
            # the file list holds each name (in a narrow column, not all of it visible)
            self._wait(lambda: all(n.rsplit(".", 1)[0] in self._find(css)[0].get_attribute("textContent")
                                   for n in names), f"{', '.join(names)} uploaded")

    def downloads(self) -> dict[str, str]:
        """The download links of the result: file name -> address."""
        links = [a.get_attribute("href") for a in self._find("#downloads a")]
        return {os.path.basename(link): link for link in links if link}

    def fetch(self, address: str) -> bytes:
        with local_opener().open(address, timeout=self.timeout) as response:
            return response.read()

    def gallery_count(self) -> int:
        return len(self._find("#results img"))

    def outside_requests(self) -> list[str]:
        """Every resource the page loaded from anywhere but its own server."""
        names = self.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        origin = self.url.rstrip("/")
        return [n for n in names if not (n.startswith(origin) or n.startswith("data:") or n.startswith("blob:"))]

    def screenshot(self, path: str) -> None:
        """The whole page as a PNG, written atomically."""
        height = self.driver.execute_script("return document.body.scrollHeight")
        self.driver.set_window_size(WINDOW[0], min(max(height, 800), 4000))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(self.driver.get_screenshot_as_png())
        self.driver.set_window_size(*WINDOW)


# ---- the measurement ------------------------------------------------------------------------
def wait_served(url: str, process: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``url`` answers 200 (the page's HTML), polling; the app's exit is an error."""
    start = time.perf_counter()
    opener = local_opener()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise UserError(f"make app exited with status {process.returncode} before serving")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.1)
    raise UserError(f"the page was not served within {timeout:g} s")


def measure(checkpoint: str | None, runs: int, screenshot: str | None, timeout: float) -> dict:
    paths = browser_paths()
    if paths is None:
        raise UserError("Chromium and its chromedriver are not installed: apt-get install chromium chromium-driver")
    port = free_port()
    app_args = f"--port {port}" + (f" --checkpoint {checkpoint}" if checkpoint else "")
    t0 = time.perf_counter()
    process = subprocess.Popen(["make", "--no-print-directory", "app", f"APP_ARGS={app_args}"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        served = wait_served(f"http://127.0.0.1:{port}/", process, timeout)
        page = PageDriver(f"http://127.0.0.1:{port}/", paths)
        try:
            page.load()
            loaded = time.perf_counter() - t0
            statuses = [page.run_example() for _ in range(runs)]
            if screenshot:
                page.screenshot(screenshot)
        finally:
            page.close()
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait()
    per_query = [float(m.group(1)) for s in statuses for m in [re.search(r"([0-9.]+) s per (query|frame)", s)] if m]
    if len(per_query) != runs:
        raise UserError(f"an example did not run: {statuses[-1]}")
    return {"served_s": served, "page_loaded_s": loaded, "per_query_s": per_query, "status": statuses[-1]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint to offer first (default: those under exp/, the demo's first)")
    parser.add_argument("--runs", type=int, default=3, help="times the first example runs")
    parser.add_argument("--screenshot", help="write the page with the last result here (PNG)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the page")
    args = parser.parse_args(argv)
    result = measure(args.checkpoint, args.runs, args.screenshot, args.timeout)
    print(f"make app -> page served: {result['served_s']:.1f} s; page loaded in the browser: "
          f"{result['page_loaded_s']:.1f} s; per query (first example, {args.runs} runs): "
          + ", ".join(f"{s:.3f} s" for s in result["per_query_s"]))
    print(f"last status: {result['status']}")
    return result


if __name__ == "__main__":
    run(main, prog=os.path.basename(sys.argv[0]))
