import json
import logging
import multiprocessing
import os
import signal

import pytest

import util.fileio as fileio
from engine.evaluate import write_test_result
from tools.baseline import read_result
from util.config import defaults
from util.errors import UserError
from util.fileio import atomic_path, atomic_write_json, atomic_write_text, create_new_json, read_json_result


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


def test_concurrent_writers_never_share_a_name(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        names = pool.starmap(create_new_json, [(str(tmp_path / "test_x"), {"i": i}) for i in range(16)], chunksize=1)
    assert len(set(names)) == 16 and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(n) for n in names)
    assert sorted(json.load(open(n))["i"] for n in names) == list(range(16))


def killed_while_writing(tmp_path, monkeypatch_link=None):
    """write_test_result in a child process that SIGKILLs itself at the point ``monkeypatch_link``
    patches in (os.link replaced in the child only); returns the folder's listing."""
    def child():
        if monkeypatch_link is not None:
            fileio.os.link = monkeypatch_link
        write_test_result({"miou_mean": 50.0}, str(tmp_path))
        os._exit(0)
    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    return sorted(os.listdir(tmp_path))


def test_a_kill_between_writing_and_naming_leaves_no_result_file(tmp_path):
    """The content is written whole first, then linked under its name: killed in between, the
    result folder holds only the hidden temporary file, never an empty or partial test_*.json."""
    def die(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)
    left = killed_while_writing(tmp_path, die)
    assert len(left) == 1 and left[0].startswith(".test_") and left[0].endswith(".tmp.json")
    assert json.load(open(tmp_path / left[0])) == {"miou_mean": 50.0}
    path = write_test_result({"miou_mean": 51.0}, str(tmp_path))      # the name was never taken
    assert json.load(open(path)) == {"miou_mean": 51.0} and "-" not in os.path.basename(path)


def test_a_kill_after_naming_leaves_the_whole_result(tmp_path):
    real_link = os.link

    def link_then_die(src, dst):
        real_link(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    left = [n for n in killed_while_writing(tmp_path, link_then_die) if not n.startswith(".")]
    assert len(left) == 1 and json.load(open(tmp_path / left[0])) == {"miou_mean": 50.0}


def test_without_hard_links_a_cut_off_write_leaves_an_empty_file_the_readers_skip_and_name(tmp_path, caplog):
    """Where links fail, the name is reserved (empty) before the rename; killed in between, the
    empty file stays, and the readers name it instead of failing on it."""
    def no_links(src, dst):
        def die(a, b):
            os.kill(os.getpid(), signal.SIGKILL)
        fileio.os.replace = die
        raise PermissionError(1, "Operation not permitted")
    left = killed_while_writing(tmp_path, no_links)
    [empty] = [n for n in left if not n.startswith(".")]
    assert os.path.getsize(tmp_path / empty) == 0
    with caplog.at_level(logging.WARNING):
        assert read_json_result(str(tmp_path / empty), "test result") is None
    assert caplog.messages == [f"skipping test result '{tmp_path / empty}': empty (a write that was cut off)"]
    with pytest.raises(UserError) as e:
        read_result(str(tmp_path / empty), defaults())
    assert str(e.value).startswith(f"--compare '{tmp_path / empty}' is empty or not complete JSON")
