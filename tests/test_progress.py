"""util/logger.py progress: a bar where someone watches (a terminal), plain periodic lines
otherwise (a log file, a pipe, CI), the one-line error last."""
import io
import os
import subprocess
import sys

import util.logger as logger
from util.logger import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_a_terminal_progress_is_a_few_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(logger, "progress_stream", lambda: None)
    assert list(progress(range(25), desc="prep", unit="img", lines=5)) == list(range(25))
    err = capsys.readouterr().err
    assert err == "".join(f"prep: {n}/25 img ({4 * n}%)\n" for n in (5, 10, 15, 20, 25))
    assert list(progress(iter(range(3)), desc="x")) == [0, 1, 2] and capsys.readouterr().err == ""   # no total


def test_on_a_terminal_progress_is_a_bar(capsys, monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(logger, "progress_stream", lambda: terminal)
    assert list(progress(range(4), desc="prep", unit="img")) == [0, 1, 2, 3]
    assert "prep: 100%" in terminal.getvalue() and "\r" in terminal.getvalue()
    assert capsys.readouterr().err == ""


def test_a_tool_run_into_a_log_prints_lines_and_ends_with_its_error(tmp_path):
    """prepare_cdfss on a Chest X-ray folder with one unreadable mask, stderr a
    pipe (as in CI or ``2> log``): the progress is plain lines, no carriage return, the error line last."""
    import cv2
    import numpy as np
    src = tmp_path / "chest"
    (src / "CXR_png").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(3):
        cv2.imwrite(str(src / "CXR_png" / f"CHNCXR_{i:04d}_0.png"), np.full((8, 8), 90, np.uint8))
        cv2.imwrite(str(src / "masks" / f"CHNCXR_{i:04d}_0_mask.png"), np.full((8, 8), 255, np.uint8))
    (src / "masks" / "CHNCXR_0001_0_mask.png").write_bytes(b"not a PNG")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTRENETPP_")}
    r = subprocess.run([sys.executable, "tools/prepare_cdfss.py", "chest", "--src", str(src), "--out",
                        str(tmp_path / "out"), "--workers", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "\r" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[-1].startswith("prepare_cdfss.py: error: ")
    assert any(line.endswith("(100%)") for line in lines[:-1])
