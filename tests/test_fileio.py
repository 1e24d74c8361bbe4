import os

import pytest

from util.fileio import atomic_write_json, atomic_write_text, atomic_path


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
