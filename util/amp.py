"""Where tensors run and in what precision: the autocast context of the ``amp`` config key
(none | bf16 | fp16), the memory format from ``channels_last``, a model or an episode batch
moved to the device."""
from __future__ import annotations

import contextlib

import torch

from util.errors import DeviceError

AMP_MODES = ("none", "bf16", "fp16")


def check_amp(amp: str, device: torch.device) -> None:
    """fp16 autocast runs on CUDA only (bf16 is the CPU's low precision): a DeviceError otherwise."""
    if amp == "fp16" and device.type != "cuda":
        raise DeviceError("amp fp16 needs a CUDA device; use amp bf16 on the CPU")


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device`` (a null context for 'none')."""
    if amp == "none":
        return contextlib.nullcontext()
    check_amp(amp, device)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_channels_last(value, device: torch.device) -> bool:
    """The ``channels_last`` key's ``value`` on ``device``: True/False as given; 'auto' is on for the CPU
    (measured faster there: docs/benchmarks.md), off elsewhere."""
    return device.type == "cpu" if value == "auto" else bool(value)


def to_device(model: torch.nn.Module, device: torch.device, channels_last="auto") -> torch.nn.Module:
    """Move ``model`` to ``device`` in the memory format the ``channels_last`` key asks for there. The network
    lays its input images out like its first convolution, so callers pass plain tensors."""
    model = model.to(device)
    if use_channels_last(channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def batch_to_device(batch: dict, device: torch.device, keys) -> dict:
    """The tensors ``keys`` of a collated episode batch on ``device`` (asynchronous copies
    when the loader pinned the batch)."""
    return {k: batch[k].to(device, non_blocking=True) for k in keys}
