"""Training BG and DO elimination: the masks' shares training logs, the pass-through
initialisation, the DO warm-up (neither changes the evaluated function), the video ablation
and the trace tool."""
import json
import os

import pytest
import torch

from engine.networks import build_model
from engine.trainer import Trainer
from model.base import EliminatingNetwork
from model.modules import BGEliminating, DOEliminating, init_pass_through
from tests.conftest import tiny_cfg
from tests.test_model import episode, make_cfg
from tests.test_video_model import clip_episode, video_cfg
from tools.measure import trace_training
from util.config import ConfigError, dump_cfg, merge_cfg_from_list
from util.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_monitor_gives_the_shares_of_the_query_and_of_its_target():
    # 1 image, 4×4 bin: BG logits say BG on the top row (4 px); the DO mask covers rows 1-2 (8 px);
    # the label marks the left half as target (8 px), 4 of them in the DO mask
    bg_logits = torch.zeros(1, 2, 4, 4)
    bg_logits[0, 1, 0, :] = 1.0
    do_mask = torch.zeros(1, 1, 4, 4)
    do_mask[0, 0, 1:3, :] = 1.0
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, :2] = 1
    labels[0, 3, 3] = 255                            # ignored: not target
    monitor = EliminatingNetwork.elimination_monitor(bg_logits, {"do_mask": do_mask, "second": None}, labels)
    assert {k: v.item() for k, v in monitor.items()} == {
        "monitor/bg_mask": 4 / 16, "monitor/do_mask": 8 / 16, "monitor/do_on_target": 4 / 8}
    # no BG branch and no DO step (the ablation 'none'): nothing to show
    assert EliminatingNetwork.elimination_monitor(None, {"do_mask": None, "second": torch.zeros(1, 2, 4, 4)},
                                                  labels) == {}


def test_training_losses_carry_the_monitors_of_the_steps_that_are_on():
    q, s, m, y, c = episode(2, 1, 65)
    for elimination, expected in (("bg+do", {"monitor/bg_mask", "monitor/do_mask", "monitor/do_on_target"}),
                                  ("bg", {"monitor/bg_mask"}), ("none", set())):
        torch.manual_seed(0)
        model = build_model(make_cfg(elimination=elimination), warn_random_backbone=False).train()
        _, losses = model(q, s, m, query_mask=y, class_ids=c)
        assert {k for k in losses if k.startswith("monitor/")} == expected
        assert all(0.0 <= losses[k].item() <= 1.0 and not losses[k].requires_grad for k in expected)


def test_pass_through_initialisation_makes_each_elimination_step_the_identity():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 8, 5, 5))
    do_step = DOEliminating(8)
    init_pass_through(do_step.fuse)
    out, _ = do_step(x, torch.randn(2, 8, 5, 5), torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5), torch.rand(2, 1, 5, 5))
    assert torch.equal(out, x)
    bg_step = BGEliminating(8)
    init_pass_through(bg_step.fuse)
    assert torch.equal(bg_step(x, torch.randn(1, 8, 1, 1)), x)


def test_guided_training_changes_only_the_elimination_fusions_initialisation():
    torch.manual_seed(0)
    authors = build_model(make_cfg(elimination_training="authors"), warn_random_backbone=False)
    torch.manual_seed(0)
    guided = build_model(make_cfg(), warn_random_backbone=False)
    a, b = authors.state_dict(), guided.state_dict()
    assert a.keys() == b.keys()
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ == {f"scales.{i}.{step}.fuse.0.weight" for i in range(4)
                      for step in ("bg_eliminating", "do_eliminating")}
    assert torch.equal(b["scales.0.do_eliminating.fuse.0.weight"][:, :16, 0, 0], torch.eye(16))
    assert not b["scales.0.do_eliminating.fuse.0.weight"][:, 16:].any()


def test_guided_do_prototype_takes_the_target_from_the_label():
    torch.manual_seed(0)
    step = DOEliminating(4)
    x, q = torch.relu(torch.randn(1, 4, 3, 3)), torch.randn(1, 4, 3, 3)
    bg_logits = torch.zeros(1, 2, 3, 3)
    bg_logits[0, 1, 0, :] = 1.0                                    # top row BG
    second = torch.zeros(1, 2, 3, 3)
    second[0, 1, 1, 1] = 1.0                                       # the prediction: the centre pixel
    label = torch.zeros(1, 1, 3, 3)
    label[0, 0, 2, :] = 1.0                                        # the label: the bottom row
    prior = torch.zeros(1, 1, 3, 3)
    guided, mask = step(x, q, bg_logits, second, prior, label)
    as_label = torch.zeros(1, 2, 3, 3)
    as_label[0, 1, 2, :] = 1.0
    assert torch.equal(guided, step(x, q, bg_logits, as_label, prior)[0])   # pooled over relu(1 − BG − y)
    # the mask it returns (what evaluation and the monitors see) is the prediction's
    assert mask[0, 0].tolist() == [[0, 0, 0], [1, 0, 1], [1, 1, 1]]


def test_prior_variant_leaves_the_prior_target_out_of_the_do_mask():
    torch.manual_seed(0)
    step = DOEliminating(4, mask="prior")
    x, q = torch.relu(torch.randn(1, 4, 3, 3)), torch.randn(1, 4, 3, 3)
    bg_logits = torch.zeros(1, 2, 3, 3)
    bg_logits[0, 1, 0, :] = 1.0
    second = torch.zeros(1, 2, 3, 3)
    second[0, 1, 1, 1] = 1.0
    prior = torch.full((1, 1, 3, 3), 0.2)
    prior[0, 0, 2, 0] = 0.5                                        # >= 0.5: target
    _, mask = step(x, q, bg_logits, second, prior)
    assert mask[0, 0].tolist() == [[0, 0, 0], [1, 0, 1], [0, 1, 1]]


