"""engine/checkpoint.py: clear errors for corrupt or mismatched checkpoints; optimizer state
resumed in the parameters' memory layout."""
import copy

import pytest
import torch

from engine.checkpoint import (adopt_architecture, build_model_from_checkpoint, load_checkpoint, load_optimizer_state,
                               read_checkpoint, save_checkpoint, saved_architecture, training_position, checkpoint_position)
from engine.networks import build_model
from model.ops import memory_format_of
from tests.conftest import tiny_cfg
from util.config import ARCH_KEYS
from util.errors import CheckpointError


def test_corrupt_or_mismatched_checkpoint_gives_a_clear_error(synth_root, tmp_path):
    cfg = tiny_cfg(synth_root, tmp_path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"bad.pth' is unreadable or corrupt"):
        load_checkpoint(str(bad), build_model(cfg), cfg)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(str(tmp_path / "none.pth"), build_model(cfg), cfg)
    good = tmp_path / "r18.pth"
    save_checkpoint(str(good), build_model(cfg), cfg)
    other = tiny_cfg(synth_root, tmp_path, layers=34)
    with pytest.raises(CheckpointError, match=r"different network: layers: checkpoint 18, config 34\. Use the config it was trained with, or override these keys\.$"):
        load_checkpoint(str(good), build_model(other), other)
    state = torch.load(good, weights_only=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, good)
    with pytest.raises(CheckpointError, match=r"r18.pth' is damaged: its content does not match its checksum"):
        load_checkpoint(str(good), build_model(cfg), cfg)
    del state["checksum"]             # a hand-made file without one is read unverified
    torch.save(state, good)
    with pytest.raises(CheckpointError, match=r"does not fit the model: 1 missing key"):
        load_checkpoint(str(good), build_model(cfg), cfg)


