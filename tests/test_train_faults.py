"""Training under the faults of real life, through the real entry point: Ctrl-C / SIGTERM,
kill -9 (also inside a checkpoint write), a damaged last.pth, a full disk, re-runs into the
same folder, a crafted checkpoint, and one failing rank under DDP.

Signals are sent by the training process to itself from a wrapper around ``Trainer.step``
(after a chosen step, as a terminal or scheduler would, asynchronously), so the point of the
interruption is exact and the test deterministic."""
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp

from commands import train
from engine.checkpoint import checkpoint_position, pick_resume, read_checkpoint, save_checkpoint
from engine.trainer import Trainer
from util.interrupt import TrainingInterrupted
from tests.conftest import tiny_cfg
from tests.test_trainer import LossRecorder, _free_port, _join_group, weights
from util.cli import run
from util.distributed import DistInfo
from util.runlock import RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")
# 4 iterations per epoch, 2 epochs; no validation (not what these tests are about)
SMALL = dict(evaluate=False, epochs=2, epoch_size=16)


@pytest.fixture(autouse=True)
def fresh_root_logger():
    """train.main/test.main point the root logger at this test's captured stdout; the next
    test must not log into that closed stream."""
    yield
    import logging
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()


def config_file(tmp_path, root, **over):
    """A YAML of the tiny config (the entry point reads a file)."""
    cfg = {k: v for k, v in tiny_cfg(root, tmp_path / "unused", **dict(SMALL, **over)).items()
           if k not in ("save_path",)}
    path = tmp_path / "tiny.yaml"
    import yaml
    path.write_text(yaml.safe_dump({"ALL": cfg}))
    return str(path)


def child(tmp_path, script, *args, timeout=120):
    """Run ``script`` (Python, with train.main available) in a fresh process; return it."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        import torch
        torch.set_num_threads(1)
        from commands import train
        from engine.trainer import Trainer
        from util.cli import run
    """) + textwrap.dedent(script)
    path = tmp_path / "child.py"
    path.write_text(code)
    return subprocess.Popen([sys.executable, str(path), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


SIGNAL_AFTER_STEP = """
    step = Trainer.step
    def step_then_signal(self, batch, lr):
        step(self, batch, lr)
        if self.state.iteration + 1 == int(sys.argv[1]):
            os.kill(os.getpid(), int(sys.argv[2]))
    Trainer.step = step_then_signal
    run(train.main, sys.argv[3:])
"""


# SIGTERM takes the same path (exit 143): test_a_signal_to_one_rank_stops_every_rank_... sends it
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130)])
def test_signal_mid_epoch_saves_and_the_resumed_run_equals_the_uninterrupted_one(synth_root, tmp_path, signum, status,
                                                                                  one_thread):
    """The child runs with one thread too: the same float reduction order, bit for bit."""
    cfg_path = config_file(tmp_path, synth_root)
    recorded, resumed_losses = LossRecorder(), LossRecorder()
    ref = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path / "ref", **SMALL), DistInfo(), recorded)
    ref.train()
    exp = str(tmp_path / "exp")
    p = child(tmp_path, SIGNAL_AFTER_STEP, "6", str(int(signum)), "--config", cfg_path, "save_path", exp)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == status, out
    line = [ln for ln in out.splitlines() if "stopped by" in ln]
    assert len(line) == 1 and "Traceback" not in out
    assert (f"stopped by {signal.Signals(signum).name} after iteration 6 of 8 (in epoch 2, 2/4 into it); "
            f"{exp}/model/last.pth is saved. Continue with: python train.py --config {cfg_path} "
            f"save_path {exp} resume auto") in line[0]
    state = read_checkpoint(os.path.join(exp, "model", "last.pth"))
    assert state["iteration"] == 6 and state["epoch"] == 1
    # the losses the interrupted process logged are the uninterrupted run's
    logged = [float(m) for m in re.findall(r"mean of iter \d+: .* total (\S+)", out)]
    assert logged == pytest.approx([h["train/loss_total"] for h in recorded.losses()[:6]], abs=1e-4)
    resumed = Trainer.from_cfg(tiny_cfg(synth_root, exp, **SMALL, resume="auto"), DistInfo(), resumed_losses,
                               tensorboard=True)
    resumed.train()
    assert resumed_losses.losses() == recorded.losses()[6:]         # bit for bit
    wr, wc = weights(ref.model), weights(resumed.model)
    assert all(torch.equal(wr[k], wc[k]) for k in wr)
    assert [resumed.run["tb"]] == os.listdir(os.path.join(exp, "tb"))  # the resume continues the run's folder


