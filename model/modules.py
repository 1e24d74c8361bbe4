"""The building blocks of NTRENet++ (docs/method.md §2–§5), each named as in the method's figure.

Shapes: ``B`` episodes, ``K`` shots, ``C`` reduced channels, ``h×w`` feature size,
``b×b`` one pyramid bin. Masks are float maps in [0, 1] with one channel.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import ConfigError

from .ops import conv1x1_relu, fuse_concat, fuse_concat_weight, fuse_relu, resize, spatial_sum

MAP_EPS = 5e-4      # PFENet's Weighted_GAP
COSINE_EPS = 1e-7   # PFENet's prior mask


def masked_average_pooling(feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``MAP(X, m) = Σ X·m / (Σ m + 5e-4)``: N×C×h×w, N×1×h×w → N×C×1×1."""
    return spatial_sum(feature, mask) / (mask.sum(dim=(2, 3), keepdim=True) + MAP_EPS)


def global_masked_pooling(feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's DO pooling: ``Σ X·m / (h·w)`` (the mask area is not used)."""
    return spatial_sum(feature, mask) / (feature.shape[2] * feature.shape[3])


def prior_mask(query_high: torch.Tensor, support_high: torch.Tensor, size) -> torch.Tensor:
    """PFENet's training-free prior, all shots at once.

    ``query_high``: B×D×h'×w' query layer4; ``support_high``: B×K×D×h'×w' masked support
    layer4 (non-target pixels are zero). For every query pixel, the max cosine similarity
    to any support pixel, min–max normalised per image and shot, resized to ``size`` and
    averaged over shots → B×1×h×w.
    """
    B, K, D = support_high.shape[:3]
    hq, wq = query_high.shape[-2:]
    query = query_high.flatten(2)                                   # B×D×M
    support = support_high.flatten(3).transpose(2, 3).reshape(B, -1, D)   # B×KN×D
    # unit vectors on both sides, so the products stay within [-1, 1] in any autocast dtype
    # (fp16 included); a multiply by the reciprocal norm is a cheaper pass than a broadcast divide
    query = query * (query.norm(dim=1, keepdim=True) + COSINE_EPS).reciprocal()
    support = support * (support.norm(dim=2, keepdim=True) + COSINE_EPS).reciprocal()
    # one bmm for all shots; the query is shared, so it is never copied per shot
    similarity = torch.bmm(support, query).view(B, K, -1, hq * wq)   # B×K×N×M
    # the N×M products may run in low precision; the reduced map is normalised in fp32
    best = similarity.amax(dim=2).float()                            # B×K×M
    low = best.amin(dim=2, keepdim=True)
    high = best.amax(dim=2, keepdim=True)
    best = (best - low) / (high - low + COSINE_EPS)
    prior = resize(best.view(B * K, 1, hq, wq), size)
    return prior.view(B, K, 1, *prior.shape[-2:]).mean(dim=1)


def distracting_object_mask(bg_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``M_DO = relu(1 − argmax(BG logits) − target)``: pixels that are neither BG nor target.

    ``bg_logits``: N×2×h×w (channel 1 = BG); ``target``: N×1×h×w in [0, 1] → N×1×h×w.
    """
    is_bg = bg_logits.argmax(dim=1, keepdim=True).to(target.dtype)
    return torch.relu(1 - is_bg - target)


def init_pass_through(fusion: nn.Sequential) -> None:
    """Initialise a prototype fusion ``ReLU(conv1×1(concat(X, expand(P))))`` (C + Cp → C) to pass
    its feature map through: the feature half of the weight the identity, the prototype half
    zero. On a non-negative X (every fused map here leaves a ReLU) the block then starts as the
    identity, the network without that elimination step, and learns the prototype's share."""
    weight = fusion[0].weight
    channels = weight.shape[0]
    with torch.no_grad():
        weight.zero_()
        weight[:, :channels, 0, 0] = torch.eye(channels, dtype=weight.dtype)


class ResidualBlock(nn.Module):
    """PFENet's ``x + (3×3 conv, ReLU, 3×3 conv, ReLU)(x)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True))

    def forward(self, x):
        return x + self.body(x)


class SegmentationHead(nn.Module):
    """3×3 conv, ReLU, Dropout2d(0.1), 1×1 → ``classes`` logits (every prediction head)."""

    def __init__(self, channels: int, classes: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True),
            nn.Dropout2d(0.1), nn.Conv2d(channels, classes, 1))

    def forward(self, x):
        return self.body(x)


class Reduce(nn.Sequential):
    """``down_query`` / ``down_supp``: 1×1 conv (no bias), ReLU, Dropout2d(0.5).

    Called with a list of maps it reduces their channel concatenation (``F = concat(layer3,
    layer2)``) without building it (:func:`fuse_concat`).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))

    def forward(self, x):
        conv, relu, dropout = self
        return dropout(relu(fuse_concat(conv, x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling on the query (new in NTRENet++).

    Five branches — global pooling + 1×1, 1×1, and 3×3 at each dilation, each conv with a
    bias, then ReLU and Dropout2d(0.5) — concatenated (5C) and fused by a 1×1 conv without
    bias to C, then ReLU and Dropout2d(0.5), as in the authors' code.
    """

    def __init__(self, channels: int, dilations=(6, 12, 18)):
        super().__init__()

        def branch(kernel, dilation=1):
            return nn.Sequential(
                nn.Conv2d(channels, channels, kernel, padding=dilation if kernel == 3 else 0, dilation=dilation),
                nn.ReLU(inplace=True), nn.Dropout2d(0.5))

        self.image_pool = branch(1)
        self.pointwise = branch(1)
        self.atrous = nn.ModuleList(branch(3, d) for d in dilations)
        self.fuse = nn.Sequential(nn.Conv2d(channels * (2 + len(dilations)), channels, 1, bias=False),
                                  nn.ReLU(inplace=True), nn.Dropout2d(0.5))

    def forward(self, x):
        pooled = self.image_pool(spatial_sum(x) / (x.shape[2] * x.shape[3]))   # mean: N×C×1×1
        branches = [self.pointwise(x)] + [conv(x) for conv in self.atrous]
        # fuse(concat(expand(pooled), branches)) without the concatenation: the pooled branch is
        # constant over the image, so its share of the 1×1 convolution is a per-image bias
        conv, relu, dropout = self.fuse
        return dropout(relu(fuse_concat_weight(conv.weight, conv.bias, branches, [pooled], prototypes_first=True)))


class AgentAttention(nn.Module):
    """Cross-frame "agent" attention of the video model (DANet's, as clip-NTRENet++ uses it).

    ``forward(x, frames)`` with ``x`` (B·T)×C×h×w, the T frames of each clip consecutive:

    1. the middle frame (index T//2) is the agent: its positions query the keys and values of
       all T·h·w positions of its clip (1×1 convs: keys and queries C → C/2, values C → C),
       ``agent = x_mid + attention``, then ``agent = agent + MLP(agent)``;
    2. every frame's positions query the agent's keys and values (a second set of 1×1
       convs), ``out = x + attention``, then ``out = out + MLP(out)``.

    Softmax over the keys with the logits scaled by 1/√C (C the input channels, as the
    reference does, not the key width). MLP = 1×1 conv, ReLU, 1×1 conv (with biases).
    No normalisation layer. Shape in = shape out.
    """

    def __init__(self, channels: int, key_channels: int | None = None):
        super().__init__()
        key = key_channels or channels // 2

        def mlp():
            return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, channels, 1))

        self.agent_query = nn.Conv2d(channels, key, 1)
        self.agent_key = nn.Conv2d(channels, key, 1)
        self.agent_value = nn.Conv2d(channels, channels, 1)
        self.agent_mlp = mlp()
        self.frame_query = nn.Conv2d(channels, key, 1)
        self.frame_key = nn.Conv2d(channels, key, 1)
        self.frame_value = nn.Conv2d(channels, channels, 1)
        self.frame_mlp = mlp()

    @staticmethod
    def _tokens(x: torch.Tensor, clips: int) -> torch.Tensor:
        """(clips·T)×D×h×w → clips×(T·h·w)×D (frame-major, then row-major positions)."""
        n, d = x.shape[:2]
        return x.reshape(clips, n // clips, d, -1).permute(0, 1, 3, 2).reshape(clips, -1, d)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        n, c, h, w = x.shape
        if frames < 1 or n % frames:
            raise ValueError(f"AgentAttention: {n} feature maps are not whole clips of {frames} frames")
        clips = n // frames
        scale = 1.0 / math.sqrt(c)
        middle = x.unflatten(0, (clips, frames))[:, frames // 2]                    # B×C×h×w
        attended = F.scaled_dot_product_attention(
            self._tokens(self.agent_query(middle), clips), self._tokens(self.agent_key(x), clips),
            self._tokens(self.agent_value(x), clips), scale=scale)                   # B×hw×C
        agent = middle + attended.transpose(1, 2).reshape(clips, c, h, w)
        agent = agent + self.agent_mlp(agent)
        attended = F.scaled_dot_product_attention(
            self._tokens(self.frame_query(x), clips), self._tokens(self.frame_key(agent), clips),
            self._tokens(self.frame_value(agent), clips), scale=scale)               # B×(T·hw)×C
        out = x + attended.reshape(clips, frames, h * w, c).permute(0, 1, 3, 2).reshape(n, c, h, w)
        return out + self.frame_mlp(out)


def mix_frames(attention: AgentAttention | None, x: torch.Tensor, frames: int | None) -> torch.Tensor:
    """``attention(x, frames)``, or ``x`` itself where the block has no temporal part (the
    image network)."""
    if attention is None:
        return x
    if frames is None:
        raise ValueError("a block with cross-frame attention needs frames=T (clip length)")
    return attention(x, frames)


class BGMiningModule(nn.Module):
    """BGMM: a learnable, episode-independent BG prototype and the BG branch.

    ``forward(X)`` → BG logits (N×2×h×w, channel 1 = BG) for any stack of feature maps
    (the query; in training also every support).

    Video model only: ``prototype_channels`` (the reference's 512-d BG prototype; default C)
    and ``temporal`` (cross-frame :class:`AgentAttention` after the fusion, ``forward(X,
    frames=T)``). With the defaults the block is the image network's.
    """

    def __init__(self, channels: int, classes: int = 2, prototype_channels: int | None = None,
                 temporal: bool = False):
        super().__init__()
        prototype_channels = prototype_channels or channels
        self.bg_prototype = nn.Parameter(torch.zeros(1, prototype_channels, 1, 1))
        self.fuse = nn.Sequential(nn.Conv2d(channels + prototype_channels, channels, 1, bias=False),
                                  nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.temporal = AgentAttention(channels) if temporal else None
        self.residual = ResidualBlock(channels)
        self.head = SegmentationHead(channels, classes)

    def forward(self, x, frames: int | None = None):
        conv, relu, dropout = self.fuse     # fuse = 1×1 on concat(X, expand(P_BG)), ReLU, Dropout2d
        x = dropout(relu(fuse_concat(conv, x, [self.bg_prototype])))
        x = mix_frames(self.temporal, x, frames)
        return self.head(self.residual(x))


class BGEliminating(nn.Module):
    """``X_BG = ReLU(conv1×1(concat(q_b, P_BG)))``: removes the BG from the query at one bin."""

    def __init__(self, channels: int, prototype_channels: int | None = None):
        super().__init__()
        self.fuse = conv1x1_relu(channels + (prototype_channels or channels), channels)

    def forward(self, query_bin, bg_prototype):
        return fuse_relu(self.fuse, query_bin, [bg_prototype])


PROTOTYPE_POOLS = {"gap": global_masked_pooling, "map": masked_average_pooling}


def prototype_pool(pool: str, key: str):
    """The pooling a config key names: 'gap' (``Σ X·m / (h·w)``, the authors') or 'map'
    (``Σ X·m / (Σ m + 5e-4)``)."""
    if pool not in PROTOTYPE_POOLS:
        raise ConfigError(f"config key '{key}' is {pool!r}; expected 'gap' or 'map'")
    return PROTOTYPE_POOLS[pool]


class TargetMatching(nn.Module):
    """Matches the support prototype (→ initial prediction), then the query's own one.

    ``forward(X_BG, P_s, prior_b, q_b)`` → ``(X_self, init_logits, second_logits)``. The query
    self-prototype ``P_q`` pools ``q_b`` over the initial prediction's foreground:
    ``self_proto_pool`` 'gap' (default, the authors' code) divides by b·b, so ``P_q`` scales with
    the predicted foreground fraction; 'map' divides by the foreground area. ``temporal`` (video
    model): cross-frame :class:`AgentAttention` after the self-prototype merge
    (``forward(..., frames=T)``).
    """

    def __init__(self, channels: int, classes: int = 2, self_proto_pool: str = "gap", temporal: bool = False):
        super().__init__()
        self.pool = prototype_pool(self_proto_pool, "self_proto_pool")
        self.support_merge = conv1x1_relu(channels * 2 + 1, channels)
        self.support_residual = ResidualBlock(channels)
        self.init_head = SegmentationHead(channels, classes)
        self.self_merge = conv1x1_relu(channels * 2 + 1, channels)
        self.temporal = AgentAttention(channels) if temporal else None
        self.self_residual = ResidualBlock(channels)
        self.second_head = SegmentationHead(channels, classes)

    def self_prototype(self, init_logits, query_bin):
        """``P_q = pool(argmax(Ŷ_init) · q_b)`` → N×C×1×1."""
        init_fg = init_logits.argmax(dim=1, keepdim=True).to(query_bin.dtype)
        return self.pool(query_bin, init_fg)

    def forward(self, x_bg, support_prototype, prior_bin, query_bin, frames: int | None = None):
        x_act = fuse_relu(self.support_merge, x_bg, [support_prototype], [prior_bin])
        x_act = self.support_residual(x_act)
        init_logits = self.init_head(x_act)
        query_prototype = self.self_prototype(init_logits, query_bin)
        x_self = fuse_relu(self.self_merge, x_act, [query_prototype], [prior_bin])
        x_self = self.self_residual(mix_frames(self.temporal, x_self, frames))
        return x_self, init_logits, self.second_head(x_self)


class DOEliminating(nn.Module):
    """Mines the distracting objects (neither BG nor target) of the query and removes them.

    ``forward(X_self, q_b, bg_logits_b, second_logits, prior_b, label_target_b=None)`` →
    ``(X_DO, M_DO)``. ``pool`` (config ``do_pool``): 'gap' divides by b·b (the authors'), 'map'
    by the mask area.

    The target the DO mask leaves out is the second prediction's (``mask`` 'argmax', the
    published network) or, ``mask`` 'prior' (a variant), that or the pixels whose prior is at
    least 0.5. ``label_target_b`` (N×1×b×b, 0/1; guided training only, docs/method.md "Training
    the elimination steps"): the prototype's mask takes the target from the label instead. The
    returned ``M_DO`` is always the prediction's, the one evaluation uses.
    """

    def __init__(self, channels: int, pool: str = "gap", mask: str = "argmax"):
        super().__init__()
        self.pool = prototype_pool(pool, "do_pool")
        if mask not in DO_MASKS:
            raise ConfigError(f"config key 'do_mask' is {mask!r}; expected one of {', '.join(DO_MASKS)}")
        self.mask = mask
        self.fuse = conv1x1_relu(channels * 2, channels)

    def _mask(self, bg_logits_bin, target, prior_bin):
        if self.mask == "prior":
            target = torch.maximum(target, (prior_bin >= 0.5).to(target.dtype))
        return distracting_object_mask(bg_logits_bin, target)

    def forward(self, x_self, query_bin, bg_logits_bin, second_logits, prior_bin, label_target_b=None):
        predicted = second_logits.argmax(dim=1, keepdim=True).to(query_bin.dtype)
        do_mask = self._mask(bg_logits_bin, predicted, prior_bin)
        pooled_mask = do_mask if label_target_b is None else self._mask(bg_logits_bin, label_target_b.to(
            query_bin.dtype), prior_bin)
        do_prototype = self.pool(query_bin, pooled_mask)
        return fuse_relu(self.fuse, x_self, [do_prototype]), do_mask


DO_MASKS = ("argmax", "prior")


class ScaleEnrichment(nn.Module):
    """PFENet's inter-scale enrichment at one bin: fuse the previous (finer) scale, refine,
    predict the auxiliary logits."""

    def __init__(self, channels: int, has_previous: bool, classes: int = 2):
        super().__init__()
        self.inter_scale = conv1x1_relu(channels * 2, channels) if has_previous else None
        self.residual = ResidualBlock(channels)
        self.aux_head = SegmentationHead(channels, classes)

    def forward(self, x, previous=None):
        if self.inter_scale is not None:
            x = fuse_relu(self.inter_scale, [x, resize(previous, x.shape[-2:])]) + x
        x = self.residual(x)
        return x, self.aux_head(x)


class ScalePath(nn.Module):
    """Everything docs/method.md §4 does at one bin: BG elimination, target matching,
    DO elimination and the inter-scale enrichment.

    Video model only: ``prototype_channels`` (BG prototype width) and ``temporal``
    (cross-frame :class:`AgentAttention` after BG elimination and after the self-prototype
    merge; ``forward(..., frames=T)``).
    """

    def __init__(self, channels: int, has_previous: bool, do_pool: str = "gap", classes: int = 2,
                 self_proto_pool: str = "gap", prototype_channels: int | None = None, temporal: bool = False,
                 eliminate_bg: bool = True, eliminate_do: bool = True, do_mask: str = "argmax"):
        super().__init__()
        # the ablation (config 'elimination'): a switched-off step passes its input through
        self.bg_eliminating = BGEliminating(channels, prototype_channels) if eliminate_bg else None
        self.temporal = AgentAttention(channels) if temporal else None
        self.target_matching = TargetMatching(channels, classes, self_proto_pool, temporal)
        self.do_eliminating = DOEliminating(channels, do_pool, do_mask) if eliminate_do else None
        self.enrichment = ScaleEnrichment(channels, has_previous, classes)

    def forward(self, query_bin, bg_prototype, support_prototype, prior_bin, bg_logits_bin, previous=None,
                frames: int | None = None, label_target_bin=None):
        x_bg = query_bin if self.bg_eliminating is None else self.bg_eliminating(query_bin, bg_prototype)
        x_bg = mix_frames(self.temporal, x_bg, frames)
        x_self, init_logits, second_logits = self.target_matching(x_bg, support_prototype, prior_bin, query_bin,
                                                                  frames)
        if self.do_eliminating is None:
            x_do, do_mask = x_self, None     # nothing mined
        else:
            x_do, do_mask = self.do_eliminating(x_self, query_bin, bg_logits_bin, second_logits, prior_bin,
                                                label_target_bin)
        x, aux_logits = self.enrichment(x_do, previous)
        return x, {"init": init_logits, "second": second_logits, "aux": aux_logits, "do_mask": do_mask}


class Merge(nn.Module):
    """Concatenate all scales (n·C) → 1×1 → C → residual block → head → final logits."""

    def __init__(self, channels: int, num_scales: int, classes: int = 2):
        super().__init__()
        self.fuse = conv1x1_relu(channels * num_scales, channels)
        self.residual = ResidualBlock(channels)
        self.head = SegmentationHead(channels, classes)

    def forward(self, scale_features):
        return self.head(self.residual(fuse_relu(self.fuse, scale_features)))
