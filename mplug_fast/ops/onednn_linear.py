"""fp32 CPU linear layers through oneDNN's GEMM, on the CPUs where it is faster than torch's BLAS GEMM.

torch runs an fp32 `F.linear` on the CPU as an MKL GEMM. On AMD CPUs with AVX2 (measured on an AMD EPYC,
Zen 1) oneDNN's JIT GEMM, which torch also ships, is 3-9 % faster on one thread and 6-19 % faster on two
at the shapes of the encoders (hundreds of rows, 768-3072 wide; docs/experiments.md). `linear` runs
x [..., K] @ weight [N, K]^T + bias through `torch.ops.mkldnn._linear_pointwise` (the weight read in
place, no packed copy, so nothing can go stale when the weight changes) when all of these hold, else it is
`F.linear` unchanged:

    x and the weight are fp32 CPU tensors, the weight is contiguous, x has at least `MIN_ROWS` rows
    (x.numel() / K; below that oneDNN's setup costs more than it saves), torch.compile is not tracing,
    and `enabled()`: `MPLUG_FAST_ONEDNN_LINEAR=1` / `0` turns it on / off; by default it is on where the
    CPU is an AMD CPU whose torch capability is AVX2 and the op runs (a one-time probe against `F.linear`).

With autograd the forward GEMM is oneDNN's and the backward is torch's (`mm` / `sum`): oneDNN reads the
transposed operands of the backward GEMMs through copies, which made them slower than MKL's. Results
differ from `F.linear` by rounding only (another summation order).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_ROWS = 128
ENV = "MPLUG_FAST_ONEDNN_LINEAR"


def _cpu_vendor() -> str:
    """The `vendor_id` of /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN's linear on x [R, K] (rows contiguous), weight [N, K] -> [R, N]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def probe_error() -> str | None:
    """Why oneDNN's linear cannot run here (None when it runs and matches `F.linear` on a small case)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)"
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((MIN_ROWS, 64), (48, 64), (48,)))
    try:
        y = _pointwise(x, w, b)
    except RuntimeError as e:
        return f"oneDNN's linear failed: {e}"
    if y.shape != (MIN_ROWS, 48) or not torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4):
        return "oneDNN's linear disagrees with F.linear"
    return None


@functools.cache
def enabled() -> bool:
    """Whether `linear` may take oneDNN's GEMM in this process (see the module docstring)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"{ENV}={choice!r}: use 1 (on), 0 (off) or auto")
    if choice == "0":
        return False
    if choice == "auto" and (
        torch.backends.cpu.get_cpu_capability() != "AVX2" or _cpu_vendor() != "AuthenticAMD"
    ):
        return False
    return probe_error() is None


def status() -> str:
    """One line for `mplug-fast info`: which GEMM runs the long fp32 CPU linear layers here, and why."""
    switch = f"({ENV}=1 / 0: on / off)"
    if enabled():
        return f"fp32 linear layers of >= {MIN_ROWS} rows run oneDNN's GEMM {switch}"
    if os.environ.get(ENV, "auto") == "0":
        reason = "oneDNN's GEMM switched off"
    elif probe_error() is not None:
        reason = f"oneDNN's GEMM unusable: {probe_error()}"
    else:
        reason = "oneDNN's GEMM is taken by default on AMD CPUs with AVX2 only"
    return f"fp32 linear layers run torch's BLAS GEMM; {reason} {switch}"


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` runs x [..., K] @ weight [N, K]^T through oneDNN (see the module docstring)."""
    return (
        not torch.compiler.is_compiling()  # a compiled graph keeps the ATen GEMM
        and x.is_cpu
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and x.dim() >= 2
        and x.numel() >= MIN_ROWS * x.shape[-1]
        and enabled()
    )


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b: forward through oneDNN, backward through torch's GEMMs. x [R, K] -> [R, N]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _pointwise(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        dx = grad.mm(weight) if ctx.needs_input_grad[0] else None  # [R, K]
        dw = grad.t().mm(x) if ctx.needs_input_grad[1] else None  # [N, K]
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # [N]
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)` on x [..., K], weight [N, K] -> [..., N], through oneDNN when `usable`."""
    if not usable(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [R, K]
    tracked = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and tracked:
        y = _OneDnnLinear.apply(rows, weight, bias)
    else:
        y = _pointwise(rows, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
