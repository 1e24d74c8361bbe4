"""engine/checkpoint.py: clear errors for corrupt or mismatched checkpoints; optimizer state
resumed in the parameters' memory layout."""
import copy

import pytest
import torch

from engine.checkpoint import (adopt_architecture, build_model_from_checkpoint, load_checkpoint, load_optimizer_state,
                               read_checkpoint, save_checkpoint, saved_architecture)
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
