"""Mixed-precision contexts from the ``amp`` config key (none | bf16 | fp16), and the memory
format from ``channels_last``."""
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


def use_channels_last(cfg, device: torch.device) -> bool:
    """The ``channels_last`` key on ``device``: True/False as given; 'auto' is on for the CPU
    (measured faster there: docs/benchmarks.md), off elsewhere."""
    value = cfg.channels_last
    return device.type == "cpu" if value == "auto" else bool(value)


def to_device(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device`` in the memory format ``cfg`` asks for there. The network
    lays its input images out like its first convolution, so callers pass plain tensors."""
    model = model.to(device)
    if use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model
