"""Process-group helpers: one code path for a single process, torchrun, one node or many.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them we run as a single process.
NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from util.errors import DeviceError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    launched: bool = False      # started by torchrun: a process group exists even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Collectives and DDP are in use: several processes, or one launched by torchrun
        (which then runs NCCL/gloo and DDP exactly as a larger job would)."""
        return self.world_size > 1 or self.launched


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → this process's CUDA device (``local_rank``) when torch sees one, else the CPU;
    'cpu'; 'cuda' (``local_rank``) or 'cuda:N'. CUDA asked for without one is a DeviceError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was asked for but there is no CUDA device here (torch sees "
                              "no GPU): use cpu, or install the CUDA build of torch")
        if ":" not in name:
            return torch.device("cuda", local_rank)
        try:
            return torch.device(name)
        except RuntimeError:
            pass
    raise DeviceError(f"{name!r} is not a device; use cpu, cuda, cuda:N or auto")


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "TORCHELASTIC_RUN_ID" in os.environ or world_size > 1   # torchrun sets it, even for one process
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size, device, launched)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gather_objects(items: list) -> list:
    """Every process's ``items`` joined in rank order (this process's alone without a process group)."""
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]
    return list(items)
