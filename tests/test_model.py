"""The whole network: shapes, K-shot and batch consistency, frozen backbone, AMP, contract errors."""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from engine.networks import build_model
from util.amp import to_device, use_channels_last
from util.config import ConfigError, defaults, merge_cfg_from_list

FRACTIONS = [1.0, 0.5, 0.25, 0.125]


def make_cfg(**overrides):
    cfg = defaults()
    cfg.update(pretrained="", reduce_dim=16, ppm_scales=FRACTIONS, memory_size=8, num_negatives=4)
    cfg.update(overrides)
    return cfg


def episode(B, K, size, seed=0):
    """Random images, support masks with 0/1/255, a query mask, class ids."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, 3, size, size, generator=g)
    supports = torch.randn(B, K, 3, size, size, generator=g)
    support_masks = torch.zeros(B, K, size, size, dtype=torch.long)
    support_masks[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    support_masks[..., :2, :] = 255
    query_mask = torch.zeros(B, size, size, dtype=torch.long)
    query_mask[:, size // 3:, size // 3:] = 1
    query_mask[:, -2:, :] = 255
    class_ids = torch.arange(1, B + 1)
    return query, supports, support_masks, query_mask, class_ids


_models = {}


def model_for(name):
    """One small model per backbone for the whole module (building ResNet-101 is not free)."""
    if name not in _models:
        torch.manual_seed(0)
        layers, vgg = {"resnet18": (18, False), "resnet50": (50, False), "resnet101": (101, False),
                       "vgg": (50, True)}[name]
        _models[name] = build_model(make_cfg(layers=layers, vgg=vgg))
    return _models[name]


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "vgg", "resnet18"])
def test_output_shapes_train_and_eval(name):
    model = model_for(name)       # configured 1-shot: K comes from the inputs
    for K in (1, 5):
        for size in (65, 97):
            query, supports, support_masks, query_mask, class_ids = episode(2, K, size)
            model.train()
            logits, losses = model(query, supports, support_masks, query_mask, class_ids)
            assert logits.shape == (2, 2, size, size)
            assert {"main", "aux1", "aux2", "bg", "contrast", "total"} <= set(losses)
            assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
            model.eval()
            with torch.no_grad():
                out = model(query, supports, support_masks)
            assert out.shape == (2, 2, size, size)


def test_eval_extras():
    model = model_for("resnet18").eval()
    query, supports, support_masks, _, _ = episode(2, 2, 65)
    with torch.no_grad():
        logits, extras = model(query, supports, support_masks, return_extras=True)
        plain = model(query, supports, support_masks)
    assert torch.equal(logits, plain)
    assert extras["bg_logits"].shape == (2, 2, 65, 65)
    assert extras["do_mask"].shape == (2, 65, 65) and extras["do_mask"].dtype == torch.long
    assert set(extras["do_mask"].unique().tolist()) <= {0, 1}
    assert extras["prior"].shape == (2, 1, 65, 65)
    assert extras["prior"].min() >= 0 and extras["prior"].max() <= 1 + 1e-6


def test_batch_shot_order_and_repeated_shot_consistency():
    model = model_for("resnet18").eval()
    query, supports, support_masks, _, _ = episode(3, 3, 65, seed=1)
    support_masks[1, 2] = 0                      # episodes differ in their masks too
    with torch.no_grad():
        batched = model(query, supports, support_masks)
        for b in range(3):
            alone = model(query[b:b + 1], supports[b:b + 1], support_masks[b:b + 1])
            assert torch.allclose(batched[b:b + 1], alone, atol=1e-4)
        order = torch.tensor([2, 0, 1])
        permuted = model(query, supports[:, order], support_masks[:, order])
        assert torch.allclose(batched, permuted, atol=1e-4)
        # K copies of one support = that support alone (prototypes and priors are averaged)
        one = model(query, supports[:, :1], support_masks[:, :1])
        repeated = model(query, supports[:, :1].repeat(1, 4, 1, 1, 1), support_masks[:, :1].repeat(1, 4, 1, 1))
        assert torch.allclose(one, repeated, atol=1e-4)


def test_losses_follow_the_total_formula_and_main_is_the_per_episode_cross_entropy():
    torch.manual_seed(0)
    cfg = make_cfg(layers=18, aux_weight=0.5, bg_weight=2.0, aux1_weight=0.3, aux2_weight=0.7, contrast_weight=0.1)
    model = build_model(cfg).train()
    query, supports, support_masks, query_mask, class_ids = episode(2, 2, 65)
    logits, losses = model(query, supports, support_masks, query_mask, class_ids)
    main = sum(F.cross_entropy(logits[b:b + 1], query_mask[b:b + 1], ignore_index=255) for b in range(2)) / 2
    assert losses["main"].item() == pytest.approx(main.item(), abs=1e-6)
    expected = losses["main"] + 0.5 * (2.0 * losses["bg"] + 0.3 * losses["aux1"] + 0.7 * losses["aux2"]
                                       + 0.1 * losses["contrast"])
    assert losses["total"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert losses["contrast"].item() == pytest.approx((losses["proto"] + losses["pixel"]).item() / 2, abs=1e-6)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_frozen_backbone_gets_no_gradient_and_keeps_bn_statistics():
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18)).train()
    backbone_before = _snapshot(model.backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    query, supports, support_masks, query_mask, class_ids = episode(2, 2, 65)
    _, losses = model(query, supports, support_masks, query_mask, class_ids)
    losses["total"].backward()
    optimizer.step()
    assert not model.backbone.training
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    for name, p in model.named_parameters():
        if not name.startswith("backbone."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_fix_bn_false_reproduces_the_reference_drift():
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18, fix_bn=False)).train()
    before = model.backbone.bn1.running_mean.clone()
    query, supports, support_masks, query_mask, class_ids = episode(1, 1, 65)
    model(query, supports, support_masks, query_mask, class_ids)
    assert model.backbone.training and not torch.equal(before, model.backbone.bn1.running_mean)
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_trainable_backbone_gets_gradient_everywhere():
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18, freeze_backbone=False, fix_bn=False)).train()
    assert model.backbone.training
    query, supports, support_masks, query_mask, class_ids = episode(2, 2, 65)
    _, losses = model(query, supports, support_masks, query_mask, class_ids)
    losses["total"].backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name   # layer4 learns through the prior


def test_training_fills_the_bank_of_the_episode_class_only():
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18, memory_size=16)).train()
    query, supports, support_masks, query_mask, _ = episode(2, 2, 65)
    class_ids = torch.tensor([3, 7])
    model(query, supports, support_masks, query_mask, class_ids)
    bank = model.memory_bank
    filled = bank.fill_count.tolist()
    assert filled[3] > 0 and filled[7] > 0 and filled[3] + filled[7] <= 2 * (1 + 2)
    assert sum(filled) == filled[3] + filled[7]
    assert bank.sample_step.item() == 1
    # a second step draws negatives from the bank: the prototype term then has competition
    _, losses = model(query, supports, support_masks, query_mask, class_ids)
    assert losses["proto"].item() > 0
    state = model.state_dict()
    assert {"memory_bank.prototypes", "memory_bank.fill_count", "memory_bank.write_pointer",
            "memory_bank.sample_step"} <= set(state)


def test_contrast_weight_zero_skips_the_bank():
    model = build_model(make_cfg(layers=18, contrast_weight=0.0)).train()
    query, supports, support_masks, query_mask, _ = episode(1, 1, 65)
    _, losses = model(query, supports, support_masks, query_mask)     # class ids not needed
    assert losses["contrast"].item() == 0.0 and model.memory_bank.fill_count.sum().item() == 0


def test_state_dict_round_trip_gives_the_same_predictions():
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18)).train()
    query, supports, support_masks, query_mask, class_ids = episode(2, 1, 65)
    model(query, supports, support_masks, query_mask, class_ids)
    torch.manual_seed(1)
    copy = build_model(make_cfg(layers=18))
    copy.load_state_dict(model.state_dict())
    model.eval(), copy.eval()
    with torch.no_grad():
        assert torch.equal(model(query, supports, support_masks), copy(query, supports, support_masks))
    assert torch.equal(copy.memory_bank.prototypes, model.memory_bank.prototypes)


def test_bf16_autocast_and_channels_last():
    model = model_for("resnet18").to(memory_format=torch.channels_last)
    try:
        query, supports, support_masks, query_mask, class_ids = episode(2, 2, 65)
        query = query.contiguous(memory_format=torch.channels_last)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, losses = model(query, supports, support_masks, query_mask, class_ids)
        losses["total"].backward()
        assert logits.shape == (2, 2, 65, 65) and all(torch.isfinite(v) for v in losses.values())
        assert losses["total"].dtype == torch.float32
        model.eval()
        with torch.no_grad():
            reference = model(query, supports, support_masks)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low, extras = model(query, supports, support_masks, return_extras=True)
        assert low.shape == reference.shape and torch.isfinite(low).all()
        # measured: 0.0014 at a logit scale of 0.2 (0.7 %); bf16 keeps ~3 significant digits
        difference = (low.float() - reference).abs().max()
        assert 0 < difference < 0.03 * reference.abs().max()
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.zero_grad(set_to_none=True)


def losses_in(model, batch, device_type="cpu", dtype=None, dropout=True):
    """One training forward and backward of a copy of ``model`` (its DO bank as it is), under
    ``dtype`` autocast when given: (losses, largest gradient). ``dropout`` False: no dropout
    (the CPU's and CUDA's generators draw different masks from one seed)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)) and not dropout:
            m.p = 0.0
    torch.manual_seed(1)                                   # dropout's draws alike in every run
    with torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext():
        _, losses = model(*batch)
    losses["total"].backward()
    return {k: v.item() for k, v in losses.items()}, max(p.grad.abs().max().item() for p in model.parameters()
                                                         if p.grad is not None)


