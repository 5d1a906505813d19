"""Dropout keep-masks from Philox, 16 decisions per call, shared by the attention and LayerNorm kernels.

The kept/dropped decision of element (row, col) of a logical `[rows, N]` matrix:

* Philox-4x32-10 (`tl.randint4x`) keyed by an int64 seed, counter = `row * ceil(N / 16) + col // 16`: one call
  gives 4 x 32 random bits, cut into 16 bytes, one per column of the 16-column group (as FlashAttention-2 cuts
  its Philox output into 8-bit values);
* kept iff `byte >= threshold` with `threshold = round(p * 256)`: the drop probability is p rounded to a
  multiple of 1/256 (0.1 -> 26/256 = 0.1016; p < 1/512 -> no dropout), and kept values are scaled by
  `256 / (256 - threshold)`, so that E[dropout(x)] = x exactly (`dropout_scale`).

Every kernel that touches an element (attention forward, split-K forward, both backward kernels, the
`dropout_keep_mask` debug kernel, the LayerNorm forward and backward) calls `keep_tile` with the same
(row, col), so the forward and backward masks agree bit for bit. Per score this costs 1/16 of a Philox call
plus a byte compare, instead of one Philox call per score with 3 of its 4 outputs thrown away.
"""

import triton
import triton.language as tl

__all__ = ["GROUP", "dropout_scale", "dropout_threshold", "keep_tile"]

GROUP = 16  # columns decided by one Philox call (4 outputs x 4 bytes)


def dropout_threshold(p: float) -> int:
    """Bytes below this are dropped: round(p * 256), in [0, 256]."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return min(256, round(p * 256))


def dropout_scale(p: float) -> float:
    """The factor applied to kept values: 1 / (1 - effective p) with effective p = threshold / 256 (0 when
    everything is dropped)."""
    t = dropout_threshold(p)
    return 0.0 if t == 256 else 256.0 / (256 - t)


@triton.jit
def _join4(a, b, c, d):
    return tl.join(tl.join(a, b), tl.join(c, d))  # [..., 2, 2]: register-local, no data movement


@triton.jit
def _bytes(w):
    """The 4 bytes of uint32 `w`, as uint8 tensors of w's shape, joined along two new trailing dims."""
    return _join4(w.to(tl.uint8), (w >> 8).to(tl.uint8), (w >> 16).to(tl.uint8), (w >> 24).to(tl.uint8))


@triton.jit
def keep_tile(seed, rows, col_start, groups_per_row, threshold, BLOCK_N: tl.constexpr):
    """Bool [R, BLOCK_N]: keep element (rows[r], col_start + c) of a matrix whose rows have
    `groups_per_row = ceil(N / 16)` Philox groups. `rows` int [R]; `col_start` a multiple of 16; BLOCK_N a
    multiple of 16."""
    G: tl.constexpr = BLOCK_N // 16
    groups = col_start // 16 + tl.arange(0, G)
    offs = rows.to(tl.int64)[:, None] * groups_per_row + groups[None, :]  # [R, G] Philox counters
    r0, r1, r2, r3 = tl.randint4x(seed, offs)
    u = _join4(_bytes(r0), _bytes(r1), _bytes(r2), _bytes(r3))  # [R, G, 2, 2, 2, 2] uint8
    u = tl.reshape(u, [rows.shape[0], BLOCK_N])
    return u.to(tl.int32) >= threshold


@triton.jit
def keep_tile_t(seed, rows, col_start, groups_per_row, threshold, BLOCK_N: tl.constexpr):
    """`keep_tile` transposed: bool [BLOCK_N, R] (for kernels that hold the score tile as [keys, queries])."""
    return tl.trans(keep_tile(seed, rows, col_start, groups_per_row, threshold, BLOCK_N))
