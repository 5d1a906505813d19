"""Plain-PyTorch implementations: the oracle every faster kernel is tested against.

Mask conventions used by all of `mplug_fast.ops`:

* `key_padding_mask`: bool `[Bk, Lk]`, True = attend (a real token), False = padding.
* `causal`: query i may attend key j iff j <= i + (Lk - Lq) (aligned at the bottom right, so a
  single decoding query attends to the whole cache).
* A query whose keys are all masked gets an all-zero output (never NaN). The official code uses
  an additive -10000 mask, which gives a uniform average instead; no released input has such a
  row (every image has its class token, every text its [CLS]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None
) -> None:
    """A one-line ValueError / TypeError unless q [B, H, Lq, Dh], k, v [Bk, H, Lk, Dh] (one dtype), the
    key-padding mask bool [Bk, Lk] and kv_index an integer [B] (or Bk == B without it) fit together."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D [B, H, L, Dh] tensors, got q {list(q.shape)}, "
            f"k {list(k.shape)}, v {list(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} disagree on heads or head dim")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_index is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(
                f"q has {q.shape[0]} rows but k/v have {k.shape[0]}; pass kv_index to share K/V rows"
            )
    elif kv_index.shape != (q.shape[0],) or kv_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"kv_index must be an integer tensor of shape [{q.shape[0]}], "
            f"got {kv_index.dtype} {list(kv_index.shape)}"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be [Bk, Lk] = [{k.shape[0]}, {k.shape[2]}], "
                f"got {list(key_padding_mask.shape)}"
            )


def attention_mask_ref(
    key_padding_mask: Tensor | None, causal: bool, Lq: int, Lk: int, device: torch.device
) -> Tensor | None:
    """The combined bool mask (True = attend), broadcastable to [B, 1, Lq, Lk]; None if nothing is masked."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # [Bk, 1, 1, Lk]
    if causal:
        rows = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
        tri = torch.arange(Lk, device=device)[None, :] <= rows  # [Lq, Lk]
        mask = tri if mask is None else mask & tri  # [Bk, 1, Lq, Lk]
    return mask


def gather_kv(
    k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """K/V (and mask) rows per query row: [Bk, ...] -> [B, ...] (a copy) when `kv_index` is given."""
    if kv_index is None:
        return k, v, key_padding_mask
    kv_index = kv_index.long()
    mask = None if key_padding_mask is None else key_padding_mask[kv_index]
    return k[kv_index], v[kv_index], mask


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    kv_index: Tensor | None = None,
    upcast: bool = True,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, written out; arguments and result as in `ops.attention.attention`
    (q [B, H, Lq, Dh], k, v [Bk, H, Lk, Dh] -> [B, H, Lq, Dh] in q's dtype), and:

    upcast: compute scores and softmax in fp32 (the accuracy oracle for low-precision kernels).
    dropout_mask: bool [B, H, Lq, Lk], True = keep: apply this mask (scaled by 1 / (1 - dropout_p)) instead
        of drawing one, e.g. a kernel's own mask, to compare its dropout with this oracle.
    """
    k, v, key_padding_mask = gather_kv(k, v, key_padding_mask, kv_index)  # [B, H, Lk, Dh]
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute_dtype = torch.float32 if upcast else q.dtype
    scores = (
        torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)) * scale
    )  # [B, H, Lq, Lk]
    mask = attention_mask_ref(key_padding_mask, causal, Lq, Lk, q.device)
    if mask is not None:
        # A finite fill keeps fully masked rows finite (uniform) in forward and backward;
        # they are zeroed below.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # rows with no key -> 0
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v.to(compute_dtype)).to(q.dtype)


def residual_layer_norm_ref(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    upcast: bool = True,
) -> Tensor:
    """LayerNorm(residual + dropout(x)) over the last dim: BERT's post-LN epilogue, written out.

    Args:
        x: [*, D] (the sublayer output, dropped out).  residual: [*, D].  weight, bias: [D].
        dropout_p: applied to x when `training` (torch's RNG, so not the Triton kernel's mask).
        upcast: add and normalise in fp32 (the accuracy oracle for low-precision kernels).
    Returns:
        [*, D] in promote_types(x.dtype, residual.dtype).
    """
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    if upcast:
        x, residual, weight, bias = x.float(), residual.float(), weight.float(), bias.float()
    h = residual + F.dropout(x, p=dropout_p, training=training)
    return F.layer_norm(h, h.shape[-1:], weight.to(h.dtype), bias.to(h.dtype), eps).to(out_dtype)


def bias_gelu_ref(x: Tensor, bias: Tensor, approximate: str = "none", *, upcast: bool = True) -> Tensor:
    """gelu(x + bias), erf GELU (BERT) or `approximate="tanh"`; bias [N] broadcast over x [*, N]."""
    y = x.float() + bias.float() if upcast else x + bias.to(x.dtype)
    return F.gelu(y, approximate=approximate).to(x.dtype)


def bias_quick_gelu_ref(x: Tensor, bias: Tensor, *, upcast: bool = True) -> Tensor:
    """quick_gelu(x + bias) = y * sigmoid(1.702 y), y = x + bias (CLIP); bias [N] broadcast over x [*, N]."""
    y = x.float() + bias.float() if upcast else x + bias.to(x.dtype)
    return (y * torch.sigmoid(1.702 * y)).to(x.dtype)
