"""The building blocks shared by every stack: attention (self / cross), MLP, post-LN BERT layer.

Written once and used by the text encoder, the fusion layers and the decoder (post-LN, erf GELU,
LayerNorm eps 1e-12) and, for attention and MLP, by the CLIP ViT (pre-LN, QuickGELU).

Parameter names are ours (`qkv`, `q_proj`, `kv_proj`, `out_proj`, `fc1`, `fc2`, `norm_*`);
`mplug_fast.checkpoint` maps the official names onto them (q/k/v are stored fused).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mplug_fast.ops.attention import attention


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    Args:
        dim: model width D.  num_heads: H (head dim D / H).
        attn_dropout: dropout on the attention probabilities (training only).
        backend: attention backend name, None = automatic (see `mplug_fast.ops.attention`).
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """x: [B, L, D]; key_padding_mask: bool [B, L], True = attend. Returns [B, L, D] (after out_proj)."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, Dh] (views)
        out = attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
            config_backend=self.backend,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))  # [B, L, D]


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from `x`, keys/values from a memory (one fused K/V GEMM).

    `project_kv(memory)` can be called once and its result passed as `kv=` to every later call
    (decoding steps, beams, answer candidates); `kv_index` then maps query rows to memory rows.

    Args:
        dim: query width D.  memory_dim: memory width.  num_heads: H.
        attn_dropout: dropout on the attention probabilities (training only).
        backend: attention backend name, None = automatic.
    """

    def __init__(
        self, dim: int, memory_dim: int, num_heads: int, attn_dropout: float = 0.0, backend: str | None = None
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.backend = backend
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(memory_dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory: [Bm, M, Dm] -> (k, v), each [Bm, H, M, Dh]."""
        Bm, M, _ = memory.shape
        kv = self.kv_proj(memory).view(Bm, M, 2, self.num_heads, self.head_dim)  # [Bm, M, 2, H, Dh]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [Bm, H, M, Dh]
        return k, v

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        *,
        kv: tuple[Tensor, Tensor] | None = None,
        kv_index: Tensor | None = None,
    ) -> Tensor:
        """x: [B, L, D]; memory: [Bm, M, Dm] or precomputed `kv`; memory_mask: bool [Bm, M], True = attend;
        kv_index: long [B] (row of the memory read by each query row; None when Bm == B).
        Returns [B, L, D]."""
        if (memory is None) == (kv is None):
            raise ValueError("CrossAttention needs exactly one of `memory` or `kv`")
        B, L, D = x.shape
        k, v = self.project_kv(memory) if kv is None else kv
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]
        out = attention(
            q,
            k,
            v,
            key_padding_mask=memory_mask,
            kv_index=kv_index,
            dropout_p=self.attn_dropout if self.training else 0.0,
            config_backend=self.backend,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))  # [B, L, D]


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (the residual and its dropout belong to the caller)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {activation!r}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU() if activation == "gelu" else QuickGELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]."""
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    """BERT's post-LN layer: self-attention [-> cross-attention] -> MLP, each `LN(x + dropout(f(x)))`.

    Used as: text-encoder layer (no cross), asymmetric co-attention layer (cross to the image),
    connected-attention layer (no cross, run over [image; text]), decoder layer (causal + cross).

    Args:
        dim: D.  num_heads: H.  intermediate_dim: MLP hidden width.
        layer_norm_eps: 1e-12 in BERT.  dropout: hidden dropout.  attn_dropout: probability dropout.
        cross_attention: build the cross block (`cross`, `norm_cross`; None otherwise).
        memory_dim: width of the cross-attention memory (defaults to D).
        backend: attention backend name, None = automatic.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        intermediate_dim: int,
        *,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        cross_attention: bool = False,
        memory_dim: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.attn = SelfAttention(dim, num_heads, attn_dropout, backend)
        self.norm_attn = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.cross = (
            CrossAttention(dim, memory_dim or dim, num_heads, attn_dropout, backend)
            if cross_attention
            else None
        )
        self.norm_cross = nn.LayerNorm(dim, eps=layer_norm_eps) if cross_attention else None
        self.mlp = MLP(dim, intermediate_dim, "gelu")
        self.norm_mlp = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        causal: bool = False,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_index: Tensor | None = None,
    ) -> Tensor:
        """x: [B, L, D]; mask: bool [B, L] (True = token); memory: [Bm, M, Dm] or its precomputed
        `memory_kv`; memory_mask: bool [Bm, M]; memory_index: long [B] -> memory row. Returns [B, L, D]."""
        x = self.norm_attn(x + self.dropout(self.attn(x, mask, causal)))
        if self.cross is not None:
            if memory is None and memory_kv is None:
                raise ValueError("this layer has cross-attention: pass `memory` (or `memory_kv`)")
            c = self.cross(x, memory, memory_mask, kv=memory_kv, kv_index=memory_index)
            x = self.norm_cross(x + self.dropout(c))
        return self.norm_mlp(x + self.dropout(self.mlp(x)))


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's scheme, applied with `model.apply`: Linear/Embedding ~ N(0, std), biases 0, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
