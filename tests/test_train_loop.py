"""The training loop (engine/trainer.py) and its hooks (engine/hooks.py) with stand-in parts: a
one-weight network whose loss and gradient are worked out here, episodes that are numbers, and
validation results scripted per epoch. Milliseconds per run, so every rule of the loop is
checked against values derived in the test: the learning rate of each iteration, the SGD
update, which epoch ``best.pth`` holds, when ``last.pth`` is written, resuming (weights,
optimiser, GradScaler, RNG, the remaining batches), the stop on a signal, the loss log."""
import math
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

import engine.hooks as hooks
from dataset.image import EpisodeSampler
from dataset.metrics import IoUResult
from engine.evaluate import EvalOutput
from engine.experiment import ExperimentExistsError
from engine.trainer import Trainer, build_training, poly_lr, train_loader
from util.config import defaults, dump_cfg
from util.distributed import DistInfo
from util.errors import ConfigError, DataError, DeviceError
from util.interrupt import TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")


class Numbers(Dataset):
    """Episode (position, seed) is the number position + 1 as a tiny query image."""

    def __init__(self, n=6, bad=None):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def sampler(self, epoch_size=0, seed=0, num_replicas=1, rank=0):
        return EpisodeSampler(self.n, epoch_size, seed, num_replicas, rank)

    def __getitem__(self, key):
        position, _ = key
        if position == self.bad:
            raise DataError(f"cannot read image 'img{position}.jpg' (missing, empty or not an image)")
        return {"query_img": torch.full((3, 2, 2), float(position + 1)), "support_imgs": torch.zeros(1, 3, 2, 2),
                "support_masks": torch.zeros(1, 2, 2, dtype=torch.long),
                "query_mask": torch.zeros(2, 2, dtype=torch.long), "class_id": position}


