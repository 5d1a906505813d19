"""One attention entry point for the whole model, with a backend registry.

    attention(q, k, v, *, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None,
              kv_index=None, backend=None) -> [B, H, Lq, Dh]

Layout `[B, H, L, Dh]` (SDPA's). `k, v` may have fewer rows than `q` (`Bk`); `kv_index [B]` maps
each query row to its K/V row so beams and answer candidates share one image's K/V.
Mask semantics are those of `mplug_fast.ops.reference` (bool, True = attend; causal aligned at
the bottom right; rows with no key give 0).

Backend choice: the `backend` argument > the `MPLUG_FAST_ATTENTION` environment variable (read
once per process) > the model config (passed by the modules as `config_backend`) > the first available
backend of the automatic order that supports the inputs: `CUDA_PRIORITY` for CUDA tensors, `PRIORITY`
otherwise. A backend asked for explicitly that cannot run the inputs is an error listing its reasons;
automatic selection skips it and logs why once.

Backends: `reference` (the oracle), `sdpa` (torch) and `triton` (our FlashAttention-2 kernels,
`mplug_fast.ops.triton.attention`, with the split-K short-query variant `mplug_fast.ops.triton.decode`,
imported lazily so that `import mplug_fast` never needs triton). On CPU tensors the Triton kernels only
run under the slow interpreter (`TRITON_INTERPRET=1`), so `triton` comes last in `PRIORITY` (never chosen
automatically there, since `reference` runs everything) but still runs when asked for by name; on CUDA
tensors it comes first. `flash_attn` and `xformers` (`mplug_fast.ops.external`, registered at the bottom
of this module; the packages are imported only when one of them runs) follow it on CUDA.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import logging
import os
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mplug_fast.ops.reference import attention_mask_ref, attention_ref

logger = logging.getLogger(__name__)

ENV_VAR = "MPLUG_FAST_ATTENTION"


class AttentionBackend(abc.ABC):
    """A backend: availability, per-input support reasons, and the call."""

    NAME: ClassVar[str]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can be used in this process, else why not."""
        return None

    @classmethod
    def not_supported_reasons(
        cls,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        dropout_p: float,
        kv_index: Tensor | None,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
    ) -> list[str]:
        """Why this backend cannot run these inputs (empty: it can). Must not synchronise with the device."""
        return []

    @staticmethod
    @abc.abstractmethod
    def run(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        causal: bool,
        dropout_p: float,
        scale: float | None,
        kv_index: Tensor | None,
    ) -> Tensor:
        """softmax(q k^T * scale) v under the masks: [B, H, Lq, D]."""


class ReferenceBackend(AttentionBackend):
    """Plain math in fp32 (`ops.reference.attention_ref`): slow, exact, the oracle."""

    NAME = "reference"

    @staticmethod
    def run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index):
        return attention_ref(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            dropout_p=dropout_p,
            scale=scale,
            kv_index=kv_index,
        )


class SdpaBackend(AttentionBackend):
    """`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient / math kernels)."""

    NAME = "sdpa"

    @staticmethod
    def run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index):
        if kv_index is not None:
            k, v = k[kv_index], v[kv_index]  # copy: [B, H, Lk, Dh]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[kv_index]
        Lq, Lk = q.shape[-2], k.shape[-2]
        if key_padding_mask is None and (not causal or Lq == Lk):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
        mask = attention_mask_ref(key_padding_mask, causal, Lq, Lk, q.device)  # bool, True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        # Rows with no key: the CPU math kernel already returns 0, the CUDA kernels may not.
        return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


# dynamo calls it eagerly (it cannot trace imports) and takes the str as a constant; the cache sits in a
# separate function because dynamo traces through an lru_cache wrapper (with a warning) instead.
@torch.compiler.assume_constant_result
def _triton_status() -> str:
    """Import the Triton kernels (once); "compiled", "interpreted", or why they cannot be used."""
    return _triton_status_cached()


@functools.cache
def _triton_status_cached() -> str:
    if importlib.util.find_spec("triton") is None:
        return "package not installed (pip install triton)"
    try:
        kernels = importlib.import_module("mplug_fast.ops.triton.attention")
    except ImportError as e:
        return f"cannot import the kernels: {e}"
    return "interpreted" if kernels.INTERPRETED else "compiled"


