"""The decoder layers of a cached CPU decoding step as one native call (`mplug_fast::decode_layers`).

A cached decoding step runs every decoder layer on one new token per row. On CPU the weights are read by
`small_linear` and the attention runs `short_query`; what is left is a few hundred small Python calls per
step (module calls, backend and fused-epilogue lookups, cache bookkeeping), which on two threads cost about
a third of the time the weights take to read. `decode_layers` (kernels/cpu/decode_layers.cpp) runs the same
kernels in the same order in a C++ loop: the logits equal the Python layers' bit for bit.

`TextDecoder.forward` takes this path when `usable(...)` holds, i.e. when the Python layers would run exactly
these kernels: one new token per row with a self-attention cache, fp32 CPU, no autograd, eval mode, plain
`nn.Linear` layers with biases (not int8) on which `small_linear` runs, `short_query` chosen for the self-
and cross-attention, the plain LayerNorm / GELU epilogues (`reference` fused backend), the memory K/V
shared in contiguous groups (`memory_index` an int or None) with their head dim contiguous, at most
`MAX_QUERIES` rows per memory row, outside torch.compile. `MPLUG_FAST_DECODE_LAYERS=0` turns it off (the
Python layers then run); `1` or unset: on where usable.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn

from mplug_fast.modeling.kv_cache import KVCache
from mplug_fast.modeling.layers import TransformerLayer, fused_backend
from mplug_fast.ops.native import native_op
from mplug_fast.ops.short_query import MAX_QUERIES
from mplug_fast.ops.small_linear import small_rows

ENV = "MPLUG_FAST_DECODE_LAYERS"


@functools.cache
def enabled() -> bool:
    """Whether the native decoder layers may run in this process (`MPLUG_FAST_DECODE_LAYERS`)."""
    choice = os.environ.get(ENV, "1")
    if choice not in ("0", "1"):
        raise ValueError(f"{ENV}={choice!r}: use 1 (on where usable) or 0 (off)")
    return choice == "1"


def _linears(layer: TransformerLayer) -> tuple[nn.Module, ...]:
    return (
        layer.attn.qkv,
        layer.attn.out_proj,
        layer.cross.q_proj,
        layer.cross.out_proj,
        layer.mlp.fc1,
        layer.mlp.fc2,
    )


def _norms(layer: TransformerLayer) -> tuple[nn.LayerNorm, ...]:
    return (layer.norm_attn, layer.norm_cross, layer.norm_mlp)


def usable(
    layers: nn.ModuleList,
    x: Tensor,
    self_mask: Tensor | None,
    memory_kv: list[tuple[Tensor, Tensor]],
    memory_mask: Tensor | None,
    memory_index: Tensor | int | None,
    cache: KVCache,
) -> bool:
    """Whether `run` computes what the Python layers would for x [N, 1, D] (see the module docstring)."""
    if not enabled() or x.dim() != 3 or x.shape[1] != 1 or isinstance(memory_index, Tensor):
        return False
    if torch.compiler.is_compiling() or native_op("decode_layers", "cpu") is None:
        return False
    if not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled():
        return False
    N, Bm = x.shape[0], memory_kv[0][0].shape[0]
    if N % Bm or N // Bm > MAX_QUERIES or (cache.k is not None and cache.k.shape[1] != N):
        return False
    q = x.view(N, -1)
    eps = layers[0].norm_attn.eps
    for layer, (k, v) in zip(layers, memory_kv, strict=True):
        if layer.training or layer.cross is None or k.stride(-1) != 1 or v.stride(-1) != 1:
            return False
        for linear in _linears(layer):
            if type(linear) is not nn.Linear or linear.bias is None or not small_rows(q, linear.weight):
                return False
        if any(norm.eps != eps for norm in _norms(layer)) or type(layer.mlp.act) is not nn.GELU:
            return False
        if layer.mlp.act.approximate != "none":
            return False
        if (
            fused_backend(layer, x, layer.norm_attn) != "reference"
            or fused_backend(layer.mlp, x, layer.mlp.fc1) != "reference"
        ):
            return False
        if layer.attn.backend_name(x, self_mask is not None, False) != "short_query":
            return False
        if layer.cross.backend_name(x, memory_mask is not None, False) != "short_query":
            return False
    return True


def run(
    layers: nn.ModuleList,
    x: Tensor,
    self_mask: Tensor | None,
    memory_kv: list[tuple[Tensor, Tensor]],
    memory_mask: Tensor | None,
    cache: KVCache,
) -> Tensor:
    """The decoder layers on x [N, 1, D] (the new token of each row) through `decode_layers`, writing its keys
    and values into `cache` at `cache.length` (the caller advances the cache). Returns [N, 1, D]."""
    N, _, D = x.shape
    attn = layers[0].attn
    cache.allocate(N, attn.num_heads, attn.head_dim, x.dtype, x.device)
    params = []
    for layer in layers:
        for module in (*_linears(layer)[:2], layer.norm_attn, *_linears(layer)[2:4], layer.norm_cross):
            params += (module.weight, module.bias)
        for module in (layer.mlp.fc1, layer.mlp.fc2, layer.norm_mlp):
            params += (module.weight, module.bias)
    memory_k = [k for k, _ in memory_kv]
    memory_v = [v for _, v in memory_kv]
    h = torch.ops.mplug_fast.decode_layers(
        x.view(N, D),
        params,
        cache.k,
        cache.v,
        cache.length,
        self_mask,
        memory_k,
        memory_v,
        memory_mask,
        layers[0].norm_attn.eps,
    )
    return h.view(N, 1, D)
