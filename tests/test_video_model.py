"""The video network: the agent attention block, the image network it reduces to, the video
loss, paired and mean supports, and the reference's two optimisers."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.tasks.video import HeadAndAttentionOptimizer, video_optimizer
from engine.networks import build_model
from model import NTRENetPP
from model.losses import soft_iou_loss
from model.modules import AgentAttention, ScalePath
from model.video import VideoNTRENetPP
from util.config import defaults
from util.errors import ConfigError


def video_cfg(**overrides):
    cfg = defaults()
    cfg.update(dataset="synthetic_video", pretrained="", layers=18, reduce_dim=8, ppm_scales=[1.0, 0.5],
               shot=3, clip_len=3, contrast_weight=0.0, main_weight=5.0, iou_weight=1.0, video_bg_dim=12)
    cfg.update(overrides)
    return cfg


def clip_episode(B, T, K, H=33, W=41, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, T, 3, H, W, generator=g)
    supports = torch.randn(B, K, 3, H, W, generator=g)
    support_masks = torch.zeros(B, K, H, W, dtype=torch.long)
    support_masks[..., 8:24, 10:30] = 1
    support_masks[..., :1, :] = 255
    query_mask = torch.zeros(B, T, H, W, dtype=torch.long)
    query_mask[..., 5:20, 12:35] = 1
    return query, supports, support_masks, query_mask


def reference_agent_attention(block: AgentAttention, x, T):
    """The block written out with explicit matrices, as the reference computes it."""
    n, C, h, w = x.shape
    B = n // T
    middle = x.view(B, T, C, h, w)[:, T // 2]
    q = block.agent_query(middle).flatten(2)                                          # B×k×hw
    k = block.agent_key(x).view(B, T, -1, h * w).permute(0, 2, 1, 3).reshape(B, -1, T * h * w)
    v = block.agent_value(x).view(B, T, C, h * w).permute(0, 1, 3, 2).reshape(B, T * h * w, C)
    a = (torch.einsum("bkn,bkm->bnm", q, k) / math.sqrt(C)).softmax(-1)
    agent = middle + torch.einsum("bnm,bmc->bnc", a, v).transpose(1, 2).reshape(B, C, h, w)
    agent = agent + block.agent_mlp(agent)
    q2 = block.frame_query(x).view(B, T, -1, h * w).permute(0, 1, 3, 2).reshape(B, T * h * w, -1)
    k2 = block.frame_key(agent).flatten(2)
    v2 = block.frame_value(agent).flatten(2).transpose(1, 2)
    a2 = (torch.einsum("bnk,bkm->bnm", q2, k2) / math.sqrt(C)).softmax(-1)
    out = x + torch.einsum("bnm,bmc->bnc", a2, v2).view(B, T, h * w, C).permute(0, 1, 3, 2).reshape(n, C, h, w)
    return out + block.frame_mlp(out)


def test_agent_attention_shapes_widths_and_values():
    torch.manual_seed(0)
    block = AgentAttention(8)
    assert block.agent_query.out_channels == block.agent_key.out_channels == 4      # keys C/2
    assert block.agent_value.out_channels == block.frame_value.out_channels == 8    # values C
    x = torch.randn(2 * 3, 8, 4, 5)
    out = block(x, 3)
    assert out.shape == x.shape
    assert torch.allclose(out, reference_agent_attention(block, x, 3), atol=1e-5)
    # channels_last input: same values
    assert torch.allclose(block(x.contiguous(memory_format=torch.channels_last), 3), out, atol=1e-5)
    with pytest.raises(ValueError, match="not whole clips of 4 frames"):
        block(x, 4)


def test_attention_mixes_frames_only_within_a_clip():
    torch.manual_seed(0)
    block = AgentAttention(8).eval()
    x = torch.randn(2 * 3, 8, 4, 4)
    y = x.clone()
    y[0] += 1.0                                      # frame 0 of clip 0
    a, b = block(x, 3), block(y, 3)
    assert not torch.allclose(a[2], b[2])            # another frame of the same clip sees it
    assert torch.equal(a[3:], b[3:])                 # the other clip does not


def test_image_blocks_have_no_temporal_part_by_default():
    path = ScalePath(8, has_previous=True)
    assert path.temporal is None and path.target_matching.temporal is None
    assert not any("temporal" in k for k in build_model(video_cfg(dataset="synthetic")).state_dict())
    video = ScalePath(8, has_previous=True, prototype_channels=12, temporal=True)
    assert isinstance(video.temporal, AgentAttention) and isinstance(video.target_matching.temporal, AgentAttention)
    assert video.bg_eliminating.fuse[0].in_channels == 8 + 12


def image_equivalent_video_model(support_mode):
    """A video model without its temporal parts (attention off, ASPP on, C-wide BG prototype),
    carrying an image model's weights."""
    torch.manual_seed(0)
    image = build_model(video_cfg(dataset="synthetic", reduce_dim=8, contrast_weight=0.01)).eval()
    cfg = video_cfg(video_attention=False, video_aspp=True, video_bg_dim=8, support_mode=support_mode,
                    shot=3 if support_mode == "paired" else 2)
    video = build_model(cfg).eval()
    weights = {k: v for k, v in image.state_dict().items() if not k.startswith("memory_bank.")}
    video.load_state_dict(weights, strict=True)
    return image, video


