"""Which GEMM runs a linear layer of the model: the one entry the layers call for their projections.

    at most `small_linear.MAX_ROWS` rows, no autograd, fp32 CPU  -> `small_linear` (native AVX2 kernel
                                                                    for the few rows of a decoding step)
    at least `onednn_linear.MIN_ROWS` rows, fp32 CPU             -> `onednn_linear` (oneDNN's GEMM, on
                                                                    the CPUs where it beats the BLAS GEMM)
    anything else                                                -> the module itself / `F.linear`

Each path has its own conditions and switch (see those modules); a plain `nn.Linear` is needed for either
(an int8 dynamic-quantised layer, or any other module, runs as itself).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.ops import onednn_linear
from mplug_fast.ops.small_linear import small_linear, small_rows


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` through the GEMM chosen above. x: [..., in] -> [..., out]."""
    if type(module) is not nn.Linear:
        return module(x)
    return linear_weight(x, module.weight, module.bias)


def linear_weight(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)` through the GEMM chosen above. x [..., K], weight [N, K] -> [..., N]."""
    if small_rows(x, weight):
        return small_linear(x, weight, bias)
    if onednn_linear.usable(x, weight):
        return onednn_linear.linear(x, weight, bias)
    return F.linear(x, weight, bias)
