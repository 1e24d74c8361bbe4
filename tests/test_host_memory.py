"""util/host_memory.py: the CPU process tuning the entry points apply."""
import pytest
import torch

from util.host_memory import tune_cpu_process


def test_cpu_process_tuning_flushes_denormals():
    tiny = torch.tensor([1e-39], dtype=torch.float32)     # a denormal float32
    applied = tune_cpu_process(malloc=False)
    assert applied == {"malloc_tuned": False, "flush_denormal": True}
    assert (tiny * 1.0).item() == 0.0
    assert (torch.tensor([1e-30]) * 1.0).item() == pytest.approx(1e-30)   # normal values untouched
