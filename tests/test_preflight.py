"""engine/preflight.py: what needs no data is refused before any data is read or any folder is
created, and a run refused at start-up leaves nothing behind (train.py, test.py, predict.py and
the train.sh / test.sh launchers)."""
import os
import shutil
import subprocess
import sys

import pytest

from commands import predict
from commands import test as test_entry
from commands import train
from engine.checkpoint import save_checkpoint
from engine.networks import build_model
from tests.conftest import TINY
from util.cli import run
from util.config import dump_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOPE = "key 'arch' is 'mynets.nope:build', but module 'mynets.nope' cannot be imported (No module named 'mynets')"


@pytest.fixture
def config(tmp_path):
    """A tiny config whose data does not exist (so any read of it would fail first)."""
    from util.config import defaults
    cfg = defaults()
    cfg.update(TINY, data_root=str(tmp_path / "no_data"), train_list=str(tmp_path / "no_data" / "train.txt"),
               val_list=str(tmp_path / "no_data" / "val.txt"))
    path = tmp_path / "config" / "synthetic" / "synthetic_tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(dump_cfg(cfg))
    return str(path), cfg


def refused(main, argv, capsys, prog):
    with pytest.raises(SystemExit) as e:
        run(main, argv, prog=prog)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_train_reports_the_arch_before_the_data_and_creates_nothing(config, tmp_path, capsys):
    path, _ = config
    save = tmp_path / "exp" / "run"
    err = refused(train.main, ["--config", path, "save_path", str(save), "arch", "mynets.nope:build"], capsys,
                  "train.py")
    assert err == f"train.py: error: {NOPE}; give a module importable from the repository root\n"
    assert not (tmp_path / "exp").exists()


def test_train_refuses_a_missing_backbone_resume_or_existing_checkpoints_before_the_data(config, tmp_path, capsys):
    path, cfg = config
    save = tmp_path / "exp" / "run"
    err = refused(train.main, ["--config", path, "save_path", str(save), "pretrained", "initmodel/none.pth"], capsys,
                  "train.py")
    assert err.startswith(f"train.py: error: backbone weight file '{os.path.abspath('initmodel/none.pth')}' "
                          f"(config key 'pretrained') does not exist; ")
    err = refused(train.main, ["--config", path, "save_path", str(save), "resume", str(tmp_path / "w.pth")], capsys,
                  "train.py")
    assert err.startswith(f"train.py: error: checkpoint '{tmp_path / 'w.pth'}' does not exist; ")
    assert not (tmp_path / "exp").exists()
    (save / "model").mkdir(parents=True)
    save_checkpoint(str(save / "model" / "last.pth"), build_model(cfg), cfg, iteration=3)
    err = refused(train.main, ["--config", path, "save_path", str(save)], capsys, "train.py")
    assert err.startswith(f"train.py: error: {save} already holds last.pth (iteration 3). Continue that run")
    assert sorted(os.listdir(save)) == ["model"] and os.listdir(save / "model") == ["last.pth"]


def test_an_unwritable_experiment_folder_is_refused_before_the_data(config, tmp_path, capsys):
    path, _ = config
    (tmp_path / "afile").write_text("")
    err = refused(train.main, ["--config", path, "save_path", str(tmp_path / "afile" / "run")], capsys, "train.py")
    assert err == (f"train.py: error: experiment folder (save_path) '{tmp_path}/afile/run' cannot be created: "
                   f"'{tmp_path}/afile' is a file; choose another folder\n")


def test_a_data_error_at_start_up_leaves_no_folder(config, tmp_path, capsys):
    path, _ = config
    save = tmp_path / "exp" / "run"
    err = refused(train.main, ["--config", path, "save_path", str(save)], capsys, "train.py")
    assert "train.py: error: list file" in err and "does not exist" in err
    assert not (tmp_path / "exp").exists()