def test_without_temporal_parts_paired_frames_are_one_shot_image_episodes():
    image, video = image_equivalent_video_model("paired")
    q, s, m, _ = clip_episode(2, 3, 3)
    with torch.no_grad():
        clip = video(q, s, m)
        assert clip.shape == (2, 3, 2, 33, 41)
        for t in range(3):          # frame t is matched with support t alone
            alone = image(q[:, t], s[:, t:t + 1], m[:, t:t + 1])
            assert torch.allclose(clip[:, t], alone, atol=1e-4), t


def test_without_temporal_parts_mean_mode_frames_are_k_shot_image_episodes():
    image, video = image_equivalent_video_model("mean")
    q, s, m, _ = clip_episode(2, 3, 2)
    with torch.no_grad():
        clip, extras = video(q, s, m, return_extras=True)
        for t in range(3):          # every frame sees the K-shot average
            logits, image_extras = image(q[:, t], s, m, return_extras=True)
            assert torch.allclose(clip[:, t], logits, atol=1e-4), t
            assert torch.allclose(extras["prior"][:, t], image_extras["prior"], atol=1e-5)
            assert torch.equal(extras["do_mask"][:, t], image_extras["do_mask"])


def test_video_model_shapes_and_reference_choices():
    torch.manual_seed(0)
    model = build_model(video_cfg())
    assert isinstance(model, VideoNTRENetPP) and model.aspp is None
    assert model.bgmm.bg_prototype.shape == (1, 12, 1, 1)
    attention = [m for m in model.modules() if isinstance(m, AgentAttention)]
    assert len(attention) == 1 + 2 * 2          # BG branch + (after BG elimination, after self merge) per scale
    q, s, m, y = clip_episode(2, 3, 3)
    logits, losses = model.train()(q, s, m, y)
    assert logits.shape == (2, 3, 2, 33, 41)
    assert set(losses) == {"main", "iou", "aux1", "aux2", "bg", "contrast", "total", "monitor/bg_mask",
                           "monitor/do_mask", "monitor/do_on_target"}
    model.eval()
    with torch.no_grad():
        out, extras = model(q, s, m, return_extras=True)
    assert out.shape == (2, 3, 2, 33, 41)
    assert extras["bg_logits"].shape == (2, 3, 2, 33, 41) and extras["prior"].shape == (2, 3, 1, 33, 41)
    assert extras["do_mask"].shape == (2, 3, 33, 41) and extras["do_mask"].dtype == torch.long


