"""DINOv2 vision transformers (ViT-S/14, B/14, L/14, g/14 and their register variants) behind the
backbone contract of model/backbone.py, loading Meta's released ``dinov2_*_pretrain.pth`` files as
they are published.

Attribute names equal the released files' key names (``cls_token``, ``pos_embed``,
``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.N.norm1 / attn.qkv /
attn.proj / ls1.gamma / norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma`` — ViT-g's feed-forward is SwiGLU,
``mlp.w12 / mlp.w3`` — and ``norm``), so a file loads without renaming. What the released model
computes, and this one too (docs/method.md, "A DINOv2 backbone", has the comparison):

- the image is cut into 14×14 patches (a stride-14 convolution); a class token is put in front,
  the position embedding added (its 37×37 grid, the 518-pixel training size, interpolated
  bicubically to the image's grid: the plain checkpoints scale by ``(grid + 0.1) / 37`` without
  antialiasing, the register checkpoints to the grid's size with antialiasing), then the 4
  register tokens (``_reg`` variants) go after the class token;
- pre-norm blocks: ``x + ls1 * attn(norm1(x))``, then ``x + ls2 * mlp(norm2(x))``; LayerNorm eps
  1e-6, GELU, layer scale (initialised to 1.0 as the released builders do);
- the output is the final ``norm`` of the tokens; the patch tokens form the feature map.

The contract's two calls:

- ``mid_level(x) -> (layer2, layer3)``: the patch tokens after blocks ``blocks[0]`` and
  ``blocks[1]`` (1-based), each through the final ``norm`` (as DINOv2's
  ``get_intermediate_layers`` gives them), as B×D×h×w maps at stride 14;
- ``high_level(layer3) -> layer3``: the prior uses layer3 itself. A later transformer block
  would mix the masked-out support tokens back into the foreground ones, so the prior's
  features are the last taken block's, masked after extraction (docs/method.md says why).

An image side that is not a multiple of the patch size is resized (bilinear) to the nearest
multiple first; the networks bring their logits back to the input's size as always.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import BackboneWeightsError

TRAIN_GRID = 37           # the released position embeddings: 518 / 14 patches a side
LN_EPS = 1e-6


@dataclass(frozen=True)
class ViTSpec:
    """One variant: width D, depth, heads, patch, register tokens, feed-forward ('mlp' or 'swiglu'),
    and the side of its position-embedding grid."""
    title: str
    dim: int
    depth: int
    heads: int
    patch: int = 14
    registers: int = 0
    ffn: str = "mlp"
    grid: int = TRAIN_GRID

    @property
    def interpolate_offset(self) -> float:
        """The released code's position-embedding interpolation: scale factor (grid + 0.1) / 37
        for the plain checkpoints, the grid's size (offset 0) for the register ones."""
        return 0.0 if self.registers else 0.1

    @property
    def interpolate_antialias(self) -> bool:
        return bool(self.registers)


def _variants() -> dict[str, ViTSpec]:
    base = {"s": ViTSpec("ViT-S/14", 384, 12, 6), "b": ViTSpec("ViT-B/14", 768, 12, 12),
            "l": ViTSpec("ViT-L/14", 1024, 24, 16), "g": ViTSpec("ViT-g/14", 1536, 40, 24, ffn="swiglu")}
    out = {}
    for letter, spec in base.items():
        out[f"dinov2_vit{letter}14"] = spec
        out[f"dinov2_vit{letter}14_reg"] = ViTSpec(spec.title + " with registers", spec.dim, spec.depth,
                                                     spec.heads, registers=4, ffn=spec.ffn)
    # the synthetic demo's stand-in, trained here on the synthetic training classes (tools/pretrain_backbone.py):
    # the DINOv2 architecture at a width, depth and patch the 2-core CPU trains in minutes
    out["vit_tiny8"] = ViTSpec("ViT-tiny/8 (synthetic demo)", 96, 6, 3, patch=8, grid=7)
    return out


VIT_VARIANTS: dict[str, ViTSpec] = _variants()


def default_blocks(depth: int) -> tuple[int, int]:
    """The blocks (1-based) behind layer2 and layer3 when the config leaves 'vit_blocks' empty:
    the first and the last of the last four (DINOv2's own multi-layer segmentation probe)."""
    return max(1, depth - 3), depth


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection (with bias), scaled dot product, ``proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)          # B×heads×N×(C/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g's feed-forward: ``w3(silu(a) * b)`` with ``(a, b) = w12(x)`` halves; the hidden width
    is 2/3 of 4·D rounded up to a multiple of 8, as the released ViT-g has it."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = (SwiGLU if ffn == "swiglu" else Mlp)(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)       # B×(h·w)×D, row by row


def rounded_size(size: int, patch: int) -> int:
    """The multiple of ``patch`` nearest to ``size`` (at least one patch)."""
    return max(1, round(size / patch)) * patch


