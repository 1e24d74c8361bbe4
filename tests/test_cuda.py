"""CUDA-only paths (skipped without a GPU; tools/measure/gpu_check.sh runs them with ``-m cuda``):
training through the real trainer in each precision and memory format, a GPU checkpoint
resumed on the CPU, and evaluation on the GPU against the CPU on the same episodes."""
import math

import pytest
import torch

from engine.evaluate import evaluate
from engine.trainer import Trainer
from tests.conftest import tiny_cfg
from tests.test_trainer import LossRecorder
from dataset.image import FewShotEvalDataset, load_split
from util.distributed import DistInfo

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_on_cuda_in_each_precision_and_layout(synth_root, tmp_path, amp, channels_last):
    recorder = LossRecorder()
    cfg = tiny_cfg(synth_root, tmp_path, epochs=1, amp=amp, channels_last=channels_last, workers=2)
    t = Trainer.from_cfg(cfg, DistInfo(device=CUDA), recorder)
    metrics = t.train()
    assert all(math.isfinite(v) for row in recorder.losses() for v in row.values())
    assert 0 <= metrics["miou"] <= 100
    assert t.loader.pin_memory
    assert t.scaler.is_enabled() == (amp == "fp16") and (amp != "fp16" or t.scaler.get_scale() > 0)
    assert next(t.model.parameters()).is_cuda
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_a_gpu_checkpoint_resumes_on_the_cpu(synth_root, tmp_path):
    cfg = tiny_cfg(synth_root, tmp_path, evaluate=False, stop_iter=2)
    Trainer.from_cfg(cfg, DistInfo(device=CUDA)).train()
    recorder = LossRecorder()
    cfg = tiny_cfg(synth_root, tmp_path, evaluate=False, resume="auto")
    Trainer.from_cfg(cfg, DistInfo(), recorder).train()
    assert sorted(recorder.history) == [3, 4]
    assert all(math.isfinite(v) for row in recorder.losses() for v in row.values())


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
