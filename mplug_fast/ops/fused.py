"""Fused epilogues of the transformer layers (BERT's post-LN `LN(residual + dropout(x))`, the MLPs'
`gelu(x + bias)` / `quick_gelu(x + bias)`), over the backends of `FUSED` (`ops/registry.py`).

Shapes: `x` (and `residual`) `[*, D]`; `weight`, `bias` `[D]`, applied over the last dim. Both backends
compute in fp32.

Backends (each: `residual_layer_norm(x, residual, weight, bias, eps, dropout_p, training)` and
`bias_act(x, bias, activation)`, activation "gelu", "gelu_tanh" or "quick_gelu"):

* `reference`: the unfused torch twins of `mplug_fast.ops.reference`, any device and dtype; dropout uses
  torch's RNG.
* `triton`: our kernels (`ops/triton/layer_norm.py`, `ops/triton/activation.py`), `torch.library` custom
  ops (traceable by `torch.compile(fullgraph=True)`), imported lazily, so `import mplug_fast.ops.fused` never
  needs triton. Dropout draws an int64 Philox seed from torch's generator on the tensor's device, so
  `torch.manual_seed` makes runs repeatable; the mask differs from the reference's but has the same law.

Automatic order: `fused_priority`; the `MPLUG_FAST_FUSED` environment variable overrides it. The modules
(`modeling/layers.py`) resolve once per (device, dtype, needs grad) with `fused_key` + `resolve_fused` and
then call `FUSED[name]`'s methods; the functions below resolve on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mplug_fast.ops.reference import bias_gelu_ref, bias_quick_gelu_ref, residual_layer_norm_ref
from mplug_fast.ops.registry import Backend, Inputs, Registry, triton_kernels_status

__all__ = [
    "ENV_VAR",
    "FUSED",
    "bias_gelu",
    "bias_quick_gelu",
    "fused_key",
    "fused_priority",
    "resolve_fused",
    "residual_layer_norm",
    "select_backend",
    "triton_unavailable_reason",
]

ENV_VAR = "MPLUG_FAST_FUSED"
TRITON_MODULES = ("mplug_fast.ops.triton.layer_norm", "mplug_fast.ops.triton.activation")


class ReferenceFused(Backend):
    """The unfused torch twins of `ops/reference.py`: any device and dtype."""

    NAME = "reference"

    @staticmethod
    def residual_layer_norm(x, residual, weight, bias, eps, dropout_p, training):
        return residual_layer_norm_ref(x, residual, weight, bias, eps, dropout_p=dropout_p, training=training)

    @staticmethod
    def bias_act(x, bias, activation):
        if activation == "quick_gelu":
            return bias_quick_gelu_ref(x, bias)
        return bias_gelu_ref(x, bias, "none" if activation == "gelu" else "tanh")


class TritonFused(Backend):
    """Our kernels, through `torch.ops` (custom ops registered when `triton_kernels_status` imports them)."""

    NAME = "triton"
    SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    MAX_WIDTH = 16384  # one program per row

    @classmethod
    def unavailable_reason(cls) -> str | None:
        status = triton_kernels_status(*TRITON_MODULES)
        return None if status in ("compiled", "interpreted") else status

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list[str]:
        reasons = []
        interpreted = triton_kernels_status(*TRITON_MODULES) == "interpreted"
        if inputs.device_type == "cuda" and interpreted:
            reasons.append(
                "TRITON_INTERPRET=1 was set when the kernels were imported: they run on CPU tensors only"
            )
        elif inputs.device_type != "cuda" and not interpreted:
            reasons.append(
                f"{inputs.device_type} tensors need a CUDA device or the Triton interpreter "
                "(TRITON_INTERPRET=1)"
            )
        if inputs.dtype not in cls.SUPPORTED_DTYPES:
            reasons.append(f"dtype {inputs.dtype} (supported: fp32, fp16, bf16)")
        if inputs.dim > cls.MAX_WIDTH:
            reasons.append(f"last dim {inputs.dim} > {cls.MAX_WIDTH} (one program per row)")
        return reasons

    @staticmethod
    def residual_layer_norm(x, residual, weight, bias, eps, dropout_p, training):
        p = float(dropout_p) if training else 0.0
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if p > 0.0 else None
        ln_fwd = torch.ops.mplug_fast.residual_layer_norm_fwd
        out, _, _ = ln_fwd(x, residual, weight, bias, seed, float(eps), p)  # (out, mean, rstd)
        return out

    @staticmethod
    def bias_act(x, bias, activation):
        return torch.ops.mplug_fast.bias_act_fwd(x, bias, activation)


def fused_priority(device_type: str, dtype: torch.dtype, needs_grad: bool) -> tuple[str, ...]:
    """`triton` first on CUDA tensors; elsewhere `reference` (on CPU tensors the kernels only run under the
    slow interpreter, `TRITON_INTERPRET=1`: tests pass `backend="triton"`)."""
    return ("triton", "reference") if device_type == "cuda" else ("reference", "triton")


FUSED = Registry("fused epilogue", ENV_VAR, (ReferenceFused, TritonFused), fused_priority)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device` in this process, else why not."""
    reasons = TritonFused.reasons(Inputs(device.type, torch.float32, 1))
    return "; ".join(reasons) if reasons else None


def fused_key(x: Tensor, *others: Tensor, dropout: bool = False) -> tuple:
    """The static properties of an epilogue call, as the positional arguments of `resolve_fused`: (device
    type, dtype (all inputs promoted), row width, dropout, needs grad)."""
    dtype = x.dtype
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others))
    width = int(x.shape[-1]) if x.dim() > 0 else 1
    # a branch, not bool(): it specialises a symbolic condition (dropout_p traced as a SymFloat) to a constant
    dropout = True if dropout else False  # noqa: SIM210
    return (x.device.type, dtype, width, dropout, needs_grad)


# Evaluated eagerly by torch.compile and put in the graph as a constant (see `ops/attention.py`).
@torch.compiler.assume_constant_result
def resolve_fused(
    device_type: str,
    dtype: torch.dtype,
    width: int,
    dropout: bool,
    needs_grad: bool,
    backend: str | None = None,
) -> str:
    """The fused backend for calls with these static properties."""
    inputs = Inputs(device_type, dtype, width, "none", dropout, needs_grad)
    return FUSED.resolve(inputs, backend=backend)


def select_backend(x: Tensor, *others: Tensor, backend: str | None = None) -> str:
    """The backend that runs these inputs (see the module docstring for the order)."""
    return resolve_fused(*fused_key(x, *others), backend)


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
    name = resolve_fused(*fused_key(x, residual, weight, bias, dropout=training and dropout_p > 0), backend)
    return FUSED[name].residual_layer_norm(x, residual, weight, bias, eps, float(dropout_p), training)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """gelu(x + bias): erf GELU (BERT), or `approximate="tanh"`; x [*, N], bias [N] -> [*, N] in x's dtype.
    backend: "reference" or "triton" (None: `MPLUG_FAST_FUSED`, else automatic)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    name = resolve_fused(*fused_key(x, bias), backend)
    return FUSED[name].bias_act(x, bias, "gelu" if approximate == "none" else "gelu_tanh")


def bias_quick_gelu(x: Tensor, bias: Tensor, *, backend: str | None = None) -> Tensor:
    """quick_gelu(x + bias) = y * sigmoid(1.702 y), y = x + bias (CLIP); x [*, N], bias [N] -> [*, N] in x's
    dtype. backend: as in `bias_gelu`."""
    name = resolve_fused(*fused_key(x, bias), backend)
    return FUSED[name].bias_act(x, bias, "quick_gelu")
