"""Mixed-precision contexts from the ``amp`` config key (none | bf16 | fp16)."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device`` (a null context for 'none')."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp 'fp16' needs a CUDA device; use 'bf16' on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