def test_second_ctrl_c_aborts_during_the_save_and_the_previous_checkpoint_survives(synth_root, tmp_path):
    cfg_path = config_file(tmp_path, synth_root, ckpt_freq_iters=2)
    exp = str(tmp_path / "exp")
    p = child(tmp_path, textwrap.dedent("""
        import util.fileio
        save = torch.save
        def impatient_save(obj, f, *a, **k):
            if obj["iteration"] == 3:                # the stop's own save: Ctrl-C again, mid-write
                f.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGINT)
            save(obj, f, *a, **k)
        util.fileio.torch = torch
        torch.save = impatient_save
    """) + textwrap.dedent(SIGNAL_AFTER_STEP), "3", str(int(signal.SIGINT)), "--config", cfg_path, "save_path", exp)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130 and "Traceback" not in out, out
    assert "interrupted (Ctrl-C)" in out and "stopped by" not in out
    assert read_checkpoint(os.path.join(exp, "model", "last.pth"))["iteration"] == 2
    assert sorted(os.listdir(os.path.join(exp, "model"))) == ["last.pth"]   # nothing half-written left


def test_kill_9_inside_a_checkpoint_write_and_at_random_points_leaves_a_loadable_checkpoint(synth_root, tmp_path):
    cfg_path = config_file(tmp_path, synth_root, ckpt_freq_iters=1, epochs=3)
    exp = str(tmp_path / "exp")
    ready = tmp_path / "inside_the_write"
    p = child(tmp_path, f"""
        save = torch.save
        def blocking_save(obj, f, *a, **k):
            if obj["iteration"] == 3:
                f.write(b"the first bytes of a checkpoint")
                f.flush()
                open({str(ready)!r}, "w").close()
                time.sleep(600)
            save(obj, f, *a, **k)
        torch.save = blocking_save
        run(train.main, sys.argv[1:])
    """, "--config", cfg_path, "save_path", exp)
    deadline = time.time() + 120
    while not ready.exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()[0]
        time.sleep(0.05)
    p.kill()
    p.wait()
    path, state = pick_resume(os.path.join(exp, "model", "last.pth"))
    assert path.endswith("last.pth") and state["iteration"] == 2
    rng = torch.Generator().manual_seed(0)
    for _ in range(1):   # kill -9 wherever it falls (saves every step), then resume auto
        p = child(tmp_path, "run(train.main, sys.argv[1:])", "--config", cfg_path, "save_path", exp, "resume", "auto")
        time.sleep(3 + 3 * torch.rand(1, generator=rng).item())
        p.kill()
        p.wait()
        path, state = pick_resume(os.path.join(exp, "model", "last.pth"))
        read_checkpoint(path)
    metrics = train.main(["--config", cfg_path, "save_path", exp, "resume", "auto"])
    assert metrics == {} and read_checkpoint(os.path.join(exp, "model", "last.pth"))["iteration"] == 12
    assert not [f for f in os.listdir(os.path.join(exp, "model")) if f.endswith(".tmp.pth")]
    assert not os.path.exists(os.path.join(exp, "train.lock"))