def test_bf16_autocast_training_matches_fp32_on_the_cpu():
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18)).train()
    batch = episode(2, 2, 65)
    full, full_grad = losses_in(model, batch)
    low, low_grad = losses_in(model, batch, "cpu", torch.bfloat16)
    # measured: every loss within 2e-4 of fp32, the largest gradient within 0.1 %
    assert all(abs(low[k] - full[k]) < 1e-3 for k in full) and low != full
    assert low_grad == pytest.approx(full_grad, rel=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_autocast_training_on_cuda_matches_the_cpu_in_fp32():
    """fp16 needs CUDA: the project refuses amp fp16 on the CPU, where autocast keeps the prior's
    norm and reciprocal in fp16 (0 · inf = NaN on a masked-out support pixel); CUDA's autocast
    runs them in fp32. The CUDA fp16 losses are those of the same model in fp32 on the CPU."""
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18)).train()
    batch = episode(2, 2, 65)
    full, full_grad = losses_in(model, batch, dropout=False)
    low, low_grad = losses_in(model.cuda(), [t.cuda() for t in batch], "cuda", torch.float16, dropout=False)
    assert all(abs(low[k] - full[k]) < 5e-3 for k in full), (low, full)
    assert low_grad == pytest.approx(full_grad, rel=2e-2)


