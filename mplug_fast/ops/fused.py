"""Fused epilogues of the transformer layers, with a backend switch.

    residual_layer_norm(x, residual, weight, bias, eps, *, dropout_p=0.0, training=False, backend=None)
        -> LayerNorm(residual + dropout(x))              BERT's post-LN `norm(x + dropout(f(x)))`
    bias_gelu(x, bias, approximate="none", *, backend=None) -> gelu(x + bias)      BERT's MLP (fc1 epilogue)
    bias_quick_gelu(x, bias, *, backend=None) -> y * sigmoid(1.702 y), y = x + bias   CLIP's MLP

Shapes: `x` (and `residual`) `[*, D]`; `weight`, `bias` `[D]`, applied over the last dim. Output dtypes:
`residual_layer_norm` returns `promote_types(x.dtype, residual.dtype)` (the input dtype when they match), the
activations return `x.dtype`. Both backends compute in fp32.

Backends:

* `reference`: the oracle twins of `mplug_fast.ops.reference` (`residual_layer_norm_ref`, `bias_gelu_ref`,
  `bias_quick_gelu_ref`): unfused torch ops, any device and dtype; dropout uses torch's RNG.
* `triton`: our kernels (`mplug_fast.ops.triton.layer_norm`, `mplug_fast.ops.triton.activation`),
  registered as `torch.library` custom ops (traceable by `torch.compile(fullgraph=True)`); imported lazily,
  so `import mplug_fast.ops.fused` never needs triton. Dropout draws an int64 Philox seed from torch's
  generator on the tensor's device, so `torch.manual_seed` makes runs repeatable; the mask differs from the
  reference's (a different RNG) but has the same law.

Backend choice: the `backend` argument > the `MPLUG_FAST_FUSED` environment variable (read once per
process) > automatic: `triton` for CUDA tensors when it can run them, else `reference` (on CPU tensors
the kernels only run under the slow interpreter, `TRITON_INTERPRET=1`: tests pass `backend="triton"`).
A backend asked for by argument or environment that cannot run the inputs is an error with the reasons;
the automatic choice falls back to `reference` and logs why, once.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from mplug_fast.ops.reference import bias_gelu_ref, bias_quick_gelu_ref, residual_layer_norm_ref

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "bias_gelu",
    "bias_quick_gelu",
    "env_backend",
    "residual_layer_norm",
    "select_backend",
    "triton_unavailable_reason",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MPLUG_FAST_FUSED"
BACKENDS = ("reference", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _read_env_backend() -> str | None:
    name = os.environ.get(ENV_VAR, "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a fused backend; valid: {', '.join(BACKENDS)}")
    return name


# Not the cached function itself: dynamo traces through an lru_cache wrapper (with a warning) instead of
# taking the marked function's result as a constant.
@torch.compiler.assume_constant_result
def env_backend() -> str | None:
    """`MPLUG_FAST_FUSED` (read once per process; `env_backend.cache_clear()` rereads it), None when unset."""
    return _read_env_backend()


env_backend.cache_clear = _read_env_backend.cache_clear


@functools.cache
def _triton_modules() -> tuple[ModuleType, ModuleType] | str:
    """(layer_norm, activation) kernel modules, or why they cannot be imported (cached: imported once)."""
    try:
        return (
            importlib.import_module("mplug_fast.ops.triton.layer_norm"),
            importlib.import_module("mplug_fast.ops.triton.activation"),
        )
    except ImportError as e:
        return f"cannot import the Triton kernels: {e}"


@torch.compiler.assume_constant_result
def _triton_interpreted() -> bool | None:
    """None when the kernels cannot be imported, else whether they run under the interpreter."""
    modules = _triton_modules()
    return None if isinstance(modules, str) else bool(modules[0].INTERPRETED)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device` in this process, else why not."""
    interpreted = _triton_interpreted()
    if interpreted is None:
        return _triton_modules()  # the import error
    if device.type == "cuda" and not interpreted:
        return None
    if device.type != "cuda" and interpreted:
        return None  # the interpreter runs on CPU tensors (slowly: tests only)
    if interpreted:
        return "TRITON_INTERPRET=1 was set when the kernels were imported: they run on CPU tensors only"
    return f"{device.type} tensors need a CUDA device or the Triton interpreter (TRITON_INTERPRET=1)"


