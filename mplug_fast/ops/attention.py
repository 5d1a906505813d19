"""One attention entry point for the whole model (`attention`), over the backends of `ATTENTION`
(`ops/registry.py`).

Layout `[B, H, L, Dh]` (SDPA's). `k, v` may have fewer rows than `q` (`Bk`); `kv_index [B]` maps
each query row to its K/V row so beams and answer candidates share one image's K/V.
Mask semantics are those of `mplug_fast.ops.reference` (bool, True = attend; causal aligned at
the bottom right; rows with no key give 0).

Backends: `reference` (the oracle), `sdpa` (torch, `ops/sdpa.py`), `short_query` (the native CPU kernel for
the few queries of a decoding step, `ops/short_query.py`), `triton` (our FlashAttention-2 kernels,
`mplug_fast.ops.triton.attention`, with the split-K short-query variant `mplug_fast.ops.triton.decode`,
imported on first use so that `import mplug_fast` never needs triton), and `flash_attn`, `xformers`
(`ops/external.py`); automatic order: `attention_priority`. The model config's choice (`config_backend=`)
ranks below `backend=` and `MPLUG_FAST_ATTENTION`. The modules (`modeling/layers.py`) resolve once per
(device, dtype, needs grad, mask kind) and then run `ATTENTION[name]`; `attention` resolves on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mplug_fast.ops.external import FlashAttnBackend, XFormersBackend
from mplug_fast.ops.reference import attention_ref, check_attention_inputs
from mplug_fast.ops.registry import AttentionBackend, Inputs, Registry, mask_kind, triton_kernels_status
from mplug_fast.ops.sdpa import SdpaBackend
from mplug_fast.ops.short_query import ShortQueryBackend

__all__ = [
    "ATTENTION",
    "BACKENDS",
    "ENV_VAR",
    "AttentionBackend",
    "attention",
    "attention_key",
    "attention_priority",
    "available_backends",
    "resolve_attention",
    "select_backend",
]

ENV_VAR = "MPLUG_FAST_ATTENTION"
TRITON_MODULES = ("mplug_fast.ops.triton.attention",)


class ReferenceBackend(AttentionBackend):
    """Plain math in fp32 (`ops.reference.attention_ref`): slow, exact, the oracle."""

    NAME = "reference"

    run = staticmethod(attention_ref)


class TritonBackend(AttentionBackend):
    """Our FlashAttention-2 Triton kernels (`mplug_fast.ops.triton.attention`), imported on first use."""

    NAME = "triton"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        status = triton_kernels_status(*TRITON_MODULES)
        if status == "interpreted":
            return None
        if status == "compiled":
            return None if torch.cuda.is_available() else "no CUDA device, and TRITON_INTERPRET=1 was not set"
        return status

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list[str]:
        """The kernels' own limits (`ops.triton.tiles`: head dim, dtype, and on CUDA the compute capability,
        TF32 for fp32 and whether the tiles fit the device's shared memory), then the interpreter's."""
        try:  # deferred: the ops.triton package imports the optional triton
            from mplug_fast.ops.triton.tiles import attention_unsupported_reasons
        except ImportError as e:
            return [f"cannot import the Triton kernels ({e})"]
        reasons = attention_unsupported_reasons(
            dtype=inputs.dtype,
            head_dim=inputs.dim,
            device=inputs.device_type,
            has_mask="key_padding" in inputs.mask,
            causal="causal" in inputs.mask,
            dropout=float(inputs.dropout),
            needs_grad=inputs.needs_grad,
        )
        if inputs.device_type != "cuda":
            if triton_kernels_status(*TRITON_MODULES) != "interpreted":
                reasons.append(f"{inputs.device_type} tensors need the interpreter (TRITON_INTERPRET=1)")
            elif inputs.dtype == torch.bfloat16:
                reasons.append(
                    "bf16 on CPU: bf16 tl.dot is wrong in the Triton interpreter (triton-lang/triton#11584)"
                )
        return reasons

    @staticmethod
    def run(q, k, v, **kwargs):
        """The main kernel, or the split-K one (`triton/decode.py`) when `num_splits_for` says the main grid
        would leave the GPU idle: Lq <= 64, Lk >= 256 and B * H * ceil(Lq / 16..64) < the SM count.
        kwargs: those of `AttentionBackend.run` (key_padding_mask, causal, dropout_p, scale, kv_index)."""
        # Deferred: triton is an optional dependency (imported by `triton_kernels_status` on resolution).
        from mplug_fast.ops.triton.attention import flash_attention
        from mplug_fast.ops.triton.decode import num_splits_for, splitk_attention

        B, H, Lq, _ = q.shape
        num_splits = num_splits_for(B, H, Lq, k.shape[2], q.device)
        if num_splits > 1:
            return splitk_attention(q, k, v, num_splits=num_splits, **kwargs)
        return flash_attention(q, k, v, **kwargs)


def attention_priority(device_type: str, dtype: torch.dtype, needs_grad: bool) -> tuple[str, ...]:
    """The automatic order. CUDA: our Triton kernels, then the external libraries, then torch. Elsewhere:
    on CPUs whose torch capability is AVX2 the native short-query kernel first (it runs fp32 inference
    without a causal mask, `ops/short_query.py`; measured on AVX2 CPUs only), then torch, the reference,
    and last the backends that never run there automatically (the external ones are CUDA only; Triton only
    under its interpreter, for tests). The order does not depend on the dtype or on gradients: the
    backends' reasons cover those (the signature keeps them in the key)."""
    if device_type == "cuda":
        return ("triton", "flash_attn", "xformers", "sdpa", "reference", "short_query")
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        return ("short_query", "sdpa", "reference", "flash_attn", "xformers", "triton")
    return ("sdpa", "reference", "short_query", "flash_attn", "xformers", "triton")


