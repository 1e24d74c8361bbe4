"""tools/convert_checkpoint.py on files laid out as PFENet's and the NTRENet++ authors' train.py
save them: ``{"epoch", "state_dict", "optimizer"}`` with their module names, ``module.``-prefixed.

The reference key names and shapes below are written from their model files (PFENet's
model/PFENet.py, the authors' NTRENet++/model/Net/NTRENet_plus.py and model/ASPP.py) with our
widths, so nothing is downloaded; the small ResNet-18 has the same key layout as their ResNets."""
import pytest
import torch
import yaml

from engine.checkpoint import read_checkpoint
from engine.networks import build_model
from model.pfenet import build_pfenet
from tools.convert_checkpoint import main
from util.cli import run
from util.config import load_cfg

C, BINS = 8, [4, 2]
N = len(BINS)
# their ResNet stem: layer0 = Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, maxpool)
STEM = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}


def reference_backbone_name(key: str, vgg: bool) -> str:
    """Our ``backbone.…`` key under their name: layer0..layer4 (VGG: the same slices of
    ``features``, renumbered from 0 in each, as their get_vgg16_layer builds them)."""
    name = key[len("backbone."):]
    head, rest = name.split(".", 1)
    return f"layer0.{STEM[head]}.{rest}" if not vgg and head in STEM else name


def conv_head(table, theirs, ours):
    """Their 3×3 conv → ReLU → Dropout2d → 1×1 conv (bias) head: indices 0 and 3."""
    table[f"{theirs}.0.weight"] = ((C, C, 3, 3), f"{ours}.0.weight")
    table[f"{theirs}.3.weight"] = ((2, C, 1, 1), f"{ours}.3.weight")
    table[f"{theirs}.3.bias"] = ((2,), f"{ours}.3.bias")


def two_convs(table, theirs, ours):
    """Their (3×3 conv, ReLU) × 2: indices 0 and 2."""
    for j in (0, 2):
        table[f"{theirs}.{j}.weight"] = ((C, C, 3, 3), f"{ours}.{j}.weight")


def pfenet_head(F):
    """PFENet's head: name → (shape, our name); ours keeps PFENet's names."""
    t = {"down_query.0.weight": ((C, F, 1, 1), "down_query.0.weight"),
         "down_supp.0.weight": ((C, F, 1, 1), "down_supp.0.weight"),
         "res1.0.weight": ((C, N * C, 1, 1), "res1.0.weight")}
    two_convs(t, "res2", "res2")
    conv_head(t, "cls", "cls")
    for i in range(N):
        t[f"init_merge.{i}.0.weight"] = ((C, 2 * C + 1, 1, 1), f"init_merge.{i}.0.weight")
        two_convs(t, f"beta_conv.{i}", f"beta_conv.{i}")
        conv_head(t, f"inner_cls.{i}", f"inner_cls.{i}")
    for i in range(N - 1):
        t[f"alpha_conv.{i}.0.weight"] = ((C, 2 * C, 1, 1), f"alpha_conv.{i}.0.weight")
    return t


