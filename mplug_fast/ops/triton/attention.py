"""FlashAttention-2 in Triton: forward and backward, registered as `torch.library` custom ops.

    flash_attention(q, k, v, *, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None,
                    kv_index=None) -> out

Same signature and semantics as `mplug_fast.ops.reference.attention_ref` (dropout: same distribution,
a different RNG; see below):

* Layout `[B, H, L, Dh]`; q `[B, H, Lq, Dh]`, k/v `[Bk, H, Lk, Dh]`; any strides with a contiguous last
  dim (other tensors are copied once by the launcher).
* `Lq != Lk` and arbitrary lengths: ragged tails are handled with masked loads, never padded copies.
* `key_padding_mask`: bool `[Bk, Lk]`, True = attend; read in place as bytes by the kernels.
* `causal`: bottom-right aligned, query i sees keys j <= i + Lk - Lq; blocks above the diagonal are skipped.
* `kv_index`: long/int `[B]`, query row b reads K/V row `kv_index[b]` by pointer arithmetic (no gather).
* Rows with no visible key give output 0 and gradient 0 (their LSE is stored as +inf, so that
  exp(s - LSE) = 0 in the backward).
* Head dims 16..128: the head dim is padded to the next power of two inside the kernels with masked
  loads (16, 32, 64, 128 exact; 80 and 96 run on 128-wide tiles).
* dtypes fp32, fp16, bf16; softmax statistics and accumulators in fp32. fp32 inputs use IEEE dots when
  `torch.get_float32_matmul_precision() == "highest"` (torch's default), TF32 otherwise.

Kernels (FlashAttention-2, Dao 2023, Algorithms 1 and 2):

* `_attn_fwd_kernel`: one program per (query block, head, batch row); online softmax over key blocks;
  writes O and the row log-sum-exp LSE `[B, H, Lq]` fp32 (natural log).
* `_attn_bwd_dq_kernel`: one program per (query block, head, batch row); computes
  delta = rowsum(dO * O) for its rows (the FA2 "preprocess", fused here), stores it, and accumulates dQ
  over key blocks.
* `_attn_bwd_dkdv_kernel`: one program per (key block, head, query batch row); accumulates dK, dV over
  query blocks, reading the delta written by the dQ kernel (launched first on the same stream). No atomics.

Caution:

* Dropout on the attention probabilities: Philox (`tl.rand`) keyed by an int64 seed tensor (drawn from
  torch's generator, so `torch.manual_seed` reproduces it) and the global index
  ((b * H + h) * Lq + i) * Lk + j of the score element; the backward kernels recompute the same keep-mask.
  Kept entries are scaled by 1 / (1 - p); the softmax normaliser (and so the LSE) is that of the undropped
  probabilities.
  `dropout_keep_mask` materialises the mask for a seed (tests and debugging).
* With `kv_index`, dK/dV are computed per query row b into an fp32 `[B, H, Lk, Dh]` buffer and summed into
  `[Bk, H, Lk, Dh]` with `index_add_`: B/Bk times the dK/dV memory of the shared layout.
* The LSE output is not differentiable (its gradient is ignored).
* `kv_index` values are not range-checked (that would need a host sync): values outside [0, Bk) read out
  of bounds.
* bf16 `tl.dot` is wrong in the Triton CPU interpreter (triton-lang/triton#11584): bf16 is checked on CUDA
  only; the backend refuses bf16 CPU tensors.
* Block sizes come from `_BLOCKS`: not tuned on GPU yet (measured under the CPU interpreter, and checked
  to fit sm_90 shared memory by ahead-of-time compilation; the autotune candidates are listed next to it).
  The kernels compile for sm_90 in every flag combination but have not been run on a GPU yet.
* The CPU interpreter (`TRITON_INTERPRET=1`, set before this module is imported) costs ~3 ms per tile
  iteration: for tests only.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRETED",
    "SUPPORTED_HEAD_DIMS",
    "draw_dropout_seed",
    "dropout_keep_mask",
    "flash_attention",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)

# Globals read by the kernels must be constexpr (triton rejects plain Python floats there).
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels use exp2 on scores times scale * log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): LSE is stored in natural-log units


# ---- kernels -----------------------------------------------------------------------------------------------


@triton.jit
def _visible(rows, cols, Lq, Lk, mask_row_ptr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_N] (or broadcastable): key col is in range, not padding, and causally visible."""
    ok = (cols < Lk)[None, :] & (rows >= 0)[:, None]  # rows >= 0 always holds: it only broadcasts to 2-D
    if HAS_MASK:
        keep = tl.load(mask_row_ptr + cols, mask=cols < Lk, other=0)
        ok = ok & (keep != 0)[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (Lk - Lq))
    return ok


