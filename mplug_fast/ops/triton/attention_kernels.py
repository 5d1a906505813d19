"""The FlashAttention-2 Triton kernels (Dao 2023, Algorithms 1 and 2); launched by `attention.py`.

* `_attn_fwd_kernel`: one program per (query block, batch row x head); online softmax over key blocks;
  writes O and the row log-sum-exp LSE `[B, H, Lq]` fp32 (natural log).
* `_attn_bwd_dq_kernel`: one program per (query block, batch row x head); computes delta = rowsum(dO * O)
  for its rows (the FA2 "preprocess", fused here), stores it, and accumulates dQ over key blocks.
* `_attn_bwd_dkdv_kernel`: one program per (key block, query batch row x head); accumulates dK, dV over query
  blocks, reading the delta written by the dQ kernel (launched first on the same stream). No atomics. It
  computes the transposed scores S^T = K Q^T ([keys, queries]) directly, so P^T and dS^T feed the dK/dV dots
  without a register-tile transpose (only the dot operands Q, dO are read transposed from shared memory).

Grids are one-dimensional (program id = block + blocks * (b * H + h)), so the batch is not limited to the
65535 programs of grid axes 1 and 2. Dropout: `dropout.keep_tile` on each [Lq, Lk] score matrix,
kept scores are not rescaled inside the loop; the 1 / (1 - p) factor is applied once to the accumulators
(and delta is multiplied by 1 - p to match).
"""

import triton
import triton.language as tl

from mplug_fast.ops.triton.dropout import keep_tile, keep_tile_t

# Globals read by the kernels must be constexpr (triton rejects plain Python floats there).
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels use exp2 on scores times scale * log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): LSE is stored in natural-log units


