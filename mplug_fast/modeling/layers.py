"""The building blocks shared by every stack: attention (self / cross), MLP, post-LN BERT layer.

Used by the text encoder, the fusion layers and the decoder (post-LN, erf GELU, LayerNorm eps 1e-12) and,
for attention and MLP, by the CLIP ViT (pre-LN, QuickGELU). Parameter names are ours (`qkv`, `q_proj`,
`kv_proj`, `out_proj`, `fc1`, `fc2`, `norm_*`); `mplug_fast.checkpoint` maps the official names onto them
(q/k/v are stored fused). The projections go through `mplug_fast.ops.small_linear.linear`: the few rows of
a CPU decoding step run the native small-row kernel, everything else `nn.Linear` itself.

Backends are resolved once per module and static key (device kind, dtype, mask kind, dropout, autograd
recording) and kept in a `BackendCache` (`mplug_fast.ops.registry`): attention from the module's `backend`
(the model config's choice, below `MPLUG_FAST_ATTENTION`), the fused epilogues from its `fused_backend`
(None: `MPLUG_FAST_FUSED`, else automatic; `set_fused_backend(model, name)` sets it on every module). With
the `triton` fused backend the post-LN blocks run `LN(x + dropout(f(x)))` as one `residual_layer_norm` and
the MLPs add fc1's bias inside the activation kernel (`bias_act`); `reference` runs the plain modules
(`nn.LayerNorm`, `nn.Dropout`, `nn.GELU`, `QuickGELU`), exactly the unfused computation. Parameters and
state-dict keys are the same either way. Call `clear_backend_caches(model)` after changing `MPLUG_FAST_*`
in a running process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.modeling.kv_cache import KVCache
from mplug_fast.ops.attention import ATTENTION, resolve_attention
from mplug_fast.ops.fused import FUSED, fused_key, resolve_fused
from mplug_fast.ops.reference import check_attention_inputs
from mplug_fast.ops.registry import BackendCache, mask_kind
from mplug_fast.ops.small_linear import linear


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Attention(nn.Module):
    """What self- and cross-attention share: head split (dim D, num_heads H, head dim D / H), dropout on the
    attention probabilities (training only), and the backend (name, None = automatic; see
    `mplug_fast.ops.attention`) resolved once per static key (`attend`)."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float, backend: str | None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.backend = backend  # the config's choice (None: MPLUG_FAST_ATTENTION, else automatic)
        self.backends = BackendCache()

    def backend_name(self, q: Tensor, padded: bool, causal: bool) -> str:
        """The backend `attend` runs for queries like `q` (device, dtype) with / without a key padding mask
        and a causal mask, in this module's mode (training: dropout) and autograd state; resolved once per
        such key."""
        dropout, grad = self.training and self.attn_dropout > 0.0, torch.is_grad_enabled()
        key = (q.is_cuda, q.is_cpu, q.dtype, padded, causal, dropout, grad)  # cheap tensor properties only

        def resolve() -> str:
            mask = mask_kind(padded, causal)
            return resolve_attention(
                q.device.type, q.dtype, self.head_dim, mask, dropout, grad, None, self.backend
            )

        return self.backends.get(key, resolve)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        kv_index: Tensor | None = None,
    ) -> Tensor:
        """`ops.attention` with this module's backend.

        q: [B, H, Lq, Dh].  k, v: [Bk, H, Lk, Dh].  key_padding_mask: bool [Bk, Lk], True = attend.
        Returns [B, H, Lq, Dh]."""
        dropout_p = self.attn_dropout if self.training else 0.0
        name = self.backend_name(q, key_padding_mask is not None, causal)
        check_attention_inputs(q, k, v, key_padding_mask, kv_index)
        kwargs = dict(key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p, scale=None)
        return ATTENTION[name].run(q, k, v, kv_index=kv_index, **kwargs)


