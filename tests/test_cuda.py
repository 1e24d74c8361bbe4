"""CUDA-only paths (skipped without a GPU; tools/measure/gpu_check.sh runs them with ``-m cuda``):
training through the real trainer in each precision and memory format, a GPU checkpoint
resumed on the CPU, and evaluation on the GPU — each compared with the same run on the CPU."""
import math

import pytest
import torch

from engine.evaluate import evaluate
from engine.trainer import Trainer
from tests.conftest import tiny_cfg
from tests.test_trainer import LossRecorder, no_dropout
from dataset.image import FewShotEvalDataset, load_split
from util.distributed import DistInfo

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)
# first-iteration losses on CUDA against the CPU in fp32: TF32 convolutions (~1e-3 relative),
# fp16 (10-bit mantissa), bf16 (7-bit mantissa)
TOLERANCE = {"none": 2e-3, "fp16": 1e-2, "bf16": 5e-2}


def train_without_dropout(cfg, info, recorder=None):
    """A seeded run with dropout off (CPU and CUDA generators draw different masks), so the two
    devices differ only by their arithmetic."""
    t = Trainer.from_cfg(cfg, info, recorder)
    no_dropout(t.model)
    return t, t.train()


@pytest.fixture(scope="module")
def cpu_losses(synth_root, tmp_path_factory):
    recorder = LossRecorder()
    train_without_dropout(tiny_cfg(synth_root, tmp_path_factory.mktemp("cpu"), epochs=1, channels_last=False),
                          DistInfo(), recorder)
    return recorder.losses()


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_on_cuda_in_each_precision_and_layout_matches_the_cpu(synth_root, tmp_path, amp, channels_last,
                                                                       cpu_losses):
    recorder = LossRecorder()
    cfg = tiny_cfg(synth_root, tmp_path, epochs=1, amp=amp, channels_last=channels_last, workers=2)
    t, metrics = train_without_dropout(cfg, DistInfo(device=CUDA), recorder)
    history = recorder.losses()
    assert len(history) == len(cpu_losses) == 2
    assert all(math.isfinite(v) for row in history for v in row.values())
    for name, value in cpu_losses[0].items():                     # the same batch, the same initial weights
        assert abs(history[0][name] - value) <= TOLERANCE[amp] * max(1.0, abs(value)), (name, history[0], value)
    assert 0 <= metrics["miou"] <= 100 and metrics["episodes"] == 8
    assert t.loader.pin_memory and next(t.model.parameters()).is_cuda
    assert t.scaler.is_enabled() == (amp == "fp16") and (amp != "fp16" or t.scaler.get_scale() > 0)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_a_gpu_checkpoint_resumes_on_the_cpu_as_the_gpu_run_continues(synth_root, tmp_path):
    whole = LossRecorder()
    train_without_dropout(tiny_cfg(synth_root, tmp_path / "gpu", evaluate=False), DistInfo(device=CUDA), whole)
    train_without_dropout(tiny_cfg(synth_root, tmp_path / "moved", evaluate=False, stop_iter=2),
                          DistInfo(device=CUDA))
    recorder = LossRecorder()
    train_without_dropout(tiny_cfg(synth_root, tmp_path / "moved", evaluate=False, resume="auto"), DistInfo(),
                          recorder)
    assert sorted(recorder.history) == [3, 4]
    for it in (3, 4):
        for name, value in whole.history[it].items():
            assert abs(recorder.history[it][name] - value) <= 2e-3 * max(1.0, abs(value)), (it, name)


def test_evaluation_on_cuda_agrees_with_the_cpu(synth_root, tmp_path):
    from engine.networks import build_model
    cfg = tiny_cfg(synth_root, tmp_path, channels_last=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    split = load_split(cfg, train=False)
    results = {}
    for device in (torch.device("cpu"), CUDA):
        dataset = FewShotEvalDataset(cfg, seed=3, num_episodes=12, split=split)
        out = evaluate(model.to(device), dataset, cfg, device)
        assert out.ms_per_unit > 0
        results[device.type] = out.result
    assert results["cuda"].episodes == results["cpu"].episodes == 12
    assert abs(results["cuda"].miou - results["cpu"].miou) < 1.0     # TF32 / kernel rounding only
    assert abs(results["cuda"].fbiou - results["cpu"].fbiou) < 1.0