def test_a_checkpoint_recorded_before_newer_architecture_keys_builds_and_predicts(synth_root, tmp_path):
    """A checkpoint whose recorded architecture predates do_mask and backbone (the demo's, say)
    rebuilds its network: the keys it lacks had their defaults when it was written."""
    cfg = tiny_cfg(synth_root, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    path = tmp_path / "older.pth"
    save_checkpoint(str(path), model, cfg)
    state = torch.load(path, weights_only=True)
    for key in ("do_mask", "backbone", "vit_blocks"):
        del state["architecture"][key]
    del state["checksum"]
    torch.save(state, path)
    rebuilt, _ = build_model_from_checkpoint(str(path), cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_a_checkpoint_older_than_an_architecture_key_is_compared_at_its_default(synth_root, tmp_path):
    """A checkpoint written before ``backbone_width`` existed has a standard-width backbone: loading
    it into a narrower one names the key, not a raw size mismatch."""
    cfg = tiny_cfg(synth_root, tmp_path)
    old = tmp_path / "old.pth"
    save_checkpoint(str(old), build_model(cfg), cfg)
    state = torch.load(old, weights_only=True)
    # as written before the key existed, and before checkpoints recorded their architecture
    del state["config"]["backbone_width"], state["checksum"], state["architecture"]
    torch.save(state, old)
    narrow = tiny_cfg(synth_root, tmp_path, backbone_width=0.5)
    with pytest.raises(CheckpointError, match=r"different network: backbone_width: checkpoint 1\.0, config 0\.5\."):
        load_checkpoint(str(old), build_model(narrow), narrow)
    load_checkpoint(str(old), build_model(cfg), cfg)              # the standard width still loads


def test_a_checkpoint_records_its_architecture_not_its_dataset(synth_root, tmp_path):
    """The architecture is the task and the network's keys (util/config.py ARCH_KEYS, derived keys
    resolved); the dataset is not among them, so a model is evaluated on another dataset of its task
    with its own network (its DO bank keeps its size quietly) and refused on the other task."""
    cfg = tiny_cfg(synth_root, tmp_path)
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, build_model(cfg), cfg)
    arch = read_checkpoint(path)["architecture"]
    assert list(arch) == list(ARCH_KEYS) and "dataset" not in arch
    assert (arch["task"], arch["arch"], arch["bank_classes"], arch["layers"]) == ("image", "ntrenetpp", 20, 18)
    coco = tiny_cfg(synth_root, tmp_path, dataset="coco")           # 80 classes: bank_classes 80 if derived
    adopted = adopt_architecture(read_checkpoint(path), coco, path)
    assert adopted.bank_classes == 20 and adopted.dataset == "coco"
    model, _ = build_model_from_checkpoint(path, coco)
    assert model.memory_bank.prototypes.shape[0] == 21                # row 0 unused: class ids are 1-based
    video = tiny_cfg(synth_root, tmp_path, dataset="synthetic_video", shot=5, clip_len=5)
    with pytest.raises(CheckpointError, match=r"holds a model of the image task; this config \(dataset "
                                              r"synthetic_video\) is of the video task"):
        build_model_from_checkpoint(path, video)


def test_an_old_checkpoint_has_its_dataset_s_task_and_bank_size():
    state = {"config": {"dataset": "coco", "layers": 101}}
    arch = saved_architecture(state)
    assert (arch["task"], arch["bank_classes"], arch["layers"], arch["arch"]) == ("image", 80, 101, "ntrenetpp")
    assert saved_architecture({"config": {"dataset": "ytvis"}})["task"] == "video"


@pytest.mark.parametrize("saved_layout,resumed_layout", [(torch.contiguous_format, torch.channels_last),
                                                         (torch.channels_last, torch.contiguous_format)])
def test_optimizer_state_follows_the_parameter_layout_on_resume(saved_layout, resumed_layout):
    """A checkpoint written in one memory format and resumed in the other (a GPU run resumed on
    the CPU under channels_last auto) continues SGD exactly; fused stays as this run built it."""
    def setup(layout, fused):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(4, 6, 3).to(memory_format=layout)
        return conv, torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused)

    def step(conv, opt, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 4, 7, 7, generator=g).contiguous(memory_format=memory_format_of(conv.weight))
        opt.zero_grad()
        (conv(x) * torch.randn(2, 6, 5, 5, generator=g)).sum().backward()
        opt.step()

    reference, ref_opt = setup(saved_layout, True)
    step(reference, ref_opt, 1)
    saved = {"model": {k: v.clone() for k, v in reference.state_dict().items()},
             "optimizer": copy.deepcopy(ref_opt.state_dict())}   # as written to disk
    saved["optimizer"]["param_groups"][0]["fused"] = None          # as checkpoints from before fused SGD
    step(reference, ref_opt, 2)

    resumed, opt = setup(resumed_layout, True)
    resumed.load_state_dict(saved["model"])
    load_optimizer_state(opt, saved["optimizer"])
    assert opt.param_groups[0]["fused"] is True
    buffer = opt.state[resumed.weight]["momentum_buffer"]
    assert buffer.stride() == resumed.weight.stride()
    step(resumed, opt, 2)
    assert torch.allclose(resumed.weight, reference.weight, atol=1e-6)
    assert torch.allclose(resumed.bias, reference.bias, atol=1e-6)


# ---------------------------------------------------------------- with stand-in parts (fast)
import os  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402

from engine.checkpoint import (adopt_architecture, check_compatible, pick_resume, previous_path,  # noqa: E402
                               read_checkpoint, resolve_weight, rng_state, saved_architecture, set_rng_state,
                               unwrap)
from util.config import defaults  # noqa: E402


def small_cfg(**over):
    cfg = defaults()
    cfg.update(dataset="synthetic", layers=18, reduce_dim=16)
    cfg.update(over)
    return cfg


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))


def test_unwrap_reaches_the_module_under_ddp_and_compile_wrappers():
    net = small_net()
    ddp_like, compiled_like = torch.nn.Module(), torch.nn.Module()
    ddp_like.module = net
    compiled_like._orig_mod = ddp_like
    assert unwrap(compiled_like) is net and unwrap(ddp_like) is net and unwrap(net) is net


def test_rng_states_round_trip_every_generator():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.standard_normal()                     # numpy now caches the second gaussian of a pair
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["numpy"]["keys"].dtype == torch.int64
    drawn = (torch.rand(3), random.random(), np.random.standard_normal(), np.random.rand())
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.standard_normal(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]


def test_previous_path_names():
    assert previous_path("exp/model/last.pth") == "exp/model/last.prev.pth"
    assert previous_path("exp/model/weights") == "exp/model/weights.prev.pth"


