"""model/modules.py: the blocks' fused forms equal the concatenations the method's figure
draws, and the prior equals PFENet's per-shot formula."""
import torch

from model.modules import ASPP, Reduce, prior_mask
from model.ops import resize


def test_aspp_pooled_branch_as_bias_equals_the_concatenation():
    torch.manual_seed(0)
    aspp = ASPP(8, (1, 2, 3)).eval()
    x = torch.randn(2, 8, 9, 9)
    pooled = aspp.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
    old = aspp.fuse(torch.cat([pooled, aspp.pointwise(x)] + [conv(x) for conv in aspp.atrous], dim=1))
    assert torch.allclose(aspp(x), old, atol=1e-6)


def test_reduce_of_a_list_equals_reduce_of_the_concatenation():
    torch.manual_seed(0)
    reduce = Reduce(12, 5).eval()
    a, b = torch.randn(2, 8, 6, 6), torch.randn(2, 4, 6, 6)
    assert torch.allclose(reduce([a, b]), torch.nn.Sequential(*reduce)(torch.cat([a, b], 1)), atol=1e-6)


def test_prior_mask_equals_pfenets_per_shot_formula():
    """All shots in one product: the same prior as PFENet's cos = s·q / (|s||q| + 1e-7) per shot,
    max over support pixels, min-max per image, resized, mean over shots."""
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
