"""Numerical helpers and speed tricks under the blocks of model/modules.py.

Each computes what its docstring's formula says — the same value as the plain PyTorch
form, up to float rounding where noted (tests/test_ops.py checks them against it) — only
faster or in a better memory layout (the measurements are in docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with align_corners=True (PFENet's convention everywhere)."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def pyramid_bins(scales, feature_size: int) -> list[int]:
    """Pyramid bins at this feature size: values <= 1.0 are fractions of it (PFENet), larger
    values absolute sizes."""
    return [max(1, int(feature_size * s)) if s <= 1.0 else int(s) for s in scales]


def input_format(backbone: nn.Module):
    """The memory format of ``backbone``'s first convolution weight: how to lay out its input."""
    return memory_format_of(next(m.weight for m in backbone.modules() if isinstance(m, nn.Conv2d)))


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


def conv1x1_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """1×1 conv (no bias) and ReLU: the fusion block the figure draws as "1×1"."""
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


def fuse_concat_weight(weight: torch.Tensor, bias, maps, prototypes=(), scalar_maps=(),
                       prototypes_first: bool = False) -> torch.Tensor:
    """:func:`fuse_concat` with the 1×1 convolution given as its ``weight`` (out×in×1×1) and ``bias``.
    ``prototypes_first``: the concatenation is ``[*prototypes, *maps, *scalar_maps]`` instead."""
    if isinstance(maps, torch.Tensor):
        maps = [maps]
    flat = weight.flatten(1)                                          # out×in
    map_width = sum(x.shape[1] for x in maps)
    proto_width = sum(p.shape[1] for p in prototypes)
    out, offset = None, proto_width if prototypes_first else 0
    for x in maps:
        width = x.shape[1]
        part = F.conv2d(x, weight[:, offset:offset + width], bias if out is None else None)
        out = part if out is None else out.add_(part)   # in place: a conv output is not saved for backward
        offset += width
    if prototypes:
        shift, offset = 0, 0 if prototypes_first else map_width
        for p in prototypes:
            width = p.shape[1]
            shift = shift + F.linear(p.flatten(1), flat[:, offset:offset + width])
            offset += width
        out = out.add_(shift.to(out.dtype)[:, :, None, None])
    offset = map_width + proto_width
    for m in scalar_maps:
        # addcmul keeps ``out``'s memory format (a broadcast product alone would come out NCHW)
        out = out.addcmul_(flat[:, offset].to(out.dtype).view(1, -1, 1, 1), m.to(out.dtype))
        offset += 1
    if offset != flat.shape[1]:
        raise ValueError(f"fuse_concat: the inputs have {offset} channels, the conv takes {flat.shape[1]}")
    return out


def fuse_relu(block: nn.Sequential, maps, prototypes=(), scalar_maps=()):
    """A :func:`conv1x1_relu` block applied to ``concat(maps, expanded prototypes, scalar maps)``."""
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