class TritonBackend(AttentionBackend):
    """Our FlashAttention-2 Triton kernels (`mplug_fast.ops.triton.attention`), imported on first use."""

    NAME = "triton"
    SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)  # 80, 96: padded to 128-wide tiles inside the kernels
    SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        status = _triton_status()
        if status == "interpreted":
            return None
        if status == "compiled":
            return None if torch.cuda.is_available() else "no CUDA device, and TRITON_INTERPRET=1 was not set"
        return status

    @classmethod
    def not_supported_reasons(cls, q, k, v, *, dropout_p, kv_index, key_padding_mask=None, causal=False):
        reasons = []
        if q.shape[-1] not in cls.SUPPORTED_HEAD_DIMS:
            reasons.append(
                f"head_dim={q.shape[-1]} (supported: {', '.join(map(str, cls.SUPPORTED_HEAD_DIMS))})"
            )
        if q.dtype not in cls.SUPPORTED_DTYPES or not q.dtype == k.dtype == v.dtype:
            reasons.append(
                f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (supported: one of fp32, fp16, bf16)"
            )
        if not q.is_cuda:
            if _triton_status() != "interpreted":
                reasons.append(f"{q.device.type} tensors need the interpreter (TRITON_INTERPRET=1)")
            elif q.dtype == torch.bfloat16:
                reasons.append(
                    "bf16 on CPU: bf16 tl.dot is wrong in the Triton interpreter (triton-lang/triton#11584)"
                )
        return reasons

    @staticmethod
    def run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index):
        """The main kernel, or the split-K one (`triton/decode.py`) when `num_splits_for` says the main grid
        would leave the GPU idle: Lq <= 64, Lk >= 256 and B * H * ceil(Lq / 16..64) < the SM count."""
        from mplug_fast.ops.triton.attention import flash_attention  # imported by _triton_status already
        from mplug_fast.ops.triton.decode import num_splits_for, splitk_attention

        kwargs = dict(
            key_padding_mask=key_padding_mask,
            causal=causal,
            dropout_p=dropout_p,
            scale=scale,
            kv_index=kv_index,
        )
        B, H, Lq, _ = q.shape
        num_splits = num_splits_for(B, H, Lq, k.shape[2], q.device)
        if num_splits > 1:
            return splitk_attention(q, k, v, num_splits=num_splits, **kwargs)
        return flash_attention(q, k, v, **kwargs)


BACKENDS: dict[str, type[AttentionBackend]] = {
    b.NAME: b for b in (ReferenceBackend, SdpaBackend, TritonBackend)
}
# Automatic order for CPU (and other non-CUDA) tensors: the Triton interpreter is for tests only, so
# `triton` is last (pass backend="triton" to run it); and for CUDA tensors.
PRIORITY: tuple[str, ...] = ("sdpa", "reference", "triton")
CUDA_PRIORITY: tuple[str, ...] = ("triton", "sdpa", "reference")


def register_backend(
    backend: type[AttentionBackend], *, priority: int | None = None, cuda_priority: int | None = None
) -> None:
    """Add a backend (used by optional kernel modules); `priority` / `cuda_priority` are its indices in the
    automatic orders for CPU and CUDA tensors (None: last)."""
    global PRIORITY, CUDA_PRIORITY

    def insert(order: tuple[str, ...], index: int | None) -> tuple[str, ...]:
        names = [name for name in order if name != backend.NAME]
        names.insert(len(names) if index is None else index, backend.NAME)
        return tuple(names)

    BACKENDS[backend.NAME] = backend
    PRIORITY = insert(PRIORITY, priority)
    CUDA_PRIORITY = insert(CUDA_PRIORITY, cuda_priority)


def available_backends() -> dict[str, str | None]:
    """Every known backend -> None when usable here, else the reason it is not."""
    return {name: BACKENDS[name].unavailable_reason() for name in PRIORITY}


@torch.compiler.assume_constant_result  # a constant under torch.compile (see _triton_status)
def env_backend() -> str | None:
    """`MPLUG_FAST_ATTENTION`, read once per process (call `env_backend.cache_clear()` to re-read)."""
    return _read_env_backend()