def test_damaged_last_is_named_and_resume_auto_falls_back_to_the_previous(synth_root, tmp_path, caplog):
    cfg = tiny_cfg(synth_root, tmp_path, **SMALL, ckpt_freq_iters=1, stop_iter=3)   # saves at 1, 2, 3
    Trainer.from_cfg(cfg, DistInfo()).train()
    last = tmp_path / "model" / "last.pth"
    raw = last.read_bytes()
    last.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(Exception, match=rf"checkpoint '{last}' is unreadable or corrupt, truncated perhaps"):
        read_checkpoint(str(last))
    path, state = pick_resume(str(last))
    assert path.endswith("last.prev.pth") and state["iteration"] == 2
    assert f"skipping checkpoint '{last}'" in caplog.text and "falling back to" in caplog.text
    caplog.set_level(logging.INFO, logger="ntrenetpp")
    t = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path, **SMALL, resume="auto", stop_iter=4), DistInfo())
    t.train()
    # one count of epochs, from 1, in the resume line and in test.py's checkpoint line alike
    assert "at iteration 2 (in epoch 1, 2/4 into it)" in caplog.text
    assert read_checkpoint(str(last))["iteration"] == 4
    assert checkpoint_position(read_checkpoint(str(last))) == "iteration 4, at the end of epoch 1"
    for name in ("last.pth", "last.prev.pth"):                     # neither valid: an error, not a fresh start
        (tmp_path / "model" / name).write_bytes(b"garbage")
    with pytest.raises(Exception, match=r"resume auto found no valid checkpoint: .*last.pth.* / .*last.prev.pth"):
        Trainer.from_cfg(tiny_cfg(synth_root, tmp_path, **SMALL, resume="auto"), DistInfo()).train()


def test_full_disk_while_saving_stops_cleanly_and_keeps_the_previous_checkpoint(synth_root, tmp_path, monkeypatch, capsys):
    cfg_path = config_file(tmp_path, synth_root, ckpt_freq_iters=2)
    exp = tmp_path / "exp"
    save = torch.save

    def full_after_the_first(obj, f, *a, **k):
        if obj["iteration"] > 2:
            f.write(b"x" * 1000)
            raise OSError(28, "No space left on device")
        save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_after_the_first)
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--config", cfg_path, "save_path", str(exp)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert (f": error: could not write checkpoint '{exp}/model/last.pth' (No space left on device); the previous "
            f"last.pth is intact.") in err
    monkeypatch.undo()
    assert read_checkpoint(str(exp / "model" / "last.pth"))["iteration"] == 2
    assert sorted(os.listdir(exp / "model")) == ["last.pth"] and not (exp / "train.lock").exists()


def test_rerun_into_a_folder_with_checkpoints_or_a_live_lock_is_refused(synth_root, tmp_path, capsys):
    cfg_path = config_file(tmp_path, synth_root, stop_iter=2)
    exp = tmp_path / "exp"
    train.main(["--config", cfg_path, "save_path", str(exp)])
    [first_tb] = os.listdir(exp / "tb")
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--config", cfg_path, "save_path", str(exp)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.endswith(
        f": error: {exp} already holds last.pth (iteration 2). Continue that run with 'resume auto', train into "
        f"another folder (another exp name, or save_path DIR), or start over here with 'overwrite True' "
        f"(deletes them)\n")
    assert os.listdir(exp / "tb") == [first_tb]                       # the refused run left no event file
    with RunLock(str(exp)):                                           # a live run holds the folder
        log_before = (exp / "train.log").read_text()
        with pytest.raises(SystemExit) as e:
            run(train.main, ["--config", cfg_path, "save_path", str(exp), "resume", "auto"])
        assert e.value.code == 2 and f"{exp} is in use by another training run (process {os.getpid()}" in capsys.readouterr().err
        assert (exp / "train.log").read_text() == log_before           # nothing written into the live run's log
    time.sleep(1.1)                                                   # another start time, another folder
    train.main(["--config", cfg_path, "save_path", str(exp), "overwrite", "True", "stop_iter", "1"])
    assert read_checkpoint(str(exp / "model" / "last.pth"))["iteration"] == 1
    assert len(os.listdir(exp / "tb")) == 2


