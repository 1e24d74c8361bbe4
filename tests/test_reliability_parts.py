"""The parts that keep a run alive: the stop request, the folder lock, rotation, checksums,
the lazy TensorBoard writer."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from util.digest import content_digest
from util.fileio import atomic_torch_save
from util.interrupt import StopAgreement, stop_on_signals
from util.logger import EventWriter
from util.runlock import LOCK_NAME, LockedError, RunLock


def test_first_signal_sets_the_flag_a_second_ctrl_c_aborts_repeated_sigterm_does_not():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM" and stop.exit_status == 143
        os.kill(os.getpid(), signal.SIGTERM)          # a scheduler's or launcher's repeat
        assert stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)      # the user insists
    assert signal.getsignal(signal.SIGINT) is before
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.name == "SIGINT" and stop.exit_status == 130


def test_agreement_of_one_process_is_the_local_flag():
    agree = StopAgreement(distributed=False)
    assert agree.any_requested(True) and not agree.any_requested(False)


def test_second_run_into_a_locked_folder_is_refused_and_the_lock_is_released(tmp_path):
    with RunLock(str(tmp_path)):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(LockedError, match=rf"{tmp_path} is in use by another training run \(process {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_locks_of_dead_processes_and_silent_hosts_are_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0}))
    with RunLock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"its process {dead.pid} is gone" in caplog.text
    # another host: held while renewed, taken over once silent for longer than stale_s
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(LockedError, match="elsewhere"):
        RunLock(str(tmp_path), stale_s=60).acquire()
    old = time.time() - 120
    os.utime(lock, (old, old))
    with RunLock(str(tmp_path), stale_s=60):
        pass
    assert "last renewed 120 s ago" in caplog.text
    lock.write_text("{trunc")                     # a crash while the lock was written
    with RunLock(str(tmp_path)):
        pass


def test_a_lock_with_our_own_pid_or_unrenewed_on_this_host_is_stale(tmp_path, caplog):
    """After a container restart the dead run's pid may be ours, or another live process's."""
    lock = tmp_path / LOCK_NAME
    host = socket.gethostname()
    lock.write_text(json.dumps({"host": host, "pid": os.getpid(), "started": 0}))
    with RunLock(str(tmp_path)):
        assert json.loads(lock.read_text())["started"] > 0                  # ours now
    assert f"its process id {os.getpid()} is this process's own" in caplog.text
    live = os.getppid()                                                      # alive, not us
    lock.write_text(json.dumps({"host": host, "pid": live, "started": 0}))
    with pytest.raises(LockedError, match=rf"in use by another training run \(process {live} on"):
        RunLock(str(tmp_path), stale_s=60).acquire()                        # renewed recently: held
    old = time.time() - 120
    os.utime(lock, (old, old))
    with RunLock(str(tmp_path), stale_s=60):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "last renewed 120 s ago (more than 60 s)" in caplog.text
    assert not lock.exists()


def test_the_owner_renews_its_lock(tmp_path):
    with RunLock(str(tmp_path), heartbeat_s=0.05):
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(tmp_path / LOCK_NAME).st_mtime < 5


def test_rotation_keeps_the_previous_file_and_a_failed_write_keeps_both(tmp_path, monkeypatch):
    path, prev = str(tmp_path / "last.pth"), str(tmp_path / "last.prev.pth")
    atomic_torch_save({"it": 1}, path, keep_previous=prev)
    assert not os.path.exists(prev)
    atomic_torch_save({"it": 2}, path, keep_previous=prev)
    atomic_torch_save({"it": 3}, path, keep_previous=prev)
    assert torch.load(path)["it"] == 3 and torch.load(prev)["it"] == 2

    def full(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"it": 4}, path, keep_previous=prev)
    monkeypatch.undo()
    assert torch.load(path)["it"] == 3 and torch.load(prev)["it"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pth", "last.pth"]   # no temporary file left


def test_digest_survives_a_round_trip_and_sees_one_flipped_value(tmp_path):
    state = {"w": torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last), "h": torch.ones(2, dtype=torch.bfloat16),
             "opt": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "rng": {"python": (3, tuple(range(5)), None)}, "iteration": 7, "cfg": {"ppm_scales": [1.0, 0.5]}}
    torch.save(state, tmp_path / "c.pth")
    back = torch.load(tmp_path / "c.pth", weights_only=True)
    assert content_digest(back) == content_digest(state)
    back["w"][0, 1, 2, 3] += 1e-6
    assert content_digest(back) != content_digest(state)
    assert content_digest({"iteration": 7}) != content_digest({"iteration": 8})


def test_event_writer_writes_nothing_until_the_first_value(tmp_path):
    w = EventWriter(str(tmp_path / "tb" / "run"))
    w.close()
    assert not (tmp_path / "tb").exists()
    w = EventWriter(str(tmp_path / "tb" / "run"), purge_step=5)
    w.add_scalar("train/loss", 1.0, 5)
    w.close()
    [name] = os.listdir(tmp_path / "tb" / "run")
    assert name.startswith("events.out.tfevents") and name.endswith(f".{os.getpid()}")


def test_an_unwritable_folder_is_one_clear_error(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "open", refuse)      # the tests run as root, where chmod would not refuse
    with pytest.raises(LockedError, match=rf"cannot create {tmp_path}/train.lock \(Permission denied\): the "
                                          r"experiment folder must be writable"):
        RunLock(str(tmp_path)).acquire()