ATTENTION = Registry(
    "attention",
    ENV_VAR,
    (ReferenceBackend, SdpaBackend, ShortQueryBackend, TritonBackend, FlashAttnBackend, XFormersBackend),
    attention_priority,
)
BACKENDS = ATTENTION.backends  # name -> backend class (the registry's table, not a copy)


def available_backends() -> dict[str, str | None]:
    """Every attention backend -> None when usable here, else the reason it is not (CUDA order)."""
    names = attention_priority("cuda", torch.float16, False)
    return {name: ATTENTION[name].unavailable_reason() for name in names}


def attention_key(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, dropout_p: float
) -> tuple:
    """The static properties of a call, as the positional arguments of `resolve_attention`: (device type,
    dtype, head dim, mask kind, dropout, needs grad)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    mask = mask_kind(key_padding_mask is not None, causal)
    # a branch, not bool(): it specialises a symbolic condition (dropout_p traced as a SymFloat) to a constant
    dropout = True if dropout_p > 0.0 else False  # noqa: SIM210
    return (q.device.type, q.dtype, int(q.shape[-1]), mask, dropout, needs_grad)


# Evaluated eagerly by torch.compile (all arguments are Python constants) and put in the graph as a
# constant: the environment read, the imports and the logging of the resolution never enter a graph.
@torch.compiler.assume_constant_result
def resolve_attention(
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    mask: str,
    dropout: bool,
    needs_grad: bool,
    backend: str | None = None,
    config_backend: str | None = None,
) -> str:
    """The backend name for calls with these static properties (order: see the module docstring)."""
    inputs = Inputs(device_type, dtype, head_dim, mask, dropout, needs_grad)
    return ATTENTION.resolve(inputs, backend=backend, config=config_backend)


def select_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str | None = None,
    config_backend: str | None = None,
) -> str:
    """The backend `attention` would use for these inputs."""
    key = attention_key(q, k, v, key_padding_mask, causal, dropout_p)
    return resolve_attention(*key, backend, config_backend)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    kv_index: Tensor | None = None,
    backend: str | None = None,
    config_backend: str | None = None,
) -> Tensor:
    """Scaled dot-product attention.

    Args:
        q: [B, H, Lq, Dh].  k, v: [Bk, H, Lk, Dh] (Bk == B unless `kv_index` is given); one dtype.
        key_padding_mask: bool [Bk, Lk], True = attend.
        causal: query i attends keys j <= i + Lk - Lq.
        dropout_p: attention-probability dropout; pass 0.0 in eval (the modules do).
        scale: softmax scale, default Dh ** -0.5.
        kv_index: long [B] with values in [0, Bk): K/V row read by each query row.
        backend: force a backend by name (error if it cannot run these inputs).
        config_backend: the model config's choice, below `backend` and `MPLUG_FAST_ATTENTION`.
    Returns:
        [B, H, Lq, Dh], q's dtype.
    """
    check_attention_inputs(q, k, v, key_padding_mask, kv_index)  # before the resolution reads q's properties
    name = resolve_attention(
        *attention_key(q, k, v, key_padding_mask, causal, dropout_p), backend, config_backend
    )
    kwargs = dict(key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p, scale=scale)
    return ATTENTION[name].run(q, k, v, kv_index=kv_index, **kwargs)