def test_a_checkpoint_carrying_a_payload_is_refused_and_nothing_runs(synth_root, tmp_path, capsys):
    from commands import test as test_entry
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    cfg = tiny_cfg(synth_root, tmp_path)
    from engine.networks import build_model
    save_checkpoint(str(tmp_path / "good.pth"), build_model(cfg), cfg)
    state = torch.load(tmp_path / "good.pth", weights_only=True)
    state["metrics"] = {"note": Payload()}
    torch.save(state, tmp_path / "evil.pth")
    cfg_path = config_file(tmp_path, synth_root)
    for entry, args in ((test_entry.main, ["weight", str(tmp_path / "evil.pth")]),
                        (train.main, ["resume", str(tmp_path / "evil.pth")])):
        with pytest.raises(SystemExit) as e:
            run(entry, ["--config", cfg_path, "save_path", str(tmp_path / "exp"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert f"checkpoint '{tmp_path}/evil.pth' is refused: it holds objects other than tensors" in err
        assert "GLOBAL posix.system" in err
    assert not marker.exists()


def _failing_rank_worker(rank, world, port, root, save_path, out_dir):
    """Writes how this rank ended into ``out_dir/rank<N>.txt``."""
    _join_group(rank, world, port)
    from util.distributed import cleanup, init_distributed
    from util.errors import DataError
    info = init_distributed("cpu")
    outcome = "finished"
    try:
        if rank == 1:                    # this process only (forked): its third batch holds a bad file
            from dataset.image import FewShotTrainDataset
            read, calls = FewShotTrainDataset.__getitem__, []

            def bad_file_on_rank_1(self, item):
                calls.append(item)
                if len(calls) == 5:      # 2 episodes per batch and rank
                    raise DataError("cannot read label 'data/broken.png' (only rank 1 reads it)")
                return read(self, item)
            FewShotTrainDataset.__getitem__ = bad_file_on_rank_1
        t = Trainer.from_cfg(tiny_cfg(root, save_path, **SMALL), info)
        t.train()
    except Exception as e:  # noqa: BLE001 - the test reads how each rank ended
        outcome = f"{type(e).__name__}: {e}"
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
        cleanup()


def test_one_failing_rank_stops_the_whole_job_within_seconds_with_its_message(synth_root, tmp_path):
    """Plain processes, no launcher that kills the survivor: rank 0 must end by itself."""
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_failing_rank_worker, args=(r, 2, port, synth_root, str(tmp_path / "ddp"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 60
    for p in procs:
        p.join(timeout=max(deadline - time.time(), 0))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, f"rank(s) {alive} still running 60 s after rank 1 failed"
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r1 == "DataError: cannot read label 'data/broken.png' (only rank 1 reads it)"
    assert r0 == ("PeerFailed: stopped because process 1 of this job failed: cannot read label 'data/broken.png' "
                  "(only rank 1 reads it)")
    assert time.time() < deadline


def _signalled_rank_worker(rank, world, port, root, save_path, out_dir, signum=signal.SIGTERM):
    _join_group(rank, world, port)
    from util.distributed import cleanup, init_distributed
    from util.interrupt import TrainingInterrupted
    info = init_distributed("cpu")
    try:
        t = Trainer.from_cfg(tiny_cfg(root, save_path, **SMALL), info)
        if rank == 1:                       # only rank 1 is signalled, after its 5th step
            step = t.step

            def step_then_signal(batch, lr):
                step(batch, lr)
                if t.state.iteration + 1 == 5:
                    os.kill(os.getpid(), signum)
            t.step = step_then_signal
        try:
            t.train()
            outcome = "finished"
        except TrainingInterrupted as e:
            outcome = f"{e.exit_status} {e}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{t.state.iteration} {outcome}")
    finally:
        cleanup()


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_iteration(synth_root, tmp_path, signum, status):
    """Every rank exits with the signalled rank's status (the largest, when ranks got different signals)."""
    save_path = tmp_path / "ddp"
    mp.start_processes(_signalled_rank_worker,
                       args=(2, _free_port(), synth_root, str(save_path), str(tmp_path), signum),
                       nprocs=2, start_method="fork")
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r0.startswith(f"5 {status} stopped by a signal to another process after iteration 5 of 8")
    assert r1.startswith(f"5 {status} stopped by {signal.Signals(signum).name} after iteration 5 of 8")
    assert read_checkpoint(str(save_path / "model" / "last.pth"))["iteration"] == 5     # rank 0 wrote it


def _emptied_copy(synth_root, tmp_path):
    """The synthetic dataset with every JPEG emptied (unreadable)."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".jpg"):
                open(os.path.join(dirpath, name), "wb").close()
    return root


def test_evaluation_shuts_its_loader_workers_down_when_a_worker_fails(synth_root, tmp_path):
    from engine.evaluate import evaluate
    from engine.networks import build_model
    from dataset.image import FewShotEvalDataset
    from util.errors import DataError
    cfg = tiny_cfg(str(_emptied_copy(synth_root, tmp_path)), tmp_path / "exp", workers=2)
    dataset = FewShotEvalDataset(cfg, seed=0, num_episodes=4)
    with pytest.raises(DataError, match="cannot read image") as e:
        evaluate(build_model(cfg, warn_random_backbone=False), dataset, cfg, torch.device("cpu"))
    assert e.value.__traceback__ is not None          # the frames holding the loader are still alive ...
    assert mp.active_children() == []                  # ... and its workers are gone all the same


def test_an_unreadable_image_in_a_loader_worker_is_one_line_and_the_run_ends(synth_root, tmp_path):
    """A DataError raised in a DataLoader worker: torch re-raises it in the main process with
    the worker's traceback in its message, and the workers (which ignore SIGTERM) must be shut
    down explicitly, else the interpreter's exit waits for them forever."""
    cfg = config_file(tmp_path, str(_emptied_copy(synth_root, tmp_path)), workers=2)
    p = subprocess.Popen([sys.executable, "train.py", "--config", cfg, "save_path", str(tmp_path / "exp")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("the run did not end after the worker's error")
    assert p.returncode == 2
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"train\.py: error: cannot read image '.*\.jpg': the file is empty, corrupt or not an "
                        r"image format OpenCV and PIL read; re-export it as JPEG or PNG\n", err)


def test_a_stop_on_an_epochs_last_step_saves_first_and_the_resume_validates_that_epoch(synth_root, tmp_path):
    """A scheduler's grace is ~30 s: the stop writes last.pth before validating; the resume
    runs that validation first, and the run ends as the uninterrupted one does."""
    ref = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path / "ref"), DistInfo())      # 2 iterations per epoch
    ref.train()
    exp = tmp_path / "exp"
    t = Trainer.from_cfg(tiny_cfg(synth_root, exp), DistInfo())
    step = t.step

    def step_then_stop(batch, lr):
        step(batch, lr)
        if t.state.iteration + 1 == 2:              # the first epoch's last step
            t.request.signum = signal.SIGTERM
    t.step = step_then_stop
    with pytest.raises(TrainingInterrupted, match=r"after iteration 2 of 4 \(at the end of epoch 1\); .*last\.pth "
                                                  r"is saved \(epoch 1's validation runs first when it continues\)"):
        t.train()
    assert os.listdir(exp / "model") == ["last.pth"]                       # no validation ran, no best.pth
    last = read_checkpoint(str(exp / "model" / "last.pth"))
    assert last["iteration"] == 2 and last["run"]["validation_pending"] is True
    resumed = Trainer.from_cfg(tiny_cfg(synth_root, exp, resume="auto"), DistInfo())
    resumed.train()
    for name in ("best", "last"):
        a, b = (read_checkpoint(str(p / "model" / f"{name}.pth")) for p in (tmp_path / "ref", exp))
        assert (a["epoch"], a["iteration"], a["best_miou"], a["metrics"]) == \
            (b["epoch"], b["iteration"], b["best_miou"], b["metrics"])
        assert "validation_pending" not in b["run"]
    wr, wc = weights(ref.model), weights(resumed.model)
    assert all(torch.equal(wr[k], wc[k]) for k in wr)