class Line(torch.nn.Module):
    """loss = mean over the batch of (w · x · u - 1)² with x the query's value and u a draw of
    torch's generator (as dropout would draw), 1 + U(0, 0.01); a second loss 'aux' = 2 · loss.
    Records every batch's x and u; ``on_call(k)`` runs before the k-th forward (from 1)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.2))
        self.b = torch.nn.Parameter(torch.tensor(0.0))       # a second parameter group, half the rate
        self.seen, self.calls, self.on_call, self.poison, self.inputs = [], 0, None, {}, []

    def forward(self, q, s, m, query_mask=None, class_ids=None):
        self.calls += 1
        if self.on_call:
            self.on_call(self.calls)
        self.inputs.append({"shapes": (tuple(s.shape), tuple(m.shape), tuple(query_mask.shape)),
                            "autocast": torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None})
        x = q.mean((1, 2, 3))
        u = 1 + 0.01 * torch.rand(())
        self.seen.append((x.tolist(), u.item(), class_ids.tolist()))
        loss = ((self.w * x * u - 1) ** 2).mean()
        if self.calls == 1:
            loss = loss + self.b ** 2                          # b has a gradient in the first step only
        aux = 2 * loss
        if self.calls in self.poison:
            aux = aux * float("nan")
        return None, {"total": loss, "aux": aux}


def trained_by_hand(seen, lrs, w=0.2, momentum=0.0):
    """SGD on w over the recorded batches: g = mean(2 (w x u - 1) x u), buffer = momentum · buffer + g
    (the first buffer is g itself), w -= lr · buffer."""
    buf = None
    for (xs, u, _), lr in zip(seen, lrs):
        g = sum(2 * (w * x * u - 1) * x * u for x in xs) / len(xs)
        buf = g if buf is None else momentum * buf + g
        w -= lr * buf
    return w


def loop_cfg(save_path, **over):
    cfg = defaults()
    cfg.update(dataset="synthetic", save_path=str(save_path), epochs=2, epoch_size=8, batch_size=2, base_lr=0.1,
               power=0.9, print_freq=1, manual_seed=3, workers=0, val_freq=1, evaluate=False, tb_images=0)
    cfg.update(over)
    return cfg


def make_trainer(cfg, net=None, scaler=None, writer=None, info=None, momentum=0.0, dataset=None, val_set="episodes",
                 tensorboard=False):
    info = info or DistInfo()
    net = net or Line()
    optimizer = torch.optim.SGD([{"params": [net.w]}, {"params": [net.b], "lr_scale": 0.5}], lr=cfg.base_lr,
                                momentum=momentum)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    loader = train_loader(dataset or Numbers(), cfg, info)
    t = Trainer(cfg, info, net, optimizer, scaler, loader, val_set if cfg.evaluate else None, writer=writer,
                tensorboard=tensorboard)
    t.rates = []
    step = optimizer.step

    def recorded_step(*args, **kwargs):
        t.rates.append([g["lr"] for g in optimizer.param_groups])
        return step(*args, **kwargs)
    optimizer.step = recorded_step
    return t


class Recorder:
    """A TensorBoard-like writer keeping every scalar."""

    def __init__(self):
        self.scalars, self.closed = [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, *args, **kwargs):
        pass

    def close(self):
        self.closed += 1


@pytest.fixture
def scripted(monkeypatch):
    """Replace the evaluation behind validation: the k-th validation scores ``mious[k]``."""
    def install(mious):
        calls = []

        def fake_evaluate(model, dataset, cfg, device, pred_dir="", keep_samples=0, progress=None, task=None):
            calls.append({"dataset": dataset, "keep_samples": keep_samples, "model": model, "cfg": cfg,
                          "device": device, "task": task})
            m = mious[len(calls) - 1]
            return EvalOutput(IoUResult(m, m / 2, {"a": m}, 8), 1.5, 2.0)
        monkeypatch.setattr(hooks, "evaluate", fake_evaluate)
        return calls
    return install


def load(path):
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- the learning rate and the update
def test_poly_rate_edges():
    assert poly_lr(0.1, 1, 10, 0.9) == pytest.approx(0.1 * 0.9 ** 0.9)           # no warm-up by default
    assert poly_lr(0.1, 12, 10, 0.9) == 0.0                              # past max_iter: 0, not complex
    assert poly_lr(0.1, 3, 10, 0.9, warmup_iters=3) == pytest.approx(0.1)     # the last warm-up iteration
    assert poly_lr(0.1, 4, 10, 0.9, warmup_iters=3) == pytest.approx(0.1 * 0.6 ** 0.9)
    assert poly_lr(0.1, 1, 10, 0.9, warmup_iters=4) == pytest.approx(0.1 * (0.1 + 0.9 / 4))


@pytest.mark.parametrize("warmup", [0, 3])
def test_every_step_uses_the_rate_of_its_iteration(tmp_path, warmup):
    """2 epochs of 4 iterations: iteration i (from 1) steps with 0.1 (1 - i/8)^0.9, or the warm-up
    0.1 (0.1 + 0.9 i/3) for i <= 3; the half-rate group with half of it."""
    t = make_trainer(loop_cfg(tmp_path, warmup_iters=warmup))
    t.train()
    expected = [0.1 * (0.1 + 0.9 * i / 3) if i <= warmup else 0.1 * (1 - i / 8) ** 0.9 for i in range(1, 9)]
    assert [r[0] for r in t.rates] == pytest.approx(expected, abs=1e-12)
    assert [r[1] for r in t.rates] == pytest.approx([lr / 2 for lr in expected], abs=1e-12)
    assert t.lr == pytest.approx(expected[-1], abs=1e-12)
    assert (t.state.iteration, t.state.epoch) == (8, 2) and len(t.net.seen) == 8
    assert t.net.w.item() == pytest.approx(trained_by_hand(t.net.seen, expected), rel=1e-5)


def test_every_batch_of_an_epoch_is_drawn_once(tmp_path):
    t = make_trainer(loop_cfg(tmp_path, epochs=1, epoch_size=6))
    t.train()
    assert sorted(c for _, _, ids in t.net.seen for c in ids) == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------- best.pth, last.pth
def test_best_pth_holds_the_best_validation_and_a_tie_keeps_the_first(tmp_path, scripted):
    calls = scripted([30.0, 50.0, 50.0, 40.0])
    t = make_trainer(loop_cfg(tmp_path, epochs=4, evaluate=True))
    metrics = t.train()
    assert metrics == {"miou": 40.0, "fbiou": 20.0, "class_iou": {"a": 40.0}, "episodes": 8}
    assert len(calls) == 4 and all(c["dataset"] == "episodes" and c["keep_samples"] == 0 for c in calls)
    best, last = load(tmp_path / "model" / "best.pth"), load(tmp_path / "model" / "last.pth")
    assert (best["epoch"], best["iteration"], best["best_miou"]) == (2, 8, 50.0)
    assert best["metrics"] == {"miou": 50.0, "fbiou": 25.0, "class_iou": {"a": 50.0}, "episodes": 8,
                               "iters_per_epoch": 4}
    assert (last["epoch"], last["iteration"], last["best_miou"]) == (4, 16, 50.0)
    assert last["metrics"]["miou"] == 40.0 and t.state.best_miou == 50.0
    assert not (tmp_path / "model" / "best.prev.pth").exists() and (tmp_path / "model" / "last.prev.pth").exists()
    assert load(tmp_path / "model" / "last.prev.pth")["epoch"] == 3


def test_validation_every_val_freq_epochs_and_after_the_last(tmp_path, scripted):
    calls = scripted([10.0, 20.0, 30.0])
    writer = Recorder()
    t = make_trainer(loop_cfg(tmp_path, epochs=5, val_freq=2, evaluate=True, tb_images=3), writer=writer)
    t.train()
    assert len(calls) == 3 and [c["keep_samples"] for c in calls] == [3, 3, 3]   # a writer: keep panels
    assert [(tag, v, step) for tag, v, step in writer.scalars if tag.startswith("val/")] == [
        ("val/miou", 10.0, 8), ("val/fbiou", 5.0, 8), ("val/miou", 20.0, 16), ("val/fbiou", 10.0, 16),
        ("val/miou", 30.0, 20), ("val/fbiou", 15.0, 20)]
    assert load(tmp_path / "model" / "best.pth")["epoch"] == 5


def test_no_validation_without_validation_episodes(tmp_path, scripted):
    calls = scripted([])
    t = make_trainer(loop_cfg(tmp_path, evaluate=False))
    assert t.train() == {} and calls == []
    assert not (tmp_path / "model" / "best.pth").exists() and load(tmp_path / "model" / "last.pth")["epoch"] == 2


def saves_of(t):
    """Wrap ``t.save``: the (name, iteration) of every save, in order."""
    saved = []
    save = t.save

    def recording(name):
        saved.append((name, t.state.iteration))
        save(name)
    t.save = recording
    return saved


@pytest.mark.parametrize("freq, expected", [(0, [4, 8]), (3, [3, 4, 6, 8]), (2, [2, 4, 6, 8])])
def test_last_pth_at_every_epoch_end_and_every_ckpt_freq_iters(tmp_path, freq, expected):
    t = make_trainer(loop_cfg(tmp_path, ckpt_freq_iters=freq))
    saved = saves_of(t)
    t.train()
    assert saved == [("last", i) for i in expected]           # an epoch's end is saved once
    assert load(tmp_path / "model" / "last.pth")["iteration"] == 8


@pytest.mark.parametrize("stop, expected", [(3, [3]), (6, [4, 6]), (4, [4])])
def test_stop_iter_saves_last_and_ends_the_run(tmp_path, scripted, stop, expected):
    scripted([60.0, 70.0])
    t = make_trainer(loop_cfg(tmp_path, stop_iter=stop, evaluate=True))
    saved = saves_of(t)
    metrics = t.train()
    assert [s for s in saved if s[0] == "last"] == [("last", i) for i in expected]
    assert t.state.iteration == stop and len(t.net.seen) == stop
    assert metrics == ({} if stop < 4 else {"miou": 60.0, "fbiou": 30.0, "class_iou": {"a": 60.0}, "episodes": 8})
    assert saved.index(("last", 4)) > saved.index(("best", 4)) if stop >= 4 else ("best", 4) not in saved


# ---------------------------------------------------------------- resuming
def test_a_resumed_run_continues_exactly(tmp_path):
    """Stopped after iteration 3 (mid-epoch) and resumed: the remaining batches, the weights, the
    SGD momentum, the GradScaler's scale and growth tracker and the generator's draws all equal
    the uninterrupted run's."""
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=8.0, growth_factor=2.0, growth_interval=2, enabled=True)
    torch.manual_seed(0)
    whole = make_trainer(loop_cfg(tmp_path / "a"), scaler=scaler(), momentum=0.9)
    whole.train()
    assert whole.scaler.get_scale() == 8.0 * 2 ** 4                    # 8 good steps, doubled every 2
    torch.manual_seed(0)
    first = make_trainer(loop_cfg(tmp_path / "b", stop_iter=3), scaler=scaler(), momentum=0.9)
    first.train()
    state = load(tmp_path / "b" / "model" / "last.pth")
    assert (state["iteration"], state["epoch"]) == (3, 0)
    assert state["scaler"]["scale"] == 16.0 and state["scaler"]["_growth_tracker"] == 1
    torch.manual_seed(123)                                              # the checkpoint's RNG state wins
    rest = make_trainer(loop_cfg(tmp_path / "b", resume="auto"), scaler=scaler(), momentum=0.9)
    rest.train()
    assert rest.net.seen == whole.net.seen[3:]                          # batches and draws
    assert (rest.state.iteration, rest.state.epoch) == (8, 2)
    assert torch.equal(rest.net.w, whole.net.w) and torch.equal(rest.net.b, whole.net.b)
    assert rest.scaler.state_dict() == whole.scaler.state_dict()
    momentum = rest.optimizer.state[rest.net.w]["momentum_buffer"]
    assert torch.equal(momentum, whole.optimizer.state[whole.net.w]["momentum_buffer"])
    rates = [0.1 * (1 - i / 8) ** 0.9 for i in range(1, 9)]
    assert [r[0] for r in rest.rates] == pytest.approx(rates[3:], abs=1e-12)   # max_iter 8, not 5
    assert whole.net.w.item() == pytest.approx(trained_by_hand(whole.net.seen, rates, momentum=0.9), rel=1e-5)


