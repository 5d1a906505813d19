"""The building blocks shared by every stack: attention (self / cross), MLP, post-LN BERT layer.

Written once and used by the text encoder, the fusion layers and the decoder (post-LN, erf GELU,
LayerNorm eps 1e-12) and, for attention and MLP, by the CLIP ViT (pre-LN, QuickGELU).

Parameter names are ours (`qkv`, `q_proj`, `kv_proj`, `out_proj`, `fc1`, `fc2`, `norm_*`);
`mplug_fast.checkpoint` maps the official names onto them (q/k/v are stored fused).

Fused epilogues (`mplug_fast.ops.fused`): the post-LN residual blocks run `LN(x + dropout(f(x)))` through
`residual_layer_norm` and the MLPs `act(fc1(x))` through `bias_gelu` / `bias_quick_gelu` (fc1's GEMM without
its bias, the bias added in the activation kernel) when the fused backend is `triton`. The backend is chosen
per call as in `mplug_fast.ops.fused.select_backend`: the module's `fused_backend` attribute (None by default;
`set_fused_backend(model, name)` sets it on every module) > `MPLUG_FAST_FUSED` > automatic (`triton` on CUDA,
`reference` on CPU). The `reference` choice runs the plain modules (`nn.LayerNorm`, `nn.Dropout`, `nn.GELU`,
`QuickGELU`), exactly the unfused computation. Parameters and state-dict keys are the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.ops.attention import attention
from mplug_fast.ops.fused import bias_gelu, bias_quick_gelu, residual_layer_norm, select_backend


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class KVCache:
    """Preallocated self-attention keys/values of a stack of layers, for incremental decoding.

    One buffer per tensor for all layers, `k`, `v`: [layers, N, H, Lmax, Dh] (slot `i` is layer i's
    [N, H, Lmax, Dh]), allocated on the first `update` with the dtype/device of the projected keys, and a
    key-padding mask `mask`: bool [N, Lmax] (True = attend). Positions [0, length) are valid. Every step
    writes in place (slice assignment); nothing is concatenated. `reorder(index)` selects rows (beam
    search, or expanding one prompt per sample to its beams).

    Per decoding call: `append_mask(new_mask, N, L, device)`, every layer `update(i, k, v)`, `advance(L)`.
    """

    def __init__(self, num_layers: int, max_length: int):
        if num_layers < 1 or max_length < 1:
            raise ValueError(
                f"KVCache needs num_layers >= 1 and max_length >= 1, got {num_layers}, {max_length}"
            )
        self.num_layers = num_layers
        self.max_length = max_length
        self.length = 0
        self.k: Tensor | None = None  # [layers, N, H, Lmax, Dh]
        self.v: Tensor | None = None
        self.mask: Tensor | None = None  # bool [N, Lmax]
        self.padded = False  # True once a mask was appended: attention then needs the key-padding mask

    @property
    def batch_size(self) -> int | None:
        """N (None before the first write)."""
        return None if self.mask is None else self.mask.shape[0]

    def append_mask(
        self, mask: Tensor | None, batch_size: int, new_length: int, device: torch.device
    ) -> None:
        """Record the padding mask of `new_length` tokens about to be written (None = all real tokens)."""
        end = self.length + new_length
        if end > self.max_length:
            raise ValueError(
                f"KVCache holds {self.max_length} positions; {self.length} are used and {new_length} more "
                "were given: build the cache with a larger max_length"
            )
        if self.mask is None:
            self.mask = torch.ones(batch_size, self.max_length, dtype=torch.bool, device=device)
        elif self.mask.shape[0] != batch_size:
            raise ValueError(f"KVCache holds {self.mask.shape[0]} rows, got {batch_size}; reorder it first")
        if mask is not None:
            self.mask[:, self.length : end] = mask
            self.padded = True

    def key_mask(self, new_length: int) -> Tensor | None:
        """bool [N, length + new_length] over the cached and new keys, or None when nothing was padded."""
        return self.mask[:, : self.length + new_length] if self.padded else None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write layer `layer`'s new k, v [N, H, L, Dh] at [length, length + L); return views over
        [0, length + L), each [N, H, length + L, Dh]."""
        N, H, L, Dh = k.shape
        if self.k is None:
            shape = (self.num_layers, N, H, self.max_length, Dh)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.length + L
        if end > self.max_length:
            raise ValueError(f"KVCache overflow: {end} positions > max_length {self.max_length}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, new_length: int) -> None:
        """Mark `new_length` more positions valid (after every layer has written them)."""
        self.length += new_length

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i]; index: long [N'] (N' may differ from N, e.g. prompt -> beams)."""
        if self.k is None:
            return
        L = self.length
        if index.shape[0] == self.k.shape[1]:
            # Same row count (a beam-search step): rewrite only the valid prefix, in place.
            self.k[:, :, :, :L] = self.k[:, index, :, :L]  # gather copy, then in-place write
            self.v[:, :, :, :L] = self.v[:, index, :, :L]
            self.mask[:, :L] = self.mask[index, :L]
        else:
            self.k = self.k.index_select(1, index)  # copy: [layers, N', H, Lmax, Dh]
            self.v = self.v.index_select(1, index)
            self.mask = self.mask.index_select(0, index)  # [N', Lmax]


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

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        *,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x: [B, L, D]; key_padding_mask: bool [B, L] (or, with a cache, [B, cache_len + L]), True = attend.

        With `cache`, `x` holds only the new tokens: their keys/values are written into the cache's
        slot `layer` at [cache.length, cache.length + L) and the queries attend to the whole cached prefix
        (causal is bottom-right aligned); the caller advances the cache after the last layer.
        Returns [B, L, D] (after out_proj)."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, Dh] (views)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # views: [B, H, cache.length + L, Dh]
            causal = causal and L > 1  # a single new query sees the whole cache: no causal mask needed
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
        kv_index: Tensor | int | None = None,
    ) -> Tensor:
        """x: [B, L, D]; memory: [Bm, M, Dm] or precomputed `kv`; memory_mask: bool [Bm, M], True = attend;
        kv_index: long [B] (row of the memory read by each query row; None when Bm == B), or an int G:
        the rows come in contiguous groups of G per memory row (row b reads memory row b // G; beams,
        samples, answer candidates). A group's queries are then folded into one query axis per memory
        row, so no backend gathers the memory K/V per row (exact: cross-attention has no causal mask).
        Returns [B, L, D]."""
        if (memory is None) == (kv is None):
            raise ValueError("CrossAttention needs exactly one of `memory` or `kv`")
        B, L, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        k, v = self.project_kv(memory) if kv is None else kv
        if isinstance(kv_index, int):
            G, Bm = kv_index, k.shape[0]
            if B != Bm * G:
                raise ValueError(f"{B} query rows are not {Bm} memory rows x groups of {G}")
            q = self.q_proj(x).view(Bm, G, L, H, Dh).permute(0, 3, 1, 2, 4)  # [Bm, H, G, L, Dh]
            q = q.reshape(Bm, H, G * L, Dh)  # copy
            out = attention(
                q,
                k,
                v,
                key_padding_mask=memory_mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                config_backend=self.backend,
            )  # [Bm, H, G*L, Dh]
            out = out.view(Bm, H, G, L, Dh).permute(0, 2, 3, 1, 4).reshape(B, L, D)  # copy: [B, L, D]
            return self.out_proj(out)
        q = self.q_proj(x).view(B, L, H, Dh).transpose(1, 2)  # [B, H, L, Dh]
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
    """fc1 -> activation -> fc2 (the residual and its dropout belong to the caller).

    With the `triton` fused backend, fc1 runs without its bias and `bias_gelu` / `bias_quick_gelu` adds it
    inside the activation kernel (one pass over the [*, hidden] activation instead of two).
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {activation!r}")
        self.activation = activation
        self.fused_backend: str | None = None  # None: MPLUG_FAST_FUSED, else automatic (see the module doc)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU() if activation == "gelu" else QuickGELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]."""
        if select_backend(x, self.fc1.bias, backend=self.fused_backend) == "reference":
            return self.fc2(self.act(self.fc1(x)))
        h = F.linear(x, self.fc1.weight)  # [..., hidden], bias added by the kernel
        if self.activation == "gelu":
            h = bias_gelu(h, self.fc1.bias, backend="triton")
        else:
            h = bias_quick_gelu(h, self.fc1.bias, backend="triton")
        return self.fc2(h)


