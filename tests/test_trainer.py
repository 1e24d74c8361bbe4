"""Training and evaluation through the real code paths, on tiny generated synthetic data."""
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine.checkpoint import save_checkpoint
from engine.trainer import NonFiniteLossError, Trainer, poly_lr
from tests.conftest import assert_ranks_equal_one_process, tiny_cfg
from util.distributed import DistInfo
from util.errors import CheckpointError



def no_dropout(model):
    """Dropout draws per-process random masks; equality across process counts needs it off."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
            m.p = 0.0


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_poly_schedule_matches_pfenet():
    assert poly_lr(0.025, 1, 100, 0.9) == pytest.approx(0.025 * (1 - 1 / 100) ** 0.9)
    assert poly_lr(0.025, 100, 100, 0.9) == 0.0
    assert poly_lr(0.01, 5, 100, 0.9, warmup_iters=10) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))


class LossRecorder:
    """A TensorBoard writer that keeps the per-iteration loss values the trainer logs."""

    def __init__(self):
        self.history: dict[int, dict[str, float]] = {}

    def add_scalar(self, tag, value, step):
        if tag.startswith("train/loss_"):
            self.history.setdefault(step, {})[tag] = value

    def add_image(self, *args, **kwargs):
        pass

    def losses(self):
        return [self.history[it] for it in sorted(self.history)]


def test_resumed_run_equals_uninterrupted_run(synth_root, tmp_path):
    ra, rb, rc = LossRecorder(), LossRecorder(), LossRecorder()
    a = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path / "a", evaluate=False), DistInfo(), ra)
    a.train()
    b = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path / "b", evaluate=False, stop_iter=3), DistInfo(), rb)
    b.train()
    assert sorted(rb.history) == [1, 2, 3] and rb.losses() == ra.losses()[:3]
    state = torch.load(tmp_path / "b" / "model" / "last.pth", weights_only=True)
    assert state["iteration"] == 3 and state["epoch"] == 1
    c = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path / "b", evaluate=False, resume="auto"), DistInfo(), rc)
    c.train()
    assert sorted(ra.history) == [1, 2, 3, 4] and sorted(rc.history) == [4]
    assert rc.losses() == ra.losses()[3:]                            # the same losses, bit for bit
    wa, wc = weights(a.model), weights(c.model)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)                # memory bank buffers included


def test_five_shot_training_runs_end_to_end(synth_root, tmp_path):
    """The published 5-shot numbers come from models trained at shot 5: such a run trains, validates
    on 5-shot episodes and checkpoints. A 5-shot episode needs 6 images of its class; the tiny
    training list has only 3 of some, so training draws from both lists (fold 0's training
    classes only, as always)."""
    both = tmp_path / "train_and_val.txt"
    with open(both, "w") as f:
        for name in ("train.txt", "val.txt"):
            with open(os.path.join(synth_root, name)) as part:
                f.write(part.read())
    cfg = tiny_cfg(synth_root, tmp_path, shot=5, epochs=1, epoch_size=8, train_list=str(both))
    recorder = LossRecorder()
    t = Trainer.from_cfg(cfg, DistInfo(), recorder)
    t.train()
    assert sorted(recorder.history) == [1, 2]
    assert all(math.isfinite(v) for row in recorder.losses() for v in row.values())
    assert t.loader.dataset.shot == 5 and t.val_set.shot == 5
    state = torch.load(tmp_path / "model" / "last.pth", weights_only=True)
    assert state["iteration"] == 2 and state["best_miou"] >= 0
    assert t.model.memory_bank.fill_count.sum().item() > 0      # DO prototypes of query and 5 supports


def test_nonfinite_loss_stops_naming_iteration_and_component(synth_root, tmp_path):
    t = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path, evaluate=False), DistInfo())
    forward = t.net.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        logits, losses = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:   # the first step of epoch 2
            losses = dict(losses, bg=losses["bg"] * float("nan"))
        return logits, losses
    t.net.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: component 'bg' = nan.*last.pth\) is intact"):
        t.train()
    state = torch.load(tmp_path / "model" / "last.pth", weights_only=True)
    assert state["iteration"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank, world, port):
    """What torchrun sets for a process, on loopback."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _ddp_worker(rank, world, port, root, save_path, out_dir, fix_bn=True):
    _join_group(rank, world, port)
    from util.distributed import cleanup, init_distributed
    info = init_distributed("cpu")
    try:
        cfg = tiny_cfg(root, save_path, evaluate=False, epochs=1, epoch_size=12, fix_bn=fix_bn)
        t = Trainer.from_cfg(cfg, info)
        no_dropout(t.model)
        t.train()
        torch.save(weights(t.model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def test_two_processes_match_one_process_with_the_same_global_batch(synth_root, tmp_path):
    torch.set_num_threads(1)
    single = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path / "single", evaluate=False, epochs=1, epoch_size=12), DistInfo())
    no_dropout(single.model)
    single.train()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), synth_root, str(tmp_path / "ddp"), str(tmp_path)),
                       nprocs=2, start_method="fork")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    ws = weights(single.model)
    bank = [k for k in ws if "bank" in k]
    assert bank, "the DO memory bank should live in the model's buffers"
    assert_ranks_equal_one_process(r0, r1, ws)


