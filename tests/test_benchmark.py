"""tools/benchmark.py at a tiny size: every field is there and sane (speed is never asserted)."""
import json

import pytest
import torch
import torch.nn as nn

from model.ops import fuse_concat
from tools import benchmark
from util.config import defaults
from util.distributed import DistInfo

TINY = dict(dataset="pascal", layers=18, pretrained="", reduce_dim=16, ppm_scales=[1.0, 0.5], train_h=65,
            train_w=65, val_size=65, batch_size=2, batch_size_val=2, shot=1, workers=1, memory_size=8,
            num_negatives=4)


def test_run_reports_every_field_with_sane_values(monkeypatch):
    monkeypatch.setitem(benchmark.PEAK_SHAPE, "cpu", (1, 16))     # the peak conv, tiny as well
    cfg = defaults()
    cfg.update(TINY)
    res = benchmark.run(cfg, torch.device("cpu"), reps=1, warmup=1, log=lambda m: None)
    for key in benchmark.FIELDS:
        assert res[key] is not None, key
    for key in ("backbone_ms", "train_step_ms", "eval_episode_ms", "eval_batched_episode_ms",
                "loader_episodes_per_s", "loader_vs_step", "peak_gflops", "peak_fwdbwd_gflops",
                "achieved_gflops", "peak_mem_mib"):
        assert res[key] > 0, key
    assert res["step_gflop"] > res["backbone_gflop"] > 0
    assert 0 < res["efficiency"] < 1.5
    assert res["params_trainable"] > 0 and res["params_frozen"] > 0
    assert all(v == v and abs(v) < 1e4 for v in res["losses"].values())   # finite
    table = benchmark.format_table(res)
    assert "training step" in table and "GFLOP/s" in table
    json.dumps(res)                                                      # --json can write it


def test_cli_skips_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmark.PEAK_SHAPE, "cpu", (1, 16))
    out = tmp_path / "bench.json"
    args = ["--config", "config/pascal/pascal_split0_resnet50.yaml", "--device", "cpu", "--reps", "1",
            "--warmup", "0", "--skip", "loader,eval", "--json", str(out)]
    for k, v in TINY.items():
        args += [k, str(v) if not isinstance(v, str) else (v or "''")]
    res = benchmark.main(args)
    assert res["loader_episodes_per_s"] is None and res["eval_episode_ms"] is None
    assert json.loads(out.read_text())["train_step_ms"] > 0


def test_random_masks_look_like_labels():
    g = torch.Generator().manual_seed(0)
    masks = benchmark.random_masks(3, (65, 81), g)
    assert masks.shape == (3, 65, 81)
    for m in masks:
        assert set(m.unique().tolist()) == {0, 1, 255}


@pytest.mark.parametrize("shared", [False, True])
def test_fuse_concat_equals_the_concatenated_convolution(shared):
    """The 1×1 convolutions on concat(X, expanded prototypes, prior) compute the same value and
    gradients as the explicit concatenation they replace."""
    torch.manual_seed(0)
    N, C, h, w = 3, 8, 5, 7
    conv = nn.Conv2d(2 * C + 1, C, 1, bias=False)
    x = torch.randn(N, C, h, w, requires_grad=True)
    p = torch.randn(1 if shared else N, C, 1, 1, requires_grad=True)
    prior = torch.rand(N, 1, h, w, requires_grad=True)
    new = fuse_concat(conv, x, [p], [prior])
    old = conv(torch.cat([x, p.expand(N, -1, h, w), prior], dim=1))
    assert torch.allclose(new, old, atol=1e-6)
    g = torch.randn_like(new)
    grads_new = torch.autograd.grad(new, [x, p, prior, conv.weight], g)
    grads_old = torch.autograd.grad(old, [x, p, prior, conv.weight], g)
    for a, b in zip(grads_new, grads_old):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        fuse_concat(conv, x, [p])


# ---- the restructured formulations of the speed work equal the ones they replace ----------
def _old_segmentation_loss(logits, label, ignore=255):
    logits = torch.nn.functional.interpolate(logits, size=label.shape[-2:], mode="bilinear",
                                             align_corners=True).float()
    per_pixel = torch.nn.functional.cross_entropy(logits, label, ignore_index=ignore, reduction="none")
    valid = (label != ignore).flatten(1).sum(dim=1)
    return (per_pixel.flatten(1).sum(dim=1) / valid.clamp_min(1)).mean()


def _old_bg_mining_loss(bg_logits, label, alpha=0.5, ignore=255):
    up = torch.nn.functional.interpolate(bg_logits, size=label.shape[-2:], mode="bilinear", align_corners=True)
    log_prob = torch.nn.functional.log_softmax(up.float(), dim=1)
    target, valid = (label == 1).float(), (label != ignore).float()
    not_bg = -(log_prob[:, 0] * target).sum(dim=(1, 2)) / (target.sum(dim=(1, 2)) + 1e-5)
    bg = -(log_prob[:, 1] * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1)
    return (not_bg + alpha * bg).mean()


