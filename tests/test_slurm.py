"""scripts/slurm/{train,test}.sbatch without SLURM: the job's environment read by commands.slurm,
one launcher per node with its NODE_RANK through a stand-in srun, a SIGTERM-stopped run requeued,
and two "nodes" on loopback training what one node trains."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from commands.slurm import SlurmEnvError, first_host, gpus_per_node, launcher_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_launcher_environment_comes_from_the_allocation():
    assert [first_host(n) for n in ("gpu[03-05,09],cpu1", "node7", "a,b", "x[12]")] == ["gpu03", "node7", "a", "x12"]
    assert [gpus_per_node(e) for e in ({"SLURM_GPUS_ON_NODE": "4"}, {"SLURM_GPUS_PER_NODE": "a100:8"},
                                       {"CUDA_VISIBLE_DEVICES": "0,1"}, {})] == [4, 8, 2, 1]
    env = {"SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_ID": "123456"}
    assert launcher_env(env) == {"NNODES": "2", "NGPUS": "4", "MASTER_ADDR": "gpu03", "MASTER_PORT": "23456"}
    assert launcher_env(dict(env, MASTER_PORT="29600"))["MASTER_PORT"] == "29600"     # set by the user: kept
    with pytest.raises(SlurmEnvError, match="submit the script with sbatch"):
        launcher_env({})


# a stand-in srun: runs the task once per node (SLURM_NODEID 0..N-1) at once, and returns the
# highest exit status, as srun does with --kill-on-bad-exit
SRUN = """#!/bin/sh
nodes=1
for a in "$@"; do case $a in --nodes=*) nodes=${a#--nodes=};; esac; done
while [ $# -gt 0 ]; do case $1 in --*) shift;; *) break;; esac; done
pids=
i=0
while [ $i -lt "$nodes" ]; do
    SLURM_NODEID=$i "$@" > "node$i.out" 2>&1 &
    pids="$pids $!"
    i=$((i + 1))
done
status=0
for p in $pids; do wait $p; s=$?; [ $s -gt $status ] && status=$s; done
exit $status
"""

# a stand-in python: the real one for commands.*, else prints what it was asked to run and exits
# with $FAKE_STATUS
FAKE_PYTHON = f"""#!{sys.executable}
import os, sys
if sys.argv[1] == "-m" and sys.argv[2].startswith("commands."):
    os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
print("RUN", " ".join(sys.argv[1:]))
sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
"""


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    for rel in ("train.sh", "test.sh", "scripts/launch.sh", "scripts/slurm/job.sh", "scripts/slurm/train.sbatch",
                "scripts/slurm/test.sbatch", "config/synthetic/synthetic_split0_resnet18.yaml"):
        os.makedirs(repo / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), repo / rel)
    os.makedirs(repo / "initmodel")
    (repo / "initmodel" / "synthetic_split0_resnet18x0.5.pth").write_bytes(b"")
    for name, text in (("srun", SRUN), ("scontrol", "#!/bin/sh\necho \"$@\" >> scontrol.calls\n"),
                       ("python", FAKE_PYTHON)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return repo


def sbatch(repo, script, *args, **env):
    tools = repo.parent
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NTRENETPP_", "SLURM_"))}
    base.update(SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242",
                SLURM_SUBMIT_DIR=str(repo), SRUN=str(tools / "srun"), SCONTROL=str(tools / "scontrol"),
                PYTHON=str(tools / "python"))
    base.update(env)
    return subprocess.run(["sh", f"scripts/slurm/{script}", *args], cwd=repo, env=base, capture_output=True,
                          text=True, timeout=120)


def test_one_launcher_per_node_with_its_rank_and_the_allocations_shape(repo):
    r = sbatch(repo, "train.sbatch", "synthetic", "split0_resnet18", "epochs", "2", SLURM_GPUS_ON_NODE="4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("train.sbatch: job 4242 (restart 0): 2 node(s) x 4 process(es), master node01:24242")
    for node in (0, 1):
        [run] = [line for line in (repo / f"node{node}.out").read_text().splitlines() if line.startswith("RUN")]
        assert run == (f"RUN -m torch.distributed.run --nproc_per_node=4 --nnodes=2 --node_rank={node} "
                       f"--master_addr=node01 --master_port=24242 train.py --config "
                       f"config/synthetic/synthetic_split0_resnet18.yaml resume auto epochs 2")
    logs = sorted(os.listdir(repo / "exp" / "synthetic" / "split0_resnet18" / "result"))
    assert sorted(name.split("-")[-1] for name in logs) == ["node0.log", "node1.log"]
    assert not (repo.parent / "scontrol.calls").exists() and not (repo / "scontrol.calls").exists()


def test_a_run_stopped_by_sigterm_requeues_the_job_and_a_test_job_runs_test_sh(repo):
    r = sbatch(repo, "train.sbatch", "synthetic", "split0_resnet18", FAKE_STATUS="143")
    assert r.returncode == 143
    assert "requeueing job 4242" in r.stdout and (repo / "scontrol.calls").read_text() == "requeue 4242\n"
    r = sbatch(repo, "test.sbatch", "synthetic", "split0_resnet18", "weight", "last.pth", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="node05")
    assert r.returncode == 2       # the checkpoint does not exist: refused before the run, named in full
    assert f"test.sh: error: checkpoint '{repo}/last.pth' does not exist" in (repo / "node0.out").read_text()
    r = sbatch(repo, "train.sbatch", "synthetic")
    assert r.returncode == 2 and "usage: sbatch" in r.stderr


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_what_one_node_with_two_processes_trains(repo, synth_root, tmp_path):
    """train.sbatch on two "nodes" (the stand-in srun starts both here, MASTER_ADDR localhost), one
    process each, against train.sh with NGPUS=2 on one node: the same weights, bit for bit."""
    from tests.conftest import TINY
    for rel in ("train.py", "test.py"):
        shutil.copy(os.path.join(ROOT, rel), repo / rel)
    tiny = {**TINY, "data_root": synth_root, "train_list": os.path.join(synth_root, "train.txt"),
            "val_list": os.path.join(synth_root, "val.txt"), "evaluate": False, "epochs": 1, "epoch_size": 8,
            "device": "cpu", "pretrained": "''", "exclude_novel_images": False}
    overrides = [str(x) for k, v in tiny.items() for x in (k, v if not isinstance(v, list) else str(v))]
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = sbatch(repo, "train.sbatch", "synthetic", "split0_resnet18", *overrides, "save_path", str(tmp_path / "two"),
               SLURM_JOB_NODELIST="localhost,localhost", MASTER_PORT=str(_free_port()), **env)
    assert r.returncode == 0, r.stdout + r.stderr + (repo / "node0.out").read_text() + (repo / "node1.out").read_text()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NTRENETPP_", "SLURM_"))}
    one = subprocess.run(["sh", "train.sh", "synthetic", "split0_resnet18", *overrides, "save_path",
                          str(tmp_path / "one")], cwd=repo, capture_output=True, text=True, timeout=600,
                         env=dict(base, NGPUS="2", MASTER_PORT=str(_free_port()), **env))
    assert one.returncode == 0, one.stdout + one.stderr
    two_nodes = torch.load(tmp_path / "two" / "model" / "last.pth", weights_only=True)
    one_node = torch.load(tmp_path / "one" / "model" / "last.pth", weights_only=True)
    assert two_nodes["iteration"] == one_node["iteration"] == 2
    assert two_nodes["model"].keys() == one_node["model"].keys()
    for name, value in one_node["model"].items():
        assert torch.equal(two_nodes["model"][name], value), name