class DINOv2(nn.Module):
    """A DINOv2 ViT of ``VIT_VARIANTS[name]`` (or of ``spec``, any other size); ``blocks``: the
    1-based blocks behind layer2 and layer3 (default :func:`default_blocks`)."""

    def __init__(self, name: str = "dinov2_vitb14", blocks: tuple[int, int] | list[int] | None = None,
                 spec: ViTSpec | None = None):
        super().__init__()
        if spec is None and name not in VIT_VARIANTS:
            raise ValueError(f"ViT backbone {name!r}: expected one of {', '.join(VIT_VARIANTS)}")
        spec = spec or VIT_VARIANTS[name]
        self.name, self.spec = name, spec
        blocks = tuple(blocks) if blocks else default_blocks(spec.depth)
        if len(blocks) != 2 or not 1 <= blocks[0] <= blocks[1] <= spec.depth:
            raise ValueError(f"vit_blocks {list(blocks)}: two block numbers 1 <= a <= b <= {spec.depth}")
        self.taken = blocks
        D = spec.dim
        self.patch_embed = PatchEmbed(D, spec.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.grid * spec.grid + 1, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, D)) if spec.registers else None
        self.blocks = nn.ModuleList(Block(D, spec.heads, spec.ffn) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        # the masked-image-modelling token of DINOv2's training: in the released files, never used here
        self.mask_token = nn.Parameter(torch.zeros(1, D), requires_grad=False)
        for block in self.blocks[blocks[1]:]:       # after the last taken block: loaded, never run
            block.requires_grad_(False)
        self.layer2_channels = self.layer3_channels = self.layer4_channels = D
        self.patch_size = spec.patch
        self._init_weights()

    def _init_weights(self):
        """DINOv2's initialisation (for training from scratch, as the synthetic demo does):
        truncated normal (std 0.02) linear weights and position embedding, zero biases, class and
        register tokens of std 1e-6, layer scale 1.0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ---- tokens ---------------------------------------------------------------------------
    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """1×(1+h·w)×D: the class position and the patch grid's, interpolated from the
        trained grid as the released code does (bicubic in float32; see the module docstring)."""
        grid, spec = self.spec.grid, self.spec
        if h == grid and w == grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        patches = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        if spec.interpolate_offset:
            scale = ((h + spec.interpolate_offset) / grid, (w + spec.interpolate_offset) / grid)
            patches = F.interpolate(patches, scale_factor=scale, mode="bicubic",
                                    antialias=spec.interpolate_antialias)
        else:
            patches = F.interpolate(patches, size=(h, w), mode="bicubic", antialias=spec.interpolate_antialias)
        patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """B×(1+R+h·w)×D input tokens of images whose sides are multiples of the patch, and the grid."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        t = t + self.position_embedding(h, w).to(t.dtype)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(x.shape[0], -1, -1).to(t.dtype), t[:, 1:]], dim=1)
        return t, h, w

    def fit_to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` resized (bilinear) to the nearest multiples of the patch size, when it is not one."""
        size = tuple(rounded_size(s, self.patch_size) for s in x.shape[-2:])
        if size == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def intermediate(self, x: torch.Tensor, blocks) -> list[torch.Tensor]:
        """The patch tokens after each of ``blocks`` (1-based), through the final norm, as
        B×D×h×w maps."""
        t, h, w = self.tokens(self.fit_to_patches(x))
        prefix = 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1])
        out = []
        for i, block in enumerate(self.blocks[:max(blocks)], start=1):
            t = block(t)
            if i in blocks:
                patches = self.norm(t[:, prefix:])
                out.append(patches.transpose(1, 2).reshape(t.shape[0], -1, h, w))
        return out

    # ---- the backbone contract ------------------------------------------------------------
    def mid_level(self, x):
        if self.taken[0] == self.taken[1]:
            (layer,) = self.intermediate(x, self.taken)
            return layer, layer
        layer2, layer3 = self.intermediate(x, self.taken)
        return layer2, layer3

    def high_level(self, layer3):
        return layer3

    # ---- weight files ---------------------------------------------------------------------
    def convert_state_dict(self, state: dict, source: str) -> tuple[dict, list[str]]:
        """The released files load as they are; one of another variant, patch size or width is
        refused naming what differs (and the variant it is)."""
        found = describe_file(state)
        want = self.spec
        if found is not None:
            differs = [f"{what} {have} (the config's {self.name} has {need})"
                       for what, have, need in (("width", found["dim"], want.dim),
                                                ("patch size", found["patch"], want.patch),
                                                ("blocks", found["depth"], want.depth),
                                                ("register tokens", found["registers"], want.registers),
                                                ("feed-forward", found["ffn"], want.ffn)) if have != need]
            if differs:
                name = found_variant(found)
                fix = f"set 'backbone {name}'" if name else "use the file of the configured variant"
                raise BackboneWeightsError(f"backbone weight file '{source}' is a ViT with " + ", ".join(differs)
                                           + f"; {fix}")
        return state, []


def describe_file(state: dict) -> dict | None:
    """Width, patch, depth, registers and feed-forward of a DINOv2 state dict (None: not a ViT's)."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4:
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    ffn = "swiglu" if any(k.endswith("mlp.w12.weight") for k in state) else "mlp"
    return {"dim": proj.shape[0], "patch": proj.shape[-1], "depth": depth, "registers": registers, "ffn": ffn}


def found_variant(found: dict) -> str | None:
    for name, spec in VIT_VARIANTS.items():
        if (spec.dim, spec.patch, spec.depth, spec.registers, spec.ffn) == (
                found["dim"], found["patch"], found["depth"], found["registers"], found["ffn"]):
            return name
    return None

