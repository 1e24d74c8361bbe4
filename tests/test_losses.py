"""Exact values of the pooling, prior, DO rule and every loss on hand-built inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import (LossSettings, bg_mining_loss, episode_mean, pixel_contrast_loss, pixel_negative_loss,
                          prototype_infonce, segmentation_losses, total_loss)
from model.modules import distracting_object_mask, global_masked_pooling, masked_average_pooling, prior_mask


def segmentation_loss(logits, label):
    """The loss of one logit map (the network computes several at once)."""
    return segmentation_losses([logits], label)[0]


def test_masked_average_pooling_exact():
    feature = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],
                             [[10.0, 20.0], [30.0, 40.0]]]])          # 1×2×2×2
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.5]]]])
    out = masked_average_pooling(feature, mask)
    area = 2.5 + 5e-4
    expected = torch.tensor([(1 + 3 + 2) / area, (10 + 30 + 20) / area]).view(1, 2, 1, 1)
    assert out.shape == (1, 2, 1, 1)
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)


def test_masked_average_pooling_empty_mask_is_zero():
    out = masked_average_pooling(torch.ones(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))
    assert torch.equal(out, torch.zeros(2, 3, 1, 1))


def test_global_masked_pooling_divides_by_all_pixels():
    feature = torch.arange(8.0).view(1, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = global_masked_pooling(feature, mask)
    assert torch.allclose(out.flatten(), torch.tensor([(0 + 3) / 4, (4 + 7) / 4]))


def _unit(v):
    return v / math.sqrt(sum(x * x for x in v)) if any(v) else v


def test_prior_mask_exact_one_and_two_shots():
    # query pixels (1,0), (0,1), (1,1) on a 1×3 map; D = 2 channels
    query = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    # shot 1: support pixels (1,0) and a masked-out zero pixel; shot 2: (0,1) and (0,0)
    shot1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 1, 2)
    shot2 = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).view(2, 1, 2)
    r = 1 / math.sqrt(2)
    norm = 1 / (1 + 1e-7)                     # min-max with min 0, max 1
    one = prior_mask(query, shot1.view(1, 1, 2, 1, 2), (1, 3))
    assert one.shape == (1, 1, 1, 3)
    assert torch.allclose(one.flatten(), torch.tensor([1.0, 0.0, r]) * norm, atol=1e-6)
    two = prior_mask(query, torch.stack([shot1, shot2]).view(1, 2, 2, 1, 2), (1, 3))
    # shot 2 alone gives (0, 1, r); the prior is the mean over shots
    assert torch.allclose(two.flatten(), torch.tensor([0.5, 0.5, r]) * norm, atol=1e-6)


def test_prior_mask_min_max_per_image_and_resized():
    # two episodes in one batch must be normalised independently
    query = torch.tensor([[3.0, 1.0], [1.0, 3.0]]).view(1, 2, 1, 2).repeat(2, 1, 1, 1)
    support = torch.zeros(2, 1, 2, 1, 2)
    support[0, 0, :, 0, 0] = torch.tensor([1.0, 0.0])
    support[1, 0, :, 0, 0] = torch.tensor([0.0, 1.0])
    prior = prior_mask(query, support, (1, 3))
    # episode 0: cos = (3/√10, 1/√10) → min-max (1, 0); resized to 3 wide with align_corners: (1, .5, 0)
    assert torch.allclose(prior[0].flatten(), torch.tensor([1.0, 0.5, 0.0]), atol=1e-6)
    assert torch.allclose(prior[1].flatten(), torch.tensor([0.0, 0.5, 1.0]), atol=1e-6)


def test_distracting_object_mask_rule():
    # BG logits: argmax BG (channel 1) at pixels 0 and 3
    bg_logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [5.0, -1.0], [0.0, 3.0]]).t().reshape(1, 2, 1, 4)
    target = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 1, 4)
    # (BG, not target) → 0; (not BG, target) → 0; neither → 1 (a DO); (BG and target) → relu(-1) = 0
    out = distracting_object_mask(bg_logits, target)
    assert torch.equal(out.flatten(), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    soft = distracting_object_mask(bg_logits, torch.full((1, 1, 1, 4), 0.25))
    assert torch.equal(soft.flatten(), torch.tensor([0.0, 0.75, 0.75, 0.0]))


def test_bg_mining_loss_formula():
    # two images, 1×4 pixels. Channel 1 = BG.
    logits = torch.zeros(2, 2, 1, 4)
    logits[0, 1] = torch.tensor([math.log(3), 0.0, math.log(1 / 3), math.log(3)])   # p_BG = 3/4, 1/2, 1/4, 3/4
    logits[1, 1] = math.log(3)
    labels = torch.tensor([[[1, 1, 0, 255]], [[0, 0, 255, 255]]])
    target_term0 = (-math.log(1 - 0.75) - math.log(1 - 0.5)) / (2 + 1e-5)
    bg_term0 = (-math.log(0.75) - math.log(0.5) - math.log(0.25)) / 3
    loss0 = target_term0 + 0.5 * bg_term0
    loss1 = 0 / (0 + 1e-5) + 0.5 * (-math.log(0.75))           # no target pixel
    out = bg_mining_loss(logits, labels, alpha=0.5)
    assert out.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-6)
    # alpha scales only the pull towards BG
    out2 = bg_mining_loss(logits, labels, alpha=2.0)
    assert out2.item() == pytest.approx((target_term0 + 2 * bg_term0 + 2 * -math.log(0.75)) / 2, abs=1e-6)


def test_bg_mining_loss_upsamples_logits_to_label_size():
    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.ones(1, 4, 4, dtype=torch.long)
    # uniform logits: every pixel CE = log 2 on both terms
    expected = 4 * 4 * math.log(2) / (16 + 1e-5) + 0.5 * math.log(2)
    assert bg_mining_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_segmentation_loss_is_a_per_image_mean_ignoring_255():
    logits = torch.zeros(2, 2, 1, 3)
    logits[0, 1] = torch.tensor([math.log(3), 0.0, 5.0])          # p(1) = 3/4, 1/2, ...
    logits[1, 1] = math.log(3)                                     # p(1) = 3/4 everywhere
    label = torch.tensor([[[1, 0, 255]], [[0, 0, 0]]])
    image0 = (-math.log(0.75) - math.log(0.5)) / 2
    image1 = -math.log(0.25)
    assert segmentation_loss(logits, label).item() == pytest.approx((image0 + image1) / 2, abs=1e-6)
    # an image with nothing to score contributes 0, not NaN
    assert segmentation_loss(logits[:1], torch.full((1, 1, 3), 255)).item() == 0.0


def test_losses_do_not_depend_on_how_the_batch_is_split():
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 3, 3)
    label = torch.randint(0, 2, (4, 6, 6))
    label[0, :4] = 255                                             # images with different valid areas
    for loss in (segmentation_loss, bg_mining_loss):
        whole = loss(logits, label)
        halves = (loss(logits[:2], label[:2]) + loss(logits[2:], label[2:])) / 2
        assert whole.item() == pytest.approx(halves.item(), abs=1e-6)


def test_prototype_infonce_known_bank():
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[2.0, 2.0]])                         # cos = 1/√2
    negatives = torch.tensor([[[0.0, 3.0], [-1.0, 0.0], [1.0, 0.0]]])   # cos 0, -1, (1: invalid)
    valid = torch.tensor([[True, True, False]])
    tau = 0.5
    sp = 1 / math.sqrt(2)
    expected = -math.log(math.exp(sp / tau) / (math.exp(sp / tau) + math.exp(0) + math.exp(-1 / tau)))
    out = prototype_infonce(anchor, positive, negatives, valid, tau)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_prototype_infonce_without_negatives_is_exactly_zero_with_zero_gradient():
    anchor = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    positive = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    negatives = torch.randn(2, 4, 2)
    out = prototype_infonce(anchor, positive, negatives, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2))
    out.sum().backward()
    assert torch.equal(anchor.grad, torch.zeros(2, 2))


def test_pixel_contrast_loss_exact():
    # query pixels (1,0) and (0,1), both target; shot 1: (1,0) target and (0,1) not target
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    query_on = torch.tensor([True, True]).view(1, 1, 1, 2)
    shot1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    on1 = torch.tensor([True, False]).view(1, 1, 1, 2)
    loss, valid = pixel_contrast_loss(query, query_on, shot1.unsqueeze(0), on1.unsqueeze(0))
    # pixel 1: max cos 1 → 1; pixel 2: only target support pixel has cos 0 → (0+1)/2
    expected = -(math.log(1 + 1e-8) + math.log(0.5 + 1e-8)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6) and valid.tolist() == [True]
    # a second shot whose target pixel is (0,1): the max runs over all shots' target pixels
    shot2 = torch.tensor([[0.0, 0.0], [2.0, 0.0]]).view(1, 2, 1, 2)   # pixel 0 = (0,2), pixel 1 = (0,0)
    on2 = torch.tensor([True, False]).view(1, 1, 1, 2)
    loss2, _ = pixel_contrast_loss(query, query_on, torch.stack([shot1, shot2], 1), torch.stack([on1, on2], 1))
    assert loss2.item() == pytest.approx(-math.log(1 + 1e-8), abs=1e-6)


def test_pixel_contrast_loss_only_counts_query_target_pixels_and_flags_empty_episodes():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2).repeat(2, 1, 1, 1)
    query_on = torch.tensor([[True, False], [False, False]]).view(2, 1, 1, 2)
    support = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 1, 2).repeat(2, 1, 1, 1, 1)  # pixels (0,1),(1,0)
    support_on = torch.tensor([[True, False], [True, True]]).view(2, 1, 1, 1, 2)
    loss, valid = pixel_contrast_loss(query, query_on, support, support_on)
    # episode 0: query pixel (1,0) vs support target (0,1): cos 0 → 0.5
    assert loss[0].item() == pytest.approx(-math.log(0.5 + 1e-8), abs=1e-6)
    assert loss[1].item() == 0.0
    assert valid.tolist() == [True, False]


def test_pixel_negative_loss_exact():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    query_on = torch.tensor([True, True]).view(1, 1, 1, 2)
    negatives = torch.tensor([[[1.0, 1.0], [0.0, 5.0]]])      # second one invalid
    valid = torch.tensor([[True, False]])
    neg = (1 / math.sqrt(2) + 1) / 2                           # both pixels: cos 1/√2 with (1,1)
    out = pixel_negative_loss(query, query_on, negatives, valid)
    assert out.item() == pytest.approx(-math.log(1 - neg + 1e-8), abs=1e-6)
    none = pixel_negative_loss(query, query_on, negatives, torch.zeros(1, 2, dtype=torch.bool))
    assert none.item() == 0.0


def test_episode_mean_and_total_loss_weights():
    assert episode_mean(torch.tensor([1.0, 5.0, 3.0, 4.0]), torch.tensor([True, False, True, False])).item() == 1.0
    assert episode_mean(torch.tensor([1.0]), torch.tensor([False])).item() == 0.0
    parts = {"main": torch.tensor(1.0), "bg": torch.tensor(2.0), "aux1": torch.tensor(3.0),
             "aux2": torch.tensor(4.0), "contrast": torch.tensor(5.0)}
    settings = LossSettings(aux_weight=2.0, bg_weight=1.0, aux1_weight=0.4, aux2_weight=0.6, contrast_weight=0.01)
    assert total_loss(parts, settings).item() == pytest.approx(1 + 2 * (2 + 0.4 * 3 + 0.6 * 4 + 0.01 * 5))


def test_losses_under_bf16_are_float32():
    """bf16 logits are scored in float32: the same value as the float32 copy of those logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 3, 3, generator=g).bfloat16()
    labels = torch.randint(0, 2, (2, 6, 6), generator=g)
    for loss in (bg_mining_loss, segmentation_loss):
        low, full = loss(logits, labels), loss(logits.float(), labels)
        assert low.dtype == torch.float32 and torch.allclose(low, full, rtol=1e-6, atol=0), loss.__name__


