"""CLIP vision transformer as mPLUG runs it (official `models/clip/model.py`, `VisualTransformer`).

conv patch embedding (no bias) -> prepend class token -> + position embedding -> ln_pre ->
pre-LN blocks (QuickGELU MLP) -> ln_post over *all* tokens; no projection (`skip_last_layer`).
Output: [B, Nv, W], class token first, Nv = (R / P)^2 + 1.

Differences from the official code, on purpose:
* the position embedding is built and resized correctly for any width and grid (the official
  `initialize_clip` leaves it at zeros, and its ViT-L resize path is broken: AliceMind#91);
* images at another resolution than configured are accepted: the table is resampled on the fly
  (bilinear, align_corners=False, as the official load-time resize);
* `visual.proj` and the CLIP text tower are not built (never used by mPLUG).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig, VisionConfig
from mplug_fast.modeling.layers import MLP, SelfAttention, init_bert_weights


def sincos_pos_table(grid: int, dim: int) -> Tensor:
    """A fixed 2-D sin-cos position table [grid * grid, dim] over the patches in row-major order, each row of
    unit norm: the first dim / 2 channels encode the patch row, the rest its column, each as dim / 4
    sin / cos pairs at the frequencies 1 / 10000^(i / (dim / 4)), i = 0 .. dim / 4 - 1."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    n = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float32) / n)  # [n]
    ys, xs = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")

    def encode(p: Tensor) -> Tensor:  # [grid, grid] -> [grid * grid, 2n]
        a = p.flatten()[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    table = torch.cat([encode(ys), encode(xs)], dim=1)  # [grid * grid, dim], each row of norm sqrt(dim / 2)
    return table / math.sqrt(dim / 2)


def resize_pos_embed(pos_embed: Tensor, grid: int | tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """Bilinearly resample a ViT position table to a new patch grid, keeping the prefix (class) rows.

    Same rule as the official `resize_pos_embed` (bilinear, align_corners=False, no antialias),
    computed in fp32 and cast back. Identity when the grid is unchanged.

    Args:
        pos_embed: [N, W] with N = num_prefix_tokens + g * g (the stored grid must be square).
        grid: new grid (gh, gw) or a side length.
    Returns:
        [num_prefix_tokens + gh * gw, W]
    """
    if pos_embed.dim() != 2:
        raise ValueError(f"pos_embed must be [N, W], got {list(pos_embed.shape)}")
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    n_grid = pos_embed.shape[0] - num_prefix_tokens
    old = math.isqrt(n_grid)
    if old * old != n_grid:
        raise ValueError(
            f"position table has {n_grid} grid rows (+{num_prefix_tokens} prefix), not a square grid"
        )
    if (old, old) == (gh, gw):
        return pos_embed
    prefix, table = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    W = table.shape[1]
    table = table.float().reshape(1, old, old, W).permute(0, 3, 1, 2)  # [1, W, g, g]
    table = F.interpolate(table, size=(gh, gw), mode="bilinear", align_corners=False)  # [1, W, gh, gw]
    table = table.permute(0, 2, 3, 1).reshape(gh * gw, W).to(pos_embed.dtype)  # [gh*gw, W]
    return torch.cat([prefix, table], dim=0)  # [prefix + gh*gw, W]


class VisionBlock(nn.Module):
    """Pre-LN CLIP block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (QuickGELU).

    The MLP's fc1 bias + QuickGELU run fused (the fused backend's `bias_act`) with the `triton` fused
    backend (see `mplug_fast.modeling.layers`). The residual adds are not fused with the next LayerNorm: a
    pre-LN block needs both the sum (the residual stream) and its normalisation, and `residual_layer_norm`
    returns only the latter, so fusing would add a pass instead of saving one.
    """

    def __init__(self, config: VisionConfig, backend: str | None = None):
        super().__init__()
        W = config.width
        self.norm1 = nn.LayerNorm(W, eps=config.layer_norm_eps)
        self.attn = SelfAttention(W, config.heads, config.attention_dropout, backend)
        self.norm2 = nn.LayerNorm(W, eps=config.layer_norm_eps)
        self.mlp = MLP(W, int(W * config.mlp_ratio), "quick_gelu")

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, Nv, W] -> [B, Nv, W]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """CLIP ViT-B/16 or ViT-L/14 trunk returning every token after ln_post."""

    def __init__(self, config: VisionConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        W, P = config.width, config.patch_size
        self.patch_embed = nn.Conv2d(3, W, kernel_size=P, stride=P, bias=False)
        self.cls_token = nn.Parameter(torch.empty(W))
        self.pos_embed = nn.Parameter(torch.empty(config.num_tokens, W))
        self.norm_pre = nn.LayerNorm(W, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(config, backend) for _ in range(config.layers))
        self.norm_post = nn.LayerNorm(W, eps=config.layer_norm_eps)

    def init_weights(self) -> None:
        """Fresh weights: class token N(0, W^-0.5), position table N(0, 0.01), patch conv and Linear weights
        N(0, 0.02), biases 0, LayerNorm (1, 0). Real runs start from OpenAI CLIP
        (`mplug_fast.checkpoint.load_clip_visual`)."""
        W = self.config.width
        nn.init.normal_(self.cls_token, std=W**-0.5)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        self.apply(init_bert_weights)  # Linear N(0, 0.02) + zero bias, LayerNorm (1, 0); no Embedding here

    def forward(self, images: Tensor) -> Tensor:
        """images: [B, 3, H, W] (CLIP-normalised) -> [B, Nv, W], Nv = (H/P)(W/P) + 1, class token first."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        P = self.config.patch_size
        H, Wd = images.shape[-2:]
        if H % P or Wd % P:
            raise ValueError(
                f"image size {H}x{Wd} is not divisible by the patch size {P}; resize to a multiple of {P} "
                f"(configured: {self.config.image_size})"
            )
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # [B, W, gh, gw]
        B, W, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls = self.cls_token.to(x.dtype).expand(B, 1, W)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1)  # copy: [B, Nv, W]
        x = x + resize_pos_embed(self.pos_embed, (gh, gw)).to(x.dtype)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm_post(x)  # [B, Nv, W]


class VisionAdapter(nn.Module):
    """Large models: ViT width -> BERT width (official visn_fc + visn_layer_norm + dropout)."""

    def __init__(self, vision_width: int, dim: int, layer_norm_eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.fc = nn.Linear(vision_width, dim)
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: Tensor) -> Tensor:
        """v: [B, Nv, W] -> [B, Nv, D]."""
        return self.dropout(self.norm(self.fc(v)))


def build_adapter(config: MPlugConfig) -> nn.Module:
    """The adapter when the ViT width differs from the text width, else `nn.Identity()`."""
    if not config.has_adapter:
        return nn.Identity()
    return VisionAdapter(
        config.vision.width, config.text.hidden_size, config.text.layer_norm_eps, config.adapter_dropout
    )