class SelfAttention(_Attention):
    """Multi-head self-attention with a fused QKV projection (arguments: see `_Attention`)."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, backend: str | None = None):
        super().__init__(dim, num_heads, attn_dropout, backend)
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
        qkv = linear(self.qkv, x).view(B, L, 3, self.num_heads, self.head_dim)  # [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, Dh] (views)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # views: [B, H, cache.length + L, Dh]
            causal = causal and L > 1  # a single new query sees the whole cache: no causal mask needed
        out = self.attend(q, k, v, key_padding_mask, causal)  # [B, H, L, Dh]
        return linear(self.out_proj, out.transpose(1, 2).reshape(B, L, D))  # [B, L, D]


class CrossAttention(_Attention):
    """Multi-head cross-attention: queries from `x`, keys/values from a memory (one fused K/V GEMM).

    `project_kv(memory)` can be called once and its result passed as `kv=` to every later call
    (decoding steps, beams, answer candidates); `kv_index` then maps query rows to memory rows.
    dim: query width D; memory_dim: memory width (other arguments: see `_Attention`).
    """

    def __init__(
        self, dim: int, memory_dim: int, num_heads: int, attn_dropout: float = 0.0, backend: str | None = None
    ):
        super().__init__(dim, num_heads, attn_dropout, backend)
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
            q = linear(self.q_proj, x).view(Bm, G, L, H, Dh).permute(0, 3, 1, 2, 4)  # [Bm, H, G, L, Dh]
            q = q.reshape(Bm, H, G * L, Dh)  # copy
            out = self.attend(q, k, v, memory_mask)  # [Bm, H, G*L, Dh]
            out = out.view(Bm, H, G, L, Dh).permute(0, 2, 3, 1, 4).reshape(B, L, D)  # copy: [B, L, D]
            return linear(self.out_proj, out)
        q = linear(self.q_proj, x).view(B, L, H, Dh).transpose(1, 2)  # [B, H, L, Dh]
        out = self.attend(q, k, v, memory_mask, kv_index=kv_index)  # [B, H, L, Dh]
        return linear(self.out_proj, out.transpose(1, 2).reshape(B, L, D))  # [B, L, D]


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (the residual and its dropout belong to the caller); with the `triton`
    fused backend, fc1's bias is added inside the activation kernel (one pass over [*, hidden], not two)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {activation!r}")
        self.activation = activation
        self.fused_backend: str | None = None  # None: MPLUG_FAST_FUSED, else automatic (see the module doc)
        self.fused_backends = BackendCache()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU() if activation == "gelu" else QuickGELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]."""
        name = fused_backend(self, x, self.fc1)
        if name == "reference":
            return linear(self.fc2, self.act(linear(self.fc1, x)))
        h = F.linear(x, self.fc1.weight)  # [..., hidden], bias added by the kernel
        return self.fc2(FUSED[name].bias_act(h, self.fc1.bias, self.activation))


def fused_backend(module: nn.Module, x: Tensor, params: nn.Module, dropout: bool = False) -> str:
    """The fused backend of `module` for an epilogue over x [*, D] with the weight and bias of `params`
    (the LayerNorm or fc1), resolved once per static key and kept in `module.fused_backends` (from
    `module.fused_backend`, else `MPLUG_FAST_FUSED`, else automatic). On a hit no parameter is read."""
    if module.fused_backend == "reference":  # runs everywhere (also on int8 layers, whose weight is a method)
        return "reference"
    key = (x.is_cuda, x.is_cpu, x.dtype, dropout, torch.is_grad_enabled())  # cheap tensor properties only

    def resolve() -> str:
        return resolve_fused(*fused_key(x, params.weight, params.bias, dropout=dropout), module.fused_backend)

    return module.fused_backends.get(key, resolve)


def residual_norm(
    module: nn.Module, out: Tensor, residual: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout
) -> Tensor:
    """`norm(residual + dropout(out))`, fused (the backend's `residual_layer_norm`) when `module`'s fused
    backend is `triton`. out, residual: [*, D] -> [*, D]."""
    drop = dropout.training and dropout.p > 0.0
    name = fused_backend(module, out, norm, dropout=drop)
    if name == "reference":
        return norm(residual + dropout(out))
    return FUSED[name].residual_layer_norm(
        out, residual, norm.weight, norm.bias, norm.eps, dropout.p, dropout.training
    )


def clear_backend_caches(model: nn.Module) -> nn.Module:
    """Forget the backends every module of `model` resolved (e.g. after changing `MPLUG_FAST_*`)."""
    for module in model.modules():
        names = ("backends", "fused_backends", "native_plans")
        for cache in (getattr(module, name, None) for name in names):
            if isinstance(cache, BackendCache):
                cache.clear()
    return model


def set_fused_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Set `fused_backend` ("reference", "triton" or None = environment / automatic) on every module of
    `model` that has fused epilogues, and clear the resolved choices; returns `model`."""
    if backend is not None and backend not in FUSED.backends:
        raise ValueError(f"unknown fused backend {backend!r}; valid: {', '.join(FUSED.names())}, None")
    for module in model.modules():
        if isinstance(module, MLP | TransformerLayer):
            module.fused_backend = backend
    return clear_backend_caches(model)


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
        self.fused_backends = BackendCache()

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