def test_resume_restores_position_best_metrics_and_run_and_writes_the_config(tmp_path, scripted):
    scripted([40.0, 45.0])
    make_trainer(loop_cfg(tmp_path, stop_iter=6, evaluate=True, epochs=3)).train()
    cfg = loop_cfg(tmp_path, resume=str(tmp_path / "model" / "last.pth"), evaluate=True, epochs=3)
    t = make_trainer(cfg)
    hooks.ResumeHook.before_train(t.hooks[0])
    assert (t.state.iteration, t.state.epoch, t.state.best_miou) == (6, 1, 40.0)
    assert t.metrics == {"miou": 40.0, "fbiou": 20.0, "class_iou": {"a": 40.0}, "episodes": 8}
    assert set(t.run) == {"tb"}
    assert (tmp_path / "config.yaml").read_text() == dump_cfg(cfg)
    other = make_trainer(loop_cfg(tmp_path, resume="", evaluate=True, epochs=3))
    hooks.ResumeHook.before_train(other.hooks[0])
    assert (other.state.iteration, other.state.best_miou, other.run) == (0, -1.0, {})


def test_resume_auto_without_a_checkpoint_starts_from_scratch(tmp_path):
    t = make_trainer(loop_cfg(tmp_path, resume="auto"))
    t.train()
    assert t.state.iteration == 8 and len(t.net.seen) == 8


