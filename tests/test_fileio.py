import json
import multiprocessing
import os

import pytest

from engine.evaluate import write_test_result
from util.fileio import atomic_path, atomic_write_json, atomic_write_text, exclusive_name


def test_atomic_write_replaces_whole_file_and_follows_umask(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(str(path), {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    old = os.umask(0o022)
    os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~old)
    atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["out.json"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "ckpt.pth"
    path.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "good" and os.listdir(tmp_path) == ["ckpt.pth"]


def test_two_results_written_in_the_same_second_keep_one_file_each(tmp_path, monkeypatch):
    """test.py runs that finish in the same second used to write one test_<time>.json, the second
    replacing the first; the name is now reserved exclusively, the later run taking -2, -3, ..."""
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20261206_120000")
    paths = [write_test_result({"run": i}, str(tmp_path)) for i in range(3)]
    assert [os.path.basename(p) for p in paths] == ["test_20261206_120000.json", "test_20261206_120000-2.json",
                                                    "test_20261206_120000-3.json"]
    assert [json.load(open(p))["run"] for p in paths] == [0, 1, 2]


def test_concurrent_reservations_never_share_a_name(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        names = pool.starmap(exclusive_name, [(str(tmp_path / "test_x"), ".json")] * 16, chunksize=1)
    assert len(set(names)) == 16 and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(n) for n in names)