def test_a_checkpoint_holds_what_a_resume_needs(tmp_path):
    net = small_net()
    wrapper = torch.nn.Module()
    wrapper.module = net
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, enabled=True)
    cfg = small_cfg()
    path = str(tmp_path / "last.pth")
    save_checkpoint(path, wrapper, cfg, opt, scaler, epoch=2, iteration=7, best_miou=12.5, metrics={"miou": 3.0},
                    run={"tb": "x"})
    state = read_checkpoint(path)
    assert state["format"] == "ntrenetpp-checkpoint-v2" and "checksum" not in state
    assert set(state["model"]) == set(net.state_dict())
    assert (state["epoch"], state["iteration"], state["best_miou"]) == (2, 7, 12.5)
    assert state["metrics"] == {"miou": 3.0} and state["run"] == {"tb": "x"}
    assert state["scaler"]["scale"] == 4.0 and state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert state["config"]["layers"] == 18 and state["architecture"]["task"] == "image"
    assert state["architecture"]["bank_classes"] == 20 and set(state["architecture"]) == set(ARCH_KEYS)
    save_checkpoint(path, net, cfg)                 # no optimiser, scaler, position: their defaults
    bare = read_checkpoint(path)
    assert (bare["optimizer"], bare["scaler"], bare["epoch"], bare["iteration"], bare["best_miou"]) == (
        None, None, 0, 0, -1.0)
    assert bare["metrics"] == {} and bare["run"] == {} and not os.path.exists(previous_path(path))
    save_checkpoint(path, net, cfg, iteration=9, keep_previous=True)
    assert read_checkpoint(previous_path(path))["iteration"] == 0 and read_checkpoint(path)["iteration"] == 9


def test_loading_restores_optimiser_scaler_and_rng_only_when_asked(tmp_path):
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 2, 3, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, enabled=True)
    cfg = small_cfg()
    path = str(tmp_path / "c.pth")
    torch.manual_seed(5)
    save_checkpoint(path, net, cfg, opt, scaler)
    expected = torch.rand(2)
    other = small_net()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other_scaler = torch.amp.GradScaler("cpu", init_scale=2.0, enabled=True)
    torch.manual_seed(6)
    load_checkpoint(path, other, cfg)                                 # weights only
    assert torch.equal(other[0].weight, net[0].weight) and other_opt.state_dict()["state"] == {}
    assert not torch.equal(torch.rand(2), expected)
    load_checkpoint(path, other, cfg, other_opt, other_scaler, restore_rng=True)
    assert torch.equal(torch.rand(2), expected)
    assert other_scaler.get_scale() == 64.0
    assert torch.equal(other_opt.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


def test_missing_checkpoints_say_what_the_folder_holds(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(tmp_path / "model" / "best.pth"))
    assert str(e.value) == (f"checkpoint '{tmp_path}/model/best.pth' does not exist; train first (sh train.sh ...). "
                            f"best.pth is written only when validation runs (evaluate True); choose with "
                            f"'weight best|last|PATH'")
    os.makedirs(tmp_path / "model")
    for name in ("last.pth", "a.pth", "notes.txt"):
        (tmp_path / "model" / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"does not exist; {tmp_path}/model holds a\.pth, last\.pth\. best"):
        read_checkpoint(str(tmp_path / "model" / "best.pth"))
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(tmp_path / "other.pth"))
    assert str(e.value) == f"'{tmp_path}/other.pth' is not a checkpoint of this project (no 'model' entry)"


def test_pick_resume_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    path = str(tmp_path / "last.pth")
    assert pick_resume(path) is None
    cfg = small_cfg()
    save_checkpoint(path, small_net(), cfg, iteration=4)
    save_checkpoint(path, small_net(), cfg, iteration=8, keep_previous=True)
    picked, state = pick_resume(path)
    assert picked == path and state["iteration"] == 8 and "resume auto" not in caplog.text
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 64)
    picked, state = pick_resume(path)
    assert picked == previous_path(path) and state["iteration"] == 4
    assert f"resume auto: falling back to {previous_path(path)} (iteration 4)" in caplog.text
    with open(previous_path(path), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError) as e:
        pick_resume(path)
    message = str(e.value)
    assert message.startswith("resume auto found no valid checkpoint: checkpoint '" + path)
    assert message.count(" / ") == 1 and previous_path(path) in message.split(" / ")[1]


