"""FlashAttention-2 in Triton: forward and backward launchers, registered as `torch.library` custom ops.

    flash_attention(q, k, v, *, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None,
                    kv_index=None) -> out

Same signature and semantics as `mplug_fast.ops.reference.attention_ref` (dropout: same distribution up to
p rounded to a multiple of 1/256, a different RNG; see below). The kernels are in `attention_kernels.py`,
their tile sizes and what they support in `tiles.py`:

* Layout `[B, H, L, Dh]`; q `[B, H, Lq, Dh]`, k/v `[Bk, H, Lk, Dh]`; any strides with a contiguous last
  dim (other tensors are copied once by the launcher).
* `Lq != Lk` and arbitrary lengths: ragged tails are handled with masked loads, never padded copies;
  short queries (Lq <= 32) get a 16- or 32-row query tile instead of the table's 64/128.
* `key_padding_mask`: bool `[Bk, Lk]`, True = attend; read in place as bytes by the kernels.
* `causal`: bottom-right aligned, query i sees keys j <= i + Lk - Lq; blocks above the diagonal are skipped.
* `kv_index`: long/int `[B]`, query row b reads K/V row `kv_index[b]` by pointer arithmetic (no gather).
* Rows with no visible key give output 0 and gradient 0 (their LSE is stored as +inf, so that
  exp(s - LSE) = 0 in the backward).
* Head dims 16..128: the head dim is padded to the next power of two inside the kernels with masked
  loads (16, 32, 64, 128 exact; 80 and 96 run on 128-wide tiles).
* dtypes fp16, bf16, and fp32; softmax statistics and accumulators in fp32. fp32 inputs use TF32 dots when
  torch allows them (`torch.get_float32_matmul_precision() != "highest"`), IEEE dots otherwise, which only the
  CPU interpreter runs: on CUDA the launcher refuses them (`attention_unsupported_reasons` says so, and the
  dispatcher routes them to SDPA).
* Launches run on q's device (`torch.cuda.device(q.device)`), with the tiles of `tiles.TILES` for its
  architecture; a device whose shared memory cannot hold them is refused with a clear error.

Caution:

* Dropout on the attention probabilities (`dropout.py`): Philox keyed by an int64 seed tensor (drawn from
  torch's generator, so `torch.manual_seed` reproduces it), one call per 16 scores of a row, each decided by
  one byte; element (b, h, i, j) is row (b * H + h) * Lq + i, column j of a [B * H * Lq, Lk] matrix. The
  drop probability is p rounded to a multiple of 1/256 and kept entries are scaled by `dropout_scale(p)`; the
  softmax normaliser (and so the LSE) is that of the undropped probabilities. `dropout_keep_mask`
  materialises the mask for a seed (tests and debugging).
* With `kv_index`, dK/dV are computed per query row b into an fp32 `[B, H, Lk, Dh]` buffer and summed into
  `[Bk, H, Lk, Dh]` with `index_add_`: B/Bk times the dK/dV memory of the shared layout.
* The LSE output is not differentiable (its gradient is ignored).
* `kv_index` is range-checked on the host when it is a CPU tensor, and with `MPLUG_FAST_DEBUG=1` on the
  device (`torch._assert_async`, no host sync); otherwise the kernels clamp it into [0, Bk), so a bad index
  reads a wrong row instead of faulting.
* bf16 `tl.dot` is wrong in the Triton CPU interpreter (triton-lang/triton#11584): bf16 is checked on CUDA
  only; the backend refuses bf16 CPU tensors.
* The tiles were chosen by compiling for sm_80 and sm_90 (`benchmarks/kernel_resources.py`); they have not
  been timed on a GPU yet. `MPLUG_FAST_TRITON_AUTOTUNE=1` makes the launchers autotune over
  `tiles.autotune_candidates` instead (on a GPU, once per shape bucket).
* The CPU interpreter (`TRITON_INTERPRET=1`, set before this module is imported) costs ~3 ms per tile
  iteration: for tests only.
"""

import math
import os

import torch
import triton
from torch import Tensor

from mplug_fast.ops.reference import check_attention_inputs
from mplug_fast.ops.triton.attention_kernels import (
    LN2,
    LOG2E,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
    _dropout_mask_kernel,
)
from mplug_fast.ops.triton.dropout import dropout_args, dropout_scale, dropout_threshold
from mplug_fast.ops.triton.layer_norm import _on_device
from mplug_fast.ops.triton.tiles import (
    SUPPORTED_HEAD_DIMS,
    attention_unsupported_reasons,
    autotune_candidates,
    block_size,
    tile_for,
)

__all__ = [
    "INTERPRETED",
    "LN2",
    "LOG2E",
    "SUPPORTED_HEAD_DIMS",
    "attention_unsupported_reasons",
    "draw_dropout_seed",
    "dropout_keep_mask",
    "dropout_scale",
    "flash_attention",
]