def _triton_reasons(x: Tensor, *others: Tensor) -> list[str]:
    reason = triton_unavailable_reason(x.device)
    reasons = [reason] if reason is not None else []
    for t in (x, *others):
        if t.dtype not in TRITON_DTYPES:
            reasons.append(f"dtype {t.dtype} (supported: fp32, fp16, bf16)")
            break
    if x.dim() > 0 and x.shape[-1] > 16384:
        reasons.append(f"last dim {x.shape[-1]} > 16384 (one program per row)")
    return reasons


@functools.cache
def _log_fallback(device_type: str, reasons: tuple[str, ...]) -> None:
    logger.info(
        "fused ops on %s tensors: using `reference`, not `triton`: %s", device_type, "; ".join(reasons)
    )


def select_backend(x: Tensor, *others: Tensor, backend: str | None = None) -> str:
    """The backend that runs these inputs (see the module docstring for the order)."""
    name = backend if backend is not None else env_backend()
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown fused backend {name!r}; valid: {', '.join(BACKENDS)}")
        if name == "triton":
            reasons = _triton_reasons(x, *others)
            if reasons:
                source = "backend=" if backend is not None else f"{ENV_VAR}="
                raise RuntimeError(
                    f"{source}'triton' cannot run these inputs (x: {list(x.shape)} {x.dtype} {x.device}): "
                    + "; ".join(reasons)
                    + ". Use backend='reference'."
                )
        return name
    if not x.is_cuda:
        return "reference"
    reasons = _triton_reasons(x, *others)
    if reasons:
        _log_fallback(x.device.type, tuple(reasons))
        return "reference"
    return "triton"


def residual_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """LayerNorm(residual + dropout(x)) over the last dim (BERT's post-LN residual epilogue).

    Args:
        x: [*, D], the sublayer output (dropped out when `training`).  residual: [*, D], the layer input.
        weight, bias: [D].  eps: LayerNorm epsilon (1e-12 in BERT).
        dropout_p: drop probability in [0, 1], applied only when `training`.
        backend: "reference" or "triton" (None: `MPLUG_FAST_FUSED`, else automatic).
    Returns:
        [*, D] in promote_types(x.dtype, residual.dtype).
    """
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if select_backend(x, residual, weight, bias, backend=backend) == "reference":
        return residual_layer_norm_ref(x, residual, weight, bias, eps, dropout_p=p, training=training)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if p > 0.0 else None
    # The custom ops are reached through torch.ops (registered when select_backend imported the kernels):
    # torch.compile traces that, not importlib.
    out, _, _ = torch.ops.mplug_fast.residual_layer_norm_fwd(x, residual, weight, bias, seed, float(eps), p)
    return out


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """gelu(x + bias): erf GELU (BERT), or `approximate="tanh"`.

    Args:
        x: [*, N].  bias: [N], broadcast over the last dim.
        backend: "reference" or "triton" (None: `MPLUG_FAST_FUSED`, else automatic).
    Returns:
        [*, N] in x's dtype.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if select_backend(x, bias, backend=backend) == "reference":
        return bias_gelu_ref(x, bias, approximate)
    return torch.ops.mplug_fast.bias_act_fwd(x, bias, "gelu" if approximate == "none" else "gelu_tanh")


def bias_quick_gelu(x: Tensor, bias: Tensor, *, backend: str | None = None) -> Tensor:
    """quick_gelu(x + bias) = y * sigmoid(1.702 y), y = x + bias (CLIP).

    Args:
        x: [*, N].  bias: [N], broadcast over the last dim.
        backend: "reference" or "triton" (None: `MPLUG_FAST_FUSED`, else automatic).
    Returns:
        [*, N] in x's dtype.
    """
    if select_backend(x, bias, backend=backend) == "reference":
        return bias_quick_gelu_ref(x, bias)
    return torch.ops.mplug_fast.bias_act_fwd(x, bias, "quick_gelu")