def test_the_architecture_of_a_checkpoint_older_than_the_record(tmp_path):
    state = {"config": {"dataset": "coco", "layers": 101}}
    arch = saved_architecture(state)
    declared = defaults()
    assert arch["layers"] == 101 and arch["task"] == "image" and arch["bank_classes"] == 80
    assert all(arch[k] == declared[k] for k in ARCH_KEYS if k not in ("layers", "task", "bank_classes"))
    assert saved_architecture({"config": {"dataset": "ytvis"}})["task"] == "video"
    # a recorded architecture older than a key (do_mask, backbone, ...) had that key's default
    recorded = saved_architecture({"architecture": {"layers": 50}})
    assert recorded == {**{k: declared[k] for k in ARCH_KEYS}, "layers": 50}
    bare = saved_architecture({})
    assert bare["bank_classes"] == 20 and bare["task"] == "image"      # the default dataset, PASCAL


def test_adopting_the_checkpoints_architecture(tmp_path, caplog):
    state = {"architecture": dict(saved_architecture({"config": {"dataset": "synthetic", "layers": 50,
                                                                   "reduce_dim": 32}}))}
    cfg = small_cfg(dataset="pascal")
    adopted = adopt_architecture(state, cfg, "w.pth")
    assert adopted.layers == 50 and adopted.reduce_dim == 32 and cfg.layers == 18
    assert "the config has layers 18, checkpoint w.pth was trained with 50: using the checkpoint's" in caplog.text
    assert "bank_classes" not in caplog.text                              # derived from the dataset: quietly
    cfg.mark(overridden=["layers", "reduce_dim"])
    with pytest.raises(CheckpointError) as e:
        adopt_architecture(state, cfg, "w.pth")
    assert str(e.value) == ("checkpoint 'w.pth' was trained with layers 50, reduce_dim 32; the command line sets "
                            "layers 18, reduce_dim 16: drop the override (the network is the checkpoint's)")
    video = small_cfg(dataset="synthetic_video", support_mode="mean")
    with pytest.raises(CheckpointError) as e:
        adopt_architecture(state, video, "w.pth")
    assert str(e.value) == ("checkpoint 'w.pth' holds a model of the image task; this config (dataset synthetic_video) is of the video task: "
                            "use a config of the checkpoint's task")
    with pytest.raises(CheckpointError) as e:
        check_compatible(state, cfg, "w.pth")
    assert str(e.value) == ("checkpoint 'w.pth' was trained with a different network: layers: checkpoint 50, "
                            "config 18; reduce_dim: checkpoint 32, config 16. Use the config it was trained with, "
                            "or override these keys.")


def test_weights_that_do_not_fit_are_listed(tmp_path):
    from engine.checkpoint import load_model_weights
    big = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(5)])
    with pytest.raises(CheckpointError) as e:
        load_model_weights(torch.nn.Sequential(torch.nn.Linear(1, 1)), {"model": big.state_dict()}, "w.pth")
    assert str(e.value) == ("checkpoint 'w.pth' does not fit the model: 0 missing key(s) [], 8 unexpected key(s) "
                            "[1.weight, 1.bias, 2.weight, 2.bias, 3.weight, 3.bias (+2 more)]")
    with pytest.raises(CheckpointError) as e:
        load_model_weights(big, {"model": {"0.weight": torch.zeros(1, 1)}}, "w.pth")
    assert str(e.value).startswith("checkpoint 'w.pth' does not fit the model: 9 missing key(s) [0.bias, 1.weight")
    with pytest.raises(CheckpointError, match=r"^checkpoint 'w\.pth' does not fit the model: Error"):
        load_model_weights(torch.nn.Linear(1, 1), {"model": torch.nn.Linear(2, 1).state_dict()}, "w.pth")


def test_a_checkpoint_that_cannot_be_written_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import engine.checkpoint as checkpoint
    path = str(tmp_path / "last.pth")

    def full(state, p, previous=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "atomic_torch_save", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        save_checkpoint(path, small_net(), small_cfg())
    assert str(e.value) == (f"could not write checkpoint '{path}' (No space left on device); no earlier checkpoint "
                            f"was there. Free space or make {tmp_path} writable, then continue with resume auto")
    (tmp_path / "last.pth").write_bytes(b"old")
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"\(No space left on device\); the previous last\.pth "
                                                              r"is intact\. Free space"):
        save_checkpoint(path, small_net(), small_cfg())