def test_bins_absolute_and_fractional():
    model = model_for("resnet18")
    model.ppm_scales = (60, 30, 15, 8)
    try:
        assert model.bin_sizes(60) == [60, 30, 15, 8]
    finally:
        model.ppm_scales = tuple(FRACTIONS)
    assert model.bin_sizes(81) == [81, 40, 20, 10]
    assert model.bin_sizes(9) == [9, 4, 2, 1]


def test_absolute_bins_larger_than_the_feature_map_and_map_pooling_run():
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18, ppm_scales=[60, 30, 15, 8], do_pool="map")).eval()
    query, supports, support_masks, _, _ = episode(1, 1, 65)
    with torch.no_grad():
        assert model(query, supports, support_masks).shape == (1, 2, 65, 65)


def test_contract_errors_say_what_to_do():
    model = model_for("resnet18")
    query, supports, support_masks, query_mask, _ = episode(1, 1, 65)
    model.train()
    with pytest.raises(ValueError, match="query_mask"):
        model(query, supports, support_masks)
    with pytest.raises(ValueError, match="class_ids"):
        model(query, supports, support_masks, query_mask)
    with pytest.raises(ValueError, match="B×K×3×H×W"):
        model(query, supports[:, 0], support_masks, query_mask)
    with pytest.raises(ValueError, match="model.eval"):
        model(query, supports, support_masks, query_mask, torch.tensor([1]), return_extras=True)
    with pytest.raises(ConfigError, match="unknown key 'classes'"):   # two logits always: no such key
        merge_cfg_from_list(defaults(), ["classes", "1"])


