"""Fused bias + activation in Triton (the MLP's fc1 epilogue), forward and backward.

    bias_act(x, bias, activation) -> act(x + bias)

with `activation` one of

* `"gelu"`: erf GELU, `0.5 y (1 + erf(y / sqrt(2)))` (BERT; `F.gelu(y)`),
* `"gelu_tanh"`: tanh GELU, `0.5 y (1 + tanh(sqrt(2 / pi) (y + 0.044715 y^3)))`
  (`F.gelu(y, approximate="tanh")`),
* `"quick_gelu"`: CLIP's QuickGELU, `y sigmoid(1.702 y)`.

* Shapes: `x` `[*, N]`, `bias` `[N]` (broadcast over the last dim). Non-contiguous `x` is copied once. The
  output is contiguous, in `x.dtype`.
* dtypes fp32, fp16, bf16 (`bias` may differ from `x`); arithmetic in fp32.
* The backward recomputes `y = x + bias` from the saved inputs (nothing else is stored).

Kernels:

* `_bias_act_fwd_kernel`: 1-D grid over `numel`, `BLOCK` elements per program; the bias column is
  `offset % N`.
* `_bias_act_bwd_kernel`: 2-D grid (row groups x column blocks); each program walks its rows in
  `[BLOCK_M, BLOCK_N]` tiles, writes `dx = dout * act'(y)` and its fp32 partial column sums of `dx` into a
  `[G, N]` buffer; torch sums the partials into `dbias` (so `dbias` is summed in fp32 even for bf16 `dx`).

Caution:

* No second derivative. Block sizes are not tuned on GPU yet.
* On CPU tensors the kernels run only under the Triton interpreter (`TRITON_INTERPRET=1` set before this
  module is imported): for tests. `tl.math.erf` works there (measured: max error 6e-8 vs `torch.erf`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mplug_fast.ops.triton.layer_norm import _on_device, cast_rtne

__all__ = ["ACTIVATIONS", "INTERPRETED", "bias_act", "bias_act_bwd", "bias_act_fwd"]

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "quick_gelu": 2}  # name -> the kernels' ACT code
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Globals read by the kernels must be constexpr (triton rejects plain Python floats there).
INV_SQRT2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_C = tl.constexpr(0.044715)
QUICK_GELU_C = tl.constexpr(1.702)


# ---- kernels -----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(z):
    # tanh(z) = 2 sigmoid(2z) - 1 (no tl.tanh in the core language; libdevice differs between backends).
    # |z| <= 15 keeps exp(2|z|) finite; tanh(15) rounds to 1 in fp32 anyway.
    z = tl.minimum(tl.maximum(z, -15.0), 15.0)
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _act_fwd(y, ACT: tl.constexpr):
    if ACT == 0:
        out = 0.5 * y * (1.0 + tl.math.erf(y * INV_SQRT2))
    elif ACT == 1:
        out = 0.5 * y * (1.0 + _tanh(SQRT_2_OVER_PI * (y + GELU_TANH_C * y * y * y)))
    else:
        out = y * tl.sigmoid(QUICK_GELU_C * y)
    return out


@triton.jit
def _act_grad(y, ACT: tl.constexpr):
    """d act(y) / dy."""
    if ACT == 0:
        grad = 0.5 * (1.0 + tl.math.erf(y * INV_SQRT2)) + y * INV_SQRT_2PI * tl.exp(-0.5 * y * y)
    elif ACT == 1:
        t = _tanh(SQRT_2_OVER_PI * (y + GELU_TANH_C * y * y * y))
        grad = 0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * y * y)
    else:
        s = tl.sigmoid(QUICK_GELU_C * y)
        grad = s + QUICK_GELU_C * y * s * (1.0 - s)
    return grad


@triton.jit
def _bias_act_fwd_kernel(
    X, Bias, Out, numel, N, ACT: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED_K: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(Bias + offs % N, mask=inside, other=0.0).to(tl.float32)
    out = _act_fwd(x + b, ACT)
    tl.store(Out + offs, cast_rtne(out, Out.dtype.element_ty, INTERPRETED_K), mask=inside)


@triton.jit
def _bias_act_bwd_kernel(
    DOut, X, Bias, DX, DBias_partial, rows, N, rows_per_program,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < N
    b = tl.load(Bias + cols, mask=in_cols, other=0.0).to(tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program  # int64 offsets (m is int64 when compiled)
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for m in range(row_start, row_end, BLOCK_M):
        r = m + tl.arange(0, BLOCK_M)
        inside = (r < row_end)[:, None] & in_cols[None, :]
        offs = r[:, None] * N + cols[None, :]  # [BLOCK_M, BLOCK_N]
        x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
        dout = tl.load(DOut + offs, mask=inside, other=0.0).to(tl.float32)
        dx = dout * _act_grad(x + b[None, :], ACT)  # 0 outside (dout = 0 there)
        tl.store(DX + offs, cast_rtne(dx, DX.dtype.element_ty, INTERPRETED_K), mask=inside)
        db_acc += tl.sum(dx, axis=0)
    tl.store(DBias_partial + pid_m * N + cols, db_acc, mask=in_cols)


# Under TRITON_INTERPRET=1 `triton.jit` returns an InterpretedFunction instead of a JITFunction.
INTERPRETED = not isinstance(_bias_act_fwd_kernel, triton.runtime.JITFunction)


# ---- launchers ---------------------------------------------------------------------------------------------

FWD_BLOCK = 1024  # elements per forward program
BWD_BLOCK_M, BWD_BLOCK_N = 16, 128  # backward tile (rows, columns)


def _check(x: Tensor, bias: Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the bias is broadcast over the last dim)")
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be [{x.shape[-1]}] (the last dim of x), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("bias", bias)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device}, x on {x.device}: put them on one device")


def _num_row_groups(device: torch.device, rows: int, col_blocks: int) -> int:
    """Backward row groups: about 4 programs per SM in all on CUDA, few under the interpreter."""
    target = (
        4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    )
    return max(1, min(triton.cdiv(rows, BWD_BLOCK_M), triton.cdiv(target, col_blocks)))


def _bias_act_fwd(x: Tensor, bias: Tensor, activation: str) -> Tensor:
    _check(x, bias, activation)
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    numel, N = x.numel(), x.shape[-1]
    if numel > 0:
        with _on_device(x):
            _bias_act_fwd_kernel[(triton.cdiv(numel, FWD_BLOCK),)](
                x, bias.contiguous(), out, numel, N,
                ACT=ACTIVATIONS[activation], BLOCK=FWD_BLOCK, INTERPRETED_K=INTERPRETED,
            )  # fmt: skip
    return out


def _bias_act_bwd(dout: Tensor, x: Tensor, bias: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    dout, x = dout.contiguous(), x.contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    N = x.shape[-1]
    rows = x.numel() // N if N > 0 else 0
    if rows == 0:
        return dx, torch.zeros_like(bias)
    col_blocks = triton.cdiv(N, BWD_BLOCK_N)
    G = _num_row_groups(x.device, rows, col_blocks)
    rows_per_program = triton.cdiv(triton.cdiv(rows, G), BWD_BLOCK_M) * BWD_BLOCK_M  # whole tiles
    G = triton.cdiv(rows, rows_per_program)
    db_partial = torch.empty((G, N), dtype=torch.float32, device=x.device)
    with _on_device(x):
        _bias_act_bwd_kernel[(G, col_blocks)](
            dout, x, bias.contiguous(), dx, db_partial, rows, N, rows_per_program,
            ACT=ACTIVATIONS[activation], BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N, INTERPRETED_K=INTERPRETED,
        )  # fmt: skip
    return dx, db_partial.sum(0).to(bias.dtype)


# ---- torch.library ops -------------------------------------------------------------------------------------


@torch.library.custom_op("mplug_fast::bias_act_fwd", mutates_args=())
def bias_act_fwd(x: Tensor, bias: Tensor, activation: str) -> Tensor:
    """act(x + bias), [*, N] contiguous in x's dtype; see the module docstring."""
    return _bias_act_fwd(x, bias, activation)


@bias_act_fwd.register_fake
def _(x, bias, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mplug_fast::bias_act_bwd", mutates_args=())
def bias_act_bwd(dout: Tensor, x: Tensor, bias: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """(dx [*, N] contiguous in x's dtype, dbias [N] in bias's dtype)."""
    return _bias_act_bwd(dout, x, bias, activation)


@bias_act_bwd.register_fake
def _(dout, x, bias, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:
    x, bias, activation = inputs
    ctx.save_for_backward(x, bias)
    ctx.activation = activation


def _backward(ctx, dout: Tensor):
    x, bias = ctx.saved_tensors
    dx, dbias = bias_act_bwd(dout, x, bias, ctx.activation)
    return dx, dbias, None


bias_act_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ---------------------------------------------------------------------------------------


def bias_act(x: Tensor, bias: Tensor, activation: str = "gelu") -> Tensor:
    """act(x + bias) with the Triton kernels; differentiable and traceable by torch.compile.

    Args:
        x: [*, N].  bias: [N].  activation: "gelu" (erf), "gelu_tanh" or "quick_gelu".
    Returns:
        [*, N] contiguous, in x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    return bias_act_fwd(x, bias, activation)