@triton.jit
def _visible(r2, c2, Lq, Lk, mask_row_ptr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Bool, the broadcast of row indices r2 and key indices c2 (either [M, 1] x [1, N] or [1, M] x [N, 1]):
    the key is in range, not padding, and causally visible."""
    ok = (c2 < Lk) & (r2 >= 0)  # r2 >= 0 always holds: it only broadcasts to 2-D
    if HAS_MASK:
        keep = tl.load(mask_row_ptr + c2, mask=c2 < Lk, other=0)
        ok = ok & (keep != 0)
    if CAUSAL:
        ok = ok & (c2 <= r2 + (Lk - Lq))
    return ok


@triton.jit
def _kv_row(KV_INDEX, off_b, Bk, HAS_KV_INDEX: tl.constexpr):
    """The K/V batch row of query row off_b, clamped into [0, Bk) so that a bad index cannot read outside
    K/V (the launcher range-checks it where that costs no host sync)."""
    if HAS_KV_INDEX:
        return tl.minimum(tl.maximum(tl.load(KV_INDEX + off_b).to(tl.int64), 0), Bk - 1)
    return off_b


@triton.jit
def _split_program_id(L, BLOCK, H, KV_INDEX, Bk, HAS_KV_INDEX: tl.constexpr):
    """Split the 1-D program id (block + blocks * (b * H + h), blocks = ceil(L / BLOCK)) into
    (block, b * H + h, b, h, the K/V row of b)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(L, BLOCK)
    bh = (pid // n_blocks).to(tl.int64)
    off_b = bh // H
    return pid % n_blocks, bh, off_b, bh % H, _kv_row(KV_INDEX, off_b, Bk, HAS_KV_INDEX)


@triton.jit
def _load_rows(base, rows, stride, offs_d, mask):
    """The [len(rows), BLOCK_D] tile at base + rows * stride + offs_d, 0 where `mask` is False."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _attend_key_range(
    q, m_i, l_i, acc, lo, hi, k_base, v_base, stride_kn, stride_vn, mask_row, rows, offs_n, offs_d, d_ok,
    Lq, Lk, qk_scale, seed, bh, row_start, drop_threshold,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Online-softmax pass of one query block over keys [lo, hi) (shared by the main and split-K forwards).

    m_i [BLOCK_M]: running max of the scores (log2 units); l_i [BLOCK_M]: running sum of exp2(s - m_i);
    acc [BLOCK_M, BLOCK_D]: unnormalised output of the kept (unscaled) probabilities.
    Returns the updated (m_i, l_i, acc)."""
    zero = qk_scale * 0.0  # dropped p: a zero the compiler cannot fold into the fp16 conversion
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(
            _visible(rows[:, None], cols[None, :], Lq, Lk, mask_row, HAS_MASK, CAUSAL), s, float("-inf")
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep exp2 finite
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser counts dropped entries too
        if DROPOUT:
            keep = keep_tile(seed, bh, row_start, start_n, drop_threshold, rows.shape[0], BLOCK_N)
            p = tl.where(keep, p, zero)
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
    H, Bk, Lq, Lk, D, qk_scale, drop_threshold, drop_scale,
    HAS_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, bh, off_b, off_h, off_bk = _split_program_id(Lq, BLOCK_M, H, KV_INDEX, Bk, HAS_KV_INDEX)
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:  # the last key any row of this block sees is (pid_m + 1) * BLOCK_M - 1 + Lk - Lq
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    m_i, l_i, acc = _attend_key_range(
        q, m_i, l_i, acc, 0, hi, k_base, v_base, stride_kn, stride_vn, mask_row, rows, offs_n, offs_d, d_ok,
        Lq, Lk, qk_scale, seed, bh, pid_m * BLOCK_M, drop_threshold,
        BLOCK_N, HAS_MASK, CAUSAL, DROPOUT, PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0  # no visible key: output 0, LSE +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(rows < Lq)[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Lq + rows, lse, mask=rows < Lq)


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
    H, Bk, Lq, Lk, D, scale, qk_scale, drop_threshold, drop_scale, keep_prob,
    HAS_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, bh, off_b, off_h, off_bk = _split_program_id(Lq, BLOCK_M, H, KV_INDEX, Bk, HAS_KV_INDEX)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_mask = (rows < Lq)[:, None] & d_ok[None, :]
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, stride_qm, offs_d, row_mask)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, rows, stride_dom, offs_d, row_mask)
    o = _load_rows(OUT + off_b * stride_ob + off_h * stride_oh, rows, stride_om, offs_d, row_mask)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # [BLOCK_M]: rowsum(dO * O), the FA2 preprocess
    row_stat = bh * Lq + rows
    tl.store(DELTA + row_stat, delta, mask=rows < Lq)
    lse2 = tl.load(LSE + row_stat, mask=rows < Lq, other=float("inf")) * LOG2E  # +inf: p = 0
    # dS = P * (keep * dP' / (1 - p) - delta) = P * (keep * dP' - delta * (1 - p)) / (1 - p): the factor
    # 1 / (1 - p) is applied to dQ at the end (keep_prob = drop_scale = 1 without dropout).
    delta = delta * keep_prob

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
        s = tl.where(
            _visible(rows[:, None], cols[None, :], Lq, Lk, mask_row, HAS_MASK, CAUSAL), s, float("-inf")
        )
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dL/d(dropped P)
        if DROPOUT:
            dp = tl.where(
                keep_tile(seed, bh, pid_m * BLOCK_M, start_n, drop_threshold, BLOCK_M, BLOCK_N), dp, 0.0
            )
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * (scale * drop_scale)
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
    H, Bk, Lq, Lk, D, scale, qk_scale, drop_threshold, drop_scale, keep_prob,
    HAS_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # bh: the query row b * H + h; dK/dV go to row b of DK/DV ([B, H, Lk, D])
    pid_n, bh, off_b, off_h, off_bk = _split_program_id(Lk, BLOCK_N, H, KV_INDEX, Bk, HAS_KV_INDEX)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (cols < Lk)[:, None] & d_ok[None, :]
    k = _load_rows(K + off_bk * stride_kb + off_h * stride_kh, cols, stride_kn, offs_d, kv_mask)
    v = _load_rows(V + off_bk * stride_vb + off_h * stride_vh, cols, stride_vn, offs_d, kv_mask)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    stat_base = bh * Lq
    mask_row = MASK + off_bk * stride_mb
    seed = tl.load(SEED) if DROPOUT else 0
    zero = qk_scale * 0.0  # dropped P: a zero the compiler cannot fold into the fp16 conversion

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # the first query that sees key pid_n * BLOCK_N is pid_n * BLOCK_N - (Lk - Lq)
        lo = tl.maximum(pid_n * BLOCK_N + Lq - Lk, 0) // BLOCK_M * BLOCK_M
    if DROPOUT and not CAUSAL:
        # Lq > 0 (the launcher skips empty inputs), so the loop runs at least once. Told so, LLVM builds no
        # zero-trip path that writes the dK/dV accumulators while their wgmma may be in flight; where it
        # finds one, ptxas serialises every wgmma of the kernel (sm_90). Not with CAUSAL: the overlap this
        # allows spills registers at the sm_90 tile.
        tl.assume(Lq > 0)
    for start_m in range(lo, Lq, BLOCK_M):
        rows = start_m + offs_m
        if DROPOUT:  # first in the step: the words' exchange (shared memory) runs ahead of the dots
            keep_t = keep_tile_t(seed, bh, start_m, pid_n * BLOCK_N, drop_threshold, BLOCK_M, BLOCK_N)
        row_mask = (rows < Lq)[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=row_mask, other=0.0)
        lse2 = tl.load(LSE + stat_base + rows, mask=rows < Lq, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stat_base + rows, mask=rows < Lq, other=0.0) * keep_prob
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M] = (Q K^T)^T
        visible = _visible(rows[None, :], cols[:, None], Lq, Lk, mask_row, HAS_MASK, CAUSAL)
        s_t = tl.where(visible, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if DROPOUT:  # dS = keep * P * dP' - P * delta: the mask is applied once, to P
            kept_t = tl.where(keep_t, p_t, zero)
            dv += tl.dot(kept_t.to(do.dtype), do, input_precision=PRECISION)
            ds_t = kept_t * dp_t - p_t * delta[None, :]
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * (scale * drop_scale)
    dv = dv * drop_scale
    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dropout_mask_kernel(SEED, KEEP, Lq, Lk, drop_threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KEEP int8 [B * H, Lq, Lk]: the keep decisions of the attention kernels (tests and debugging); axis 0
    over (query block, b * H + h), axis 1 over key blocks."""
    n_blocks = tl.cdiv(Lq, BLOCK_M)
    bh = (tl.program_id(0) // n_blocks).to(tl.int64)
    row_start = tl.program_id(0) % n_blocks * BLOCK_M
    col_start = tl.program_id(1) * BLOCK_N
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_start + tl.arange(0, BLOCK_N)
    keep = keep_tile(tl.load(SEED), bh, row_start, col_start, drop_threshold, BLOCK_M, BLOCK_N)
    ptrs = KEEP + (bh * Lq + rows)[:, None] * Lk + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])
