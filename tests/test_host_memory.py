"""util/host_memory.py: the CPU process tuning the entry points apply."""
import pytest
import torch

from util.host_memory import tune_cpu_process


def flushing() -> bool:
    """Whether float32 denormals are flushed to zero now (torch has no getter for the switch)."""
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


@pytest.fixture
def restore_flush_denormal():
    """The switch is process-wide: later tests must see it as it was."""
    before = flushing()
    yield
    torch.set_flush_denormal(before)
    assert flushing() == before


def test_cpu_process_tuning_flushes_denormals(restore_flush_denormal):
    tiny = torch.tensor([1e-39], dtype=torch.float32)     # a denormal float32
    torch.set_flush_denormal(False)
    assert (tiny * 1.0).item() == pytest.approx(1e-39, rel=1e-3)
    applied = tune_cpu_process(malloc=False)
    assert applied == {"malloc_tuned": False, "flush_denormal": True}
    assert (tiny * 1.0).item() == 0.0
    assert (torch.tensor([1e-30]) * 1.0).item() == pytest.approx(1e-30)   # normal values untouched