def test_prior_is_computed_from_the_masked_support():
    """An all-ignore support mask leaves a zero masked support: the prior is then exactly 0."""
    model = model_for("resnet18").eval()
    query, supports, support_masks, _, _ = episode(1, 1, 65)
    with torch.no_grad():
        _, extras = model(query, supports, torch.full_like(support_masks, 255), return_extras=True)
    assert torch.equal(extras["prior"], torch.zeros_like(extras["prior"]))
    assert not math.isnan(extras["bg_logits"].sum().item())


def test_channels_last_auto_is_on_for_the_cpu_and_changes_no_prediction():
    cfg = make_cfg(layers=18, ppm_scales=[1.0, 0.5])
    assert cfg.channels_last == "auto" and use_channels_last(cfg.channels_last, torch.device("cpu"))
    assert not use_channels_last(cfg.channels_last, torch.device("cuda"))
    cfg.channels_last = False
    assert not use_channels_last(cfg.channels_last, torch.device("cpu"))
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    cfg.channels_last = "auto"
    fast = to_device(build_model(cfg), torch.device("cpu"), cfg.channels_last).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    inputs = episode(2, 2, 65)[:3]                                   # plain NCHW tensors
    with torch.no_grad():
        assert torch.allclose(fast(*inputs), plain(*inputs), atol=1e-4)


# ---- the network equals the authors' (docs/method.md §7 and §9) ------------
def _dropouts(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]


def expected_dropouts(levels):
    """(module name, p) of every dropout the authors' network has, in module order."""
    head = lambda prefix: (f"{prefix}.body.2", 0.1)   # noqa: E731 - SegmentationHead: conv, ReLU, dropout, conv
    names = [("down_query.2", 0.5), ("down_supp.2", 0.5),
             ("aspp.image_pool.2", 0.5), ("aspp.pointwise.2", 0.5),
             ("aspp.atrous.0.2", 0.5), ("aspp.atrous.1.2", 0.5), ("aspp.atrous.2.2", 0.5), ("aspp.fuse.2", 0.5),
             ("bgmm.fuse.2", 0.5), head("bgmm.head")]
    for i in range(levels):
        names += [head(f"scales.{i}.target_matching.init_head"), head(f"scales.{i}.target_matching.second_head"),
                  head(f"scales.{i}.enrichment.aux_head")]
    return names + [head("merge.head")]


def test_every_dropout_is_channel_dropout_with_the_authors_p_at_the_authors_places():
    model = build_model(make_cfg(layers=18))
    found = _dropouts(model)
    assert [(name, m.p) for name, m in found] == expected_dropouts(len(FRACTIONS))
    assert sum(m.p == 0.5 for _, m in found) == 9 and sum(m.p == 0.1 for _, m in found) == 14
    modules = dict(model.named_modules())
    for i, (name, m) in enumerate(found):
        assert type(m) is torch.nn.Dropout2d, name
        parent, index = name.rsplit(".", 1)
        assert isinstance(modules[parent][int(index) - 1], torch.nn.ReLU), f"{name} does not follow a ReLU"
        # behaviour, not only the class: whole channels are kept or dropped (element-wise fails this)
        torch.manual_seed(i)
        out = m.train()(torch.ones(4, 64, 6, 6))
        per_channel = out.flatten(2)
        assert torch.equal(per_channel.amax(dim=2), per_channel.amin(dim=2)), name
        assert set(per_channel[..., 0].unique().tolist()) == {0.0, torch.tensor(1 / (1 - m.p)).item()}, name