def test_test_and_predict_check_the_checkpoint_before_the_data_and_create_nothing(config, tmp_path, capsys):
    path, cfg = config
    save = tmp_path / "exp" / "run"
    err = refused(test_entry.main, ["--config", path, "save_path", str(save)], capsys, "test.py")
    assert err.startswith(f"test.py: error: checkpoint '{save}/model/best.pth' does not exist; ")
    assert not (tmp_path / "exp").exists()
    weight = tmp_path / "w.pth"
    save_checkpoint(str(weight), build_model(cfg), cfg)
    conflict = (f"checkpoint '{weight}' was trained with arch 'ntrenetpp'; the command line sets arch "
                f"'mynets.nope:build': drop the override (the network is the checkpoint's)\n")
    err = refused(test_entry.main, ["--config", path, "save_path", str(save), "weight", str(weight),
                                    "arch", "mynets.nope:build"], capsys, "test.py")
    assert err == "test.py: error: " + conflict
    assert not (tmp_path / "exp").exists()
    # the data is missing: the test is refused when it reads it, and leaves no folder either
    err = refused(test_entry.main, ["--config", path, "save_path", str(save), "weight", str(weight)], capsys,
                  "test.py")
    assert "does not exist" in err and not (tmp_path / "exp").exists()
    out = tmp_path / "out"
    base = ["--config", path, "--support", "a.jpg", "a.png", "--query", "q.jpg", "--out", str(out), "--device", "cpu"]
    err = refused(predict.main, base + ["--weight", str(tmp_path / "none.pth")], capsys, "predict.py")
    assert err.startswith(f"predict.py: error: checkpoint '{tmp_path}/none.pth' does not exist; ")
    err = refused(predict.main, base + ["--weight", str(weight), "arch", "mynets.nope:build"], capsys, "predict.py")
    assert err == "predict.py: error: " + conflict       # before the (missing) images are read
    (tmp_path / "afile").write_text("")
    err = refused(predict.main, base[:-4] + ["--out", str(tmp_path / "afile" / "out"), "--weight", str(weight)],
                  capsys, "predict.py")
    assert err.startswith(f"predict.py: error: output folder (--out) '{tmp_path}/afile/out' cannot be created")
    assert not out.exists()


@pytest.fixture
def tree(tmp_path, config):
    """A repository with the launchers and entry points (the packages come from the install), one
    config whose data does not exist."""
    for rel in ("train.sh", "test.sh", "scripts/launch.sh", "train.py", "test.py"):
        os.makedirs(tmp_path / "repo" / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / "repo" / rel)
    shutil.copytree(tmp_path / "config", tmp_path / "repo" / "config")
    return tmp_path / "repo"


def launch(tree, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTRENETPP_")}
    env["PYTHON"] = sys.executable
    return subprocess.run(["sh", *args], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_launchers_leave_nothing_behind_a_refused_run(tree):
    r = launch(tree, "train.sh", "synthetic", "tiny", "arch", "mynets.nope:build")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"train.sh: error: {NOPE}; give a module importable from the repository root\n"
    assert not (tree / "exp").exists()
    r = launch(tree, "test.sh", "synthetic", "tiny")
    assert r.returncode == 2 and "test.sh: error: checkpoint '" in r.stderr and not (tree / "exp").exists()
    # past the checks, the data is missing: python is refused at start-up and removes the new folder, log and all
    r = launch(tree, "train.sh", "synthetic", "tiny")
    assert r.returncode == 2 and "train.py: error: list file" in r.stdout and "log: " not in r.stdout
    assert not (tree / "exp").exists()
    # in a folder that was there before, only this run's log goes
    os.makedirs(tree / "exp" / "synthetic" / "tiny" / "result")
    (tree / "exp" / "synthetic" / "tiny" / "result" / "keep.txt").write_text("")
    r = launch(tree, "train.sh", "synthetic", "tiny")
    assert r.returncode == 2 and "log: " not in r.stdout
    assert os.listdir(tree / "exp" / "synthetic" / "tiny" / "result") == ["keep.txt"]


def test_start_up_cleanup_keeps_what_another_run_put_beside_its_folder(tmp_path, monkeypatch):
    from engine.experiment import StartupCleanup
    monkeypatch.delenv("NTRENETPP_NEW_FOLDER", raising=False)
    save = tmp_path / "exp" / "a" / "run"
    cleanup = StartupCleanup(str(save))
    (save / "model").mkdir(parents=True)
    (save / "train.log").write_text("")
    (tmp_path / "exp" / "b").mkdir()           # another run's, made meanwhile
    cleanup.discard()
    assert os.listdir(tmp_path / "exp") == ["b"]
    assert not StartupCleanup(str(tmp_path / "exp" / "b")).created    # there already: not this run's