def test_guided_and_authors_training_evaluate_the_same_function():
    """A checkpoint trained either way (or before the key existed) loads into a model built
    either way and gives the same logits: no parameter or buffer is added."""
    torch.manual_seed(0)
    authors = build_model(make_cfg(elimination_training="authors"), warn_random_backbone=False).eval()
    guided = build_model(make_cfg(), warn_random_backbone=False).eval()
    guided.load_state_dict(authors.state_dict())
    q, s, m, _, _ = episode(2, 1, 65)
    with torch.no_grad():
        assert torch.equal(authors(q, s, m), guided(q, s, m))


def test_guided_training_differs_from_the_authors_only_through_the_do_mask():
    q, s, m, y, c = episode(2, 1, 65)
    torch.manual_seed(0)
    authors = build_model(make_cfg(elimination_training="authors"), warn_random_backbone=False).train()
    guided = build_model(make_cfg(), warn_random_backbone=False).train()
    guided.load_state_dict(authors.state_dict())
    torch.manual_seed(3)
    a, _ = authors(q, s, m, query_mask=y, class_ids=c)
    torch.manual_seed(3)
    g, _ = guided(q, s, m, query_mask=y, class_ids=c)
    assert not torch.equal(a, g)
    guided.guided = False                                          # the same network, its own masks
    guided.load_state_dict(authors.state_dict())
    torch.manual_seed(3)
    g, _ = guided(q, s, m, query_mask=y, class_ids=c)
    assert torch.equal(a, g)


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="elimination_training"):
        merge_cfg_from_list(make_cfg(), ["elimination_training", "warm"])
    with pytest.raises(ConfigError, match="do_mask"):
        merge_cfg_from_list(make_cfg(), ["do_mask", "soft"])


@pytest.mark.parametrize("elimination", ["bg", "do", "none"])
def test_video_network_takes_the_elimination_ablation(elimination):
    torch.manual_seed(0)
    model = build_model(video_cfg(elimination=elimination), warn_random_backbone=False)
    bg_on, do_on = elimination in ("bg", "bg+do"), elimination in ("do", "bg+do")
    assert (model.bgmm is not None) == (bg_on or do_on)
    assert all((p.bg_eliminating is not None) == bg_on and (p.do_eliminating is not None) == do_on
               for p in model.scales)
    q, s, m, y = clip_episode(2, 3, 3)
    model.train()
    _, losses = model(q, s, m, query_mask=y)
    losses["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert (losses["bg"].item() == 0.0) == (not (bg_on or do_on))
    model.eval()
    with torch.no_grad():
        _, extras = model(q, s, m, return_extras=True)
    assert set(extras) == {"prior"} | ({"bg_logits"} if bg_on or do_on else set()) | ({"do_mask"} if do_on else set())


class ScalarRecorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, *args, **kwargs):
        pass


def test_training_logs_the_shares_beside_the_losses(synth_root, tmp_path, caplog):
    writer = ScalarRecorder()
    cfg = tiny_cfg(synth_root, tmp_path, evaluate=False, epochs=1, print_freq=2)
    with caplog.at_level("INFO", logger="ntrenetpp"):
        Trainer.from_cfg(cfg, DistInfo(), writer).train()
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"monitor/foreground", "monitor/bg_mask", "monitor/do_mask", "monitor/do_on_target"} <= tags
    assert not any(t.startswith("train/loss_monitor") for t in tags)
    steps = sorted(step for tag, _, step in writer.scalars if tag == "monitor/do_mask")
    assert steps == [1, 2]
    lines = [r.getMessage() for r in caplog.records if "shares of the query:" in r.getMessage()]
    assert len(lines) == 1
    assert "predicted fg" in lines[0] and "target in DO mask" in lines[0]
    assert "monitor" not in lines[0].split("shares of the query:")[0]


def test_trace_records_every_step_and_plots_it(synth_root, tmp_path):
    cfg = tiny_cfg(synth_root, tmp_path / "exp", epochs=1)
    records = trace_training.trace(cfg, 3)
    assert [r["step"] for r in records] == [1, 2, 3]
    first = records[0]
    for key in ("main", "total", "monitor/foreground", "monitor/do_on_target", "rms/do_elim/0", "zero/do_elim/1",
                "rms/do_input/0", "rms/bg_elim/0", "rms/bgmm_fuse", "rms/inter_scale/1", "grad/down_query",
                "grad/scales.0.do_eliminating", "grad/merge"):
        assert key in first, key
    assert "rms/inter_scale/0" not in first            # the first bin has no previous scale
    assert not os.path.exists(tmp_path / "exp")          # nothing written into the experiment folder
    out = tmp_path / "trace"
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_cfg(tiny_cfg(synth_root, tmp_path / "exp", epochs=1)))
    trace_training.main(["--config", str(config), "--steps", "2", "--out", str(out), "print_freq", "1"])
    saved = json.loads((out / "trace.json").read_text())
    assert [r["step"] for r in saved] == [1, 2]
    assert saved[0]["main"] == pytest.approx(records[0]["main"], rel=1e-5)     # the same run, from the file
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(tmp_path / "exp")