def test_aspp_fusion_has_no_bias_and_ends_with_relu_and_channel_dropout():
    aspp = build_model(make_cfg(layers=18)).aspp
    conv, relu, dropout = aspp.fuse
    assert conv.bias is None and conv.kernel_size == (1, 1)
    assert isinstance(relu, torch.nn.ReLU) and type(dropout) is torch.nn.Dropout2d and dropout.p == 0.5
    for branch in [aspp.image_pool, aspp.pointwise, *aspp.atrous]:
        assert branch[0].bias is not None       # the five branch convs keep theirs


def test_query_self_prototype_is_the_global_average_by_default():
    """P_q = Σ(argmax(Ŷ_init) · q_b) / b² (the authors' AdaptiveAvgPool2d(1)); 'map' divides by the area."""
    query_bin = torch.arange(1.0, 19.0).view(1, 2, 3, 3)             # channel 0: 1..9, channel 1: 10..18
    init_logits = torch.zeros(1, 2, 3, 3)
    init_logits[0, 1, 0, 0] = init_logits[0, 1, 0, 1] = init_logits[0, 1, 2, 2] = 1.0   # foreground: 1, 2, 9
    gap = build_model(make_cfg(layers=18)).scales[0].target_matching
    assert torch.equal(gap.self_prototype(init_logits, query_bin).flatten(), torch.tensor([12 / 9, 39 / 9]))
    masked = build_model(make_cfg(layers=18, self_proto_pool="map")).scales[0].target_matching
    assert torch.allclose(masked.self_prototype(init_logits, query_bin).flatten(),
                          torch.tensor([12 / (3 + 5e-4), 39 / (3 + 5e-4)]), rtol=1e-6, atol=0)


def test_self_proto_pool_reaches_the_forward_and_a_bad_value_names_the_key():
    torch.manual_seed(0)
    gap = build_model(make_cfg(layers=18)).eval()
    masked = build_model(make_cfg(layers=18, self_proto_pool="map")).eval()
    masked.load_state_dict(gap.state_dict())
    query, supports, support_masks, _, _ = episode(1, 1, 65)
    with torch.no_grad():
        assert not torch.allclose(gap(query, supports, support_masks), masked(query, supports, support_masks))
    with pytest.raises(ValueError, match="self_proto_pool"):
        build_model(make_cfg(layers=18, self_proto_pool="max"))


def test_fix_bn_false_trains_with_the_authors_separate_backbone_passes():
    """With fix_bn False BatchNorm normalises with its batch's statistics, so the batches must be
    the authors': the query images, then each shot's images, each alone; layer4 on the query's
    layer3, then on each shot's masked layer3. The same features, prior and running statistics."""
    import copy

    from model.modules import prior_mask
    from model.ops import resize

    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18, fix_bn=False)).train()
    reference = copy.deepcopy(model.backbone).train()
    B, K = 2, 3
    query, supports, support_masks, _, _ = episode(B, K, 65)
    with torch.no_grad():
        (layer3, layer2), prior, support_mask = model.backbone_features(query, supports, support_masks)
        query2, query3 = reference.mid_level(query)
        shots = [reference.mid_level(supports[:, k]) for k in range(K)]
        masks = [resize((support_masks[:, k] == 1).unsqueeze(1).float(), query3.shape[-2:]) for k in range(K)]
        query4 = reference.high_level(query3)
        support4 = [reference.high_level(shots[k][1] * masks[k]) for k in range(K)]
        support4 = torch.stack([s * resize(m, s.shape[-2:]) for s, m in zip(support4, masks)], dim=1)
        expected_prior = prior_mask(query4, support4, query3.shape[-2:])
    per_episode = lambda maps: torch.stack(maps, dim=1).flatten(0, 1)   # noqa: E731 - index b·K + k
    assert torch.allclose(layer3, torch.cat([query3, per_episode([s[1] for s in shots])]), atol=1e-6)
    assert torch.allclose(layer2, torch.cat([query2, per_episode([s[0] for s in shots])]), atol=1e-6)
    assert torch.equal(support_mask, per_episode(masks))
    assert torch.allclose(prior, expected_prior, atol=1e-6)
    for (name, mine), theirs in zip(model.backbone.named_buffers(), reference.buffers()):
        assert torch.allclose(mine.float(), theirs.float(), atol=1e-6), name
    # one batch of all B·(K+1) images would normalise differently: the test can tell them apart
    with torch.no_grad():
        _, one_batch3 = copy.deepcopy(model.backbone).mid_level(torch.cat([query, supports.flatten(0, 1)]))
    assert not torch.allclose(one_batch3, layer3, atol=1e-3)
    # in eval mode (running statistics) one batch is used, with the same values
    model.eval()
    with torch.no_grad():
        (eval3, _), _, _ = model.backbone_features(query, supports, support_masks)
        alone = model.backbone.mid_level(supports[:, 1])[1]
    assert torch.allclose(eval3[B:].unflatten(0, (B, K))[:, 1], alone, atol=1e-5)