def test_grouped_margin_losses_equal_cross_entropy_on_upsampled_logits():
    from model.losses import bg_mining_loss, segmentation_losses

    g = torch.Generator().manual_seed(0)
    label = benchmark.random_masks(3, (41, 41), g).long()
    label[2] = 255                                                   # an image with no valid pixel
    maps = [torch.randn(3, 2, s, s, generator=g).mul(4).requires_grad_() for s in (41, 11, 11, 6, 11)]
    new = segmentation_losses(maps, label)
    old = torch.stack([_old_segmentation_loss(m, label) for m in maps])
    assert torch.allclose(new, old, atol=1e-5)
    w = torch.randn(len(maps), generator=g)
    for a, b in zip(torch.autograd.grad((new * w).sum(), maps), torch.autograd.grad((old * w).sum(), maps)):
        assert torch.allclose(a, b, atol=1e-6)
    bg = torch.randn(3, 2, 11, 11, generator=g).mul(4).requires_grad_()
    new, old = bg_mining_loss(bg, label, 0.7), _old_bg_mining_loss(bg, label, 0.7)
    assert torch.allclose(new, old, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(new, bg)[0], torch.autograd.grad(old, bg)[0], atol=1e-6)


def test_aspp_pooled_branch_as_bias_equals_the_concatenation():
    from model.modules import ASPP

    torch.manual_seed(0)
    aspp = ASPP(8, (1, 2, 3)).eval()
    x = torch.randn(2, 8, 9, 9)
    pooled = aspp.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
    old = aspp.fuse(torch.cat([pooled, aspp.pointwise(x)] + [conv(x) for conv in aspp.atrous], dim=1))
    assert torch.allclose(aspp(x), old, atol=1e-6)


