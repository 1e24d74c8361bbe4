"""scripts/launch.sh (train.sh / test.sh) under Ctrl-C, SIGTERM and a terminal, with a stand-in
python that reports what it received: the log stays complete, the status passes through,
a signal reaches python exactly once, and the progress bar's descriptor is the terminal only."""
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from util.config import experiment_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = f"""#!{sys.executable}
import os, signal, sys, time
if sys.argv[1:3] == ["-m", "commands.folder"]:       # the folder rule: the real one
    os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
fd = os.environ.get("NTRENETPP_PROGRESS_FD")
print("progress fd", fd, bool(fd) and os.isatty(int(fd)))
if fd:
    os.write(int(fd), b"BAR-ONLY-ON-THE-TERMINAL\\n")
print("ready")
start = time.time()
while not got and time.time() - start < 20:
    time.sleep(0.02)
time.sleep(0.3)                       # a second copy of the signal would arrive by now
for i in range(300):                  # what the trainer prints after a stop: none may be lost
    print("after stop", i)
print("signals", [int(s) for s in got])
sys.exit(128 + got[0] if got else 0)
"""


# a stand-in that prints its arguments (the folder rule it leaves to the real python)
ECHO = FAKE.split("print(\"progress fd")[0].split("got = []")[0] + "print(' '.join(sys.argv[1:]))\n"


@pytest.fixture
def tree(tmp_path):
    """A copy of the launcher, train.sh and one config, with the stand-in as PYTHON."""
    for rel in ("train.sh", "scripts/launch.sh", "config/synthetic/synthetic_split0_resnet18.yaml"):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    # the backbone file the config names: its existence is checked before the folder is created
    os.makedirs(tmp_path / "initmodel")
    (tmp_path / "initmodel" / "synthetic_split0_resnet18x0.5.pth").write_bytes(b"")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    return tmp_path


def env_with(fake):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTRENETPP_")}
    env["PYTHON"] = str(fake)
    return env


def read_log(tree):
    folder = tree / "exp" / "synthetic" / "split0_resnet18" / "result"
    [name] = os.listdir(folder)
    return (folder / name).read_text()


def wait_for(predicate, timeout=20.0):
    start = time.time()
    while not predicate():
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.02)