def test_another_rank_reseeds_its_dropout_stream_after_a_resume(tmp_path):
    make_trainer(loop_cfg(tmp_path, stop_iter=3)).train()
    t = make_trainer(loop_cfg(tmp_path, resume="auto"), info=DistInfo(rank=1))
    hooks.ResumeHook.before_train(t.hooks[0])
    assert torch.initial_seed() == 3 + 1 + 3                            # manual_seed + rank + iteration


def test_rerunning_into_a_folder_with_checkpoints_is_refused(tmp_path):
    make_trainer(loop_cfg(tmp_path, epochs=1)).train()
    with pytest.raises(ExperimentExistsError, match=r"already holds last\.pth"):
        make_trainer(loop_cfg(tmp_path, epochs=1)).train()


# ---------------------------------------------------------------- the stop on a signal
def signal_at(t, call, signum=signal.SIGTERM):
    t.net.on_call = lambda k: t.request.handle(signum, None) if k == call else None


def test_a_signal_mid_epoch_saves_last_and_says_how_to_continue(tmp_path):
    t = make_trainer(loop_cfg(tmp_path))
    signal_at(t, 2)
    with pytest.raises(TrainingInterrupted) as e:
        t.train()
    last = tmp_path / "model" / "last.pth"
    assert e.value.exit_status == 143 and str(e.value) == (
        f"stopped by SIGTERM after iteration 2 of 8 (in epoch 1, 2/4 into it); {last} is saved. "
        f"Continue with: the same command with resume auto")
    assert load(last)["iteration"] == 2 and len(t.net.seen) == 2


def test_a_signal_at_an_epochs_last_step_leaves_its_validation_to_the_resume(tmp_path, scripted):
    calls = scripted([55.0, 65.0])
    t = make_trainer(loop_cfg(tmp_path, evaluate=True))
    signal_at(t, 4, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as e:
        t.train()
    last = tmp_path / "model" / "last.pth"
    assert e.value.exit_status == 130 and str(e.value) == (
        f"stopped by SIGINT after iteration 4 of 8 (at the end of epoch 1); {last} is saved (epoch 1's "
        f"validation runs first when it continues). Continue with: the same command with resume auto")
    assert calls == [] and load(last)["run"]["validation_pending"] is True
    resumed = make_trainer(loop_cfg(tmp_path, evaluate=True, resume="auto"))
    saved = saves_of(resumed)
    resumed.train()
    assert len(calls) == 2 and saved[:3] == [("best", 4), ("last", 4), ("best", 8)]
    assert load(tmp_path / "model" / "best.pth")["epoch"] == 2
    assert "validation_pending" not in load(last)["run"]


def test_a_signal_at_the_end_of_an_epoch_without_validation(tmp_path):
    t = make_trainer(loop_cfg(tmp_path))
    signal_at(t, 4)
    with pytest.raises(TrainingInterrupted) as e:
        t.train()
    assert str(e.value).startswith("stopped by SIGTERM after iteration 4 of 8 (at the end of epoch 1); ")
    assert "validation runs first" not in str(e.value) and len(t.net.seen) == 4
    last_epoch = make_trainer(loop_cfg(tmp_path / "x", epochs=1))
    signal_at(last_epoch, 4)
    last_epoch.train()                         # the run ends there anyway: no stop, the usual last save
    assert load(tmp_path / "x" / "model" / "last.pth")["iteration"] == 4


# ---------------------------------------------------------------- the loss log
def test_losses_are_logged_per_iteration_with_the_rate_at_each_read_back(tmp_path):
    writer = Recorder()
    t = make_trainer(loop_cfg(tmp_path, print_freq=3), writer=writer)
    t.train()
    logged = [(tag, step) for tag, _, step in writer.scalars]
    steps = [step for tag, step in logged if tag == "train/loss_total"]
    assert steps == list(range(1, 9)) and [s for tag, s in logged if tag == "train/loss_aux"] == steps
    totals = {step: v for tag, v, step in writer.scalars if tag == "train/loss_total"}
    auxes = {step: v for tag, v, step in writer.scalars if tag == "train/loss_aux"}
    assert all(auxes[s] == pytest.approx(2 * totals[s], rel=1e-6) for s in steps)
    rates = [0.1 * (1 - i / 8) ** 0.9 for i in range(1, 9)]
    assert [(step, v) for tag, v, step in writer.scalars if tag == "train/lr"] == [
        (3, pytest.approx(rates[2])), (4, pytest.approx(rates[3])), (6, pytest.approx(rates[5])),
        (8, pytest.approx(rates[7]))]                                   # read back every 3 and at epoch ends
    first_x, first_u = t.net.seen[0][0], t.net.seen[0][1]
    assert totals[1] == pytest.approx(sum((0.2 * x * first_u - 1) ** 2 for x in first_x) / 2, rel=1e-6)
    assert writer.closed == 0                                           # not the trainer's own writer


@pytest.mark.parametrize("poisoned, where", [({5}, 5), ({2, 7}, 2)])
def test_a_non_finite_loss_stops_naming_the_iteration_and_component(tmp_path, poisoned, where):
    t = make_trainer(loop_cfg(tmp_path, print_freq=3))
    t.net.poison = poisoned
    with pytest.raises(hooks.NonFiniteLossError) as e:
        t.train()
    last = tmp_path / "model" / "last.pth"
    kept = f"({last}) is intact" if where > 4 else "(none written yet) is intact"
    assert str(e.value) == (f"non-finite loss at iteration {where}: component 'aux' = nan. Training stopped; the "
                            f"last good checkpoint {kept}. Try a lower base_lr, amp none, or check the data.")
    if where > 4:
        assert load(last)["iteration"] == 4                             # nothing non-finite was saved


def test_the_tensorboard_folder_is_new_per_run_and_kept_by_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks.time, "strftime", lambda fmt: "20250101-000000")
    for name in ("20250101-000000", "20250101-000000-2"):
        os.makedirs(tmp_path / "tb" / name)
    t = make_trainer(loop_cfg(tmp_path, stop_iter=3), tensorboard=True)
    t.train()
    assert t.run == {"tb": "20250101-000000-3"} and t.writer.log_dir == str(tmp_path / "tb" / "20250101-000000-3")
    assert t.writer.purge_step is None and t.losses.tensorboard
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb" / "20250101-000000-3"))
    resumed = make_trainer(loop_cfg(tmp_path, resume="auto"), tensorboard=True)
    resumed.train()
    assert resumed.run == {"tb": "20250101-000000-3"} and resumed.writer.purge_step == 4
    plain = make_trainer(loop_cfg(tmp_path / "p"), writer=Recorder(), tensorboard=True)
    assert not plain.losses.tensorboard                                 # a writer given: the caller's
    rank1 = make_trainer(loop_cfg(tmp_path / "r"), info=DistInfo(rank=1), tensorboard=True)
    assert not rank1.losses.tensorboard