@pytest.mark.parametrize("layers, vgg, frozen, trainable", [
    (50, False, 23_631_808, 30_681_628), (0, True, 14_723_136, 30_288_412),
])
def test_parameter_counts_of_the_published_configurations(layers, vgg, frozen, trainable):
    """README's table (tools/measure/model_summary.py): reduce_dim 256, 4 levels, frozen backbone. The head
    is the authors' less their unused parameters (docs/method.md §9) and plus a 2-logit final conv."""
    from model import parameter_counts

    cfg = defaults()
    cfg.update(pretrained="", layers=layers or 50, vgg=vgg)
    rows = parameter_counts(build_model(cfg))
    assert (sum(r[2] for r in rows), sum(r[1] for r in rows)) == (frozen, trainable)


@pytest.mark.parametrize("elimination, has_bg, has_do", [("bg+do", True, True), ("bg", True, False),
                                                          ("do", False, True), ("none", False, False)])
def test_elimination_ablation_removes_exactly_the_switched_off_steps(elimination, has_bg, has_do):
    torch.manual_seed(0)
    model = build_model(make_cfg(layers=18, elimination=elimination))
    names = {n.split(".")[0] for n, _ in model.named_parameters()} | {n.split(".")[0] for n, _ in model.named_buffers()}
    assert ("bgmm" in names) == (has_bg or has_do)          # the DO mask needs the BG logits
    assert ("memory_bank" in names) == has_do
    for path in model.scales:
        assert (path.bg_eliminating is not None) == has_bg
        assert (path.do_eliminating is not None) == has_do
    query, supports, support_masks, query_mask, class_ids = episode(2, 1, 65)
    model.train()
    logits, losses = model(query, supports, support_masks, query_mask, class_ids)
    assert (losses["bg"].item() > 0) == (has_bg or has_do)
    assert (losses["contrast"].item() != 0) == has_do and torch.isfinite(losses["total"])
    losses["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        _, extras = model(query, supports, support_masks, return_extras=True)
    assert ("bg_logits" in extras) == (has_bg or has_do) and ("do_mask" in extras) == has_do


def test_elimination_none_is_the_full_network_with_both_fusions_bypassed():
    """The ablated network's prediction is the full one's with X_BG = q_b and X_DO = X_self."""
    torch.manual_seed(0)
    full = build_model(make_cfg(layers=18)).eval()
    ablated = build_model(make_cfg(layers=18, elimination="none")).eval()
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith(("bgmm.", "memory_bank.")) or "_eliminating." in k for k in unexpected)
    for path in full.scales:
        path.bg_eliminating.forward = lambda q, p: q
        path.do_eliminating.forward = lambda x_self, q, bg, second, *_: (x_self, torch.zeros_like(second[:, :1]))
    query, supports, support_masks, _, _ = episode(2, 1, 65)
    with torch.no_grad():
        assert torch.equal(full(query, supports, support_masks), ablated(query, supports, support_masks))


def test_elimination_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="elimination"):
        merge_cfg_from_list(defaults(), ["elimination", "bg-do"])