@functools.cache
def _read_env_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip() or None
    if value is not None and value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not a known attention backend; choose one of {sorted(BACKENDS)}"
        )
    return value


env_backend.cache_clear = _read_env_backend.cache_clear  # type: ignore[attr-defined]


def _describe(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, causal: bool) -> str:
    mask = "key_padding" if key_padding_mask is not None else "none"
    return (
        f"q: {list(q.shape)} {q.dtype} {q.device}   k, v: {list(k.shape)}   mask: {mask}   causal: {causal}"
    )


def _log_once(message: str) -> None:
    """Log a backend decision once per process; silent while torch.compile traces (no graph break)."""
    if torch.compiler.is_compiling():
        return
    _log_once_eager(message)


@functools.cache
def _log_once_eager(message: str) -> None:
    logger.info(message)


def select_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    kv_index: Tensor | None = None,
    backend: str | None = None,
    config_backend: str | None = None,
) -> str:
    """The backend `attention` would use for these inputs (see the module docstring for the order)."""
    requested = backend or env_backend() or config_backend
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown attention backend {requested!r}; choose one of {sorted(BACKENDS)}")
        impl = BACKENDS[requested]
        reasons = [r for r in [impl.unavailable_reason()] if r]
        reasons += impl.not_supported_reasons(
            q, k, v, dropout_p=dropout_p, kv_index=kv_index, key_padding_mask=key_padding_mask, causal=causal
        )
        if reasons:
            raise RuntimeError(
                f"attention backend {requested!r} cannot run these inputs: {'; '.join(reasons)}\n"
                f"     {_describe(q, k, key_padding_mask, causal)}\n"
                f"Available here: {[n for n, r in available_backends().items() if r is None]}"
            )
        return requested
    skipped = []
    for name in CUDA_PRIORITY if q.is_cuda else PRIORITY:
        impl = BACKENDS[name]
        reasons = [r for r in [impl.unavailable_reason()] if r]
        reasons += impl.not_supported_reasons(
            q, k, v, dropout_p=dropout_p, kv_index=kv_index, key_padding_mask=key_padding_mask, causal=causal
        )
        if not reasons:
            for skipped_name, why in skipped:
                _log_once(f"attention backend {skipped_name!r} skipped: {why}")
            _log_once(f"attention backend: {name} (automatic)")
            return name
        skipped.append((name, "; ".join(reasons)))
    lines = "\n".join(f"`{n}`: {why}" for n, why in skipped)
    raise RuntimeError(
        f"No attention backend can run these inputs:\n     {_describe(q, k, key_padding_mask, causal)}\n"
        f"{lines}"
    )


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
        q: [B, H, Lq, Dh].  k, v: [Bk, H, Lk, Dh] (Bk == B unless `kv_index` is given).
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
    _check_inputs(q, k, v, key_padding_mask, kv_index)
    name = select_backend(
        q,
        k,
        v,
        key_padding_mask=key_padding_mask,
        causal=causal,
        dropout_p=dropout_p,
        kv_index=kv_index,
        backend=backend,
        config_backend=config_backend,
    )
    return BACKENDS[name].run(
        q,
        k,
        v,
        key_padding_mask=key_padding_mask,
        causal=causal,
        dropout_p=dropout_p,
        scale=scale,
        kv_index=kv_index,
    )


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, kv_index: Tensor | None
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D [B, H, L, Dh] tensors, got q {list(q.shape)}, "
            f"k {list(k.shape)}, v {list(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} disagree on heads or head dim")
    if kv_index is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(
                f"q has {q.shape[0]} rows but k/v have {k.shape[0]}; pass kv_index to share K/V rows"
            )
    elif kv_index.shape != (q.shape[0],) or kv_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"kv_index must be an integer tensor of shape [{q.shape[0]}], "
            f"got {kv_index.dtype} {list(kv_index.shape)}"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be [Bk, Lk] = [{k.shape[0]}, {k.shape[2]}], "
                f"got {list(key_padding_mask.shape)}"
            )


import mplug_fast.ops.external  # noqa: E402, F401  (registers flash_attn and xformers; imports neither package)
