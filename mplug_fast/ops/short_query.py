"""The `short_query` attention backend: the native CPU kernel for the few queries of a decoding step.

A decoding step attends from a few query rows per head (the beams of an image: their rows are folded into
one query axis by `CrossAttention`, or one new token against the self-attention cache) to hundreds of keys
(the image memory). torch's CPU attention blocks for long query tiles and reads the K/V at a fraction of
the memory rate there; `mplug_fast::short_query_attention` (kernels/cpu/short_query_attention.cpp) computes
the scores, the softmax and the value sums in AVX2 register tiles with the K/V rows prefetched ahead of the
FMAs (1.9x torch's kernel at 5 queries x 577 keys with the K/V of each head contiguous, 1.4x on the fused
K/V projection's strided views; `benchmarks/generation_speed.py` measures the step).

It runs fp32 CPU tensors with a key padding mask or none (no causal mask, dropout or autograd), head dims a
multiple of 8, outside torch.compile (a compiled graph keeps SDPA), when the native op is built. Calls with
more than `MAX_QUERIES` query rows per head (an encoder, a teacher-forced decoder) go to the `sdpa` backend:
beyond that the two kernels are about as fast. `attention_priority` puts it first on CPUs whose torch
capability is AVX2 (where it was measured); elsewhere it runs when chosen (`MPLUG_FAST_ATTENTION=short_query`
or `backend=`). Results differ from SDPA by rounding only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mplug_fast.ops.native import native_op, unavailable_reason
from mplug_fast.ops.reference import gather_kv
from mplug_fast.ops.registry import AttentionBackend, Inputs
from mplug_fast.ops.sdpa import SdpaBackend

__all__ = ["MAX_QUERIES", "ShortQueryBackend"]

MAX_QUERIES = 16  # query rows per head up to which the native kernel runs (SDPA is as fast beyond)


class ShortQueryBackend(AttentionBackend):
    """`mplug_fast::short_query_attention` up to `MAX_QUERIES` query rows, SDPA beyond (see the module)."""

    NAME = "short_query"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.compiler.is_compiling():
            return "not inside torch.compile (a compiled graph keeps SDPA)"
        return unavailable_reason("short_query_attention", "cpu")

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list[str]:
        reasons = []
        if inputs.device_type != "cpu":
            reasons.append(f"needs CPU tensors, got {inputs.device_type}")
        if inputs.dtype != torch.float32:
            reasons.append(f"float32 only, got {inputs.dtype}")
        if inputs.dim % 8:
            reasons.append(f"head dim {inputs.dim} is not a multiple of 8")
        if "causal" in inputs.mask:
            reasons.append(f"no causal mask ({inputs.mask})")
        if inputs.dropout:
            reasons.append("no dropout")
        if inputs.needs_grad:
            reasons.append("no autograd (inference only)")
        return reasons

    @staticmethod
    def run(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask, causal, dropout_p, scale, kv_index):
        """q [B, H, Lq, Dh]; k, v [Bk, H, Lk, Dh] (kv_index: see `AttentionBackend`) -> [B, H, Lq, Dh]."""
        if causal or dropout_p > 0.0:
            raise ValueError("short_query attention runs without a causal mask and dropout")
        k, v, mask = gather_kv(k, v, key_padding_mask, kv_index)
        if q.shape[-2] > MAX_QUERIES or min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1:
            return SdpaBackend.run(
                q, k, v, key_padding_mask=mask, causal=False, dropout_p=0.0, scale=scale, kv_index=None
            )
        op = native_op("short_query_attention", "cpu")
        return op(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
