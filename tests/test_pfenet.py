"""PFENet (model/pfenet.py): the forward contract, the K-shot rule, the losses against values
derived by hand, the frozen backbone and PFENet's separate BatchNorm passes, the prior, the
layout of every block and dropout, and its construction from a config."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from model.backbone import build_backbone
from model.modules import masked_average_pooling, prior_mask
from model.ops import resize
from model.pfenet import PFENet, build_pfenet
from util.config import defaults

FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def tiny(seed=0, **kwargs):
    """A quarter-width ResNet-18 under a reduce_dim 8 head: small enough for a 2-core CPU."""
    torch.manual_seed(seed)
    kwargs.setdefault("reduce_dim", 8)
    kwargs.setdefault("ppm_scales", FRACTIONS)
    return PFENet(build_backbone(18, False, True, 0.25), **kwargs)


def episode(B, K, size, seed=0):
    """Random images; support masks with a target square and an ignored band; a query label
    with target, background and ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, 3, size, size, generator=g)
    supports = torch.randn(B, K, 3, size, size, generator=g)
    support_masks = torch.zeros(B, K, size, size, dtype=torch.long)
    support_masks[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    support_masks[..., :3, :] = 255
    query_mask = torch.zeros(B, size, size, dtype=torch.long)
    query_mask[:, size // 3:, size // 3:] = 1
    query_mask[:, -2:, :] = 255
    return query, supports, support_masks, query_mask


def without_dropout(model):
    """Training mode (losses, fix_bn) with every dropout off, for values a test can recompute."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.eval()
    return model


@pytest.mark.parametrize("vgg", [False, True])
def test_output_shapes_in_training_and_evaluation(vgg):
    torch.manual_seed(0)
    backbone = build_backbone(50, True, True) if vgg else build_backbone(18, False, True, 0.25)
    model = PFENet(backbone, reduce_dim=8, ppm_scales=(60, 30, 15, 8) if vgg else FRACTIONS)
    query, supports, support_masks, query_mask = episode(2, 2, 33)
    logits, losses = model(query, supports, support_masks, query_mask)
    assert logits.shape == (2, 2, 33, 33)
    assert set(losses) == {"main", "aux", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(query[:, :, :25, :31], supports[..., :25, :31], support_masks[..., :25, :31])
    assert out.shape == (2, 2, 25, 31)          # any input size, not only (H - 1) % 8 == 0


def test_a_model_trained_at_one_shot_runs_at_five():
    model = tiny()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    query, supports, support_masks, query_mask = episode(2, 1, 33)
    _, losses = model(query, supports, support_masks, query_mask)
    losses["total"].backward()
    optimizer.step()
    model.eval()
    query, supports, support_masks, _ = episode(2, 5, 33, seed=1)
    with torch.no_grad():
        assert model(query, supports, support_masks).shape == (2, 2, 33, 33)


def test_k_shots_average_the_prototypes_and_the_priors():
    """PFENet's K-shot rule, recomputed from each shot alone: the FEM sees the mean of the K
    prototypes and the mean of the K priors."""
    model = tiny().eval()
    query, supports, support_masks, _ = episode(2, 3, 33, seed=2)
    support_masks[1, 2] = 0                  # an empty shot counts: a zero prototype and a zero prior
    support_masks[0, 1, :16] = 1
    with torch.no_grad():
        five, extras = model(query, supports, support_masks, return_extras=True)
        prototypes, priors = [], []
        for k in range(3):
            (layer3, layer2), prior, mask = model.backbone_features(query, supports[:, k:k + 1],
                                                                    support_masks[:, k:k + 1])
            conv, relu, _ = model.down_supp
            x_support = relu(conv(torch.cat([layer3[2:], layer2[2:]], dim=1)))
            prototypes.append(masked_average_pooling(x_support, mask))
            priors.append(prior)
        x_query = model.down_query[1](model.down_query[0](torch.cat([layer3[:2], layer2[:2]], dim=1)))
        logits, _ = model.enrich(x_query, sum(prototypes) / 3, sum(priors) / 3)
    assert torch.allclose(five, resize(logits, (33, 33)), atol=1e-5)
    assert torch.allclose(extras["prior"], resize(sum(priors) / 3, (33, 33)), atol=1e-6)
    # three copies of one shot are that shot
    with torch.no_grad():
        one = model(query, supports[:, :1], support_masks[:, :1])
        copies = model(query, supports[:, :1].repeat(1, 3, 1, 1, 1), support_masks[:, :1].repeat(1, 3, 1, 1))
    assert torch.allclose(one, copies, atol=1e-5)


def test_episodes_of_a_batch_are_independent():
    model = tiny().eval()
    query, supports, support_masks, _ = episode(3, 2, 33, seed=3)
    support_masks[2] = 0
    with torch.no_grad():
        batched = model(query, supports, support_masks)
        for b in range(3):
            assert torch.allclose(batched[b:b + 1], model(query[b:b + 1], supports[b:b + 1], support_masks[b:b + 1]),
                                  atol=1e-5)


def test_losses_are_the_values_derived_by_hand():
    """Final head: zero weights, biases (0, ln 3) → p(target) = 3/4 everywhere, so a target pixel
    costs ln(4/3) and a background pixel ln 4; auxiliary heads: zero → ln 2 per pixel. Each
    episode is averaged over its non-ignored pixels, then episodes are averaged (an all-ignored
    episode adds 0); total = main + aux_weight · mean of the bins' auxiliary losses."""
    model = without_dropout(tiny(aux_weight=0.7))
    with torch.no_grad():
        model.cls[3].weight.zero_()
        model.cls[3].bias.copy_(torch.tensor([0.0, math.log(3.0)]))
        for head in model.inner_cls:
            head[3].weight.zero_()
            head[3].bias.zero_()
    query, supports, support_masks, _ = episode(3, 1, 33)
    label = torch.full((3, 33, 33), 255, dtype=torch.long)
    label[0, :10] = 1                 # 330 target pixels
    label[0, 10:30] = 0               # 660 background pixels
    label[1] = 1                      # all target
    logits, losses = model(query, supports, support_masks, label)
    episode0 = (330 * math.log(4 / 3) + 660 * math.log(4)) / 990
    main = (episode0 + math.log(4 / 3) + 0.0) / 3
    aux = 2 * math.log(2) / 3         # ln 2 per valid pixel in two of three episodes
    assert losses["main"].item() == pytest.approx(main, abs=1e-6)
    assert losses["aux"].item() == pytest.approx(aux, abs=1e-6)
    assert losses["total"].item() == pytest.approx(main + 0.7 * aux, abs=1e-6)


def test_losses_against_cross_entropy_computed_independently():
    model = without_dropout(tiny(aux_weight=0.4, ppm_scales=(8, 4, 2)))
    query, supports, support_masks, query_mask = episode(2, 2, 33, seed=4)
    logits, losses = model(query, supports, support_masks, query_mask)
    with torch.no_grad():
        (layer3, layer2), prior, mask = model.backbone_features(query, supports, support_masks)
        x_support = model.down_supp[1](model.down_supp[0](torch.cat([layer3[2:], layer2[2:]], 1)))
        prototype = masked_average_pooling(x_support, mask)
        x_query = model.down_query[1](model.down_query[0](torch.cat([layer3[:2], layer2[:2]], 1)))
        _, aux_logits = model.enrich(x_query, prototype.unflatten(0, (2, 2)).mean(1), prior)

    def ce(map_):
        up = F.interpolate(map_, size=(33, 33), mode="bilinear", align_corners=True)
        return sum(F.cross_entropy(up[b:b + 1], query_mask[b:b + 1], ignore_index=255) for b in range(2)) / 2

    assert len(aux_logits) == 3 and [a.shape[-1] for a in aux_logits] == [8, 4, 2]
    main, aux = ce(logits).item(), sum(ce(a) for a in aux_logits).item() / 3
    assert losses["main"].item() == pytest.approx(main, abs=1e-5)
    assert losses["aux"].item() == pytest.approx(aux, abs=1e-5)
    assert losses["total"].item() == pytest.approx(main + 0.4 * aux, abs=1e-5)


def test_ignore_pixels_are_neither_loss_nor_support_target():
    model = without_dropout(tiny())
    query, supports, support_masks, query_mask = episode(2, 2, 33, seed=5)
    # a support pixel labelled 255 is not target: the same as 0
    zeros = support_masks.clone()
    zeros[zeros == 255] = 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(query, supports, support_masks), model(query, supports, zeros))
    without_dropout(model)
    # a query pixel labelled 255 adds nothing: the loss equals the loss on the valid pixels alone
    logits, losses = model(query, supports, support_masks, query_mask)
    flipped = query_mask.clone()
    flipped[query_mask == 255] = 1
    _, other = model(query, supports, support_masks, flipped)
    assert other["main"].item() != pytest.approx(losses["main"].item(), abs=1e-6)
    per_episode = [F.cross_entropy(logits[b:b + 1], query_mask[b:b + 1], ignore_index=255) for b in range(2)]
    assert losses["main"].item() == pytest.approx(sum(per_episode).item() / 2, abs=1e-6)


def test_frozen_backbone_gets_no_gradient_and_keeps_its_statistics():
    model = tiny()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    query, supports, support_masks, query_mask = episode(2, 2, 33)
    _, losses = model(query, supports, support_masks, query_mask)
    losses["total"].backward()
    optimizer.step()
    assert model.training and not model.backbone.training        # fix_bn: backbone BN stays in eval
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    for name, p in model.named_parameters():    # every head parameter is used and learns
        if not name.startswith("backbone."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_trainable_backbone_gets_gradient():
    model = tiny(freeze_backbone=False)
    query, supports, support_masks, query_mask = episode(1, 1, 33)
    model(query, supports, support_masks, query_mask)[1]["total"].backward()
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert model.backbone.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_fix_bn_false_makes_pfenets_separate_passes():
    """Train-mode BatchNorm normalises with its batch: PFENet passes the query images, then
    each shot's images, alone (and layer4 likewise), so running statistics and features must
    be those of these passes."""
    model = tiny(fix_bn=False).train()
    reference = copy.deepcopy(model.backbone).train()
    B, K = 2, 2
    query, supports, support_masks, _ = episode(B, K, 33, seed=6)
    with torch.no_grad():
        (layer3, layer2), prior, _ = model.backbone_features(query, supports, support_masks)
        q2, q3 = reference.mid_level(query)
        q4 = reference.high_level(q3)
        shots = [reference.mid_level(supports[:, k]) for k in range(K)]
        masks = [resize((support_masks[:, k] == 1).unsqueeze(1).float(), q3.shape[-2:]) for k in range(K)]
        s4 = torch.stack([reference.high_level(shots[k][1] * masks[k]) * masks[k] for k in range(K)], dim=1)
        expected = prior_mask(q4, s4, q3.shape[-2:])
    assert model.backbone.training
    assert torch.allclose(layer3[:B], q3, atol=1e-6)
    assert torch.allclose(layer3[B:].unflatten(0, (B, K))[:, 1], shots[1][1], atol=1e-6)
    assert torch.allclose(layer2[B:].unflatten(0, (B, K))[:, 0], shots[0][0], atol=1e-6)
    assert torch.allclose(prior, expected, atol=1e-6)
    for (name, mine), theirs in zip(model.backbone.named_buffers(), reference.buffers()):
        assert torch.allclose(mine.float(), theirs.float(), atol=1e-6), name


def test_eval_extras_and_the_contract_errors():
    model = tiny().eval()
    query, supports, support_masks, query_mask = episode(2, 2, 33)
    with torch.no_grad():
        logits, extras = model(query, supports, support_masks, return_extras=True)
        assert torch.equal(logits, model(query, supports, support_masks))
    assert set(extras) == {"prior"} and extras["prior"].shape == (2, 1, 33, 33)
    assert extras["prior"].min() >= 0 and extras["prior"].max() <= 1
    model.train()
    with pytest.raises(ValueError, match="query_mask"):
        model(query, supports, support_masks)
    with pytest.raises(ValueError, match="return_extras is for evaluation"):
        model(query, supports, support_masks, query_mask, return_extras=True)
    with pytest.raises(ValueError, match="B×K×3×H×W"):
        model(query, supports[:, 0], support_masks, query_mask)


def test_an_empty_support_mask_gives_a_zero_prior_and_a_zero_prototype():
    """Nothing to match: every masked support feature is 0, so every cosine is 0 and the
    min-max normalised prior is 0/(0 + 1e-7) = 0; the masked average is 0/(0 + 5e-4) = 0."""
    model = tiny().eval()
    query, supports, support_masks, _ = episode(1, 2, 33)
    support_masks.zero_()
    with torch.no_grad():
        _, extras = model(query, supports, support_masks, return_extras=True)
        (layer3, layer2), _, mask = model.backbone_features(query, supports, support_masks)
    assert torch.equal(extras["prior"], torch.zeros(1, 1, 33, 33))
    assert torch.equal(mask, torch.zeros_like(mask))


def test_blocks_bins_and_dropouts_are_pfenets():
    model = tiny(ppm_scales=(60, 30, 15, 8))
    C = 8
    assert len(model.init_merge) == len(model.beta_conv) == len(model.inner_cls) == 4 and len(model.alpha_conv) == 3
    assert model.init_merge[0][0].weight.shape == (C, 2 * C + 1, 1, 1) and model.init_merge[0][0].bias is None
    assert model.alpha_conv[0][0].weight.shape == (C, 2 * C, 1, 1)
    assert model.res1[0].weight.shape == (C, 4 * C, 1, 1)
    assert model.cls[3].weight.shape == (2, C, 1, 1) and model.cls[3].bias is not None
    assert model.down_query[0].weight.shape == (C, 64 + 32, 1, 1)    # layer3 + layer2 of the tiny ResNet-18
    dropouts = [(name, type(m).__name__, m.p) for name, m in model.named_modules()
                if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]
    assert dropouts == ([("down_query.2", "Dropout2d", 0.5), ("down_supp.2", "Dropout2d", 0.5)]
                        + [(f"inner_cls.{i}.2", "Dropout2d", 0.1) for i in range(4)] + [("cls.2", "Dropout2d", 0.1)])
    assert model.bin_sizes(60) == [60, 30, 15, 8] and model.bin_sizes(5) == [60, 30, 15, 8]
    assert tiny().bin_sizes(81) == [81, 40, 20, 10] and tiny().bin_sizes(5) == [5, 2, 1, 1]


@pytest.mark.parametrize("vgg, trainable", [(False, 10_817_034), (True, 10_423_818)])
def test_parameter_counts_are_pfenets_10_8m(vgg, trainable):
    """C = 256, four bins: the reductions 2·F·256 (F = 1536 for ResNet-50, 768 for VGG), init_merge
    4·513·256, alpha_conv 3·512·256, beta_conv 4·2·9·256², inner_cls 4·590,338, res1 1024·256,
    res2 2·9·256², cls 590,338: the 10.8M learnable parameters cited for PFENet (ResNet-50)."""
    torch.manual_seed(0)
    model = PFENet(build_backbone(50, vgg, True))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_bad_arguments_are_value_errors_naming_the_argument():
    for kwargs, name in [({"ppm_scales": ()}, "ppm_scales"), ({"ppm_scales": (60, 0)}, "ppm_scales"),
                         ({"reduce_dim": 0}, "reduce_dim"), ({"aux_weight": -1.0}, "aux_weight"),
                         ({"aux_weight": float("nan")}, "aux_weight"), ({"ignore_label": 2.5}, "ignore_label")]:
        with pytest.raises(ValueError, match=name) as error:
            tiny(**kwargs)
        assert type(error.value) is ValueError


def test_build_pfenet_reads_its_config_keys_and_loads_the_backbone_file(tmp_path):
    torch.manual_seed(1)
    weights = build_backbone(18, False, True, 0.25).state_dict()
    torch.save(weights, tmp_path / "backbone.pth")
    cfg = defaults()
    cfg.update(arch="pfenet", layers=18, backbone_width=0.25, pretrained=str(tmp_path / "backbone.pth"),
               reduce_dim=8, ppm_scales=[8, 4], aux_weight=0.25, ignore_label=254, fix_bn=False,
               freeze_backbone=False)
    model = build_pfenet(cfg)
    assert isinstance(model, PFENet) and len(model.inner_cls) == 2 and model.down_query[0].out_channels == 8
    assert (model.aux_weight, model.ignore_label, model.fix_bn, model.freeze_backbone) == (0.25, 254, False, False)
    assert all(torch.equal(v, weights[k]) for k, v in model.backbone.state_dict().items())


def test_channels_last_changes_no_prediction_and_bf16_autocast_trains():
    """The engine lays the network out channels_last on the CPU and may train under autocast."""
    plain = tiny().eval()
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    inputs = episode(2, 2, 33)[:3]                                   # plain NCHW tensors
    with torch.no_grad():
        assert torch.allclose(fast(*inputs), plain(*inputs), atol=1e-5)
    model = tiny()
    query, supports, support_masks, query_mask = episode(2, 2, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, losses = model(query, supports, support_masks, query_mask)
    assert logits.shape == (2, 2, 33, 33)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert model.cls[3].weight.grad is not None
