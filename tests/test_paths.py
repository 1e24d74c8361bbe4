"""util/config.py resolve_paths: the one rule for relative paths. A class list is read under the
root of its classes when it is there; any other relative path typed on the command line is taken
from the folder the command was typed in (the launchers pass it on, as they run python from the
repository), one written in a config file from the folder python runs in; a missing file's error
names its absolute path."""
import os
import shutil
import subprocess
import sys

import pytest

from util.config import config_with_overrides, defaults, resolve_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_with(overridden=(), **values):
    cfg = defaults()
    cfg.update(values)
    return cfg.mark(explicit=values, overridden=overridden)


def test_a_class_list_is_read_under_its_root_then_where_the_command_was_typed(tmp_path, monkeypatch):
    own, shell, repo = tmp_path / "own", tmp_path / "shell", tmp_path / "repo"
    for folder in (own, shell, repo / "lists"):
        folder.mkdir(parents=True)
    (own / "test.txt").write_text("a\n")
    (shell / "train.txt").write_text("b\n")
    (repo / "lists" / "val.txt").write_text("c\n")
    monkeypatch.chdir(repo)
    typed = ("data_root", "test_classes", "train_classes", "weight", "save_path", "resume")
    cfg = resolve_paths(cfg_with(typed, dataset="folder", data_root=str(own), test_classes="test.txt",
                                 train_classes="train.txt", val_classes="lists/val.txt", weight="w.pth",
                                 save_path="exp/mine", resume="auto", pretrained="initmodel/r.pth"), str(shell))
    assert cfg.test_classes == str(own / "test.txt")                 # under data_root
    assert cfg.train_classes == str(shell / "train.txt")            # not there: where the command was typed
    assert cfg.val_classes == "lists/val.txt"                       # a config file's: where python runs
    assert (cfg.weight, cfg.save_path, cfg.resume) == (str(shell / "w.pth"), str(shell / "exp/mine"), "auto")
    assert cfg.pretrained == "initmodel/r.pth"
    # found nowhere: a typed class list stays under its root (where the error then looks), a config's as written
    cfg = resolve_paths(cfg_with(("test_classes",), dataset="folder", data_root="data/x", test_classes="t.txt",
                                 val_root="data/v", val_classes="v.txt"), str(shell))
    assert (cfg.test_classes, cfg.val_classes) == ("data/x/t.txt", "v.txt")
    # typed in the folder python runs in: nothing moves, relative stays relative
    cfg = resolve_paths(cfg_with(("weight",), weight="w.pth"), str(repo))
    assert cfg.weight == "w.pth"
    assert resolve_paths(cfg_with(("weight",), weight="best"), str(shell)).weight == "best"


def test_the_shipped_configs_class_lists_still_resolve_from_the_repository():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = config_with_overrides("config/fss1000/fss1000_resnet50.yaml", [])
    finally:
        os.chdir(cwd)
    assert (cfg.train_classes, cfg.test_classes) == ("lists/fss1000/train.txt", "lists/fss1000/test.txt")


@pytest.fixture
def repo(tmp_path):
    """The launchers, the entry points and the class-folder config (the packages come from the install)."""
    repo = tmp_path / "repo"
    for rel in ("train.sh", "test.sh", "scripts/launch.sh", "train.py", "test.py"):
        os.makedirs(repo / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), repo / rel)
    os.makedirs(repo / "config" / "folder")
    shutil.copy(os.path.join(ROOT, "config/folder/folder_resnet50.yaml"), repo / "config/folder/folder_resnet50.yaml")
    return repo


def launch(cwd, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTRENETPP_")}
    env["PYTHON"] = sys.executable
    return subprocess.run(["sh", *args, "pretrained", "", "workers", "0"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_readme_class_folder_commands_work_from_the_repository_and_from_elsewhere(repo, tmp_path):
    """``sh train.sh folder resnet50 data_root data/mine train_classes train.txt ...`` with the lists
    in data/mine: the lists are found under data_root; typed in another folder, data_root is taken
    from there. The class folders are missing, so each run stops at the first one, naming it."""
    for base in (repo, tmp_path / "shell"):
        mine = base / "data" / "mine"
        mine.mkdir(parents=True)
        for part in ("train", "val", "test"):
            (mine / f"{part}.txt").write_text(f"{part}_class\n")
    args = ["folder", "resnet50", "data_root", "data/mine", "train_classes", "train.txt", "val_classes", "val.txt",
            "test_classes", "test.txt"]
    r = launch(repo, "train.sh", *args)
    assert r.returncode == 2
    assert (f"train.py: error: class 'train_class' listed in '{repo}/data/mine/train.txt' has no folder "
            f"'{repo}/data/mine/train_class'") in r.stdout
    shell = tmp_path / "shell"
    r = launch(shell, f"{repo}/train.sh", *args)
    assert r.returncode == 2
    assert (f"train.py: error: class 'train_class' listed in '{shell}/data/mine/train.txt' has no folder "
            f"'{shell}/data/mine/train_class'") in r.stdout
    # test.sh: the checkpoint typed relative to the shell's folder is looked for there, and named in full
    r = launch(shell, f"{repo}/test.sh", "folder", "resnet50", "data_root", "data/mine", "test_classes", "test.txt",
               "weight", "model/best.pth")
    assert r.returncode == 2 and r.stderr.startswith(f"test.sh: error: checkpoint '{shell}/model/best.pth' does "
                                                     f"not exist")
    # the case: a list given by name, missing under data_root and here, is named under data_root
    r = launch(shell, f"{repo}/train.sh", "folder", "resnet50", "data_root", str(shell / "data" / "mine"),
               "train_classes", "none.txt")
    assert r.returncode == 2 and f"class list '{shell}/data/mine/none.txt' does not exist" in r.stdout
    assert not (repo / "exp").exists() and not (shell / "exp").exists()