def test_the_trainers_own_writer_is_closed_at_the_end(tmp_path):
    writer = Recorder()
    t = make_trainer(loop_cfg(tmp_path, epochs=1), tensorboard=True)
    t.writer = writer
    t.losses.before_train = lambda: None                              # keep this writer
    t.train()
    assert writer.closed == 1


# ---------------------------------------------------------------- data faults and the loader
def test_a_bad_file_stops_training_with_its_message(tmp_path):
    t = make_trainer(loop_cfg(tmp_path), dataset=Numbers(bad=4))
    with pytest.raises(DataError, match=r"^cannot read image 'img4\.jpg'"):
        t.train()
    with pytest.raises(ValueError) as e:
        Trainer(loop_cfg(tmp_path), DistInfo(), Line(), None, None).train()
    assert str(e.value) == "Trainer.train needs a loader (Trainer.from_cfg builds one)"


def test_train_loader_splits_the_global_batch_and_leaves_the_global_rng_alone(tmp_path):
    cfg = loop_cfg(tmp_path, batch_size=4, epoch_size=10)
    loader = train_loader(Numbers(), cfg, DistInfo(rank=1, world_size=2))
    assert loader.batch_size == 2 and loader.drop_last and not loader.pin_memory and loader.num_workers == 0
    assert (loader.sampler.num_replicas, loader.sampler.rank, loader.sampler.seed) == (2, 1, 3)
    assert len(loader.sampler) == 5 and len(loader) == 2
    state = torch.get_rng_state()
    first = [b["class_id"].tolist() for b in loader]
    assert torch.equal(state, torch.get_rng_state()) and first == [b["class_id"].tolist() for b in loader]
    with pytest.raises(ConfigError) as e:
        train_loader(Numbers(), cfg, DistInfo(world_size=3))
    assert str(e.value) == "batch_size 4 (the global batch) is not divisible by 3 processes"
    with pytest.raises(ConfigError) as e:
        train_loader(Numbers(), loop_cfg(tmp_path, batch_size=4, epoch_size=3), DistInfo())
    assert str(e.value) == ("an epoch has no iteration: 3 episodes per process, fewer than the per-process batch "
                            "4; raise epoch_size or lower batch_size")


