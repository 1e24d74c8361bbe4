"""What the SLURM job scripts (scripts/slurm/*.sbatch) hand the launcher, read from the job's
environment: ``python -m commands.slurm`` prints shell assignments of ``NNODES`` (nodes of the
allocation), ``NGPUS`` (processes per node: the GPUs of a node, 1 without GPUs),
``MASTER_ADDR`` (the first node of the node list) and ``MASTER_PORT`` (one per job id, so two
jobs sharing a node do not collide). A variable already set (``MASTER_PORT=29600 sbatch ...``) is
kept. Each node's ``NODE_RANK`` is its ``SLURM_NODEID``, set by ``srun`` per task."""
from __future__ import annotations

import os
import re
import shlex
import sys

from util.errors import ConfigError, user_message

PORT_BASE, PORT_SPAN = 20000, 20000


class SlurmEnvError(ConfigError):
    """The job's environment lacks what the job scripts need."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` → ``gpu03``, ``a,b`` → ``a``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head or not head.group(1):
        raise SlurmEnvError(f"SLURM_JOB_NODELIST {nodelist!r} names no node")
    prefix, ranges = head.group(1), head.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def gpus_per_node(env: dict) -> int:
    """GPUs of this node: ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE`` (``4`` or
    ``a100:4``), else the devices in ``CUDA_VISIBLE_DEVICES``; 1 (one CPU process) without any."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(name, "").strip()
        if value:
            count = value.split("(")[0].split(":")[-1]
            if count.isdigit() and int(count) > 0:
                return int(count)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return len(visible) or 1


def launcher_env(env: dict) -> dict[str, str]:
    """NNODES, NGPUS, MASTER_ADDR, MASTER_PORT for the launcher, from a SLURM job's ``env``."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if not nodelist or not nodes:
        raise SlurmEnvError("SLURM_JOB_NODELIST / SLURM_JOB_NUM_NODES are not set: submit the script with "
                            "sbatch (scripts/slurm/train.sbatch), or call sh train.sh yourself")
    job = env.get("SLURM_JOB_ID", "0")
    out = {"NNODES": str(int(nodes)), "NGPUS": str(gpus_per_node(env)), "MASTER_ADDR": first_host(nodelist),
           "MASTER_PORT": str(PORT_BASE + int(job) % PORT_SPAN if job.isdigit() else PORT_BASE)}
    for name in out:
        if env.get(name):
            out[name] = env[name]
    return out


def main(argv=None, env=None) -> str:
    """Print (and return) the assignments; ``env``: the environment to read (os.environ)."""
    text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in launcher_env(dict(os.environ if env is None
                                                                             else env)).items())
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    try:            # util.cli.run's report, without the torch import it brings: this runs at every job start
        main()
    except ConfigError as e:
        print(f"commands.slurm: error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
