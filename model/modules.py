"""The building blocks of NTRENet++ (method.md §2–§4), each named as in the method's figure.

Shapes: ``B`` episodes, ``K`` shots, ``C`` reduced channels, ``h×w`` feature size,
``b×b`` one pyramid bin. Masks are float maps in [0, 1] with one channel.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MAP_EPS = 5e-4      # PFENet's Weighted_GAP
COSINE_EPS = 1e-7   # PFENet's prior mask


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with align_corners=True (PFENet's convention everywhere)."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def memory_format_of(x: torch.Tensor):
    """channels_last for a 4-d tensor laid out so (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _SpatialSum(torch.autograd.Function):
    """``Σ_hw X·m`` → N×C×1×1 (``m`` N×1×h×w, or None for ``Σ_hw X``), whose backward writes
    ``dX`` in X's own memory format. Autograd's own backward broadcasts the N×C×1×1 gradient
    into a new NCHW tensor, so a channels_last feature map would get an NCHW gradient and the
    layers below would convert it, or run slower on it."""

    @staticmethod
    def forward(ctx, feature, mask):
        ctx.feature_meta = (feature.shape, feature.dtype, memory_format_of(feature))
        mask_needs_grad = mask is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(feature if mask_needs_grad else None, mask)
        product = feature if mask is None else feature * mask
        return product.sum(dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        feature, mask = ctx.saved_tensors
        shape, dtype, memory_format = ctx.feature_meta
        grad_feature = grad_mask = None
        if ctx.needs_input_grad[0]:
            grad_feature = torch.empty(shape, dtype=dtype, device=grad.device, memory_format=memory_format)
            if mask is None:
                grad_feature.copy_(grad.expand(shape))
            else:
                torch.mul(grad, mask, out=grad_feature)
        if mask is not None and ctx.needs_input_grad[1]:
            grad_mask = (grad * feature).sum(dim=1, keepdim=True)
        return grad_feature, grad_mask


def spatial_sum(feature: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_hw X·m`` (N×C×h×w, N×1×h×w → N×C×1×1), gradient in X's memory format."""
    if not (torch.is_grad_enabled() and (feature.requires_grad or (mask is not None and mask.requires_grad))):
        return (feature if mask is None else feature * mask).sum(dim=(2, 3), keepdim=True)
    return _SpatialSum.apply(feature, mask)


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


def _conv1x1_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True))


def fuse_concat(conv: nn.Conv2d, maps, prototypes=(), scalar_maps=()) -> torch.Tensor:
    """``conv(concat([*maps, *(expand(p) for p in prototypes), *scalar_maps], dim=1))`` for a
    1×1 ``conv``, without building the concatenation.

    ``maps``: N×Ci×h×w feature maps (a single tensor counts as one); ``prototypes``:
    N×Cp×1×1 (or 1×Cp×1×1, shared); ``scalar_maps``: N×1×h×w. The 1×1 convolution of a
    concatenation is the sum of the convolutions of its parts with the matching weight
    slices; a prototype is the same at every pixel, so its part is one matrix-vector product
    per image, added as a per-image bias; a one-channel map adds a per-channel multiple of
    itself. Same value as the concatenated form up to float rounding (tested), without the
    concatenated tensor, the expanded copies, their share of the arithmetic — and with every
    part's gradient a plain tensor in its own memory format (a slice of a concatenation's
    gradient is neither contiguous nor channels_last, which costs a copy in the backward of
    whatever produced the part).
    """
    return fuse_concat_weight(conv.weight, conv.bias, maps, prototypes, scalar_maps)


def fuse_concat_weight(weight: torch.Tensor, bias, maps, prototypes=(), scalar_maps=()) -> torch.Tensor:
    """:func:`fuse_concat` with the 1×1 convolution given as its ``weight`` (out×in×1×1) and ``bias``."""
    if isinstance(maps, torch.Tensor):
        maps = [maps]
    flat = weight.flatten(1)                                          # out×in
    out, offset = None, 0
    for x in maps:
        width = x.shape[1]
        part = F.conv2d(x, weight[:, offset:offset + width], bias if out is None else None)
        out = part if out is None else out.add_(part)   # in place: a conv output is not saved for backward
        offset += width
    if prototypes:
        shift = 0
        for p in prototypes:
            width = p.shape[1]
            shift = shift + F.linear(p.flatten(1), flat[:, offset:offset + width])
            offset += width
        out = out.add_(shift.to(out.dtype)[:, :, None, None])
    for m in scalar_maps:
        # addcmul keeps ``out``'s memory format (a broadcast product alone would come out NCHW)
        out = out.addcmul_(flat[:, offset].to(out.dtype).view(1, -1, 1, 1), m.to(out.dtype))
        offset += 1
    if offset != flat.shape[1]:
        raise ValueError(f"fuse_concat: the inputs have {offset} channels, the conv takes {flat.shape[1]}")
    return out


def _fuse_relu(block: nn.Sequential, maps, prototypes=(), scalar_maps=()):
    """A ``_conv1x1_relu`` block applied to ``concat(maps, expanded prototypes, scalar maps)``."""
    conv, relu = block
    return relu(fuse_concat(conv, maps, prototypes, scalar_maps))


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)``: the identity at x's own size, a plain average pool
    where the size divides x's (the same windows), adaptive pooling otherwise."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h % size == 0 and w % size == 0:
        return F.avg_pool2d(x, (h // size, w // size))
    return F.adaptive_avg_pool2d(x, size)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (element-wise; kept values scaled by 1/(1−p) in training) with a faster
    CPU path: one ``torch.rand`` draw per element, thresholded and scaled in place, then one
    multiply. ATen's CPU dropout draws with ``bernoulli_`` and then divides and multiplies in
    separate passes — about twice the time (docs/benchmarks.md), and the network runs ~20 of
    them per step. Same distribution; the mask is drawn in fp32 whatever the input's dtype.
    Other devices keep PyTorch's own (fused) kernel."""

    def forward(self, x):
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        keep = torch.rand_like(x, dtype=torch.float32).ge_(self.p).mul_(1 / (1 - self.p))
        return x * keep.to(x.dtype)


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
    """3×3 conv, ReLU, Dropout(0.1), 1×1 → ``classes`` logits."""

    def __init__(self, channels: int, classes: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True),
            Dropout(0.1), nn.Conv2d(channels, classes, 1))

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

    Five branches — global pooling + 1×1, 1×1, and 3×3 at each dilation — each ReLU +
    Dropout(0.5), concatenated (5C) and fused by a 1×1 conv to C (+ ReLU, so the query
    features stay non-negative like the support features they are matched against).
    """

    def __init__(self, channels: int, dilations=(6, 12, 18)):
        super().__init__()

        def branch(kernel, dilation=1):
            return nn.Sequential(
                nn.Conv2d(channels, channels, kernel, padding=dilation if kernel == 3 else 0, dilation=dilation),
                nn.ReLU(inplace=True), Dropout(0.5))

        self.image_pool = branch(1)
        self.pointwise = branch(1)
        self.atrous = nn.ModuleList(branch(3, d) for d in dilations)
        self.fuse = nn.Sequential(nn.Conv2d(channels * (2 + len(dilations)), channels, 1), nn.ReLU(inplace=True))

    def forward(self, x):
        pooled = self.image_pool(spatial_sum(x) / (x.shape[2] * x.shape[3]))   # mean: N×C×1×1
        branches = [self.pointwise(x)] + [conv(x) for conv in self.atrous]
        # fuse(concat(expand(pooled), branches)): the pooled branch is constant over the image,
        # so its share of the 1×1 convolution is a per-image bias (no expanded copy, no extra GEMM);
        # the branches are summed through their weight slices (no concatenation)
        conv, relu = self.fuse
        C = pooled.shape[1]
        out = fuse_concat_weight(conv.weight[:, C:], conv.bias, branches)
        out = out.add_(F.linear(pooled.flatten(1), conv.weight.flatten(1)[:, :C]).to(out.dtype)[:, :, None, None])
        return relu(out)


class BGMiningModule(nn.Module):
    """BGMM: a learnable, episode-independent BG prototype and the BG branch.

    ``forward(X)`` → BG logits (N×2×h×w, channel 1 = BG) for any stack of feature maps
    (the query; in training also every support).
    """

    def __init__(self, channels: int, classes: int = 2):
        super().__init__()
        self.bg_prototype = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.fuse = nn.Sequential(nn.Conv2d(channels * 2, channels, 1, bias=False),
                                  nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.residual = ResidualBlock(channels)
        self.head = SegmentationHead(channels, classes)

    def forward(self, x):
        conv, relu, dropout = self.fuse     # fuse = 1×1 on concat(X, expand(P_BG)), ReLU, Dropout2d
        x = dropout(relu(fuse_concat(conv, x, [self.bg_prototype])))
        return self.head(self.residual(x))


class BGEliminating(nn.Module):
    """``X_BG = ReLU(conv1×1(concat(q_b, P_BG)))``: removes the BG from the query at one bin."""

    def __init__(self, channels: int):
        super().__init__()
        self.fuse = _conv1x1_relu(channels * 2, channels)

    def forward(self, query_bin, bg_prototype):
        return _fuse_relu(self.fuse, query_bin, [bg_prototype])


class TargetMatching(nn.Module):
    """Matches the support prototype (→ initial prediction), then the query's own one.

    ``forward(X_BG, P_s, prior_b, q_b)`` → ``(X_self, init_logits, second_logits)``. The query
    self-prototype ``P_q`` is the masked average of ``q_b`` over the initial prediction's
    foreground (PFENet's Weighted_GAP).
    """

    def __init__(self, channels: int, classes: int = 2):
        super().__init__()
        self.support_merge = _conv1x1_relu(channels * 2 + 1, channels)
        self.support_residual = ResidualBlock(channels)
        self.init_head = SegmentationHead(channels, classes)
        self.self_merge = _conv1x1_relu(channels * 2 + 1, channels)
        self.self_residual = ResidualBlock(channels)
        self.second_head = SegmentationHead(channels, classes)

    def forward(self, x_bg, support_prototype, prior_bin, query_bin):
        x_act = _fuse_relu(self.support_merge, x_bg, [support_prototype], [prior_bin])
        x_act = self.support_residual(x_act)
        init_logits = self.init_head(x_act)
        init_fg = init_logits.argmax(dim=1, keepdim=True).to(query_bin.dtype)
        query_prototype = masked_average_pooling(query_bin, init_fg)
        x_self = _fuse_relu(self.self_merge, x_act, [query_prototype], [prior_bin])
        x_self = self.self_residual(x_self)
        return x_self, init_logits, self.second_head(x_self)


class DOEliminating(nn.Module):
    """Mines the distracting objects (neither BG nor target) of the query and removes them.

    ``forward(X_self, q_b, bg_logits_b, second_logits)`` → ``(X_DO, M_DO)``.
    ``pool``: 'gap' divides by h·w (the reference), 'map' by the mask area.
    """

    def __init__(self, channels: int, pool: str = "gap"):
        super().__init__()
        if pool not in ("gap", "map"):
            raise ValueError(f"config key 'do_pool' is {pool!r}; expected 'gap' or 'map'")
        self.pool = global_masked_pooling if pool == "gap" else masked_average_pooling
        self.fuse = _conv1x1_relu(channels * 2, channels)

    def forward(self, x_self, query_bin, bg_logits_bin, second_logits):
        target = second_logits.argmax(dim=1, keepdim=True).to(query_bin.dtype)
        do_mask = distracting_object_mask(bg_logits_bin, target)
        do_prototype = self.pool(query_bin, do_mask)
        return _fuse_relu(self.fuse, x_self, [do_prototype]), do_mask


class ScaleEnrichment(nn.Module):
    """PFENet's inter-scale enrichment at one bin: fuse the previous (finer) scale, refine,
    predict the auxiliary logits."""

    def __init__(self, channels: int, has_previous: bool, classes: int = 2):
        super().__init__()
        self.inter_scale = _conv1x1_relu(channels * 2, channels) if has_previous else None
        self.residual = ResidualBlock(channels)
        self.aux_head = SegmentationHead(channels, classes)

    def forward(self, x, previous=None):
        if self.inter_scale is not None:
            x = _fuse_relu(self.inter_scale, [x, resize(previous, x.shape[-2:])]) + x
        x = self.residual(x)
        return x, self.aux_head(x)


class ScalePath(nn.Module):
    """Everything method.md §4 does at one bin: BG elimination, target matching,
    DO elimination and the inter-scale enrichment."""

    def __init__(self, channels: int, has_previous: bool, do_pool: str = "gap", classes: int = 2):
        super().__init__()
        self.bg_eliminating = BGEliminating(channels)
        self.target_matching = TargetMatching(channels, classes)
        self.do_eliminating = DOEliminating(channels, do_pool)
        self.enrichment = ScaleEnrichment(channels, has_previous, classes)

    def forward(self, query_bin, bg_prototype, support_prototype, prior_bin, bg_logits_bin, previous=None):
        x_bg = self.bg_eliminating(query_bin, bg_prototype)
        x_self, init_logits, second_logits = self.target_matching(x_bg, support_prototype, prior_bin, query_bin)
        x_do, do_mask = self.do_eliminating(x_self, query_bin, bg_logits_bin, second_logits)
        x, aux_logits = self.enrichment(x_do, previous)
        return x, {"init": init_logits, "second": second_logits, "aux": aux_logits, "do_mask": do_mask}


class Merge(nn.Module):
    """Concatenate all scales (n·C) → 1×1 → C → residual block → head → final logits."""

    def __init__(self, channels: int, num_scales: int, classes: int = 2):
        super().__init__()
        self.fuse = _conv1x1_relu(channels * num_scales, channels)
        self.residual = ResidualBlock(channels)
        self.head = SegmentationHead(channels, classes)

    def forward(self, scale_features):
        return self.head(self.residual(_fuse_relu(self.fuse, scale_features)))