def test_build_training_makes_the_configured_optimiser_and_scaler(tmp_path):
    cfg = loop_cfg(tmp_path, layers=18, pretrained="", reduce_dim=8, ppm_scales=[1.0], memory_size=4,
                   num_negatives=2, base_lr=0.02, momentum=0.8, weight_decay=1e-3)
    model, net, optimizer, scaler = build_training(cfg, DistInfo(), warn_random_backbone=False)
    assert net is model and not scaler.is_enabled()
    [group] = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], group["fused"]) == (0.02, 0.8, 1e-3, True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(group["params"]) == len(trainable) < len(list(model.parameters()))   # the frozen backbone is out
    with pytest.raises(DeviceError, match="amp fp16 needs a CUDA device"):
        build_training(loop_cfg(tmp_path, amp="fp16"), DistInfo())


# ---------------------------------------------------------------- the step and the run's surroundings
def test_a_parameter_without_gradient_is_left_alone(tmp_path):
    """The half-rate weight b gets a gradient only in the first step (set_to_none: no gradient
    is no update, even with momentum): b moves once, by -lr_1/2 · 2b, and stays."""
    t = make_trainer(loop_cfg(tmp_path), momentum=0.9)
    with torch.no_grad():
        t.net.b.fill_(1.0)
    t.train()
    assert t.net.b.item() == pytest.approx(1.0 - 0.05 * (1 - 1 / 8) ** 0.9 * 2.0, abs=1e-7)


def test_the_step_passes_the_batch_under_the_configured_autocast(tmp_path):
    for amp, dtype in (("none", None), ("bf16", torch.bfloat16)):
        t = make_trainer(loop_cfg(tmp_path / amp, amp=amp, epochs=1))
        t.train()
        assert {i["autocast"] for i in t.net.inputs} == {dtype}
        assert t.net.inputs[0]["shapes"] == ((2, 1, 3, 2, 2), (2, 1, 2, 2), (2, 2, 2))


def test_a_trainer_defaults_to_no_tensorboard_and_the_plain_network(tmp_path):
    cfg = loop_cfg(tmp_path)
    net, wrapped = Line(), Line()
    t = Trainer(cfg, DistInfo(), net, None, None, None)
    assert t.net is net and t.lr == 0.1 and not t.losses.tensorboard and t.lock is None
    assert not t.request.requested and t.continue_cmd == "the same command with resume auto"
    assert [type(h).__name__ for h in t.hooks] == ["ResumeHook", "LossLog", "StopOnSignal", "Validation",
                                                   "PeriodicCheckpoint"]
    assert all(h.trainer is t for h in t.hooks)
    t = Trainer(cfg, DistInfo(), net, None, None, None, net=wrapped, continue_cmd="sh train.sh x y")
    assert t.model is net and t.net is wrapped and t.continue_cmd == "sh train.sh x y"


def test_training_holds_the_folder_lock_or_uses_the_one_given(tmp_path):
    from util.runlock import LockedError, RunLock
    t = make_trainer(loop_cfg(tmp_path, epochs=1))
    t.net.on_call = lambda k: seen.append(os.path.isfile(tmp_path / "train.lock"))
    seen = []
    t.train()
    assert seen == [True] * 4 and not (tmp_path / "train.lock").exists()      # held while training, then freed
    lock = RunLock(str(tmp_path / "held"))
    lock.acquire()
    try:
        t = make_trainer(loop_cfg(tmp_path / "held", epochs=1))
        t.lock = lock                                                           # train.py took it already
        t.train()
        assert (tmp_path / "held" / "train.lock").exists()                     # its holder releases it
        with pytest.raises(LockedError):
            make_trainer(loop_cfg(tmp_path / "held", epochs=1, resume="auto")).train()
    finally:
        lock.release()


def test_a_failed_save_stops_the_run_with_its_message(tmp_path, monkeypatch):
    import engine.trainer as trainer_module
    from engine.checkpoint import CheckpointWriteError

    def full(path, *args, **kwargs):
        raise CheckpointWriteError(f"could not write checkpoint '{path}' (No space left on device)")
    monkeypatch.setattr(trainer_module, "save_checkpoint", full)
    t = make_trainer(loop_cfg(tmp_path))
    with pytest.raises(CheckpointWriteError, match=r"last\.pth' \(No space left on device\)"):
        t.train()
    assert t.state.iteration == 4


def test_the_loaders_workers_are_shut_down_when_the_run_ends(tmp_path):
    t = make_trainer(loop_cfg(tmp_path, workers=1, epochs=1))
    assert t.loader.num_workers == 1 and t.loader.persistent_workers
    from dataset.image import worker_init
    assert t.loader.worker_init_fn is worker_init
    t.train()
    assert t.loader._iterator is None


def test_the_progress_bar_is_rank_0s_and_counts_the_epochs_batches(tmp_path, monkeypatch):
    import io
    import engine.trainer as trainer_module
    streams = []

    def stream():
        streams.append(io.StringIO())
        return streams[-1]
    monkeypatch.setattr(trainer_module, "progress_stream", stream)
    make_trainer(loop_cfg(tmp_path, stop_iter=1)).train()
    assert len(streams) == 1 and "epoch 1: " in streams[0].getvalue() and "0/4" in streams[0].getvalue()
    assert streams[0].getvalue().endswith("\r") and "\n" not in streams[0].getvalue()   # cleared, not left
    make_trainer(loop_cfg(tmp_path, resume="auto", epochs=1)).train()
    assert len(streams) == 2 and "epoch 1: " in streams[1].getvalue() and "0/3" in streams[1].getvalue()
    make_trainer(loop_cfg(tmp_path / "r1", epochs=1), info=DistInfo(rank=1)).train()
    assert len(streams) == 2                                            # no bar on other ranks


def test_from_cfg_builds_the_configured_run(synth_root, tmp_path):
    from dataset.image import FewShotEvalDataset
    from tests.conftest import tiny_cfg
    cfg = tiny_cfg(synth_root, tmp_path, val_num=6)
    t = Trainer.from_cfg(cfg, DistInfo(), writer=None, tensorboard=True, continue_cmd="again")
    assert torch.initial_seed() == cfg.manual_seed
    assert t.loader.dataset.split.classes == list(range(6, 21)) and t.loader.batch_size == 4
    assert t.loader.sampler.seed == cfg.manual_seed and t.loader.sampler.epoch_size == 8
    expected = FewShotEvalDataset(cfg, seed=cfg.manual_seed + 1000, num_episodes=6)
    assert t.val_set.episodes == expected.episodes and t.val_set.split.classes == [1, 2, 3, 4, 5]
    assert t.net is t.model and t.optimizer.param_groups[0]["lr"] == cfg.base_lr
    assert t.losses.tensorboard and t.continue_cmd == "again" and not t.scaler.is_enabled()
    cfg = tiny_cfg(synth_root, tmp_path, evaluate=False, manual_seed=9)
    t = Trainer.from_cfg(cfg, DistInfo(rank=1))
    assert t.val_set is None and torch.initial_seed() == 10                # manual_seed + rank


def test_build_training_wraps_for_ddp_and_compile(tmp_path, caplog):
    """One gloo process launched as by torchrun: DDP around the model, the DO bank's buffers left
    out of its broadcasts, BatchNorm statistics broadcast unless fixed. (SyncBatchNorm under DDP
    needs CUDA; without a process group sync_bn changes nothing.)"""
    from torch.nn.parallel import DistributedDataParallel
    cfg = loop_cfg(tmp_path, layers=18, pretrained="", reduce_dim=8, ppm_scales=[1.0], memory_size=4,
                   num_negatives=2)
    build_training(cfg, DistInfo())
    assert "pretrained is ''" in caplog.text                           # warned by default
    caplog.clear()
    build_training(cfg, DistInfo(), warn_random_backbone=False)
    assert "pretrained is ''" not in caplog.text
    compiled_cfg = cfg.copy()
    compiled_cfg.update(compile=True)
    model, net, _, _ = build_training(compiled_cfg, DistInfo(), warn_random_backbone=False)
    assert net._orig_mod is model
    sync_cfg = cfg.copy()
    sync_cfg.update(sync_bn=True)
    model, _, _, _ = build_training(sync_cfg, DistInfo(), warn_random_backbone=False)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())   # one process: plain BN
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        info = DistInfo(launched=True)
        for fix_bn in (True, False):
            fixed = cfg.copy()
            fixed.update(fix_bn=fix_bn)
            model, net, _, _ = build_training(fixed, info, warn_random_backbone=False)
            assert isinstance(net, DistributedDataParallel) and net.module is model
            assert net.forward_sync_buffers is (not fix_bn) and net.device_ids is None
            bank = {n for n, _ in model.named_buffers() if n.startswith("memory_bank.")}
            assert bank and set(model._ddp_params_and_buffers_to_ignore) == bank
            assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        t = Trainer(cfg, info, model, None, None, None)
        assert t.stop.distributed
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- hooks: what the second mutation run left
def test_validation_evaluates_the_plain_model_and_keeps_panels_only_for_a_writer(tmp_path, scripted, caplog):
    import logging
    calls = scripted([20.0, 30.0])
    caplog.set_level(logging.INFO, logger="ntrenetpp")
    t = make_trainer(loop_cfg(tmp_path, evaluate=True, tb_images=2))
    t.train()
    assert [c["keep_samples"] for c in calls] == [0, 0]                  # no writer: no panels kept
    assert all(c["model"] is t.model and c["cfg"] is t.cfg and c["device"] == torch.device("cpu")
               and c["task"] is t.task for c in calls)
    assert "validation after epoch 1: class mIoU 20.00" in caplog.text
    assert "validation after epoch 2: class mIoU 30.00" in caplog.text


