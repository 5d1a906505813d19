"""The `sdpa` attention backend: `torch.nn.functional.scaled_dot_product_attention` under mPLUG's mask
semantics (`mplug_fast.ops.reference`: bool masks, True = attend; causal aligned at the bottom right; rows
with no key give 0)."""

from __future__ import annotations

import torch.nn.functional as F

from mplug_fast.ops.reference import attention_mask_ref, gather_kv
from mplug_fast.ops.registry import AttentionBackend

__all__ = ["SdpaBackend"]


class SdpaBackend(AttentionBackend):
    """`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient / math kernels)."""

    NAME = "sdpa"

    @staticmethod
    def run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index):
        k, v, key_padding_mask = gather_kv(k, v, key_padding_mask, kv_index)  # [B, H, Lk, Dh]
        Lq, Lk = q.shape[-2], k.shape[-2]
        if key_padding_mask is None and (not causal or Lq == Lk):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
        mask = attention_mask_ref(key_padding_mask, causal, Lq, Lk, q.device)  # bool, True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        # Rows with no key: the CPU math kernel already returns 0, the CUDA kernels may not.
        return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
