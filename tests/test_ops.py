"""model/ops.py: each helper equals the plain PyTorch form it replaces — values, gradients and
memory format."""
import pytest
import torch
import torch.nn as nn

from model.modules import global_masked_pooling, masked_average_pooling
from model.ops import fuse_concat, pool_to


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


def test_fuse_concat_of_several_maps_and_pool_to():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 5, 1, bias=True)
    a, b = torch.randn(2, 8, 6, 6), torch.randn(2, 4, 6, 6)
    assert torch.allclose(fuse_concat(conv, [a, b]), conv(torch.cat([a, b], 1)), atol=1e-6)
    x = torch.randn(2, 3, 60, 60)
    for size in (60, 30, 15, 8, 7):
        assert torch.allclose(pool_to(x, size), torch.nn.functional.adaptive_avg_pool2d(x, size), atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_sum_gradient_keeps_the_memory_format(channels_last):
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