def test_weight_names_resolve_in_the_experiment_folder():
    assert resolve_weight("best", "exp/a") == "exp/a/model/best.pth"
    assert resolve_weight("last", "exp/a") == "exp/a/model/last.pth"
    assert resolve_weight("w/x.pth", "") == "w/x.pth"
    with pytest.raises(CheckpointError) as e:
        resolve_weight("best", "")
    assert str(e.value) == ("weight 'best' needs save_path (the experiment folder); run through test.sh or pass "
                            "save_path exp/<dataset>/<exp_name>")


def test_a_model_is_built_from_its_checkpoint_without_the_imagenet_file(synth_root, tmp_path):
    from engine.checkpoint import build_model_from_checkpoint
    cfg = tiny_cfg(synth_root, tmp_path, reduce_dim=8)
    torch.manual_seed(0)
    model = build_model(cfg)
    path = str(tmp_path / "w.pth")
    save_checkpoint(path, model, cfg, iteration=3)
    other = tiny_cfg(synth_root, tmp_path, pretrained="nowhere/resnet18.pth")
    rebuilt, state = build_model_from_checkpoint(path, other)
    assert state["iteration"] == 3 and state["architecture"]["reduce_dim"] == 8
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


def test_read_errors_say_what_was_refused_and_what_to_do(tmp_path):
    refused = tmp_path / "payload.pth"
    torch.save({"model": {}, "call": os.getcwd}, refused)              # a reference to a function: not a tensor
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(refused))
    message = str(e.value)
    assert message.startswith(f"checkpoint '{refused}' is refused: it holds objects other than tensors and plain "
                              f"values (")
    assert message.endswith("). A crafted file could run code when loaded, so nothing beyond tensors is read; this "
                            "project's checkpoints (format v2) never hold more. Use a checkpoint you trust, written "
                            "by this version")
    assert "numpy" not in message and "posix.getcwd). A crafted file" in message     # no note for other globals
    old = tmp_path / "v1.pth"
    torch.save({"model": {}, "rng": np.random.get_state()}, old)      # format v1 kept numpy's state
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(old))
    assert ("; checkpoints of this project before format v2 stored numpy RNG states and are not read). A crafted"
            in str(e.value))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(cut))
    assert str(e.value).startswith(f"checkpoint '{cut}' is unreadable or corrupt, truncated perhaps (")
    assert str(e.value).endswith("); re-download or re-train it")


def test_pick_resume_uses_the_previous_checkpoint_when_last_is_missing(tmp_path, caplog):
    path = str(tmp_path / "last.pth")
    save_checkpoint(path, small_net(), small_cfg(), iteration=4)
    os.replace(path, previous_path(path))                               # a crash between the two renames
    picked, state = pick_resume(path)
    assert picked == previous_path(path) and state["iteration"] == 4
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # nothing was skipped


def test_pick_resume_names_both_damaged_checkpoints_exactly(tmp_path, caplog):
    path = str(tmp_path / "last.pth")
    for p in (path, previous_path(path)):
        with open(p, "wb") as f:
            f.write(b"garbage")
    problems = []
    for p in (path, previous_path(path)):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(p)
        problems.append(str(e.value))
    with pytest.raises(CheckpointError) as e:
        pick_resume(path)
    assert str(e.value) == "resume auto found no valid checkpoint: " + problems[0] + " / " + problems[1]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"resume auto: skipping {problems[0]}", f"resume auto: skipping {problems[1]}"]
    save_checkpoint(previous_path(path), small_net(), small_cfg(), iteration=6)
    caplog.clear()
    pick_resume(path)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"resume auto: skipping {problems[0]}", f"resume auto: falling back to {previous_path(path)} (iteration 6)"]


