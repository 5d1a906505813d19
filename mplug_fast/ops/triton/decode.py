"""Split-K ("flash-decoding") forward for short queries against long keys, registered as a custom op.

    splitk_attention(q, k, v, *, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None,
                     kv_index=None, num_splits=None) -> out

The shapes it is for: mPLUG's asymmetric co-attention (Lq <= 64 text queries x 257-1297 image keys) and
decoding (Lq = 1 per step, beams sharing one image's K/V through `kv_index`). There the main kernel
(`attention.py`) launches B * H * ceil(Lq / 64) programs, each walking every key block: with a small batch the
GPU is mostly idle. Here the key axis is cut into `num_splits` ranges (whole key blocks each):

* `_splitk_fwd_kernel`: one program per (query block x batch row x head, split); online softmax over its key
  range; writes the split's normalised partial output `[S, B, H, Lq, Dh]` fp32 and its LSE `[S, B, H, Lq]`
  (-inf for a split that sees no key);
* `_splitk_combine_kernel`: one program per query block x batch row x head;
  out = sum_s w_s O_s / sum_s w_s with w_s = exp(LSE_s - max LSE), LSE = max + log(sum w_s)
  (+inf when no split saw a key, as in the main kernel).

The query block is `max(16, next_pow2(Lq))` rows (16 is the smallest `tl.dot` tile), as in the main kernel for
Lq <= 32; key tile, warps and pipeline depth are the forward's (`tiles.py`), and every split covers a whole
number of key tiles. Grids are 1-D over query blocks x B x H
(axis 1 = splits), so the batch is not limited to 65535.

Semantics are those of the main kernel (and `attention_ref`): key padding, bottom-right causal, `kv_index`
read by pointer arithmetic, rows without keys give 0, dropout with the same RNG function on the same
element indices (so for one seed the split-K and main forwards drop the same entries). The backward is the
main backward kernel from the combined (out, LSE): the op is differentiable.

`num_splits_for(...)` is the heuristic the Triton backend uses to choose this kernel (see its docstring).
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mplug_fast.ops.triton.attention import (
    _bhl_strides,
    _checked,
    _mask_arg,
    _precision,
    attention_backward,
    draw_dropout_seed,
    setup_attention_context,
)
from mplug_fast.ops.triton.attention_kernels import (
    LN2,
    LOG2E,
    _attend_key_range,
    _load_rows,
    _split_program_id,
)
from mplug_fast.ops.triton.dropout import dropout_args
from mplug_fast.ops.triton.layer_norm import _on_device
from mplug_fast.ops.triton.tiles import block_size, tile_for

__all__ = ["MAX_QUERIES", "MIN_KEYS", "num_splits_for", "splitk_attention"]

MAX_QUERIES = 64  # the split-K kernel is used for Lq <= MAX_QUERIES ...
MIN_KEYS = 256  # ... and Lk >= MIN_KEYS
BLOCK_N = 64  # keys per split unit in the heuristic (two units at least per split)
DEFAULT_SMS = 132  # SMs assumed off CUDA (H100/H200 SXM): only the interpreter runs there


@triton.jit
def _splitk_fwd_kernel(
    Q, K, V, MASK, KV_INDEX, SEED, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb,
    B, H, Bk, Lq, Lk, D, qk_scale, drop_threshold, drop_scale, keys_per_split,
    HAS_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # axis 0 over (query block, batch row x head): 1-D, so B * H is not limited to 65535; axis 1: the split
    pid_m, bh, off_b, off_h, off_bk = _split_program_id(Lq, BLOCK_M, H, KV_INDEX, Bk, HAS_KV_INDEX)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    q_mask = (rows < Lq)[:, None] & d_ok[None, :]
    q = _load_rows(q_base, rows, stride_qm, offs_d, q_mask)  # [BLOCK_M, BLOCK_D]
    k_base = K + off_bk * stride_kb + off_h * stride_kh
    v_base = V + off_bk * stride_vb + off_h * stride_vh
    mask_row = MASK + off_bk * stride_mb
    seed = tl.load(SEED) if DROPOUT else 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Lk)
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + Lk - Lq)
    m_i, l_i, acc = _attend_key_range(
        q, m_i, l_i, acc, lo, hi, k_base, v_base, stride_kn, stride_vn, mask_row, rows, offs_n, offs_d, d_ok,
        Lq, Lk, qk_scale, seed, bh, pid_m * BLOCK_M, drop_threshold,
        BLOCK_N, HAS_MASK, CAUSAL, DROPOUT, PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0  # this split saw no key for the row: weight 0 in the combine
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    part = pid_s * B * H + bh  # [S, B, H, ...] layout, contiguous
    o_ptrs = O_PART + (part * Lq + rows)[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, acc * (drop_scale / l_safe)[:, None], mask=(rows < Lq)[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part * Lq + rows, lse, mask=rows < Lq)


@triton.jit
def _splitk_combine_kernel(
    O_PART, LSE_PART, OUT, LSE,
    stride_ob, stride_oh, stride_om,
    B, H, Lq, D, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % m_blocks
    bh = (pid // m_blocks).to(tl.int64)
    off_b = bh // H
    off_h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (rows < Lq)[:, None] & (offs_d < D)[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        part = s * B * H + bh
        lse_s = tl.load(LSE_PART + part * Lq + rows, mask=rows < Lq, other=float("-inf")) * LOG2E
        o_s = tl.load(O_PART + (part * Lq + rows)[:, None] * D + offs_d[None, :], mask=io_mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        w = tl.math.exp2(lse_s - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        l_i = l_i * alpha + w
        m_i = m_new

    empty = l_i == 0.0  # no split saw a key: output 0, LSE +inf (the main kernel's convention)
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(OUT.dtype.element_ty), mask=io_mask)
    tl.store(LSE + bh * Lq + rows, lse, mask=rows < Lq)


# ---- heuristic ---------------------------------------------------------------------------------------------


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":  # torch caches the device properties
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def num_splits_for(B: int, H: int, Lq: int, Lk: int, device: torch.device | str) -> int:
    """How many key splits the Triton backend uses; 1 means "use the main kernel".

    Split when the main kernel cannot fill the GPU and there is a long key axis to share out:
    Lq <= 64, Lk >= 256, and the split-K kernel's B * H * ceil(Lq / BLOCK_M) programs number fewer than the
    streaming multiprocessors (SMs; 132 assumed off CUDA). Then the splits bring the grid to about two waves
    (2 * SMs programs), with at least two key tiles (128 keys) per split so that each program amortises its
    query load and the combine stays small. Not tuned on a GPU yet.
    """
    if Lq > MAX_QUERIES or Lk < MIN_KEYS:
        return 1
    programs = B * H * triton.cdiv(Lq, block_size(Lq))
    sms = _sm_count(torch.device(device))
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(Lk, 2 * BLOCK_N)))


# ---- launcher and op ---------------------------------------------------------------------------------------


def _splitk_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None, causal: bool,
    scale: float, dropout_p: float, seed: Tensor | None, num_splits: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Launch the split and combine kernels. Returns out [B, H, Lq, Dh] (q's dtype), LSE [B, H, Lq] fp32."""
    q, k, v = _checked(q, k, v, key_padding_mask, kv_index, dropout_p, seed, needs_grad=False)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    B, H, Lq, D = q.shape
    Bk, _, Lk, _ = k.shape
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_d = block_size(D)
    block_m = block_size(Lq)
    tile = tile_for("fwd", block_d, q.dtype, q.device, Lq)  # the forward's key tile, warps and stages
    block_n = tile.block_n
    keys_per_split = triton.cdiv(triton.cdiv(max(Lk, 1), block_n), num_splits) * block_n
    num_splits = triton.cdiv(max(Lk, 1), keys_per_split)  # no empty trailing split
    o_part = torch.empty((num_splits, B, H, Lq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_splits, B, H, Lq), dtype=torch.float32, device=q.device)
    mask, stride_mb = _mask_arg(key_padding_mask, q)
    seed_arg, dropout, threshold, drop_scale, _ = dropout_args(dropout_p, seed, q)
    m_blocks = triton.cdiv(Lq, block_m)
    with _on_device(q):
        _splitk_fwd_kernel[(m_blocks * B * H, num_splits)](
            q, k, v, mask, q if kv_index is None else kv_index, seed_arg, o_part, lse_part,
            *_bhl_strides(q, k, v), stride_mb,
            B, H, Bk, Lq, Lk, D, scale * LOG2E.value, threshold, drop_scale, keys_per_split,
            HAS_MASK=key_padding_mask is not None, HAS_KV_INDEX=kv_index is not None, CAUSAL=causal,
            DROPOUT=dropout,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
        _splitk_combine_kernel[(m_blocks * B * H,)](
            o_part, lse_part, out, lse, *_bhl_strides(out),
            B, H, Lq, D, num_splits,
            BLOCK_M=block_m, BLOCK_D=block_d,
        )  # fmt: skip
    return out, lse


@torch.library.custom_op("mplug_fast::flash_attn_splitk_fwd", mutates_args=())
def flash_attn_splitk_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None, causal: bool,
    scale: float, dropout_p: float, seed: Tensor | None, num_splits: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(out [B, H, Lq, Dh], LSE [B, H, Lq] fp32), as `mplug_fast::flash_attn_fwd`; see the module doc."""
    return _splitk_fwd(q, k, v, key_padding_mask, kv_index, causal, scale, dropout_p, seed, num_splits)


@flash_attn_splitk_fwd.register_fake
def _(q, k, v, key_padding_mask, kv_index, causal, scale, dropout_p, seed, num_splits):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


flash_attn_splitk_fwd.register_autograd(attention_backward, setup_context=setup_attention_context)


def splitk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    kv_index: Tensor | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """`flash_attention` through the split-K forward (same arguments; differentiable).

    Args:
        q: [B, H, Lq, Dh].  k, v: [Bk, H, Lk, Dh].  key_padding_mask: bool [Bk, Lk], True = attend.
        kv_index: int32/int64 [B], the K/V row of each query row.
        num_splits: key splits (each a whole number of the forward's key tiles; capped at the tile
            count); default `num_splits_for(...)`, at least 2.
    Returns:
        [B, H, Lq, Dh] in q's dtype (contiguous).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if num_splits is None:
        B, H, Lq, _ = q.shape
        num_splits = max(2, num_splits_for(B, H, Lq, k.shape[2], q.device))
    seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    out, _ = flash_attn_splitk_fwd(
        q, k, v, key_padding_mask, kv_index, causal, scale, float(dropout_p), seed, int(num_splits)
    )
    return out
