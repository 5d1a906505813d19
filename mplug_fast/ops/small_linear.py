"""Linear layers over the few rows of a decoding step on CPU (the native `small_linear` op of kernels/).

A BLAS GEMM is tuned for many rows; a decoding step multiplies every weight matrix by a few rows (beams x
samples), where it reaches a fraction of the CPU's FMA rate. `mplug_fast::small_linear` computes those
products as AVX2 dot products in register tiles (kernels/cpu/small_linear.cpp; 1.2-2.9x faster than the BLAS
GEMM at 1-64 rows on an AVX2 CPU, docs/experiments.md). It is used when all of these hold, else the call is
`module(x)` / `F.linear` unchanged:

    the native op is built and loaded (`mplug_fast.ops.native`), x and the weight are fp32 on the CPU,
    autograd is off, x has at most `MAX_ROWS` rows (x.numel() / in_features), torch.compile is not
    tracing, and `enabled()`: `MPLUG_FAST_SMALL_LINEAR=1` / `0` turns the kernel on / off; by default it
    is on where torch's CPU capability is AVX2 (the CPUs it was measured on; on AVX-512 CPUs the BLAS
    GEMM keeps the work, as its small-row speed there has not been measured against this kernel).

Results differ from the BLAS GEMM by rounding only (another summation order; the same for every thread count).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.ops.native import native_op

MAX_ROWS = 64
ENV = "MPLUG_FAST_SMALL_LINEAR"


@functools.cache
def enabled() -> bool:
    """Whether the small-row kernel may run in this process (see the module docstring)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"{ENV}={choice!r}: use 1 (on), 0 (off) or auto")
    if choice == "auto":
        return torch.backends.cpu.get_cpu_capability() == "AVX2"
    return choice == "1"


def small_rows(x: Tensor, weight: Tensor) -> bool:
    """Whether `small_linear` runs x [..., K] @ weight [N, K]^T (see the module docstring)."""
    return (
        not torch.compiler.is_compiling()  # a compiled graph keeps the ATen GEMM
        and x.is_cpu
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and not torch.is_grad_enabled()
        and enabled()
        and native_op("small_linear", "cpu") is not None
    )


def small_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The native op on x [..., K] (any leading shape): returns [..., N]."""
    y = torch.ops.mplug_fast.small_linear(x.reshape(-1, x.shape[-1]), weight, bias)  # [rows, N]
    return y.view(*x.shape[:-1], weight.shape[0])


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, through `small_linear` when `module` is a plain `nn.Linear` and `small_rows` holds
    (an int8 dynamic-quantised layer, or any other module, runs as itself). x: [..., in] -> [..., out]."""
    if type(module) is nn.Linear and small_rows(x, module.weight):
        return small_linear(x, module.weight, module.bias)
    return module(x)


def linear_weight(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)`, through `small_linear` when `small_rows` holds."""
    return small_linear(x, weight, bias) if small_rows(x, weight) else F.linear(x, weight, bias)