def test_two_processes_with_drifting_batchnorm_stay_in_step(synth_root, tmp_path):
    """fix_bn False (the reference's BN drift) under DDP: BN buffers are broadcast from rank 0
    before each forward, so both ranks end with the same parameters; the backbone's BN
    statistics drift (each process normalises with its own batch, so no one-process equality)."""
    torch.set_num_threads(1)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), synth_root, str(tmp_path / "ddp"), str(tmp_path), False),
                       nprocs=2, start_method="fork")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    from engine.networks import build_model
    torch.manual_seed(0)
    init = build_model(tiny_cfg(synth_root, tmp_path)).state_dict()
    params = {name for name, _ in build_model(tiny_cfg(synth_root, tmp_path)).named_parameters()}
    for k in params:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    stats = [k for k in r0 if k.startswith("backbone.") and k.endswith("running_mean")]
    assert stats and all(not torch.equal(r0[k], init[k]) for k in stats)        # the statistics drifted
    bank = [k for k in r0 if "bank" in k]
    assert bank and all(torch.equal(r0[k], r1[k]) for k in bank)


def _ddp_resume_worker(rank, world, port, root, save_path, out_dir, stop_iter, resume):
    _join_group(rank, world, port)
    from util.distributed import cleanup, init_distributed
    info = init_distributed("cpu")
    try:
        cfg = tiny_cfg(root, save_path, evaluate=False, epochs=1, epoch_size=12, stop_iter=stop_iter, resume=resume)
        t = Trainer.from_cfg(cfg, info)
        no_dropout(t.model)
        t.train()
        torch.save({"weights": weights(t.model), "iteration": t.state.iteration, "epoch": t.state.epoch},
                   os.path.join(out_dir, f"{'resumed' if resume else 'stopped'}{rank}.pt"))
    finally:
        cleanup()


def test_two_processes_resumed_mid_epoch_end_where_one_uninterrupted_process_does(synth_root, tmp_path):
    """3 iterations per epoch (12 episodes, global batch 4 over 2 processes): stopped after the
    first and resumed by 2 processes, each rank skips its own first batch and the run ends with
    the weights of one process that was never stopped."""
    torch.set_num_threads(1)
    single = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path / "single", evaluate=False, epochs=1, epoch_size=12),
                              DistInfo())
    no_dropout(single.model)
    single.train()
    for stop_iter, resume in ((1, ""), (0, "auto")):
        mp.start_processes(_ddp_resume_worker, nprocs=2, start_method="fork",
                           args=(2, _free_port(), synth_root, str(tmp_path / "ddp"), str(tmp_path), stop_iter, resume))
    last = torch.load(tmp_path / "ddp" / "model" / "last.prev.pth", weights_only=True)
    assert (last["iteration"], last["epoch"]) == (1, 0)                   # the stop's checkpoint, rotated
    stopped = torch.load(tmp_path / "stopped0.pt")
    assert (stopped["iteration"], stopped["epoch"]) == (1, 0)
    r0, r1 = torch.load(tmp_path / "resumed0.pt"), torch.load(tmp_path / "resumed1.pt")
    assert (r0["iteration"], r0["epoch"]) == (r1["iteration"], r1["epoch"]) == (3, 1)
    ws = weights(single.model)
    assert_ranks_equal_one_process(r0["weights"], r1["weights"], ws)


def _eval_worker(rank, world, port, root, ckpt, out_dir):
    _join_group(rank, world, port)
    from util.distributed import cleanup, init_distributed
    from engine.tester import run_test
    info = init_distributed("cpu")
    try:
        cfg = tiny_cfg(root, out_dir, weight=ckpt, save_pred=True)
        summary = run_test(cfg, info)
        if rank == 0:
            with open(os.path.join(out_dir, "summary.json"), "w") as f:
                json.dump(summary, f)
    finally:
        cleanup()


def test_sharded_evaluation_equals_single_process(synth_root, tmp_path):
    from engine.networks import build_model
    from engine.tester import run_test
    torch.manual_seed(0)
    cfg = tiny_cfg(synth_root, tmp_path / "one", save_pred=True)
    ckpt = str(tmp_path / "w.pth")
    save_checkpoint(ckpt, build_model(cfg), cfg)
    one = run_test(tiny_cfg(synth_root, tmp_path / "one", weight=ckpt, save_pred=True), DistInfo())
    mp.start_processes(_eval_worker, args=(2, _free_port(), synth_root, ckpt, str(tmp_path / "two")),
                       nprocs=2, start_method="fork")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for a, b in zip(one["per_seed"], two["per_seed"]):
        assert a["seed"] == b["seed"] and a["episodes"] == b["episodes"] == 12
        assert a["miou"] == b["miou"] and a["fbiou"] == b["fbiou"] and a["class_iou"] == b["class_iou"]
    eps_one = json.loads((tmp_path / "one" / "result" / "pred_seed5" / "episodes.json").read_text())
    eps_two = json.loads((tmp_path / "two" / "result" / "pred_seed5" / "episodes.json").read_text())
    assert eps_one == eps_two and len(eps_one["episodes"]) == 12