@triton.jit
def _dropout_keep(seed, bh, rows, cols, Lq, Lk, dropout_p):
    """Bool [BLOCK_M, BLOCK_N]: keep score (bh // H, bh % H, row, col) of the [B, H, Lq, Lk] score matrix.

    Philox (`tl.rand`) keyed by the seed and the element's global index (int64), so every kernel that touches
    an element (forward, both backward kernels, the split-K forward, `dropout_keep_mask`) draws the same
    number.
    """
    offs = (bh * Lq + rows.to(tl.int64))[:, None] * Lk + cols[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _attend_key_range(
    q, m_i, l_i, acc, lo, hi, k_base, v_base, stride_kn, stride_vn, mask_row, rows, offs_n, offs_d, d_ok,
    Lq, Lk, qk_scale, seed, bh, dropout_p, drop_scale,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Online-softmax pass of one query block over keys [lo, hi) (shared by the main and split-K forwards).

    m_i [BLOCK_M]: running max of the scores (log2 units); l_i [BLOCK_M]: running sum of exp2(s - m_i);
    acc [BLOCK_M, BLOCK_D]: unnormalised output. Returns the updated (m_i, l_i, acc)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(_visible(rows, cols, Lq, Lk, mask_row, HAS_MASK, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep exp2 finite
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser counts dropped entries too
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows, cols, Lq, Lk, dropout_p), p * drop_scale, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, KV_INDEX, SEED, OUT, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb,
    stride_ob, stride_oh, stride_om,
    H, Lq, Lk, D, qk_scale, dropout_p, drop_scale,
    HAS_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bk = tl.load(KV_INDEX + off_b).to(tl.int64) if HAS_KV_INDEX else off_b  # K/V row of this query row

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(rows < Lq)[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + off_bk * stride_kb + off_h * stride_kh
    v_base = V + off_bk * stride_vb + off_h * stride_vh
    mask_row = MASK + off_bk * stride_mb
    seed = tl.load(SEED) if DROPOUT else 0
    bh = off_b * H + off_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:  # the last key any row of this block sees is (pid_m + 1) * BLOCK_M - 1 + Lk - Lq
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    m_i, l_i, acc = _attend_key_range(
        q, m_i, l_i, acc, 0, hi, k_base, v_base, stride_kn, stride_vn, mask_row, rows, offs_n, offs_d, d_ok,
        Lq, Lk, qk_scale, seed, bh, dropout_p, drop_scale,
        BLOCK_N, HAS_MASK, CAUSAL, DROPOUT, PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0  # no visible key: output 0, LSE +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(rows < Lq)[:, None] & d_ok[None, :])
    tl.store(LSE + (off_b * H + off_h) * Lq + rows, lse, mask=rows < Lq)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, MASK, KV_INDEX, SEED, OUT, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, Lq, Lk, D, scale, qk_scale, dropout_p, drop_scale,
    HAS_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bk = tl.load(KV_INDEX + off_b).to(tl.int64) if HAS_KV_INDEX else off_b

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_mask = (rows < Lq)[:, None] & d_ok[None, :]
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )
    o = tl.load(
        OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # [BLOCK_M]: rowsum(dO * O), the FA2 preprocess
    row_stat = (off_b * H + off_h) * Lq + rows
    tl.store(DELTA + row_stat, delta, mask=rows < Lq)
    lse2 = tl.load(LSE + row_stat, mask=rows < Lq, other=float("inf")) * LOG2E  # +inf: p = 0

    k_base = K + off_bk * stride_kb + off_h * stride_kh
    v_base = V + off_bk * stride_vb + off_h * stride_vh
    mask_row = MASK + off_bk * stride_mb
    seed = tl.load(SEED) if DROPOUT else 0
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(_visible(rows, cols, Lq, Lk, mask_row, HAS_MASK, CAUSAL), s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dL/d(dropped P)
        if DROPOUT:  # dL/dP = keep * dL/d(dropped P) / (1 - p); delta = rowsum(dO * O) still holds
            keep = _dropout_keep(seed, off_b * H + off_h, rows, cols, Lq, Lk, dropout_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, MASK, KV_INDEX, SEED, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, Lq, Lk, D, scale, qk_scale, dropout_p, drop_scale,
    HAS_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)  # the query row; dK/dV go to row off_b of DK/DV ([B, H, Lk, D])
    off_bk = tl.load(KV_INDEX + off_b).to(tl.int64) if HAS_KV_INDEX else off_b

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (cols < Lk)[:, None] & d_ok[None, :]
    k = tl.load(
        K + off_bk * stride_kb + off_h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + off_bk * stride_vb + off_h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    stat_base = (off_b * H + off_h) * Lq
    mask_row = MASK + off_bk * stride_mb
    seed = tl.load(SEED) if DROPOUT else 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # the first query that sees key pid_n * BLOCK_N is pid_n * BLOCK_N - (Lk - Lq)
        lo = tl.maximum(pid_n * BLOCK_N + Lq - Lk, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        rows = start_m + offs_m
        row_mask = (rows < Lq)[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=row_mask, other=0.0)
        lse2 = tl.load(LSE + stat_base + rows, mask=rows < Lq, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stat_base + rows, mask=rows < Lq, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(_visible(rows, cols, Lq, Lk, mask_row, HAS_MASK, CAUSAL), s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        if DROPOUT:
            keep = _dropout_keep(seed, off_b * H + off_h, rows, cols, Lq, Lk, dropout_p)
            p_drop = tl.where(keep, p * drop_scale, 0.0)
            dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=PRECISION)
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# Set by triton at definition time: the CPU interpreter replaces JITFunction with InterpretedFunction.
INTERPRETED = not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)


# ---- launchers ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N) by padded head dim (BLOCK_D). Not tuned on GPU yet. Measured so far:
# * CPU interpreter (B=1, H=2, L=256, causal, fwd+bwd): fewer, larger tiles are faster there (32x32: 2.9 s,
#   64x64: 1.0 s, 128x128: 0.3 s at Dh=128), so the tests use the largest tiles the GPU can hold;
# * shared memory of the kernels compiled ahead of time for sm_90 (H200: 227 KiB per block): at 64x64,
#   Dh=128 needs <= 73 KiB in fp16/bf16 but 209 KiB in fp32; 128x64 at Dh=128 exceeds the limit in fp32
#   (354 KiB), so fp32 at BLOCK_D=128 keeps 64x64 and the 16-bit dtypes are the ones to tune upwards.
# Candidates to autotune on the GPU: BLOCK_M in (64, 128), BLOCK_N in (32, 64, 128), num_warps in (4, 8),
# num_stages in (2, 3, 4).
_BLOCKS = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (64, 64)}


def _blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for a head dim: BLOCK_D is the next power of two (>= 16)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n = _BLOCKS[block_d]
    return block_m, block_n, block_d


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 unless torch allows TF32 for fp32 matmuls; ignored for fp16/bf16."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # copy only when the last dim is strided


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"flash_attention expects q [B, H, Lq, Dh] and k, v [Bk, H, Lk, Dh], got q {list(q.shape)}, "
            f"k {list(k.shape)}, v {list(v.shape)}"
        )
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} disagree on heads or head dim")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"flash_attention needs q, k, v of one dtype among float32, float16, bfloat16; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[3]} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if kv_index is None and q.shape[0] != k.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but k/v have {k.shape[0]}; pass kv_index")
    if kv_index is not None and (
        kv_index.shape != (q.shape[0],) or kv_index.dtype not in (torch.int64, torch.int32)
    ):
        raise ValueError(
            f"kv_index must be int32/int64 [{q.shape[0]}], got {kv_index.dtype} {list(kv_index.shape)}"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (k.shape[0], k.shape[2])
    ):
        raise ValueError(
            f"key_padding_mask must be bool [Bk, Lk] = [{k.shape[0]}, {k.shape[2]}], "
            f"got {key_padding_mask.dtype} {list(key_padding_mask.shape)}"
        )


def _check_dropout(dropout_p: float, seed: Tensor | None, q: Tensor) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and (
        seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != q.device
    ):
        raise ValueError(
            "dropout_p > 0 needs seed: an int64 tensor with one element on q's device (draw_dropout_seed), "
            f"got {None if seed is None else (seed.dtype, list(seed.shape), seed.device)}"
        )


def _dropout_args(dropout_p: float, seed: Tensor | None, dummy: Tensor) -> tuple[Tensor, float, float]:
    """(seed pointer, p, 1 / (1 - p)) for the kernels; `dummy` stands for the seed without dropout."""
    if dropout_p == 0.0:
        return dummy, 0.0, 1.0
    return seed, float(dropout_p), 1.0 / (1.0 - dropout_p)


def _mask_arg(key_padding_mask: Tensor | None, dummy: Tensor) -> tuple[Tensor, int]:
    """The key-padding mask as bytes (a view, no copy) and its row stride; `dummy` when there is none."""
    if key_padding_mask is None:
        return dummy, 0
    mask = _last_dim_contiguous(key_padding_mask).view(torch.uint8)  # [Bk, Lk], 1 = attend
    return mask, mask.stride(0)


def _attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None, causal: bool,
    scale: float, dropout_p: float = 0.0, seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Launch the forward kernel. Returns out [B, H, Lq, Dh] (q's dtype, contiguous), LSE [B, H, Lq] fp32."""
    _check(q, k, v, key_padding_mask, kv_index)
    _check_dropout(dropout_p, seed, q)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_m, block_n, block_d = _blocks(D)
    mask, stride_mb = _mask_arg(key_padding_mask, q)
    seed_arg, p_drop, drop_scale = _dropout_args(dropout_p, seed, q)
    grid = (triton.cdiv(Lq, block_m), H, B)
    _attn_fwd_kernel[grid](
        q, k, v, mask, q if kv_index is None else kv_index, seed_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_mb,
        out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, D, scale * LOG2E.value, p_drop, drop_scale,
        HAS_MASK=key_padding_mask is not None, HAS_KV_INDEX=kv_index is not None, CAUSAL=causal,
        DROPOUT=p_drop > 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def _attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_padding_mask: Tensor | None,
    kv_index: Tensor | None, causal: bool, scale: float, dropout_p: float = 0.0, seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Launch the dQ kernel (which also writes delta), then the dK/dV kernel. Returns contiguous
    dq [B, H, Lq, Dh], dk, dv [Bk, H, Lk, Dh] in the inputs' dtype."""
    _check(q, k, v, key_padding_mask, kv_index)
    _check_dropout(dropout_p, seed, q)
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    B, H, Lq, D = q.shape
    Bk, _, Lk, _ = k.shape
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if kv_index is None:
        dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=v.device)
    else:  # per query row, fp32; summed over the rows sharing a K/V row below
        dk = torch.empty((B, H, Lk, D), dtype=torch.float32, device=k.device)
        dv = torch.empty((B, H, Lk, D), dtype=torch.float32, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
    else:
        delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
        block_m, block_n, block_d = _blocks(D)
        mask, stride_mb = _mask_arg(key_padding_mask, q)
        index = q if kv_index is None else kv_index
        seed_arg, p_drop, drop_scale = _dropout_args(dropout_p, seed, q)
        flags = dict(
            HAS_MASK=key_padding_mask is not None, HAS_KV_INDEX=kv_index is not None, CAUSAL=causal,
            DROPOUT=p_drop > 0.0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
        )  # fmt: skip
        _attn_bwd_dq_kernel[(triton.cdiv(Lq, block_m), H, B)](
            q, k, v, mask, index, seed_arg, out, dout, lse, delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            stride_mb,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, Lq, Lk, D, scale, scale * LOG2E.value, p_drop, drop_scale,
            **flags,
        )  # fmt: skip
        _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, block_n), H, B)](
            q, k, v, mask, index, seed_arg, dout, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            stride_mb,
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            H, Lq, Lk, D, scale, scale * LOG2E.value, p_drop, drop_scale,
            **flags,
        )  # fmt: skip
    if kv_index is not None:  # [B, H, Lk, D] fp32 -> [Bk, H, Lk, D]: sum over query rows sharing a K/V row
        dk = torch.zeros((Bk, H, Lk, D), dtype=torch.float32, device=k.device).index_add_(0, kv_index, dk)
        dv = torch.zeros((Bk, H, Lk, D), dtype=torch.float32, device=v.device).index_add_(0, kv_index, dv)
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv


# ---- torch.library ops -------------------------------------------------------------------------------------


@torch.library.custom_op("mplug_fast::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    kv_index: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out [B, H, Lq, Dh], LSE [B, H, Lq] fp32); see the module docstring. `seed`: int64 [1], needed when
    dropout_p > 0."""
    return _attn_fwd(q, k, v, key_padding_mask, kv_index, causal, scale, dropout_p, seed)


@flash_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, kv_index, causal, scale, dropout_p=0.0, seed=None):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("mplug_fast::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    kv_index: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq [B, H, Lq, Dh], dk, dv [Bk, H, Lk, Dh]), contiguous. `out` and `lse` may come from any forward with
    the same semantics (the main kernel or the split-K one of `decode.py`)."""
    return _attn_bwd(dout, q, k, v, out, lse, key_padding_mask, kv_index, causal, scale, dropout_p, seed)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, kv_index, causal, scale, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def setup_attention_context(ctx, inputs, output) -> None:
    """Autograd context shared by the forward ops whose first inputs are
    (q, k, v, key_padding_mask, kv_index, causal, scale, dropout_p, seed) and whose output is (out, LSE)."""
    q, k, v, key_padding_mask, kv_index, causal, scale = inputs[:7]
    dropout_p = inputs[7] if len(inputs) > 7 else 0.0
    seed = inputs[8] if len(inputs) > 8 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, kv_index, seed)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.n_inputs = causal, scale, dropout_p, len(inputs)
    ctx.mark_non_differentiable(lse)


def attention_backward(ctx, dout: Tensor, dlse: Tensor | None):
    """The backward of those ops: the main backward kernels from the saved (out, LSE)."""
    q, k, v, out, lse, key_padding_mask, kv_index, seed = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(
        dout, q, k, v, out, lse, key_padding_mask, kv_index, ctx.causal, ctx.scale, ctx.dropout_p, seed
    )
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


flash_attn_fwd.register_autograd(attention_backward, setup_context=setup_attention_context)


# ---- dropout mask (debugging and tests) --------------------------------------------------------------------


@triton.jit
def _dropout_mask_kernel(SEED, KEEP, H, Lq, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64)
    keep = _dropout_keep(tl.load(SEED), bh, rows, cols, Lq, Lk, dropout_p)
    ptrs = KEEP + (bh * Lq + rows.to(tl.int64))[:, None] * Lk + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])


def draw_dropout_seed(device: torch.device | str) -> Tensor:
    """An int64 [1] seed from torch's generator for `device`, so `torch.manual_seed` makes dropout
    reproducible (and the draw is an ordinary traced op under torch.compile)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed: Tensor, B: int, H: int, Lq: int, Lk: int, dropout_p: float) -> Tensor:
    """The keep-mask the kernels apply for `seed`: bool [B, H, Lq, Lk] (True = kept, scaled by 1 / (1 - p)),
    computed by a kernel that calls the same RNG function on the same element indices."""
    _check_dropout(dropout_p, seed, seed)
    keep = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=seed.device)
    if keep.numel() == 0:
        return keep.bool()
    grid = (triton.cdiv(Lq, 64), triton.cdiv(Lk, 64), B * H)
    _dropout_mask_kernel[grid](seed, keep, H, Lq, Lk, float(dropout_p), BLOCK_M=64, BLOCK_N=64)
    return keep.bool()


# ---- public function ---------------------------------------------------------------------------------------


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    kv_index: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v with the Triton kernels; differentiable and traceable by torch.compile.

    Args:
        q: [B, H, Lq, Dh].  k, v: [Bk, H, Lk, Dh] (Bk == B unless `kv_index` is given).
        key_padding_mask: bool [Bk, Lk], True = attend.
        causal: query i attends keys j <= i + Lk - Lq.
        dropout_p: dropout on the attention probabilities, in [0, 1); the seed is drawn from torch's
            generator for q's device (`draw_dropout_seed`), the mask is `dropout_keep_mask(seed, ...)`.
        scale: softmax scale, default Dh ** -0.5.
        kv_index: int32/int64 [B] with values in [0, Bk): the K/V row read by each query row.
    Returns:
        [B, H, Lq, Dh] in q's dtype (contiguous).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    out, _ = flash_attn_fwd(q, k, v, key_padding_mask, kv_index, causal, scale, float(dropout_p), seed)
    return out