# Set by triton at definition time: the CPU interpreter replaces JITFunction with InterpretedFunction.
INTERPRETED = not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)
_DEBUG = os.environ.get("MPLUG_FAST_DEBUG", "0") not in ("", "0")
_AUTOTUNE = os.environ.get("MPLUG_FAST_TRITON_AUTOTUNE", "0") not in ("", "0") and not INTERPRETED


# ---- launch helpers ----------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 unless torch allows TF32 for fp32 matmuls; ignored for fp16/bf16."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch(kernel, kind: str, n_blocks_of, args: tuple, flags: dict, q: Tensor) -> None:
    """Launch `kernel` on q's device with the table's tile for `kind` (`tiles.tile_for`), or autotune over the
    candidates (MPLUG_FAST_TRITON_AUTOTUNE=1).

    n_blocks_of(BLOCK_M, BLOCK_N) -> the number of programs (the grid is 1-D)."""
    with _on_device(q):
        if _AUTOTUNE:
            tuned = _autotuned(kernel, kind, flags["BLOCK_D"], q.dtype, q.device)
            tuned[lambda meta: (n_blocks_of(meta["BLOCK_M"], meta["BLOCK_N"]),)](*args, **flags)
            return
        tile = tile_for(kind, flags["BLOCK_D"], q.dtype, q.device, q.shape[2])
        kernel[(n_blocks_of(tile.block_m, tile.block_n),)](
            *args, **flags,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip


_AUTOTUNED: dict = {}


def _autotuned(kernel, kind: str, block_d: int, dtype: torch.dtype, device: torch.device):
    """`triton.autotune` of `kernel` over `tiles.autotune_candidates`, keyed on the lengths (cached)."""
    key = (kernel, kind, block_d, dtype, torch.cuda.get_device_capability(device))
    if key not in _AUTOTUNED:
        configs = [
            triton.Config(
                {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps, num_stages=t.num_stages
            )
            for t in autotune_candidates(kind, block_d, dtype, device)
        ]
        # dQ writes DELTA, which the dK/dV kernel reads: restore nothing, every config rewrites it whole.
        _AUTOTUNED[key] = triton.autotune(configs, key=["Lq", "Lk"])(kernel)
    return _AUTOTUNED[key]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # copy only when the last dim is strided


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None) -> None:
    """`check_attention_inputs`, then what the kernels add: the dtypes and head dims they support, one device,
    kv_index values in [0, Bk) (on the host for CPU tensors, asynchronously on the device with
    MPLUG_FAST_DEBUG=1; the kernels clamp out-of-range values either way)."""
    check_attention_inputs(q, k, v, key_padding_mask, kv_index)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"flash_attention needs float32, float16 or bfloat16 inputs, got {q.dtype}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[3]} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if kv_index is None:
        return
    if kv_index.device != q.device:
        raise ValueError(f"kv_index is on {kv_index.device}, q on {q.device}: put it on q's device")
    Bk = k.shape[0]
    if q.shape[0] == 0:
        return
    if not kv_index.is_cuda:
        lo, hi = int(kv_index.min()), int(kv_index.max())
        if lo < 0 or hi >= Bk:
            raise ValueError(f"kv_index values must be in [0, {Bk}) (the K/V rows), got min {lo}, max {hi}")
    elif _DEBUG:
        torch._assert_async(((kv_index >= 0) & (kv_index < Bk)).all(), "kv_index out of range [0, Bk)")


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


def _checked(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None,
    dropout_p: float, seed: Tensor | None, needs_grad: bool, *others: Tensor,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Check a launch's inputs, and raise rather than launch what q's CUDA device cannot run; returns q, k, v,
    *others with a contiguous last dim."""
    _check(q, k, v, key_padding_mask, kv_index)
    _check_dropout(dropout_p, seed, q)
    inputs = dict(dtype=q.dtype, head_dim=q.shape[-1], device=q.device, needs_grad=needs_grad)
    if q.is_cuda and (reasons := attention_unsupported_reasons(**inputs)):
        raise NotImplementedError("Triton attention cannot run these inputs: " + "; ".join(reasons))
    return tuple(_last_dim_contiguous(t) for t in (q, k, v, *others))


def _bhl_strides(*tensors: Tensor) -> tuple[int, ...]:
    """The batch, head and row strides of each [B, H, L, Dh] tensor, in order (the kernels' stride args)."""
    return tuple(stride for t in tensors for stride in t.stride()[:3])


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
    q, k, v = _checked(q, k, v, key_padding_mask, kv_index, dropout_p, seed, needs_grad=False)
    B, H, Lq, D = q.shape
    Bk, _, Lk, _ = k.shape
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_d = block_size(D)  # the padded head dim of the tiles
    mask, stride_mb = _mask_arg(key_padding_mask, q)
    seed_arg, dropout, threshold, drop_scale, _ = dropout_args(dropout_p, seed, q)
    args = (
        q, k, v, mask, q if kv_index is None else kv_index, seed_arg, out, lse,
        *_bhl_strides(q, k, v), stride_mb, *_bhl_strides(out),
        H, Bk, Lq, Lk, D, scale * LOG2E.value, threshold, drop_scale,
    )  # fmt: skip
    flags = dict(
        HAS_MASK=key_padding_mask is not None, HAS_KV_INDEX=kv_index is not None, CAUSAL=causal,
        DROPOUT=dropout, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    _launch(_attn_fwd_kernel, "fwd", lambda bm, bn: triton.cdiv(Lq, bm) * B * H, args, flags, q)
    return out, lse


def _attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_padding_mask: Tensor | None,
    kv_index: Tensor | None, causal: bool, scale: float, dropout_p: float = 0.0, seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Launch the dQ kernel (which also writes delta), then the dK/dV kernel. Returns contiguous
    dq [B, H, Lq, Dh], dk, dv [Bk, H, Lk, Dh] in the inputs' dtype."""
    q, k, v, dout, out = _checked(q, k, v, key_padding_mask, kv_index, dropout_p, seed, True, dout, out)
    lse = lse.contiguous()
    B, H, Lq, D = q.shape
    Bk, _, Lk, _ = k.shape
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    # with kv_index: per query row, fp32; summed over the rows sharing a K/V row below
    grad_dtype = k.dtype if kv_index is None else torch.float32
    dk = torch.empty((B, H, Lk, D), dtype=grad_dtype, device=k.device)
    dv = torch.empty((B, H, Lk, D), dtype=grad_dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
    else:
        delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
        block_d = block_size(D)  # the padded head dim of the tiles
        mask, stride_mb = _mask_arg(key_padding_mask, q)
        index = q if kv_index is None else kv_index
        seed_arg, dropout, threshold, drop_scale, keep_prob = dropout_args(dropout_p, seed, q)
        flags = dict(
            HAS_MASK=key_padding_mask is not None, HAS_KV_INDEX=kv_index is not None, CAUSAL=causal,
            DROPOUT=dropout, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
        )  # fmt: skip
        dq_args = (
            q, k, v, mask, index, seed_arg, out, dout, lse, delta, dq,
            *_bhl_strides(q, k, v), stride_mb, *_bhl_strides(out, dout, dq),
            H, Bk, Lq, Lk, D, scale, scale * LOG2E.value, threshold, drop_scale, keep_prob,
        )  # fmt: skip
        dkdv_args = (
            q, k, v, mask, index, seed_arg, dout, lse, delta, dk, dv,
            *_bhl_strides(q, k, v), stride_mb, *_bhl_strides(dout, dk, dv),
            H, Bk, Lq, Lk, D, scale, scale * LOG2E.value, threshold, drop_scale, keep_prob,
        )  # fmt: skip
        _launch(_attn_bwd_dq_kernel, "dq", lambda bm, bn: triton.cdiv(Lq, bm) * B * H, dq_args, flags, q)
        _launch(
            _attn_bwd_dkdv_kernel, "dkdv", lambda bm, bn: triton.cdiv(Lk, bn) * B * H, dkdv_args, flags, q
        )
    if kv_index is not None:  # [B, H, Lk, D] fp32 -> [Bk, H, Lk, D]: sum over query rows sharing a K/V row
        dk = torch.zeros((Bk, H, Lk, D), dtype=torch.float32, device=k.device).index_add_(0, kv_index, dk)
        dv = torch.zeros((Bk, H, Lk, D), dtype=torch.float32, device=v.device).index_add_(0, kv_index, dv)
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv


# ---- torch.library ops -------------------------------------------------------------------------------------


@torch.library.custom_op("mplug_fast::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None, causal: bool,
    scale: float, dropout_p: float = 0.0, seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(out [B, H, Lq, Dh], LSE [B, H, Lq] fp32); see the module docstring. `seed`: int64 [1], needed when
    dropout_p > 0."""
    return _attn_fwd(q, k, v, key_padding_mask, kv_index, causal, scale, dropout_p, seed)


@flash_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, kv_index, causal, scale, dropout_p=0.0, seed=None):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("mplug_fast::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_padding_mask: Tensor | None,
    kv_index: Tensor | None, causal: bool, scale: float, dropout_p: float = 0.0, seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
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


def draw_dropout_seed(device: torch.device | str) -> Tensor:
    """An int64 [1] seed from torch's generator for `device`, so `torch.manual_seed` makes dropout
    reproducible (and the draw is an ordinary traced op under torch.compile)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed: Tensor, B: int, H: int, Lq: int, Lk: int, dropout_p: float) -> Tensor:
    """The keep-mask the kernels apply for `seed`: bool [B, H, Lq, Lk] (True = kept, scaled by
    `dropout_scale(dropout_p)`), computed by a kernel that calls the same RNG function on the same
    elements."""
    _check_dropout(dropout_p, seed, seed)
    keep = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=seed.device)
    if keep.numel() == 0:
        return keep.bool()
    with _on_device(seed):
        _dropout_mask_kernel[(triton.cdiv(Lq, 64) * B * H, triton.cdiv(Lk, 64))](
            seed, keep, Lq, Lk, dropout_threshold(dropout_p), BLOCK_M=64, BLOCK_N=64
        )
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