def ntrenetpp_head(F):
    """The NTRENet++ authors' head: name → (shape, our name in model/ntrenet.py); None for the
    second half of their 2n initial heads, which their forward never calls."""
    t = {"down_query.0.weight": ((C, F, 1, 1), "down_query.0.weight"),
         "down_supp.0.weight": ((C, F, 1, 1), "down_supp.0.weight")}
    for j, ours in enumerate(["aspp.image_pool.0", "aspp.pointwise.0", "aspp.atrous.0.0", "aspp.atrous.1.0",
                              "aspp.atrous.2.0"]):
        k = 1 if j < 2 else 3
        t[f"down_query.3.layer6_{j}.0.weight"] = ((C, C, k, k), f"{ours}.weight")
        t[f"down_query.3.layer6_{j}.0.bias"] = ((C,), f"{ours}.bias")
    t["down_query.3.down_dim.0.weight"] = ((C, 5 * C, 1, 1), "aspp.fuse.0.weight")
    t["bg_prototype"] = ((1, C, 1, 1), "bgmm.bg_prototype")
    t["down_bg.0.weight"] = ((C, 2 * C, 1, 1), "bgmm.fuse.0.weight")
    two_convs(t, "bg_res1", "bgmm.residual.body")
    conv_head(t, "bg_cls", "bgmm.head.body")
    for i in range(N):
        s = f"scales.{i}"
        t[f"init_merge1.{i}.0.weight"] = ((C, 2 * C, 1, 1), f"{s}.bg_eliminating.fuse.0.weight")
        t[f"init_merge2.{i}.0.weight"] = ((C, 2 * C + 1, 1, 1), f"{s}.target_matching.support_merge.0.weight")
        two_convs(t, f"inital_beta_conv.{i}", f"{s}.target_matching.support_residual.body")
        conv_head(t, f"inital_inner_cls.{i}", f"{s}.target_matching.init_head.body")
        t[f"init_merge4.{i}.0.weight"] = ((C, 2 * C + 1, 1, 1), f"{s}.target_matching.self_merge.0.weight")
        two_convs(t, f"second_beta_conv.{i}", f"{s}.target_matching.self_residual.body")
        conv_head(t, f"second_inner_cls.{i}", f"{s}.target_matching.second_head.body")
        t[f"init_merge3.{i}.0.weight"] = ((C, 2 * C, 1, 1), f"{s}.do_eliminating.fuse.0.weight")
        two_convs(t, f"beta_conv.{i}", f"{s}.enrichment.residual.body")
        conv_head(t, f"inner_cls.{i}", f"{s}.enrichment.aux_head.body")
    for i in range(N, 2 * N):                        # appended twice per bin, read only up to n - 1
        unused = {}
        conv_head(unused, f"inital_inner_cls.{i}", "unused")
        t.update({k: (shape, None) for k, (shape, _) in unused.items()})
    for i in range(N - 1):
        t[f"alpha_conv.{i}.0.weight"] = ((C, 2 * C, 1, 1), f"scales.{i + 1}.enrichment.inter_scale.0.weight")
    t["res1.0.weight"] = ((C, N * C, 1, 1), "merge.fuse.0.weight")
    two_convs(t, "res2", "merge.residual.body")
    conv_head(t, "cls", "merge.head.body")           # their released final conv has 1 channel: see the refusals
    return t


def write_config(tmp_path, arch, **keys):
    model = {"arch": arch, "layers": 18, "backbone_width": 0.25, "pretrained": "", "reduce_dim": C,
             "ppm_scales": BINS, "memory_size": 8, "num_negatives": 4}
    model.update(keys)
    if model.get("vgg"):
        model["backbone_width"] = 1.0
    path = tmp_path / f"{arch}.yaml"
    path.write_text(yaml.safe_dump({"DATA": {"dataset": "pascal"}, "MODEL": model}))
    return str(path)


