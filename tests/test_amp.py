"""bf16 end to end on the CPU: training, validation, checkpoints and evaluation, and the tool
that compares an evaluation in fp32 and in low precision (tools/measure/amp_compare.py)."""
import math

import pytest
import torch

from engine.trainer import Trainer
from tests.conftest import tiny_cfg
from tests.test_trainer import LossRecorder
from tools.measure import amp_compare
from util.distributed import DistInfo


def test_bf16_trains_validates_and_checkpoints(synth_root, tmp_path):
    """The same seeded run in fp32 and in bf16: both finish, validate and checkpoint; bf16's
    first-iteration losses are close to fp32's but not equal (autocast was really on)."""
    runs = {}
    for amp in ("none", "bf16"):
        cfg = tiny_cfg(synth_root, tmp_path / amp, epochs=1, amp=amp)
        recorder = LossRecorder()
        metrics = Trainer.from_cfg(cfg, DistInfo(), recorder).train()
        history = recorder.losses()
        assert len(history) == 2 and all(math.isfinite(v) for row in history for v in row.values())
        assert 0 <= metrics["miou"] <= 100 and metrics["episodes"] == 8
        assert (tmp_path / amp / "model" / "best.pth").is_file()
        state = torch.load(tmp_path / amp / "model" / "last.pth", weights_only=True)
        assert state["config"]["amp"] == amp
        assert all(v.dtype != torch.bfloat16 for v in state["model"].values())   # weights stay fp32
        runs[amp] = history[0]
    for name, value in runs["none"].items():
        assert abs(runs["bf16"][name] - value) < 0.05 * abs(value) + 0.02, name
    assert runs["bf16"] != runs["none"]


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    """A tiny model trained for a few iterations (fp32), evaluated by the tests below."""
    path = tmp_path_factory.mktemp("amp_model")
    cfg = tiny_cfg(synth_root, path, epochs=1, epoch_size=24, evaluate=False)
    Trainer.from_cfg(cfg, DistInfo()).train()
    return cfg, str(path / "model" / "last.pth")


def test_compare_scores_both_precisions_on_the_same_episodes(trained):
    cfg, weight = trained
    res = amp_compare.compare(cfg, torch.device("cpu"), 10, ("none", "bf16"), weight, log=lambda m: None)
    none, bf16 = res["runs"]["none"], res["runs"]["bf16"]
    assert res["episodes"] == 10 and res["model"] == "checkpoint " + weight
    assert "pixel_agreement_pct" not in none
    for run in (none, bf16):
        assert run["ms_per_episode"] > 0 and 0 <= run["miou"] <= 100 and 0 <= run["foreground_pct"] <= 100
    assert 0 <= bf16["worst_episode_agreement_pct"] <= bf16["pixel_agreement_pct"] <= 100
    assert bf16["pixel_agreement_pct"] > 90                # bf16 keeps ~3 significant digits
    assert 0 < bf16["margin_rel_error"] < 0.1
    assert bf16["miou_diff"] == pytest.approx(bf16["miou"] - none["miou"])
    assert bf16["scored_pixels"] > 0
    table = amp_compare.format_table(res)
    assert "(ref)" in table and "bf16" in table


def test_agreement_counts_only_scored_pixels(tmp_path):
    import cv2
    import numpy as np
    label = np.array([[0, 1, 255, 1]], np.uint8)
    cv2.imwrite(str(tmp_path / "q.png"), label)
    rec = {"episode": 0, "query_label": "q.png"}
    a, b = np.array([[0, 1, 1, 0]], np.uint8), np.array([[0, 0, 0, 0]], np.uint8)
    out = amp_compare.agreement([(rec, a)], [(rec, b)], str(tmp_path))
    # pixels 0, 1, 3 are scored; 0 and 3 agree, 1 differs (pixel 2 differs too, but is ignored)
    assert out["scored_pixels"] == 3 and out["pixel_agreement_pct"] == pytest.approx(200 / 3)
    assert out["worst_episode_agreement_pct"] == pytest.approx(200 / 3)


def test_margin_error_is_relative_and_counts_sign_changes():
    ref = [torch.tensor([[1.0, -2.0], [3.0, -4.0]])]
    out = amp_compare.margin_error(ref, [ref[0] * 1.01])
    assert out["margin_rel_error"] == pytest.approx(0.01) and out["margin_sign_agreement_pct"] == 100
    flipped = amp_compare.margin_error(ref, [torch.tensor([[1.0, 2.0], [3.0, -4.0]])])
    assert flipped["margin_sign_agreement_pct"] == 75


def test_cli_mistakes_are_config_errors():
    from util.errors import ConfigError
    with pytest.raises(ConfigError, match="--amps"):
        amp_compare.main(["--config", "config/synthetic/synthetic_split0_resnet18.yaml", "--amps", "bf16"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        amp_compare.main(["--config", "config/synthetic/synthetic_split0_resnet18.yaml", "--device", "cpu",
                          "--amps", "none,fp16"])