def strip(path, *keys):
    """Rewrite a checkpoint without ``keys`` (dotted), as an older or hand-made one would be (no checksum)."""
    state = torch.load(path, weights_only=True)
    state.pop("checksum")
    for key in keys:
        *parents, last = key.split(".")
        node = state
        for p in parents:
            node = node[p]
        node.pop(last)
    torch.save(state, path)


def test_resume_refuses_another_shot_or_epoch_length_naming_the_checkpoint(tmp_path):
    from util.errors import CheckpointError
    make_trainer(loop_cfg(tmp_path, stop_iter=3)).train()
    last = tmp_path / "model" / "last.pth"
    with pytest.raises(CheckpointError) as e:
        make_trainer(loop_cfg(tmp_path, resume="auto", shot=2)).train()
    assert str(e.value) == (f"{last} was trained with shot 1, this run has shot 2: resume with shot 1, or train the "
                            f"2-shot model into its own folder (sh train.sh <dataset> <exp_name> shot 2 uses "
                            f"exp/<dataset>/<exp_name>_shot2)")
    with pytest.raises(CheckpointError) as e:
        make_trainer(loop_cfg(tmp_path, resume="auto", epoch_size=6)).train()
    assert str(e.value) == (f"{last} was trained with 4 iterations per epoch, this run has 3: resume with the same "
                            f"batch_size, epoch_size and process count, or start a new experiment")
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{last}' was trained with a different network: layers"):
        make_trainer(loop_cfg(tmp_path, resume="auto", layers=101)).train()


def test_a_checkpoint_without_shot_iteration_length_or_tensorboard_folder_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks.time, "strftime", lambda fmt, real=hooks.time.strftime: real(fmt, hooks.time.gmtime(0)))
    make_trainer(loop_cfg(tmp_path, stop_iter=3), tensorboard=True).train()
    assert load(tmp_path / "model" / "last.pth")["run"] == {"tb": "19700101-000000"}
    strip(tmp_path / "model" / "last.pth", "config.shot", "metrics.iters_per_epoch", "run.tb")
    t = make_trainer(loop_cfg(tmp_path, resume="auto"), tensorboard=True)
    t.train()
    assert t.state.iteration == 8 and t.run == {"tb": "19700101-000000-2"} and t.writer.purge_step is None


