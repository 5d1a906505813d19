"""Linear layers whose weight is stored as panels (the native `packed_linear` op of kernels/).

A decoding step multiplies every weight matrix by a few rows while the weights stream from memory. In
nn.Linear's layout [N, K] an AVX2 kernel reads several weight rows at once (several memory streams) and
sums vector lanes at the end. Stored as panels [N/16, K, 16] (`pack`: packed[p, k, j] = W[16 p + j, k]),
the 16 outputs of a panel are one sequential stream, and the product is broadcast-FMA outer products
(kernels/cpu/packed_linear.cpp). On the AVX2 CPU it was measured on, this reads the decoder's weights
1.3-1.5x as fast as `small_linear` at 5 rows on one thread (docs/experiments.md).

`packed_linear(x, packed, bias)` runs the native op when `packed_rows` holds (the op is built and loaded, x
and the weight are fp32 on the CPU, autograd is off, torch.compile is not tracing), at any row count; else
`F.linear` on `unpack(packed)` (differentiable: gradients reach the packed tensor). The native result
differs from the BLAS GEMM by rounding only: each output is summed over k in order, then the bias added
(the same order for every row count and thread count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mplug_fast.ops.native import native_op

PANEL = 16  # outputs per panel


def pack(weight: Tensor) -> Tensor:
    """weight [N, K] (N a multiple of `PANEL`) -> panels [N/16, K, 16], contiguous, a new tensor."""
    if weight.dim() != 2 or weight.shape[0] % PANEL:
        shape = tuple(weight.shape)
        raise ValueError(f"pack: a weight [N, K] with N a multiple of {PANEL} is needed, got {shape}")
    N, K = weight.shape
    return weight.reshape(N // PANEL, PANEL, K).transpose(1, 2).contiguous()


def unpack(packed: Tensor) -> Tensor:
    """panels [N/16, K, 16] -> weight [N, K] (a new tensor; differentiable)."""
    P, K, width = packed.shape
    return packed.transpose(1, 2).reshape(P * width, K)


def packed_rows(x: Tensor, packed: Tensor) -> bool:
    """Whether the native op runs x [..., K] against `packed` (see the module docstring)."""
    return (
        not torch.compiler.is_compiling()
        and x.is_cpu
        and x.dtype == torch.float32
        and packed.dtype == torch.float32
        and packed.is_cpu
        and not torch.is_grad_enabled()
        and native_op("packed_linear", "cpu") is not None
    )


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] times the weight of `packed` [N/16, K, 16], plus bias [N]: returns [..., N]."""
    if not packed_rows(x, packed):
        return F.linear(x, unpack(packed), bias)
    y = torch.ops.mplug_fast.packed_linear(x.reshape(-1, x.shape[-1]), packed, bias)  # [rows, N]
    return y.view(*x.shape[:-1], y.shape[-1])