def test_pixel_contrast_gradient_equals_a_full_matrix_max():
    torch.manual_seed(0)
    query = torch.randn(2, 4, 3, 3, requires_grad=True)
    support = torch.randn(2, 2, 4, 3, 3, requires_grad=True)
    query_on = torch.rand(2, 1, 3, 3) > 0.3
    support_on = torch.rand(2, 2, 1, 3, 3) > 0.5
    loss, valid = pixel_contrast_loss(query, query_on, support, support_on)
    loss.sum().backward()
    grads = query.grad.clone(), support.grad.clone()
    query.grad = support.grad = None
    # naive: the whole similarity matrix, masked, max-reduced with autograd
    q = F.normalize(query.flatten(2).transpose(1, 2), dim=-1)                        # B×9×C
    s = F.normalize(support.flatten(3).transpose(2, 3), dim=-1).reshape(2, 18, 4)    # B×18×C
    sim = (q @ s.transpose(1, 2)).masked_fill(~support_on.reshape(2, 1, 18), -1.0)
    pos = (sim.amax(dim=2) + 1) / 2
    on = query_on.flatten(1).float()
    naive = -(torch.log(pos + 1e-8) * on).sum(1) / on.sum(1).clamp_min(1)
    naive.sum().backward()
    assert torch.allclose(loss, naive, atol=1e-6) and valid.all()
    assert torch.allclose(grads[0], query.grad, atol=1e-6)
    assert torch.allclose(grads[1], support.grad, atol=1e-6)


# ---- the grouped margin form equals cross-entropy on upsampled logits (the form it replaced) ----
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
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 2, (3, 41, 41), generator=g)
    label[:, 18:21] = 255                                            # an ignored band
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
