"""model/base.py with stand-in parts (milliseconds): the frozen backbone and fix_bn in every mode
switch, the pyramid bins, the training/evaluation contract, and the pyramid's wiring — which
input each scale path gets, what it passes on, and how the merge is resized. The real networks
are in tests/test_model.py."""
import pytest
import torch
import torch.nn.functional as F

from model.base import BackboneNetwork


def tiny_backbone():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


class Head(BackboneNetwork):
    """A backbone and a head added after the base class's constructor ran."""

    def __init__(self, freeze=True, fix_bn=True, scales=(1.0, 0.5)):
        super().__init__(tiny_backbone(), scales, freeze, fix_bn)
        self.head = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))


def test_fix_bn_keeps_the_backbone_in_eval_mode_through_every_switch():
    net = Head()
    assert net.training and not net.backbone.training and net.head.training      # right after construction
    before = net.backbone[1].running_mean.clone()
    net.head(net.backbone(torch.randn(2, 3, 4, 4)))
    assert torch.equal(net.backbone[1].running_mean, before)                      # statistics fixed
    assert net.train() is net and not net.backbone.training and net.head.training
    net.eval()
    assert not net.training and not net.backbone.training and not net.head.training
    net.train(False)
    assert not net.head.training
    net.train(True)
    assert net.head.training and not net.backbone.training


def test_without_fix_bn_the_backbone_follows_the_network():
    net = Head(fix_bn=False)
    assert net.training and net.backbone.training
    net.eval()
    assert not net.backbone.training
    net.train()
    assert net.backbone.training


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_backbone_stops_its_gradients_only(freeze):
    net = Head(freeze=freeze)
    assert net.freeze_backbone is freeze and net.fix_bn is True
    assert all(p.requires_grad is not freeze for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    net.head(net.backbone(torch.randn(2, 3, 4, 4))).sum().backward()
    assert all((p.grad is None) is freeze for p in net.backbone.parameters())


def test_bins_follow_the_scales():
    net = Head(scales=[1.0, 0.5, 0.25, 0.125])
    assert net.ppm_scales == (1.0, 0.5, 0.25, 0.125)
    assert net.bin_sizes(60) == [60, 30, 15, 7] and net.bin_sizes(5) == [5, 2, 1, 1]
    assert Head(scales=[60, 30, 8]).bin_sizes(5) == [60, 30, 8]
    with pytest.raises(ValueError) as e:
        Head(scales=[])
    assert str(e.value) == "ppm_scales is empty; e.g. [60, 30, 15, 8] or [1.0, 0.5, 0.25, 0.125]"


def test_the_training_contract():
    net = Head()
    with pytest.raises(ValueError) as e:
        net._check_mode(None, False, "B×H×W")
    assert str(e.value) == "training needs query_mask (B×H×W) for the losses"
    with pytest.raises(ValueError) as e:
        net._check_mode(torch.zeros(1), True, "B×H×W")
    assert str(e.value) == "return_extras is for evaluation; call model.eval() first"
    net._check_mode(torch.zeros(1), False, "B×H×W")
    net.eval()
    net._check_mode(None, True, "B×H×W")                                           # evaluation: both fine


def test_the_input_format_is_the_backbones():
    net = Head()
    assert net._input_format() == torch.contiguous_format
    net.backbone.to(memory_format=torch.channels_last)
    assert net._input_format() == torch.channels_last


class Path(torch.nn.Module):
    """A scale path that records its inputs and returns its pooled query plus the previous scale's
    output resized to it (so the chaining shows in the result)."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, x, bg_prototype, prototype, prior, bg_logits, previous, frames=None, label_target_bin=None):
        self.log.append({"x": x, "bg": bg_prototype, "proto": prototype, "prior": prior, "bg_logits": bg_logits,
                         "previous": previous, "frames": frames})
        out = x + (0 if previous is None else F.interpolate(previous, size=x.shape[-2:], mode="bilinear",
                                                             align_corners=True))
        return out, {"size": x.shape[-1]}


class Pyramid(BackboneNetwork):
    def __init__(self, scales):
        super().__init__(tiny_backbone(), scales, True, True)
        self.log = []
        self.scales = torch.nn.ModuleList([Path(self.log) for _ in scales])
        self.merge = lambda features: torch.cat(features, 1)
        self.bgmm = torch.nn.Module()
        self.bgmm.bg_prototype = torch.full((1, 2, 1, 1), 7.0)


def test_the_pyramid_wires_each_scale_and_merges_at_the_image_size():
    """A 4×6 query: the bins follow its height (1.0 -> 4, 0.5 -> 2), each scale pools the query to
    its bin, gets the prior and BG logits resized to it and the previous scale's output."""
    net = Pyramid([1.0, 0.5])
    query = torch.arange(2 * 2 * 4 * 6, dtype=torch.float32).view(2, 2, 4, 6)
    prototype = torch.ones(2, 2, 1, 1)
    prior = torch.rand(2, 1, 4, 6, dtype=torch.float64)
    bg_logits = torch.rand(2, 2, 4, 6)
    logits, outputs = net.pyramid(query, prototype, prior, bg_logits, (8, 6), frames=3)
    first, second = net.log

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    x1, x2 = F.adaptive_avg_pool2d(query, 4), F.avg_pool2d(query, (2, 3))
    assert torch.equal(first["x"], x1) and first["previous"] is None
    assert torch.equal(second["x"], x2)
    assert first["bg"] is net.bgmm.bg_prototype and second["proto"] is prototype
    assert first["prior"].dtype == torch.float32                                     # the query's dtype
    assert torch.allclose(second["prior"], up(prior.float(), (2, 2)))
    assert torch.allclose(first["bg_logits"], up(bg_logits, (4, 4)))
    assert torch.allclose(second["bg_logits"], up(bg_logits, (2, 2)))
    level1 = up(x1, (4, 6))                                                          # back at h×w
    assert torch.allclose(second["previous"], level1)                                # the first scale's output
    assert first["frames"] == second["frames"] == 3
    assert outputs == [{"size": 4}, {"size": 2}]
    merged = torch.cat([level1, up(x2 + up(level1, (2, 2)), (4, 6))], 1)            # every level at h×w
    assert logits.shape == (2, 4, 8, 6)
    assert torch.allclose(logits, up(merged, (8, 6)))