def test_messages_name_the_checkpoint_and_the_folder(tmp_path, monkeypatch, caplog):
    import engine.checkpoint as checkpoint
    state = {"architecture": dict(saved_architecture({"config": {"dataset": "synthetic", "layers": 50,
                                                                 "reduce_dim": 16}}))}
    adopt_architecture(state, small_cfg(), "w.pth")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "the config has layers 18, checkpoint w.pth was trained with 50: using the checkpoint's"]
    monkeypatch.chdir(tmp_path)

    def full(state, p, previous=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "atomic_torch_save", full)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"Free space or make \. writable, then continue"):
        save_checkpoint("last.pth", small_net(), small_cfg())
    assert saved_architecture({"config": {"dataset": "mystery"}})["bank_classes"] == defaults().bank_classes


def test_load_errors_name_the_checkpoint(tmp_path):
    cfg = small_cfg()
    path = str(tmp_path / "w.pth")
    save_checkpoint(path, small_net(), cfg)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, small_net(), small_cfg(layers=34))
    assert str(e.value).startswith(f"checkpoint '{path}' was trained with a different network: layers: checkpoint 18")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1)), cfg)
    assert str(e.value).startswith(f"checkpoint '{path}' does not fit the model: 0 missing key(s) [], 5 unexpected")


@pytest.mark.parametrize("n, listed", [(6, "1.weight, 1.bias, 2.weight, 2.bias, 3.weight, 3.bias"),
                                       (7, "1.weight, 1.bias, 2.weight, 2.bias, 3.weight, 3.bias (+1 more)")])
def test_up_to_six_keys_are_listed(n, listed):
    from engine.checkpoint import load_model_weights
    extra = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(5)]).state_dict()
    extra = dict(list(extra.items())[:n + 2])                           # 0.* fit, then n unexpected
    with pytest.raises(CheckpointError) as e:
        load_model_weights(torch.nn.Sequential(torch.nn.Linear(1, 1)), {"model": extra}, "w.pth")
    assert str(e.value) == (f"checkpoint 'w.pth' does not fit the model: 0 missing key(s) [], {n} unexpected key(s) "
                            f"[{listed}]")


def test_adam_state_keeps_its_step_count_and_this_runs_implementation_flags():
    def setup(layout, foreach):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(4, 6, 3).to(memory_format=layout)
        return conv, torch.optim.Adam(conv.parameters(), lr=0.1, foreach=foreach)
    conv, opt = setup(torch.contiguous_format, True)
    conv(torch.randn(1, 4, 5, 5)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other, other_opt = setup(torch.channels_last, False)
    load_optimizer_state(other_opt, saved)
    state = other_opt.state[other.weight]
    assert state["step"].shape == () and state["step"].item() == 1.0
    assert state["exp_avg"].stride() == other.weight.stride()
    assert other_opt.param_groups[0]["foreach"] is False                # as this run built it


def test_building_from_a_checkpoint_warns_of_no_random_backbone_and_names_the_file(synth_root, tmp_path, caplog):
    from engine.checkpoint import build_model_from_checkpoint
    cfg = tiny_cfg(synth_root, tmp_path, reduce_dim=8)
    path = str(tmp_path / "w.pth")
    save_checkpoint(path, build_model(cfg, warn_random_backbone=False), cfg)
    caplog.clear()
    build_model_from_checkpoint(path, cfg)
    assert "randomly initialised" not in caplog.text                    # its backbone is the checkpoint's
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{path}' holds a model of the image task; this config \(dataset synthetic_video\) is of the video task"):
        build_model_from_checkpoint(path, small_cfg(dataset="synthetic_video", support_mode="mean"))
    state = torch.load(path, weights_only=True)
    del state["checksum"], state["model"][next(iter(state["model"]))]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{path}' does not fit the model: 1 missing key"):
        build_model_from_checkpoint(path, cfg)


def test_one_count_of_epochs_from_one():
    """The stop line, the resume line and test.py's checkpoint line say where a run is the same way."""
    assert [training_position(i, 4) for i in (0, 3, 4, 6, 8)] == [
        "before epoch 1", "in epoch 1, 3/4 into it", "at the end of epoch 1", "in epoch 2, 2/4 into it",
        "at the end of epoch 2"]
    assert checkpoint_position({"iteration": 92, "epoch": 1, "metrics": {"iters_per_epoch": 60}}) == \
        "iteration 92, in epoch 2, 32/60 into it"
    assert checkpoint_position({"iteration": 60, "epoch": 1}) == "iteration 60, after epoch 1"   # an older file