def test_the_tensorboard_folder_of_a_run_resumed_after_one_iteration(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks.time, "strftime", lambda fmt, real=hooks.time.strftime: real(fmt, hooks.time.gmtime(0)))
    make_trainer(loop_cfg(tmp_path, stop_iter=1)).train()
    t = make_trainer(loop_cfg(tmp_path, resume="auto"), tensorboard=True)
    t.train()
    assert t.run == {"tb": "19700101-000000"} and t.writer.purge_step == 2
    assert not hooks.LossLog().tensorboard                                  # off unless asked


def test_a_non_finite_loss_on_another_process_stops_this_one(tmp_path, monkeypatch):
    t = make_trainer(loop_cfg(tmp_path, print_freq=2))
    t.info = DistInfo(world_size=2)                                          # as rank 0 of two, after set-up
    reduced = []

    def other_rank_saw_nan(tensor, op=None):
        reduced.append(op)
        tensor.fill_(1.0)
    monkeypatch.setattr(torch.distributed, "all_reduce", other_rank_saw_nan)
    with pytest.raises(hooks.NonFiniteLossError) as e:
        t.train()
    assert str(e.value).startswith("non-finite loss on another process. Training stopped; the last good checkpoint "
                                   "(none written yet) is intact.")
    assert reduced == [torch.distributed.ReduceOp.MAX]


def test_a_stop_signalled_to_another_process_stops_this_one_with_its_status(tmp_path):
    t = make_trainer(loop_cfg(tmp_path))
    told = []

    def agreed_max(local):                           # rank 1 got SIGTERM during iteration 2
        if t.state.iteration == 2 and not told:
            told.append(local)
            return 143
        return local
    t.stop.agreed_max = agreed_max
    with pytest.raises(TrainingInterrupted) as e:
        t.train()
    assert e.value.exit_status == 143
    assert str(e.value).startswith("stopped by a signal to another process after iteration 2 of 8 (in epoch 1, ")


def test_the_loss_log_line_names_its_window_mean_speed_and_eta(tmp_path, monkeypatch, caplog):
    import logging
    from util.logger import format_eta
    caplog.set_level(logging.INFO, logger="ntrenetpp")
    now = [100.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: now[0])
    t = make_trainer(loop_cfg(tmp_path, print_freq=3))
    losses = []
    forward = t.net.forward

    def timed(*args, **kwargs):
        now[0] += 2.0                                                       # every iteration takes 2 s
        out = forward(*args, **kwargs)
        losses.append(out[1]["total"].item())
        return out
    t.net.forward = timed
    t.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    mean = sum(losses[:3]) / 3
    assert lines[0] == (f"epoch 1/2 iter 3/8 | mean of iter 1-3: total {mean:.4f} aux {2 * mean:.4f} | "
                        f"lr {0.1 * (5 / 8) ** 0.9:.5f} | 2.000 s/it over 3 iter | eta {format_eta(10.0)}")
    assert lines[1].startswith(f"epoch 1/2 iter 4/8 | mean of iter 4: total {losses[3]:.4f} ")
    assert lines[1].endswith("| 2.000 s/it over 4 iter | eta 0:00:08")


def test_loss_read_back_is_all_reduced_under_a_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        t = make_trainer(loop_cfg(tmp_path / "run", epochs=1), info=DistInfo(launched=True))
        t.train()
        assert t.state.iteration == 4
    finally:
        torch.distributed.destroy_process_group()


def test_from_cfg_defaults_and_what_it_hands_the_trainer(synth_root, tmp_path):
    from tests.conftest import tiny_cfg
    cfg = tiny_cfg(synth_root, tmp_path, compile=True, evaluate=False)
    t = Trainer.from_cfg(cfg, DistInfo())
    assert not t.losses.tensorboard and t.continue_cmd == "the same command with resume auto"
    assert t.net is not t.model and t.net._orig_mod is t.model            # compiled lazily: nothing runs here
    writer = Recorder()
    assert Trainer.from_cfg(tiny_cfg(synth_root, tmp_path, evaluate=False), DistInfo(), writer).writer is writer


def test_a_resumed_runs_log_lines_count_its_own_iterations(tmp_path, monkeypatch, caplog):
    import logging
    make_trainer(loop_cfg(tmp_path, stop_iter=3)).train()
    caplog.set_level(logging.INFO, logger="ntrenetpp")
    caplog.clear()      # the first run's lines, captured when another test left INFO enabled
    now = [100.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: now[0])
    t = make_trainer(loop_cfg(tmp_path, resume="auto", print_freq=2))
    forward = t.net.forward

    def timed(*args, **kwargs):
        now[0] += 2.0
        return forward(*args, **kwargs)
    t.net.forward = timed
    t.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert lines[0].startswith("epoch 1/2 iter 4/8 | mean of iter 4: ")
    assert lines[0].endswith("| 2.000 s/it over 1 iter | eta 0:00:08")          # since the resume, not since 0
    assert lines[1].startswith("epoch 2/2 iter 6/8 | mean of iter 5-6: ")
    assert lines[1].endswith("| 2.000 s/it over 3 iter | eta 0:00:04")
