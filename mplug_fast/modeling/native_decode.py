"""The decoder layers of a cached CPU decoding step as one native call (`mplug_fast::decode_layers`).

A cached decoding step runs every decoder layer on one new token per row. On CPU the weights are read by
`small_linear` and the attention runs `short_query`; what is left is a few hundred small Python calls per
step (module calls, backend and fused-epilogue lookups, cache bookkeeping), which on two threads cost about
a third of the time the weights take to read. `decode_layers` (kernels/cpu/decode_layers.cpp) runs the same
kernels in the same order in a C++ loop: the logits equal the Python layers' bit for bit.

`TextDecoder.forward` takes this path when `usable(...)` holds, i.e. when the Python layers would run exactly
these kernels: one new token per row with a self-attention cache, fp32 CPU, no autograd, eval mode, linear
layers with biases that are plain `nn.Linear` (not int8) on which `small_linear` runs or `PackedLinear`
(their panels go to the op, which runs `packed_linear` on them), `short_query` chosen for the self- and
cross-attention, the plain LayerNorm / GELU epilogues (`reference` fused backend), the memory K/V shared in
contiguous groups (`memory_index` an int or None) with their head dim contiguous, at most `MAX_QUERIES`
rows per memory row, outside torch.compile. `MPLUG_FAST_DECODE_LAYERS=0` turns it off (the
Python layers then run); `1` or unset: on where usable.

Whether the modules qualify (their types, the backends they resolve) is worked out once per static key and
kept, with the module objects it was worked out for, in the decoder's `native_plans` (a `BackendCache`,
cleared with the resolved backends by `clear_backend_caches`). Each step reads the modules and their
parameters through the modules' own dicts (cheap), and runs the op only when they are the same objects as
then (none replaced, e.g. by int8 layers), none is in training mode and every parameter is fp32 on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn

from mplug_fast.modeling.kv_cache import KVCache
from mplug_fast.modeling.layers import fused_backend
from mplug_fast.modeling.packed_linear import PackedLinear
from mplug_fast.ops.native import native_op
from mplug_fast.ops.packed_linear import packed_rows
from mplug_fast.ops.registry import BackendCache
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


MODULES_PER_LAYER = 10  # the layer, then the 9 modules whose weight and bias the op reads, in its order
# positions in a layer's 10: qkv, attn out_proj, q_proj, cross out_proj, fc1, fc2; the three norms
LINEARS, NORMS = (1, 2, 4, 5, 7, 8), (3, 6, 9)
KERNEL_CHECKS = {nn.Linear: small_rows, PackedLinear: packed_rows}  # the linear layer types the op runs


def _modules(layers: nn.ModuleList) -> tuple[nn.Module, ...]:
    """Per layer: the layer, qkv, attn out_proj, norm_attn, q_proj, cross out_proj, norm_cross, fc1, fc2,
    norm_mlp (the op's parameter order); () when a layer has no cross-attention. Plain dict lookups."""
    out: list[nn.Module] = []
    for layer in layers._modules.values():
        m = layer._modules
        if m.get("cross") is None:
            return ()
        attn, cross, mlp = m["attn"]._modules, m["cross"]._modules, m["mlp"]._modules
        out += (layer, attn["qkv"], attn["out_proj"], m["norm_attn"], cross["q_proj"], cross["out_proj"])
        out += (m["norm_cross"], mlp["fc1"], mlp["fc2"], m["norm_mlp"])
    return tuple(out)


def _qualifies(modules: tuple[nn.Module, ...], x: Tensor, self_padded: bool, cross_padded: bool) -> bool:
    """Whether the Python layers (`modules` from `_modules`) would run exactly the op's kernels on
    x [N, 1, D] (fp32 CPU, no grad)."""
    rows = x.view(x.shape[0], -1)
    eps = modules[NORMS[0]].eps
    for start in range(0, len(modules), MODULES_PER_LAYER):
        group = modules[start : start + MODULES_PER_LAYER]
        layer = group[0]
        for linear in (group[i] for i in LINEARS):
            runs = KERNEL_CHECKS.get(type(linear))  # whether the op's kernel runs this layer
            if runs is None or linear.bias is None or not runs(rows, linear.weight):
                return False
        for norm in (group[i] for i in NORMS):
            if type(norm) is not nn.LayerNorm or norm.eps != eps or norm.weight is None or norm.bias is None:
                return False
        act = layer.mlp.act
        if type(act) is not nn.GELU or act.approximate != "none":
            return False
        epilogues = fused_backend(layer, x, group[NORMS[0]]), fused_backend(layer.mlp, x, group[LINEARS[4]])
        if epilogues != ("reference", "reference"):
            return False
        attention = (
            layer.attn.backend_name(x, self_padded, False),
            layer.cross.backend_name(x, cross_padded, False),
        )
        if attention != ("short_query", "short_query"):
            return False
    return True


def params(modules: tuple[nn.Module, ...]) -> list[Tensor] | None:
    """The op's parameters (18 per layer) read from `modules` (`_modules`), or None when one is missing or
    is not an fp32 CPU tensor."""
    out: list[Tensor] = []
    for i, module in enumerate(modules):
        if i % MODULES_PER_LAYER:  # (entry 0 of each layer is the layer itself)
            p = module._parameters
            weight, bias = p.get("weight"), p.get("bias")
            if weight is None or bias is None:
                return None
            out += (weight, bias)
    if any(t.dtype != torch.float32 or not t.is_cpu for t in out):
        return None
    return out


def plan(
    layers: nn.ModuleList,
    plans: BackendCache,
    x: Tensor,
    self_mask: Tensor | None,
    memory_kv: list[tuple[Tensor, Tensor]],
    memory_mask: Tensor | None,
    memory_index: Tensor | int | None,
    cache: KVCache,
) -> list[Tensor] | None:
    """The parameters `run` passes to the op for x [N, 1, D], or None where the Python layers must run (see
    the module docstring). `plans`: the decoder's cache of verdicts per static key."""
    if not enabled() or x.dim() != 3 or x.shape[1] != 1 or isinstance(memory_index, Tensor):
        return None
    if not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    N, Bm = x.shape[0], memory_kv[0][0].shape[0]
    if N % Bm or N // Bm > MAX_QUERIES or (cache.k is not None and cache.k.shape[1] != N):
        return None
    if any(k.stride(-1) != 1 or v.stride(-1) != 1 for k, v in memory_kv):
        return None
    modules = _modules(layers)
    if not modules or any(m.training for m in modules) or native_op("decode_layers", "cpu") is None:
        return None  # (the verdict below is worked out in eval mode)
    self_padded, cross_padded = self_mask is not None, memory_mask is not None
    key = (N, self_padded, cross_padded)  # fp32 CPU, no grad: checked above

    def resolve() -> tuple:
        return (modules, _qualifies(modules, x, self_padded, cross_padded))

    verdict = plans.get(key, resolve)
    if verdict[0] != modules:  # a module was replaced since: decide again
        plans.clear()
        verdict = plans.get(key, resolve)
    return params(modules) if verdict[1] else None


def run(
    layers: nn.ModuleList,
    params: list[Tensor],
    x: Tensor,
    self_mask: Tensor | None,
    memory_kv: list[tuple[Tensor, Tensor]],
    memory_mask: Tensor | None,
    cache: KVCache,
) -> Tensor:
    """The decoder layers on x [N, 1, D] (the new token of each row) through `decode_layers` with `params`
    (from `plan`), writing its keys and values into `cache` at `cache.length` (the caller advances the
    cache). Returns [N, 1, D]."""
    N, _, D = x.shape
    attn = layers[0].attn
    cache.allocate(N, attn.num_heads, attn.head_dim, x.dtype, x.device)
    h = torch.ops.mplug_fast.decode_layers(
        x.view(N, D),
        params,
        cache.k,
        cache.v,
        cache.length,
        self_mask,
        [k for k, _ in memory_kv],
        [v for _, v in memory_kv],
        memory_mask,
        layers[0].norm_attn.eps,
    )
    return h.view(N, 1, D)
