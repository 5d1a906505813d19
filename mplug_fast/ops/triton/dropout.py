"""Dropout keep-masks from Philox, 16 decisions per call, shared by the attention and LayerNorm kernels.

Attention: the kept/dropped decision of score (query m, key n) of slice `stream` (= b * H + h):

* Philox-4x32-10 (Salmon et al. 2011; `philox`, the bits of `tl.random.philox`) keyed by the int64 seed,
  counter `(c0, c1, c2, c3) = (32 * (n // 32) + 8 * ((n // 2) % 4) + m % 8, m // 16, stream, 0)`; its
  4 x 32 bits are cut into 16 bytes (as FlashAttention-2 cuts its Philox output into 8-bit values): byte
  `2 * ((n // 16) % 2) + n % 2` of word `2 * ((m // 8) % 2) + (n // 8) % 2` decides the score.
* kept iff `byte >= threshold` with `threshold = round(p * 256)`: the drop probability is p rounded to a
  multiple of 1/256 (0.1 -> 26/256 = 0.1016; p < 1/512 -> no dropout), and kept values are scaled by
  `256 / (256 - threshold)`, so that E[dropout(x)] = x exactly (`dropout_scale`). The byte is compared in
  place, `word << (24 - 8k) > (threshold - 1) * 2^24 + 2^24 - 1`: two instructions per score.

Why this order: one call covers the 16 scores `(m, m + 8) x (n0 + {0, 1, 8, 9, 16, 17, 24, 25})` one thread
holds in the mma/wgmma accumulator of a `[queries, keys]` tile, so in the forward and dQ kernels
(`keep_tile`: counters as an 8-dim tensor over those index bits, reshaped to the tile) every call runs in
the thread that uses its bytes. In the `[keys, queries]` tile of dK/dV a thread's scores span 4 to 8 calls;
`keep_tile_t` makes each call once and lets the compiler move its words (shared memory) to their users.

LayerNorm (`keep_row`, a row padded to BLOCK columns): element `col` of row `row`: counter `((col % (BLOCK /
2)) // 8, row, 0, 1)` (c3 = 1 keeps it apart from every attention counter), byte `j % 4` of word `j // 4`,
`j = 8 * (col // (BLOCK / 2)) + col % 8`: one call per thread whether it holds 8 contiguous columns (fp16)
or 4 + 4 half a row apart (fp32).

Every kernel that touches an element (attention forward, split-K forward, both backward kernels, the
`dropout_keep_mask` debug kernel; the LayerNorm forward and backward) calls the same function with the same
coordinates, so the forward and backward masks agree bit for bit.
"""

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["dropout_args", "dropout_scale", "dropout_threshold", "keep_row", "keep_tile", "keep_tile_t"]


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


def dropout_args(p: float, seed: Tensor | None, dummy: Tensor) -> tuple[Tensor, bool, int, float, float]:
    """The kernels' dropout arguments: (seed pointer, dropout flag, byte threshold, 1 / keep probability,
    keep probability); `dummy` stands for the seed without dropout."""
    threshold = dropout_threshold(p)
    if threshold == 0:
        return dummy, False, 0, 1.0, 1.0
    if seed is None:
        raise ValueError(f"dropout_p={p} needs a seed tensor (int64 [1]), got None")
    return seed, True, threshold, dropout_scale(p), (256 - threshold) / 256


@triton.jit
def _mulhilo(a, B: tl.constexpr):
    """(high, low) 32 bits of the 64-bit product a * B of uint32 `a` in one `mul.wide.u32` (from a plain
    64-bit product LLVM emits a 64-bit multiply: two or three instructions)."""
    if _INTERPRETED or a.numel == 1:  # the interpreter has no PTX; scalars run on the uniform datapath
        p = a.to(tl.uint64) * B
    else:
        p = tl.inline_asm_elementwise(
            "mul.wide.u32 $0, $1, $2;", "=l,r,r", [a, tl.full(a.shape, B, tl.uint32)], tl.uint64, True, 1
        )
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def philox(seed, c0, c1, c2, c3):
    """Philox-4x32-10 of counter (c0, c1, c2, c3) (int32 tensors, broadcast together) under the int64 key
    `seed`: 4 uint32 tensors, the bits of `tl.random.philox`, with each round's high and low products
    taken from one wide multiply."""
    seed = seed.to(tl.uint64)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = c0.to(tl.uint32, bitcast=True)
    c1 = c1.to(tl.uint32, bitcast=True)
    c2 = c2.to(tl.uint32, bitcast=True)
    c3 = c3.to(tl.uint32, bitcast=True)
    for _ in tl.static_range(10):
        hi0, lo0 = _mulhilo(c2, 0xCD9E8D57)
        hi2, lo2 = _mulhilo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi0 ^ c1 ^ k0, lo0, hi2 ^ c3 ^ k1, lo2
        k0 += 0x9E3779B9
        k1 += 0xBB67AE85
    return c0, c1, c2, c3


# Under TRITON_INTERPRET=1 `triton.jit` returns an InterpretedFunction instead of a JITFunction.
_INTERPRETED = tl.constexpr(not isinstance(philox, triton.runtime.JITFunction))