def test_video_loss_is_the_reference_formula():
    torch.manual_seed(0)
    model = build_model(video_cfg()).train()
    q, s, m, y = clip_episode(2, 3, 3)
    logits, losses = model(q, s, m, y)
    frames = logits.flatten(0, 1)
    labels = y.flatten(0, 1)
    main = sum(F.cross_entropy(frames[i:i + 1], labels[i:i + 1]) for i in range(6)) / 6
    assert losses["main"].item() == pytest.approx(main.item(), abs=1e-6)
    p = frames.softmax(1)[:, 1].view(2, 3, 33, 41)
    t = (y == 1).float()
    iou = (torch.minimum(p, t).flatten(1).sum(1) / torch.maximum(p, t).flatten(1).sum(1))
    assert losses["iou"].item() == pytest.approx((1 - iou).mean().item(), abs=1e-6)
    expected = (5 * losses["main"] + losses["iou"] + losses["bg"] + 0.4 * losses["aux1"] + 0.6 * losses["aux2"])
    assert losses["total"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert losses["contrast"].item() == 0.0
    losses["total"].backward()
    for name, param in model.named_parameters():
        if not name.startswith("backbone."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_soft_iou_loss_on_hand_made_values():
    # one clip of one frame, two pixels; margins 0 → p = 0.5 on both
    logits = torch.zeros(1, 1, 2, 1, 2)
    # target on the first pixel: inter 0.5, union max(.5,1) + max(.5,0) = 1.5 → 1 − 1/3
    assert soft_iou_loss(logits, torch.tensor([[[[1, 0]]]])).item() == pytest.approx(2 / 3)
    # the second pixel ignored: inter 0.5, union 1 → 0.5
    assert soft_iou_loss(logits, torch.tensor([[[[1, 255]]]])).item() == pytest.approx(0.5)
    # margin log(3) → p = 0.75; two clips averaged: (1 − 0.75) and (1 − 0) with y = 0 → (0.25 + 1) / 2
    logits = torch.zeros(2, 1, 2, 1, 1)
    logits[:, 0, 1] = math.log(3)
    assert soft_iou_loss(logits, torch.tensor([[[[1]]], [[[0]]]])).item() == pytest.approx(0.625)
    # a clip of ignore only counts 0
    assert soft_iou_loss(logits[:1], torch.tensor([[[[255]]]])).item() == 0.0


def test_contrast_weight_does_not_apply_to_the_video_network():
    """The video network has no contrastive term (the reference computes one but never adds it):
    the image default 0.01 leaves its total exactly as 0 does."""
    totals = []
    for weight in (0.0, 0.01):
        torch.manual_seed(0)
        model = build_model(video_cfg(contrast_weight=weight)).train()
        torch.manual_seed(1)
        _, losses = model(*clip_episode(1, 3, 3))
        totals.append(losses["total"].item())
    assert totals[0] == totals[1]


def test_paired_needs_as_many_supports_as_frames():
    with pytest.raises(ConfigError, match="'shot' \\(2\\) must equal 'clip_len' \\(3\\)"):
        build_model(video_cfg(shot=2))
    model = build_model(video_cfg()).eval()
    q, s, m, _ = clip_episode(1, 3, 2)
    with pytest.raises(ValueError, match="support_mode mean"):
        model(q, s, m)


def test_optimizer_pair_splits_steps_and_round_trips():
    torch.manual_seed(0)
    cfg = video_cfg(base_lr=0.005, attention_lr=1e-5, attention_weight_decay=5e-4)
    model = build_model(cfg).train()
    opt = video_optimizer(model, cfg)
    attention = {id(p) for m in model.modules() if isinstance(m, AgentAttention) for p in m.parameters()}
    sgd_params = [p for g in opt.sgd.param_groups for p in g["params"]]
    adam_params = [p for g in opt.adam.param_groups for p in g["params"]]
    assert {id(p) for p in adam_params} == attention
    assert not attention & {id(p) for p in sgd_params}
    assert len(sgd_params) + len(adam_params) == sum(p.requires_grad for p in model.parameters())
    assert opt.adam.param_groups[0]["weight_decay"] == 5e-4 and opt.sgd.param_groups[0]["momentum"] == 0.9
    for group in opt.param_groups:                 # what the training loop does each iteration
        group["lr"] = 0.005 * group["lr_scale"]
    assert opt.adam.param_groups[0]["lr"] == pytest.approx(1e-5)
    before = {id(p): p.detach().clone() for p in sgd_params + adam_params}
    q, s, m, y = clip_episode(1, 3, 3)
    opt.zero_grad()
    model(q, s, m, y)[1]["total"].backward()
    opt.step()
    assert not torch.equal(before[id(adam_params[0])], adam_params[0])    # both stepped
    assert not torch.equal(before[id(sgd_params[-1])], sgd_params[-1])
    again = HeadAndAttentionOptimizer([p for p in sgd_params], [p for p in adam_params], cfg)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.adam.state[adam_params[0]]["exp_avg"], opt.adam.state[adam_params[0]]["exp_avg"])
    assert len(opt.state) == len(sgd_params) + len(adam_params)


def test_bf16_autocast_gives_finite_losses_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(video_cfg()).train()
    for m in model.modules():                       # the same computation in both precisions
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    q, s, m, y = clip_episode(1, 3, 3)
    _, full = model(q, s, m, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = model(q, s, m, y)
    for name in ("main", "iou", "bg", "total"):
        assert torch.isfinite(low[name]), name
        assert abs(low[name].item() - full[name].item()) < 0.05 * max(1.0, abs(full[name].item())), name


def test_without_attention_blocks_the_pair_still_builds_and_steps():
    torch.manual_seed(0)
    cfg = video_cfg(video_attention=False)
    model = build_model(cfg).train()
    assert not any(isinstance(m, AgentAttention) for m in model.modules())
    opt = video_optimizer(model, cfg)
    q, s, m, y = clip_episode(1, 3, 3)
    before = model.merge.fuse[0].weight.detach().clone()
    opt.zero_grad()
    model(q, s, m, y)[1]["total"].backward()
    opt.step()
    assert not torch.equal(before, model.merge.fuse[0].weight)