def test_end_to_end_through_the_entry_points(synth_root, tmp_path):
    """train.py then test.py as a user runs them (config file + KEY VALUE overrides)."""
    from commands import train
    from commands import test as test_entry
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(
        "DATA:\n  dataset: synthetic\n"
        f"  data_root: {synth_root}\n  train_list: {synth_root}/train.txt\n  val_list: {synth_root}/val.txt\n"
        "  min_class_pixels: 150\n  class_index_workers: 1\n  workers: 0\n"
        "MODEL:\n  layers: 18\n  pretrained: ''\n  reduce_dim: 16\n  ppm_scales: [1.0, 0.5]\n"
        "TRAIN:\n  train_h: 33\n  train_w: 33\n  batch_size: 4\n  epochs: 1\n  epoch_size: 8\n"
        "  manual_seed: 7\n  val_num: 8\n  tb_images: 1\n"
        "TEST:\n  val_size: 41\n  batch_size_val: 3\n  test_num: 10\n  test_seeds: 2\n")
    exp = tmp_path / "exp"
    metrics = train.main(["--config", str(cfg_path), "save_path", str(exp)])
    assert metrics["episodes"] == 8 and 0 <= metrics["miou"] <= 100
    assert (exp / "model" / "best.pth").is_file() and (exp / "model" / "last.pth").is_file()
    assert (exp / "config.yaml").is_file() and (exp / "train.log").is_file()
    [run_dir] = os.listdir(exp / "tb")                                 # one event folder per run
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(exp / "tb" / run_dir))
    summary = test_entry.main(["--config", str(cfg_path), "save_path", str(exp), "weight", "last",
                               "shot", "2", "save_pred", "True", "vis", "2"])
    result = json.loads(open(summary["json_path"]).read())
    assert set(result) >= {"miou_mean", "miou_std", "fbiou_mean", "fbiou_std", "episodes", "shot", "weight",
                           "per_seed"}
    assert result["episodes"] == 10 and result["shot"] == 2 and result["weight"].endswith("last.pth")
    assert [p["seed"] for p in result["per_seed"]] == [7, 8]
    assert set(result["per_seed"][0]["class_iou"]) == {"solid square", "striped triangle", "checkered ring",
                                                       "dotted square", "striped cross"}
    mious = [p["miou"] for p in result["per_seed"]]
    assert result["miou_mean"] == pytest.approx(sum(mious) / 2)
    assert result["miou_std"] == pytest.approx(abs(mious[0] - mious[1]) / 2 ** 0.5)
    listing = json.loads((exp / "result" / "pred_seed7" / "episodes.json").read_text())["episodes"]
    assert [e["episode"] for e in listing] == list(range(10))
    import cv2
    for e in listing[:3]:
        pred = cv2.imread(str(exp / "result" / "pred_seed7" / e["prediction"]), cv2.IMREAD_GRAYSCALE)
        label = cv2.imread(os.path.join(synth_root, e["query_label"]), cv2.IMREAD_GRAYSCALE)
        assert pred.shape == label.shape and set(pred.ravel().tolist()) <= {0, 1}
    assert len(os.listdir(exp / "result" / "vis_seed7")) == 2


def test_launcher_rejects_unknown_dataset_and_config():
    import subprocess
    r = subprocess.run(["sh", "train.sh", "nosuch", "split0"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown dataset 'nosuch'" in r.stderr
    r = subprocess.run(["sh", "test.sh", "pascal", "split7_resnet50"], capture_output=True, text=True)
    assert r.returncode == 2 and "no config config/pascal/pascal_split7_resnet50.yaml" in r.stderr
    assert "split0_resnet50" in r.stderr


def test_stop_on_an_epoch_boundary_still_validates_that_epoch(synth_root, tmp_path):
    Trainer.from_cfg(tiny_cfg(synth_root, tmp_path, stop_iter=2), DistInfo()).train()   # 2 iterations per epoch
    best = torch.load(tmp_path / "model" / "best.pth", weights_only=True)
    last = torch.load(tmp_path / "model" / "last.pth", weights_only=True)
    assert best["epoch"] == 1 and last["epoch"] == 1 and last["iteration"] == 2
    assert last["metrics"]["episodes"] == 8 and last["metrics"]["iters_per_epoch"] == 2
    resumed = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path, resume="auto", batch_size=2), DistInfo())
    with pytest.raises(CheckpointError, match="trained with 2 iterations per epoch, this run has 4"):
        resumed.train()
    resumed = Trainer.from_cfg(tiny_cfg(synth_root, tmp_path, resume="auto", shot=2), DistInfo())
    with pytest.raises(CheckpointError, match=r"last\.pth was trained with shot 1, this run has shot 2: resume with "
                                              r"shot 1, or train the 2-shot model into its own folder \(sh train\.sh "
                                              r"<dataset> <exp_name> shot 2 uses exp/<dataset>/<exp_name>_shot2\)$"):
        resumed.train()