@triton.jit
def _kept(words, word_idx, byte_idx, threshold):
    """Bool: byte `byte_idx` of word `word_idx` (of the 4 in `words`) is >= threshold (in [1, 256]): the
    byte shifted to the top, the bytes below it cannot lift it over the bound."""
    w0, w1, w2, w3 = words
    w = tl.where(word_idx < 2, tl.where(word_idx == 0, w0, w1), tl.where(word_idx == 2, w2, w3))
    bound = (((threshold - 1) << 24) | 0xFFFFFF).to(tl.uint32, bitcast=True)
    return (w << (24 - 8 * byte_idx).to(tl.uint32)) > bound


@triton.jit
def _keep8(
    seed, stream, row_start, col_start, threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXCHANGE: tl.constexpr,
):  # fmt: skip
    """Bool [BLOCK_M / 16, 2, 8, G, X, 2, 4, 2]: the decisions of queries row_start + 16i + 8h + a and keys
    col_start + 32g + 16x + 8y + 2t + e (G = BLOCK_N / 32, X = 2; BLOCK_N = 16: G = 1, X = 1).
    row_start: a multiple of 16; col_start: a multiple of min(BLOCK_N, 32). EXCHANGE: compute each Philox
    call once and move its words to the threads that use them (a reduction over a size-1 axis stops the
    compiler from recomputing the calls in the layout of their users)."""
    G: tl.constexpr = max(BLOCK_N // 32, 1)
    X: tl.constexpr = min(BLOCK_N // 16, 2)
    i = tl.expand_dims(row_start // 16 + tl.arange(0, BLOCK_M // 16), (1, 2, 3, 4, 5, 6, 7))
    h = tl.expand_dims(tl.arange(0, 2), (0, 2, 3, 4, 5, 6, 7))
    a = tl.expand_dims(tl.arange(0, 8), (0, 1, 3, 4, 5, 6, 7))
    g = tl.expand_dims(col_start // 32 + tl.arange(0, G), (0, 1, 2, 4, 5, 6, 7))
    x0 = (col_start // 16) % 2 if X == 1 else 0  # 0 when BLOCK_N >= 32, known to the compiler
    x = tl.expand_dims(x0 + tl.arange(0, X), (0, 1, 2, 3, 5, 6, 7))
    y = tl.expand_dims(tl.arange(0, 2), (0, 1, 2, 3, 4, 6, 7))
    t = tl.expand_dims(tl.arange(0, 4), (0, 1, 2, 3, 4, 5, 7))
    e = tl.expand_dims(tl.arange(0, 2), (0, 1, 2, 3, 4, 5, 6))
    w0, w1, w2, w3 = philox(seed, g * 32 + t * 8 + a, i, stream.to(tl.int32), tl.full([], 0, tl.int32))
    if EXCHANGE:
        w0 = tl.reshape(tl.max(w0, 7), w0.shape)
        w1 = tl.reshape(tl.max(w1, 7), w1.shape)
        w2 = tl.reshape(tl.max(w2, 7), w2.shape)
        w3 = tl.reshape(tl.max(w3, 7), w3.shape)
    return _kept((w0, w1, w2, w3), 2 * h + y, 2 * x + e, threshold)


@triton.jit
def keep_tile(seed, stream, row_start, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_N]: keep score (row_start + r, col_start + c) of slice `stream`. row_start: a
    multiple of 16, col_start: of min(BLOCK_N, 32); BLOCK_M, BLOCK_N >= 16."""
    keep = _keep8(seed, stream, row_start, col_start, threshold, BLOCK_M, BLOCK_N, False)
    return tl.reshape(keep, [BLOCK_M, BLOCK_N])


@triton.jit
def keep_tile_t(seed, stream, row_start, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`keep_tile` as bool [BLOCK_N, BLOCK_M] (for kernels that hold the score tile as [keys, queries]), built
    transposed from the same counters."""
    keep = _keep8(seed, stream, row_start, col_start, threshold, BLOCK_M, BLOCK_N, True)
    return tl.reshape(tl.permute(keep, (3, 4, 5, 6, 7, 0, 1, 2)), [BLOCK_N, BLOCK_M])


@triton.jit
def keep_row(seed, row, threshold, BLOCK: tl.constexpr):
    """Bool [BLOCK]: keep element col of row `row` (LayerNorm; BLOCK a power of two >= 16)."""
    row32 = (row + tl.zeros([1, 1, 1], tl.int64)).to(tl.int32)  # row: an int64 tensor or an int (interpreter)
    half = tl.arange(0, 2)[:, None, None]  # col = half * BLOCK / 2 + 8 * q + r
    q = tl.arange(0, BLOCK // 16)[None, :, None]
    r = tl.arange(0, 8)[None, None, :]
    words = philox(seed, q, row32, tl.full([], 0, tl.int32), tl.full([], 1, tl.int32))
    j = 8 * half + r
    return tl.reshape(_kept(words, j // 4, j % 4, threshold), [BLOCK])
