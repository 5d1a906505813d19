"""Fused residual + dropout + LayerNorm in Triton (BERT's post-LN epilogue), forward and backward.

    residual_layer_norm(x, residual, weight, bias, eps, dropout_p=0.0, seed=None) -> out

computes `LayerNorm(residual + dropout(x))` over the last dim, in one read of `x` and `residual`:

* Shapes: `x`, `residual` `[*, D]` (same shape); `weight`, `bias` `[D]`. Any strides: non-contiguous inputs
  are copied once by the launcher. The output is contiguous, in `promote_types(x.dtype, residual.dtype)`
  (the dtype of `residual + x` in eager PyTorch), which is the input dtype when both match.
* dtypes fp32, fp16, bf16 (each tensor may differ); all arithmetic in fp32 (statistics, normalisation,
  gradients); `weight`/`bias` gradients are accumulated in fp32 and returned in their own dtype.
* Dropout: `dropout.keep_row` on the logical `[rows, D]` matrix (one Philox call per 16 elements of a row,
  one byte per decision, independent of strides): the drop probability is p rounded to a multiple of 1/256,
  kept values are scaled by `dropout_scale(p)` (1 / (1 - p) for that rounded p). The seed
  is an int64 `[1]` tensor drawn by the caller (`mplug_fast.ops.fused`) from torch's generator, so the
  op itself is deterministic; the backward regenerates the mask from the seed (no mask is stored).
  `dropout_p == 1` drops everything (scale 0).

Kernels:

* `_ln_fwd_kernel`: one program per row, the whole row in one block (`BLOCK = next_power_of_2(D)`, masked);
  stores the output and the row statistics mean, rstd `[rows]` fp32.
* `_ln_bwd_kernel`: `G` programs, each over a contiguous range of rows: recomputes `h = residual +
  dropout(x)` and `x_hat`, writes `dresidual = dh`, `dx = dh * keep / (1 - p)`, and accumulates its partial
  `dweight = sum dy * x_hat`, `dbias = sum dy` in fp32 `[G, D]` buffers, summed by torch afterwards.

Caution:

* No second derivative (the backward op has no autograd formula).
* `D` up to `MAX_D` (a whole row per program; wider rows would need a split-row kernel).
* Block and grid choices are not tuned on GPU yet (num_warps from the row width, `G = 4 x SMs`).
* On CPU tensors the kernels run only under the Triton interpreter (`TRITON_INTERPRET=1` set before this
  module is imported): for tests.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from mplug_fast.ops.triton.dropout import dropout_args, keep_row

__all__ = [
    "INTERPRETED",
    "MAX_D",
    "residual_layer_norm",
    "residual_layer_norm_bwd",
    "residual_layer_norm_fwd",
]

MAX_D = 16384  # widest row handled by one program
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- kernels -----------------------------------------------------------------------------------------------


@triton.jit
def cast_rtne(y, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 `y` -> `dtype`, rounding to nearest even.

    Compiled kernels already round so. Triton 3.6's interpreter truncates fp32 -> bf16 (even with
    `fp_downcast_rounding="rtne"`), up to 1 bf16 ulp off, twice the compiled kernels' error: under the
    interpreter the bf16 rounding is done here on the bits (round half to even), so CPU tests see GPU
    numerics.
    """
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _h_row(
    x_row_ptr, r_row_ptr, seed, row, cols, D, drop_threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """h = residual + dropout(x) for one row, fp32 [BLOCK] (0 beyond D); also returns the factor dropout
    applied to each x (1 / (1 - p) or 0; a dummy without dropout)."""
    in_row = cols < D
    x = tl.load(x_row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    r = tl.load(r_row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        factor = tl.where(keep_row(seed, row, drop_threshold, BLOCK), drop_scale, 0.0)
        x = x * factor
    else:
        factor = in_row
    return r + x, factor


@triton.jit
def _ln_fwd_kernel(
    X, R, W, B, Y, Mean, Rstd, Seed,
    stride_x, stride_r, stride_y,
    D, eps, drop_threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < D
    seed = tl.load(Seed) if HAS_DROPOUT else 0
    h, _ = _h_row(
        X + row * stride_x, R + row * stride_r, seed, row, cols, D, drop_threshold, drop_scale,
        HAS_DROPOUT, BLOCK,
    )  # fmt: skip
    mean = tl.sum(h, axis=0) / D
    diff = tl.where(in_row, h - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    y = diff * rstd * w + b
    tl.store(Y + row * stride_y + cols, cast_rtne(y, Y.dtype.element_ty, INTERPRETED_K), mask=in_row)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    DY, X, R, W, Mean, Rstd, Seed, DX, DR, DW_partial, DB_partial,
    stride_dy, stride_x, stride_r, stride_dx, stride_dr,
    rows, D, rows_per_program, drop_threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < D
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # int64 bounds make `row` int64 when compiled (under the interpreter the loop variable is a Python int,
    # which has no `.to`: cast the bounds, never the loop variable).
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    seed = tl.load(Seed) if HAS_DROPOUT else 0
    for row in range(row_start, row_end):
        h, factor = _h_row(
            X + row * stride_x, R + row * stride_r, seed, row, cols, D, drop_threshold, drop_scale,
            HAS_DROPOUT, BLOCK,
        )  # fmt: skip
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        x_hat = tl.where(in_row, (h - mean) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dy + cols, mask=in_row, other=0.0).to(tl.float32)
        wdy = w * dy  # 0 beyond D
        c1 = tl.sum(x_hat * wdy, axis=0) / D
        c2 = tl.sum(wdy, axis=0) / D
        dh = (wdy - (x_hat * c1 + c2)) * rstd
        tl.store(DR + row * stride_dr + cols, cast_rtne(dh, DR.dtype.element_ty, INTERPRETED_K), mask=in_row)
        if HAS_DROPOUT:
            dx = dh * factor
        else:
            dx = dh
        tl.store(DX + row * stride_dx + cols, cast_rtne(dx, DX.dtype.element_ty, INTERPRETED_K), mask=in_row)
        dw_acc += dy * x_hat
        db_acc += dy
    tl.store(DW_partial + pid * D + cols, dw_acc, mask=in_row)
    tl.store(DB_partial + pid * D + cols, db_acc, mask=in_row)


# Under TRITON_INTERPRET=1 `triton.jit` returns an InterpretedFunction instead of a JITFunction.
INTERPRETED = not isinstance(_ln_fwd_kernel, triton.runtime.JITFunction)


# ---- launchers ---------------------------------------------------------------------------------------------


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _num_programs(device: torch.device, rows: int) -> int:
    """Backward grid size: enough programs to fill the GPU, few enough to keep the [G, D] partials small."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 16))  # the interpreter: the cost is per row, the partials are tiny


def _on_device(t: Tensor):
    """Make t's CUDA device current for the launch (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows_2d(t: Tensor, D: int) -> Tensor:
    """[*, D] -> [rows, D] with a unit last-dim stride (a view when possible, else one copy)."""
    t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def _block(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # >= 16: one Philox group of dropout decisions


def _check(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, dropout_p: float) -> None:
    if x.shape != residual.shape:
        raise ValueError(
            f"x and residual must have the same shape, got {tuple(x.shape)} and {tuple(residual.shape)}"
        )
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the normalised last dim)")
    D = x.shape[-1]
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(
            f"weight and bias must be [{D}] (the last dim of x), "
            f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if D > MAX_D:
        raise NotImplementedError(f"last dim {D} > MAX_D={MAX_D}: one program holds a whole row")
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: put them on one device")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


def _ln_fwd(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, seed: Tensor | None, eps: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    _check(x, residual, weight, bias, dropout_p)
    D = x.shape[-1]
    x2, r2 = _rows_2d(x, D), _rows_2d(residual, D)  # [rows, D]
    rows = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((rows, D), dtype=out_dtype, device=x.device)
    mean = torch.empty((rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows > 0 and D > 0:
        seed_arg, has_dropout, threshold, drop_scale, _ = dropout_args(dropout_p, seed, mean)
        BLOCK = _block(D)
        with _on_device(x):
            _ln_fwd_kernel[(rows,)](
                x2, r2, weight.contiguous(), bias.contiguous(), y, mean, rstd, seed_arg,
                x2.stride(0), r2.stride(0), y.stride(0),
                D, eps, threshold, drop_scale,
                HAS_DROPOUT=has_dropout, BLOCK=BLOCK, INTERPRETED_K=INTERPRETED, num_warps=_num_warps(BLOCK),
            )  # fmt: skip
    return y.view(x.shape), mean, rstd


def _ln_bwd(
    dy: Tensor, x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, seed: Tensor | None, mean: Tensor,
    rstd: Tensor, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    D = x.shape[-1]
    dy2, x2, r2 = _rows_2d(dy, D), _rows_2d(x, D), _rows_2d(residual, D)  # [rows, D]
    rows = x2.shape[0]
    dx = torch.empty((rows, D), dtype=x.dtype, device=x.device)
    dr = torch.empty((rows, D), dtype=residual.dtype, device=x.device)
    if rows == 0 or D == 0:
        return dx.view(x.shape), dr.view(x.shape), torch.zeros_like(weight), torch.zeros_like(bias)
    G = _num_programs(x.device, rows)
    rows_per_program = triton.cdiv(rows, G)
    G = triton.cdiv(rows, rows_per_program)  # no empty program
    dw_partial = torch.empty((G, D), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((G, D), dtype=torch.float32, device=x.device)
    seed_arg, has_dropout, threshold, drop_scale, _ = dropout_args(dropout_p, seed, mean)
    BLOCK = _block(D)
    with _on_device(x):
        _ln_bwd_kernel[(G,)](
            dy2, x2, r2, weight.contiguous(), mean, rstd, seed_arg, dx, dr, dw_partial, db_partial,
            dy2.stride(0), x2.stride(0), r2.stride(0), dx.stride(0), dr.stride(0),
            rows, D, rows_per_program, threshold, drop_scale,
            HAS_DROPOUT=has_dropout, BLOCK=BLOCK, INTERPRETED_K=INTERPRETED, num_warps=_num_warps(BLOCK),
        )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(bias.dtype)
    return dx.view(x.shape), dr.view(x.shape), dw, db


# ---- torch.library ops -------------------------------------------------------------------------------------


@torch.library.custom_op("mplug_fast::residual_layer_norm_fwd", mutates_args=())
def residual_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, seed: Tensor | None, eps: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(out [*, D], mean [rows] fp32, rstd [rows] fp32) of LayerNorm(residual + dropout(x)); see the module
    docstring. `seed`: int64 [1], required when dropout_p > 0."""
    return _ln_fwd(x, residual, weight, bias, seed, eps, dropout_p)


@residual_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, seed, eps, dropout_p):
    rows = x.numel() // x.shape[-1] if x.shape[-1] != 0 else 0
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return out, x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("mplug_fast::residual_layer_norm_bwd", mutates_args=())
def residual_layer_norm_bwd(
    dy: Tensor, x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, seed: Tensor | None, mean: Tensor,
    rstd: Tensor, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dresidual, dweight, dbias), each contiguous in its input's dtype."""
    return _ln_bwd(dy, x, residual, weight, bias, seed, mean, rstd, dropout_p)


@residual_layer_norm_bwd.register_fake
def _(dy, x, residual, weight, bias, seed, mean, rstd, dropout_p):
    return (
        x.new_empty(x.shape),
        residual.new_empty(x.shape),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, seed, eps, dropout_p = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, seed, mean, rstd)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy: Tensor, dmean: Tensor | None, drstd: Tensor | None):
    x, residual, weight, bias, seed, mean, rstd = ctx.saved_tensors
    dx, dr, dw, db = residual_layer_norm_bwd(dy, x, residual, weight, bias, seed, mean, rstd, ctx.dropout_p)
    return dx, dr, dw, db, None, None, None


residual_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ---------------------------------------------------------------------------------------


def residual_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """LayerNorm(residual + dropout(x)) with the Triton kernels; differentiable, traceable by torch.compile.

    Args:
        x: [*, D] (the sublayer output, dropped out).  residual: [*, D].  weight, bias: [D].
        eps: LayerNorm epsilon.  dropout_p: drop probability (0: no dropout; the caller passes 0 in eval).
        seed: int64 [1] on x's device, the Philox seed of the dropout mask (needed when dropout_p > 0).
    Returns:
        [*, D] contiguous, in promote_types(x.dtype, residual.dtype).
    """
    out, _, _ = residual_layer_norm_fwd(x, residual, weight, bias, seed, float(eps), float(dropout_p))
    return out