def test_fuse_concat_of_several_maps_and_pool_to():
    from model.ops import pool_to

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 5, 1, bias=True)
    a, b = torch.randn(2, 8, 6, 6), torch.randn(2, 4, 6, 6)
    assert torch.allclose(fuse_concat(conv, [a, b]), conv(torch.cat([a, b], 1)), atol=1e-6)
    x = torch.randn(2, 3, 60, 60)
    for size in (60, 30, 15, 8, 7):
        assert torch.allclose(pool_to(x, size), torch.nn.functional.adaptive_avg_pool2d(x, size), atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_sum_gradient_keeps_the_memory_format(channels_last):
    from model.modules import global_masked_pooling, masked_average_pooling

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    m = (torch.rand(2, 1, 5, 7) > 0.5).float()
    g = torch.randn(2, 6, 1, 1)
    for pool in (masked_average_pooling, global_masked_pooling):
        new = pool(x, m)
        old = (x * m).sum(dim=(2, 3), keepdim=True) / (
            m.sum(dim=(2, 3), keepdim=True) + 5e-4 if pool is masked_average_pooling else 35)
        assert torch.allclose(new, old, atol=1e-6)
        (grad_new,), (grad_old,) = torch.autograd.grad(new, x, g), torch.autograd.grad(old, x, g)
        assert torch.allclose(grad_new, grad_old, atol=1e-6)
        assert grad_new.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_reduce_of_a_list_equals_reduce_of_the_concatenation():
    from model.modules import Reduce

    torch.manual_seed(0)
    reduce = Reduce(12, 5).eval()
    a, b = torch.randn(2, 8, 6, 6), torch.randn(2, 4, 6, 6)
    assert torch.allclose(reduce([a, b]), torch.nn.Sequential(*reduce)(torch.cat([a, b], 1)), atol=1e-6)


def test_prior_mask_equals_pfenets_per_shot_formula():
    """All shots in one product: the same prior as PFENet's cos = s·q / (|s||q| + 1e-7) per shot,
    max over support pixels, min-max per image, resized, mean over shots."""
    from model.modules import prior_mask
    from model.ops import resize

    g = torch.Generator().manual_seed(0)
    B, K, D, h, w = 2, 3, 16, 7, 9
    query = torch.rand(B, D, h, w, generator=g)
    support = torch.rand(B, K, D, h, w, generator=g) * (torch.rand(B, K, 1, h, w, generator=g) > 0.5)
    expected = []
    for k in range(K):
        q, s = query.flatten(2), support[:, k].flatten(2)                       # B×D×M
        cos = torch.bmm(s.transpose(1, 2), q) / (s.norm(dim=1)[:, :, None] * q.norm(dim=1)[:, None, :] + 1e-7)
        best = cos.max(dim=1).values
        low, high = best.min(dim=1, keepdim=True).values, best.max(dim=1, keepdim=True).values
        expected.append(resize(((best - low) / (high - low + 1e-7)).view(B, 1, h, w), (13, 17)))
    expected = torch.stack(expected).mean(dim=0)
    assert torch.allclose(prior_mask(query, support, (13, 17)), expected, atol=1e-5)


def test_channels_last_auto_is_on_for_the_cpu_and_changes_no_prediction():
    from model import build_model
    from util.amp import to_device, use_channels_last

    cfg = defaults()
    cfg.update(TINY)
    assert cfg.channels_last == "auto" and use_channels_last(cfg, torch.device("cpu"))
    assert not use_channels_last(cfg, torch.device("cuda"))
    cfg.channels_last = False
    assert not use_channels_last(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    cfg.channels_last = "auto"
    fast = to_device(build_model(cfg), cfg, torch.device("cpu")).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = benchmark.make_batch(2, 2, (65, 65))
    inputs = [batch[k] for k in ("query_img", "support_imgs", "support_masks")]   # plain NCHW tensors
    with torch.no_grad():
        assert torch.allclose(fast(*inputs), plain(*inputs), atol=1e-4)


@pytest.mark.parametrize("pixel_negative", [False, True])
def test_training_step_reads_no_tensor_value_on_the_host(pixel_negative):
    """No .item()/bool(tensor)/nonzero/boolean-mask indexing anywhere in forward, losses,
    backward, optimizer and DO-bank update — steps with the bank empty, filling and full."""
    cfg = defaults()
    cfg.update(TINY, pixel_negative=pixel_negative, memory_size=2)
    torch.manual_seed(0)
    trainer = benchmark.make_trainer(cfg, DistInfo(device=torch.device("cpu")))
    for i in range(3):
        batch = benchmark.make_batch(2, 1, (65, 65), seed=i)
        batch["class_id"] = torch.tensor([3, 3])                  # one class: its bank fills up
        assert benchmark.host_sync_ops(lambda: trainer.step(batch, 0.01)) == []
    assert int(trainer.model.memory_bank.fill_count[3]) == 2


def test_the_sync_detector_sees_host_reads_and_mask_indexing():
    x = torch.tensor([1.0, 2.0, 3.0])
    ops = benchmark.host_sync_ops(lambda: (x.sum().item(), x[x > 1], bool(x.any()), x.nonzero()))
    assert ops == ["aten::_local_scalar_dense", "aten::index with a boolean mask",
                   "aten::_local_scalar_dense", "aten::nonzero"]


def test_bf16_losses_match_fp32_within_the_stated_tolerance():
    """Every loss under CPU bf16 autocast within 2e-2 of fp32 at this tiny size (at PASCAL size
    docs/benchmarks.md records at most 9.3e-4)."""
    cfg = defaults()
    cfg.update(TINY, amp="bf16")
    torch.manual_seed(0)
    model = benchmark.make_trainer(cfg, DistInfo()).model
    batch = benchmark.make_batch(2, 1, (65, 65))
    check = benchmark.amp_loss_check(model, batch, cfg, torch.device("cpu"))
    assert set(check) == {"main", "aux1", "aux2", "bg", "proto", "pixel", "contrast", "total"}
    for name, (full, low, diff) in check.items():
        assert abs(full - low) < 2e-2, (name, full, low)


def test_profile_writes_a_trace_and_lists_the_convolutions(tmp_path):
    cfg = defaults()
    cfg.update(TINY)
    trace = tmp_path / "step.json"
    table = benchmark.profile_step(cfg, torch.device("cpu"), str(trace), warmup=1, top=10)
    assert "convolution" in table and "by input shape" in table
    assert json.loads(trace.read_text())["traceEvents"]


def test_cpu_process_tuning_flushes_denormals():
    from util.host_memory import tune_cpu_process

    tiny = torch.tensor([1e-39], dtype=torch.float32)     # a denormal float32
    applied = tune_cpu_process(malloc=False)
    assert applied == {"malloc_tuned": False, "flush_denormal": True}
    assert (tiny * 1.0).item() == 0.0
    assert (torch.tensor([1e-30]) * 1.0).item() == pytest.approx(1e-30)   # normal values untouched


def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    config = "config/pascal/pascal_split0_resnet50.yaml"
    for extra, expected in ((["channels_last", "yes"], "expected True, False or 'auto'"),
                            (["--reps", "0"], "--reps must be at least 1"),
                            (["amp", "fp16"], "amp fp16 needs --device cuda")):
        done = subprocess.run([sys.executable, "tools/benchmark.py", "--config", config, "--device", "cpu", *extra],
                              capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