def reference_file(tmp_path, arch, vgg=False, seed=0):
    """A checkpoint as their train.py writes it: random tensors under their names with our shapes
    (each checked against the network the config builds), every key 'module.'-prefixed.
    Returns (path, their state dict, their name → (shape, our name or None))."""
    cfg = load_cfg(write_config(tmp_path, arch, vgg=vgg))
    own = (build_pfenet(cfg, False) if arch == "pfenet" else build_model(cfg, False)).state_dict()
    table = {reference_backbone_name(k, vgg): (tuple(v.shape), k) for k, v in own.items() if k.startswith("backbone.")}
    F = 768 if vgg else 96                     # layer3 + layer2 channels: VGG 512 + 256; ResNet-18 at 0.25: 64 + 32
    table.update((pfenet_head if arch == "pfenet" else ntrenetpp_head)(F))
    # every key of ours has a source, but the DO bank (not in their files: it starts empty)
    assert {o for _, o in table.values() if o} == {k for k in own if not k.startswith("memory_bank.")}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for theirs, (shape, ours) in table.items():
        if ours is not None:
            assert tuple(own[ours].shape) == shape, (theirs, ours)
        integer = ours is not None and own[ours].dtype == torch.int64      # BatchNorm's num_batches_tracked
        state[theirs] = torch.randint(0, 1000, shape, generator=g) if integer else torch.randn(shape, generator=g)
    path = tmp_path / f"{arch}_train_epoch_7_0.61.pth"
    torch.save({"epoch": 7, "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.025, "params": [0, 1]}]}}, path)
    return str(path), state, table


def convert(tmp_path, arch, src, **keys):
    out = tmp_path / "exp" / "model" / "best.pth"
    summary = main(["--from", arch, src, str(out), "--config", write_config(tmp_path, arch, **keys)])
    return str(out), summary


@pytest.mark.parametrize("vgg", [False, True])
def test_pfenet_checkpoint_converts_tensor_by_tensor(tmp_path, capsys, vgg):
    src, state, table = reference_file(tmp_path, "pfenet", vgg=vgg)
    assert all(theirs == ours for theirs, (_, ours) in table.items() if not ours.startswith("backbone."))
    out, summary = convert(tmp_path, "pfenet", src, vgg=vgg)
    assert capsys.readouterr().out == f"wrote {out}: PFENet, {len(state)} tensors from {src}\n"
    assert summary["left_out"] == []
    saved = read_checkpoint(out)
    assert saved["config"]["arch"] == "pfenet" and saved["config"]["vgg"] is vgg
    assert saved["run"] == {"converted_from": "pfenet", "source_file": "pfenet_train_epoch_7_0.61.pth",
                            "source_epoch": 7}
    assert len(saved["model"]) == len(state)
    for theirs, (_, ours) in table.items():
        assert torch.equal(saved["model"][ours], state[theirs]), theirs


def test_ntrenetpp_checkpoint_converts_tensor_by_tensor_without_the_unused_heads(tmp_path, capsys):
    src, state, table = reference_file(tmp_path, "ntrenetpp")
    out, summary = convert(tmp_path, "ntrenetpp", src)
    unused = sorted(k for k, (_, o) in table.items() if o is None)
    assert unused == [f"inital_inner_cls.{i}.{p}" for i in (2, 3) for p in ("0.weight", "3.bias", "3.weight")]
    assert sorted(summary["left_out"]) == unused
    assert capsys.readouterr().out.endswith(f"from {src}; left out 6 unused tensors\n")
    saved = read_checkpoint(out)
    assert saved["config"]["arch"] == "ntrenetpp"
    for theirs, (_, ours) in table.items():
        if ours is not None:
            assert torch.equal(saved["model"][ours], state[theirs]), theirs
    assert saved["model"]["memory_bank.fill_count"].sum() == 0      # the bank starts empty
    # the engine's own loader takes it (build_model_from_checkpoint builds NTRENet++)
    from engine.checkpoint import build_model_from_checkpoint
    model, _ = build_model_from_checkpoint(out, load_cfg(write_config(tmp_path, "ntrenetpp")))
    assert torch.equal(model.bgmm.bg_prototype, state["bg_prototype"])


def test_round_trip_of_our_pfenet_through_their_names_is_the_identity(tmp_path):
    """Our PFENet (random head, randomised BatchNorm statistics) → PFENet's names and
    train.py's wrapping → converted back: the same tensors and the same predictions."""
    cfg = load_cfg(write_config(tmp_path, "pfenet"))
    torch.manual_seed(3)
    model = build_pfenet(cfg, False).eval()
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(123)
    ours = model.state_dict()
    theirs = {reference_backbone_name(k, False) if k.startswith("backbone.") else k: v for k, v in ours.items()}
    src = tmp_path / "final.pth"
    torch.save({"epoch": 200, "state_dict": {"module." + k: v for k, v in theirs.items()}, "optimizer": {}}, src)
    out, _ = convert(tmp_path, "pfenet", str(src))
    back = read_checkpoint(out)["model"]
    assert list(back) == list(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    again = build_pfenet(cfg, False).eval()
    again.load_state_dict(back)
    g = torch.Generator().manual_seed(0)
    query, supports = torch.randn(1, 3, 33, 33, generator=g), torch.randn(1, 2, 3, 33, 33, generator=g)
    masks = torch.zeros(1, 2, 33, 33, dtype=torch.long)
    masks[..., 8:24, 8:24] = 1
    with torch.no_grad():
        assert torch.equal(model(query, supports, masks), again(query, supports, masks))


def refusal(tmp_path, capsys, argv):
    out = tmp_path / "refused" / "best.pth"
    with pytest.raises(SystemExit) as e:
        run(main, argv[:2] + [argv[2], str(out)] + argv[3:], prog="convert_checkpoint.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("convert_checkpoint.py: error: "), err
    assert not out.exists()
    return err


def test_refusals_name_the_key_in_one_line(tmp_path, capsys):
    src, state, _ = reference_file(tmp_path, "pfenet")
    pfenet_cfg, ntre_cfg = write_config(tmp_path, "pfenet"), write_config(tmp_path, "ntrenetpp")

    def with_state(name, new_state):
        path = tmp_path / name
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in new_state.items()}}, path)
        return str(path)

    cases = [
        (with_state("missing.pth", {k: v for k, v in state.items() if k != "res1.0.weight"}), pfenet_cfg, "pfenet",
         "lacks the network's key 'res1.0.weight'; check the config's layers, vgg, ppm_scales"),
        (with_state("extra.pth", {**state, "extra_head.0.weight": torch.zeros(1)}), pfenet_cfg, "pfenet",
         "has key 'extra_head.0.weight' that the configured PFENet lacks"),
        (with_state("bins.pth", {**state, "inner_cls.5.0.weight": torch.zeros(C, C, 3, 3)}), pfenet_cfg, "pfenet",
         "has key 'inner_cls.5.0.weight' that the configured PFENet lacks"),
        (with_state("stem.pth", {**state, "layer0.2.weight": torch.zeros(1)}), pfenet_cfg, "pfenet",
         "has key 'layer0.2.weight' that the configured PFENet lacks"),
        (with_state("shape.pth", {**state, "down_query.0.weight": torch.zeros(C, 50, 1, 1)}), pfenet_cfg, "pfenet",
         "key 'down_query.0.weight' has shape (8, 50, 1, 1), the network's 'down_query.0.weight' (8, 96, 1, 1)"),
        (src, ntre_cfg, "ntrenetpp",
         "holds PFENet's network (key 'init_merge.0.0.weight'), not NTRENet++; use --from pfenet"),
        (src, ntre_cfg.replace("ntrenetpp.yaml", "pfenet.yaml"), "ntrenetpp",
         "has arch 'pfenet' but --from ntrenetpp needs arch 'ntrenetpp'"),
        (str(tmp_path / "absent.pth"), pfenet_cfg, "pfenet", f"checkpoint '{tmp_path / 'absent.pth'}' does not exist"),
    ]
    for path, config, source, message in cases:
        err = refusal(tmp_path, capsys, ["--from", source, path, "--config", config])
        assert message in err, (message, err)


def test_refusals_of_ntrenetpp_files(tmp_path, capsys):
    src, state, _ = reference_file(tmp_path, "ntrenetpp")
    config = write_config(tmp_path, "pfenet")
    err = refusal(tmp_path, capsys, ["--from", "pfenet", src, "--config", config])
    assert "holds the NTRENet++ authors' network (key 'bg_prototype'), not PFENet; use --from ntrenetpp" in err
    # the released code's 1-channel final head cannot fill a 2-logit network
    one = dict(state, **{"cls.3.weight": torch.zeros(1, C, 1, 1), "cls.3.bias": torch.zeros(1)})
    path = tmp_path / "one_channel.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in one.items()}}, path)
    err = refusal(tmp_path, capsys, ["--from", "ntrenetpp", str(path), "--config", write_config(tmp_path, "ntrenetpp")])
    assert "key 'cls.3.weight' has shape (1, 8, 1, 1), the network's 'merge.head.body.3.weight' (2, 8, 1, 1)" in err
    assert "1 output channel" in err


def test_a_checkpoint_of_this_project_is_not_converted_again(tmp_path, capsys):
    src, _, _ = reference_file(tmp_path, "pfenet")
    out, _ = convert(tmp_path, "pfenet", src)
    capsys.readouterr()
    err = refusal(tmp_path, capsys, ["--from", "pfenet", out, "--config", write_config(tmp_path, "pfenet")])
    assert "is already a checkpoint of this project" in err