def residual_norm(
    module: nn.Module, out: Tensor, residual: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout
) -> Tensor:
    """`norm(residual + dropout(out))`, fused (`residual_layer_norm`) when `module.fused_backend` (or the
    environment / device) selects `triton`. out, residual: [*, D] -> [*, D]."""
    backend = select_backend(out, residual, norm.weight, norm.bias, backend=module.fused_backend)
    if backend == "reference":
        return norm(residual + dropout(out))
    return residual_layer_norm(
        out,
        residual,
        norm.weight,
        norm.bias,
        norm.eps,
        dropout_p=dropout.p,
        training=dropout.training,
        backend="triton",
    )


def set_fused_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Set `fused_backend` ("reference", "triton" or None = environment / automatic) on every module of
    `model` that has fused epilogues; returns `model`."""
    if backend is not None and backend not in ("reference", "triton"):
        raise ValueError(f"unknown fused backend {backend!r}; valid: reference, triton, None")
    for module in model.modules():
        if hasattr(module, "fused_backend"):
            module.fused_backend = backend
    return model


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
        self.fused_backend: str | None = None  # None: MPLUG_FAST_FUSED, else automatic (see the module doc)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        causal: bool = False,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_index: Tensor | int | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x: [B, L, D]; mask: bool [B, L] (True = token); memory: [Bm, M, Dm] or its precomputed
        `memory_kv`; memory_mask: bool [Bm, M]; memory_index: long [B] -> memory row, or an int G
        (contiguous groups of G rows per memory row, see `CrossAttention.forward`).
        cache / layer: incremental decoding (see `SelfAttention.forward`; `mask` then covers the cached
        keys too, [B, cache.length + L]). Returns [B, L, D]."""
        a = self.attn(x, mask, causal, cache=cache, layer=layer)
        x = residual_norm(self, a, x, self.norm_attn, self.dropout)
        if self.cross is not None:
            if memory is None and memory_kv is None:
                raise ValueError("this layer has cross-attention: pass `memory` (or `memory_kv`)")
            c = self.cross(x, memory, memory_mask, kv=memory_kv, kv_index=memory_index)
            x = residual_norm(self, c, x, self.norm_cross, self.dropout)
        return residual_norm(self, self.mlp(x), x, self.norm_mlp, self.dropout)


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