def test_ctrl_c_in_a_terminal_reaches_python_once_and_the_log_stays_complete(tree):
    master, slave = pty.openpty()
    p = subprocess.Popen(["sh", "train.sh", "synthetic", "split0_resnet18"], cwd=tree, env=env_with(tree / "fake_python"),
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = []

    def reader():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            out.append(chunk.decode())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    wait_for(lambda: "ready" in "".join(out))
    os.killpg(p.pid, signal.SIGINT)       # what the terminal does on Ctrl-C: the whole job gets it
    assert p.wait(timeout=30) == 130
    thread.join(timeout=5)
    os.close(master)
    shown = "".join(out).replace("\r\n", "\n")
    log = read_log(tree)
    assert "progress fd 3 True" in log and "signals [2]" in log
    assert log.count("after stop") == 300
    assert "BAR-ONLY-ON-THE-TERMINAL" in shown and "BAR-ONLY-ON-THE-TERMINAL" not in log
    assert shown.rstrip().splitlines()[-1].startswith("log: exp/synthetic/split0_resnet18/result/train-")


def test_sigterm_to_the_launcher_alone_is_forwarded_once(tree):
    p = subprocess.Popen(["sh", "train.sh", "synthetic", "split0_resnet18"], cwd=tree, env=env_with(tree / "fake_python"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = p.stdout.readline() + p.stdout.readline()
    assert "progress fd None False" in first     # not a terminal: no bar
    p.send_signal(signal.SIGTERM)                # only the shell: docker stop, kill PID
    rest = p.stdout.read()
    assert p.wait(timeout=30) == 143
    assert "signals [15]" in rest and rest.count("after stop") == 300
    assert rest.rstrip().splitlines()[-1].startswith("log: ")
    assert read_log(tree).count("after stop") == 300


def test_exit_status_passes_through(tree):
    (tree / "fake_python").write_text(ECHO.replace("print(' '.join(sys.argv[1:]))", "print('boom')\nsys.exit(3)"))
    r = subprocess.run(["sh", "train.sh", "synthetic", "split0_resnet18"], cwd=tree, env=env_with(tree / "fake_python"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "boom" in r.stdout and read_log(tree) == "boom\n"


def test_a_k_shot_run_gets_its_own_experiment_folder(tree):
    """``shot 5`` must not train into (or resume) the 1-shot model's folder; ``shot 1`` is that folder."""
    (tree / "fake_python").write_text(ECHO)
    env = env_with(tree / "fake_python")
    config = "config/synthetic/synthetic_split0_resnet18.yaml"
    shutil.copy(os.path.join(ROOT, "test.sh"), tree / "test.sh")
    r = subprocess.run(["sh", "test.sh", "synthetic", "split0_resnet18", "shot", "5"], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=30)
    # test.sh looks for the 5-shot model in its own folder (and, finding none, creates nothing)
    assert r.returncode == 2 and f"checkpoint '{tree}/exp/synthetic/split0_resnet18_shot5/model/best.pth' does " \
        "not exist" in r.stderr
    assert not (tree / "exp").exists()
    r = subprocess.run(["sh", "train.sh", "synthetic", "split0_resnet18", "epochs", "5", "shot", "5"], cwd=tree,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"-u train.py --config {config} epochs 5 shot 5"
    assert "this experiment's folder is exp/synthetic/split0_resnet18_shot5" in r.stderr
    r = subprocess.run(["sh", "train.sh", "synthetic", "split0_resnet18", "shot", "1"], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.splitlines()[0].endswith("--config config/synthetic/synthetic_split0_resnet18.yaml shot 1")
    assert sorted(os.listdir(tree / "exp" / "synthetic")) == ["split0_resnet18", "split0_resnet18_shot5"]


def test_the_configs_own_shot_keeps_the_configs_folder(tree):
    """A config that trains at K shots (the video configs: shot 5) keeps its folder for ``shot K``;
    only another K gets ``_shotK``."""
    (tree / "fake_python").write_text(ECHO)
    env = env_with(tree / "fake_python")
    source = (tree / "config/synthetic/synthetic_split0_resnet18.yaml").read_text()
    assert "  shot: 1" in source
    (tree / "config/synthetic/synthetic_split0_k3.yaml").write_text(source.replace("  shot: 1", "  shot: 3", 1))
    for shot, folder in (("3", "split0_k3"), ("1", "split0_k3_shot1"), ("5", "split0_k3_shot5")):
        r = subprocess.run(["sh", "train.sh", "synthetic", "split0_k3", "shot", shot], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert os.path.isdir(tree / "exp" / "synthetic" / folder / "result")
        assert (tree / "exp" / "synthetic" / folder / "synthetic_split0_k3.yaml").read_text() == \
            (tree / "config/synthetic/synthetic_split0_k3.yaml").read_text()


def test_the_launcher_and_train_py_agree_on_the_folder_for_every_override(tree):
    """The rule lives in Python: train.sh's folder (where its log goes) is the save_path train.py
    derives from the same arguments, for any override; an explicit save_path passes through."""
    (tree / "fake_python").write_text(ECHO)
    env = env_with(tree / "fake_python")
    config = "config/synthetic/synthetic_split0_resnet18.yaml"
    for extra in ([], ["shot", "5"], ["shot", "1", "epochs", "2"], ["save_path", "exp/mine"], ["shot", "2", "split", "1"]):
        r = subprocess.run(["sh", "train.sh", "synthetic", "split0_resnet18", *extra], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        cwd = os.getcwd()
        os.chdir(tree)
        try:
            expected = experiment_cfg("", ["--config", config, *extra]).save_path
        finally:
            os.chdir(cwd)
        assert r.stdout.strip().endswith(f"log: {expected}/result/" + r.stdout.strip().split("/result/")[-1])
        assert os.path.isdir(tree / expected / "result")


def test_a_bad_override_stops_the_launcher_with_one_line(tree):
    r = subprocess.run(["sh", "train.sh", "synthetic", "split0_resnet18", "shott", "5"], cwd=tree,
                       env=env_with(tree / "fake_python"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr == "train.sh: error: command line: unknown key 'shott'; did you mean 'shot'?\n"
    assert not (tree / "exp").exists()


# a stand-in that prints the "Continue with:" command train.py would print for what it was given
CONTINUE = ECHO.replace("print(' '.join(sys.argv[1:]))",
                        "from util.interrupt import continue_command\n"
                        "print(continue_command(sys.argv[sys.argv.index('train.py') + 1:]))")


@pytest.mark.parametrize("env_extra, prefix", [({}, ""), ({"NGPUS": "2"}, "NGPUS=2 "),
                                               ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "host0", "NGPUS": "4"},
                                                "NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 MASTER_PORT=29500 NGPUS=4 ")])
def test_the_continue_command_of_a_launched_run_is_the_launcher_line(tree, env_extra, prefix):
    """A run started with ``sh train.sh`` is continued with ``sh train.sh``: the launcher finds the
    venv's python and keeps the log, which ``python train.py`` in a bare shell would not."""
    (tree / "fake_python").write_text(CONTINUE)
    env = {**env_with(tree / "fake_python"), **env_extra}
    r = subprocess.run(["sh", "train.sh", "synthetic", "split0_resnet18", "epochs", "5", "resume", "auto"],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{prefix}sh train.sh synthetic split0_resnet18 epochs 5 resume auto"
