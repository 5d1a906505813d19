"""Attention backends over external kernel libraries: `flash_attn` (FlashAttention-2) and `xformers`.

Listed in `mplug_fast.ops.attention.ATTENTION` (its `attention_priority` puts them right after `triton` on
CUDA tensors). Neither package is imported here: `unavailable_reason` looks the package up
(`importlib.util.find_spec`, package metadata) without importing it, and `run` imports it on first use. On a
machine without CUDA or without the package, `available_backends()` says which.

How mPLUG's attention maps onto them (semantics of `mplug_fast.ops.reference`):

* `flash_attn`: fp16/bf16 CUDA tensors, head dim a multiple of 8 up to 256.
  - no key padding: `flash_attn_func` on `[B, L, H, Dh]` views; `causal` is bottom-right aligned in
    flash-attn >= 2.1 (older versions are reported unavailable), rows with no visible key give 0 there too;
  - key padding: `flash_attn_varlen_func` with the keys unpadded by the mask (`nonzero` on the mask: one
    host synchronisation) and every query kept (`cu_seqlens_q` = multiples of Lq); batch rows without any key
    are zeroed;
  - causal together with key padding is refused (`not_supported_reasons`): varlen aligns the diagonal to each
    row's unpadded key count, not to the padded positions that mPLUG's semantics use;
  - `kv_index`: K/V (and the mask) are gathered per query row (a copy: the shared-K/V saving of the Triton
    kernels is not there);
  - dropout: flash-attn's own RNG (same distribution, not the Triton kernels' mask).
* `xformers`: `memory_efficient_attention` on `[B, L, H, Dh]` views, fp32/fp16/bf16 CUDA tensors. Masks
  (padding and/or causal) become an additive bias `[B, H, Lq, Lk]` materialised in q's dtype (row stride
  padded to a multiple of 8, as the kernels require), filled with a large finite negative value so that rows
  with no visible key stay finite; those rows are then zeroed. `kv_index`: gathered, as above.
  Dropout: xformers' RNG.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

import torch

from mplug_fast.ops.reference import attention_mask_ref, gather_kv
from mplug_fast.ops.registry import AttentionBackend, Inputs

__all__ = ["FlashAttnBackend", "XFormersBackend"]

FLASH_ATTN_MIN_VERSION = (2, 1)  # bottom-right aligned causal masks


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _cuda_reason(package: str) -> str | None:
    if not torch.cuda.is_available():
        return f"needs a CUDA device ({package} kernels are CUDA only; torch.cuda.is_available() is False)"
    return None


def _device_dtype_reasons(inputs: Inputs, dtypes: tuple[torch.dtype, ...], supported: str) -> list[str]:
    """The reasons shared by the CUDA-only libraries: CUDA tensors of a supported dtype."""
    reasons = [] if inputs.device_type == "cuda" else [f"needs CUDA tensors, got {inputs.device_type}"]
    if inputs.dtype not in dtypes:
        reasons.append(f"dtype {inputs.dtype} ({supported})")
    return reasons


class FlashAttnBackend(AttentionBackend):
    """FlashAttention-2 `flash_attn_func`; `flash_attn_varlen_func` with padding."""

    NAME = "flash_attn"
    SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("flash_attn") is None:
            return "package not installed (pip install flash-attn; needs CUDA)"
        try:
            version = importlib.metadata.version("flash_attn")
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is not None and _version_tuple(version)[:2] < FLASH_ATTN_MIN_VERSION:
            return (
                f"flash-attn {version} < 2.1 aligns causal masks at the top left (mPLUG needs bottom right)"
            )
        return _cuda_reason("flash-attn")

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list[str]:
        reasons = _device_dtype_reasons(inputs, cls.SUPPORTED_DTYPES, "flash-attn supports fp16, bf16")
        head_dim = inputs.dim
        if head_dim % 8 != 0 or head_dim > 256:
            reasons.append(f"head_dim={head_dim} (flash-attn: a multiple of 8, at most 256)")
        if inputs.mask == "key_padding+causal":
            reasons.append(
                "causal with key padding (varlen aligns the diagonal to each row's unpadded key count, "
                "not to the padded positions)"
            )
        return reasons

    @staticmethod
    def run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index):
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # optional package, imported on use

        k, v, key_padding_mask = gather_kv(k, v, key_padding_mask, kv_index)
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        q_bl, k_bl, v_bl = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, Dh] views
        if key_padding_mask is None:
            out = flash_attn_func(q_bl, k_bl, v_bl, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
            return out.transpose(1, 2)  # [B, H, Lq, Dh]
        keep = key_padding_mask.reshape(-1).nonzero().squeeze(1)  # [total_k]: host sync
        lengths = key_padding_mask.sum(dim=1, dtype=torch.int32)
        cu_k = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
        cu_k[1:] = lengths.cumsum(0)
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(
            q_bl.reshape(B * Lq, H, D),
            k_bl.reshape(B * Lk, H, D).index_select(0, keep),
            v_bl.reshape(B * Lk, H, D).index_select(0, keep),
            cu_q,
            cu_k,
            Lq,
            Lk,  # an upper bound of the row lengths (no host sync for the max)
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=False,
        )  # [B * Lq, H, Dh]
        out = out.reshape(B, Lq, H, D).transpose(1, 2)  # [B, H, Lq, Dh]
        return out.masked_fill(~key_padding_mask.any(dim=-1)[:, None, None, None], 0.0)  # rows without keys


class XFormersBackend(AttentionBackend):
    """xFormers `memory_efficient_attention` (`pip install xformers`), masks as an additive bias tensor."""

    NAME = "xformers"
    SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("xformers") is None:
            return "package not installed (pip install xformers; needs CUDA)"
        return _cuda_reason("xformers")

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list[str]:
        return _device_dtype_reasons(inputs, cls.SUPPORTED_DTYPES, "xformers: fp32, fp16, bf16")

    @staticmethod
    def run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index):
        xops = importlib.import_module("xformers.ops")

        k, v, key_padding_mask = gather_kv(k, v, key_padding_mask, kv_index)
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        mask = attention_mask_ref(key_padding_mask, causal, Lq, Lk, q.device)  # bool, True = attend, or None
        bias = None
        if mask is not None:
            padded = -(-Lk // 8) * 8  # the kernels need the bias row stride to be a multiple of 8
            bias = torch.zeros((B, H, Lq, padded), dtype=q.dtype, device=q.device)[..., :Lk]
            bias.masked_fill_(~mask.expand(B, H, Lq, Lk), max(torch.finfo(q.dtype).min, -1e9))
        q_bl, k_bl, v_bl = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, Dh] views
        out = xops.memory_efficient_attention(q_bl, k_bl, v_bl, attn_bias=bias, p=dropout_p, scale=scale)
        out = out.transpose(1, 2)  # [B, H, Lq, Dh]
        if mask is not None:  # rows with no visible key: the finite fill gave their mean; mPLUG wants 0
            out = out.masked_fill(~mask.expand(B, 1, Lq, Lk).any(dim=-1, keepdim=True), 0.0)
        return out
