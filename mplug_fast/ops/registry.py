"""One backend registry for the ops (attention, fused epilogues): dispatch with reasons.

A backend is a small class (`Backend`): `NAME`, `unavailable_reason()` (None when it can run in this
process; a guarded look-up that never raises), `not_supported_reasons(inputs)` decided on the static
properties of a call (`Inputs`: device type, dtype, head dim / row width, mask kind, dropout, needs grad,
never tensor values) and per-dtype tolerances `ATOL` / `RTOL` for the tests.

`Registry.resolve(inputs, backend=, config=)` picks the backend, in this order:

1. `backend=` (an explicit choice): it must be able to run the inputs, else an error lists its reasons;
2. the registry's environment variable (`MPLUG_FAST_ATTENTION`, `MPLUG_FAST_FUSED`), read at resolution
   time, and checked the same way;
3. `config=` (the model config's choice), checked the same way;
4. the first backend of `priority(device type, dtype, needs grad)` (a pure function) with no reasons; the
   backends skipped on the way are logged once with their reasons. When none fits, `NotImplementedError`
   describes the inputs and lists every backend's reasons.

Resolution is for outside the hot path: modules resolve once per (device, dtype, needs grad, mask kind)
and keep the name (`BackendCache`); under `torch.compile` the resolution runs eagerly at trace time
(`torch.compiler.assume_constant_result` on the resolvers of `ops/attention.py` and `ops/fused.py`) and
its result is a constant of the graph.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

logger = logging.getLogger(__name__)

MaskKind = Literal["none", "key_padding", "causal", "key_padding+causal"]


def mask_kind(key_padding: bool, causal: bool) -> MaskKind:
    """The mask kind of a call from whether it has a key-padding mask and a causal mask."""
    if key_padding:
        return "key_padding+causal" if causal else "key_padding"
    return "causal" if causal else "none"


@dataclass(frozen=True)
class Inputs:
    """The static properties of a call that decide which backend can run it (hashable: a cache key).

    dim: the head dim Dh for attention, the row width (last dim) for the fused epilogues.
    """

    device_type: str
    dtype: torch.dtype
    dim: int
    mask: MaskKind = "none"
    dropout: bool = False
    needs_grad: bool = False

    def describe(self) -> str:
        return (
            f"device: {self.device_type}   dtype: {self.dtype}   dim: {self.dim}   mask: {self.mask}   "
            f"dropout: {self.dropout}   needs_grad: {self.needs_grad}"
        )


class Backend:
    """A backend of one op: its name, its availability, and the static inputs it cannot run."""

    NAME: ClassVar[str]
    # error budget vs the fp32 reference, per input dtype (tests compare with these)
    ATOL: ClassVar[dict[torch.dtype, float]] = {
        torch.float32: 1e-5,
        torch.float16: 2e-3,
        torch.bfloat16: 2e-2,
    }
    RTOL: ClassVar[dict[torch.dtype, float]] = dict(ATOL)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can be used in this process, else why not (never raises)."""
        return None

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list[str]:
        """Why this backend cannot run calls with these static properties (empty: it can)."""
        return []

    @classmethod
    def reasons(cls, inputs: Inputs) -> list[str]:
        """Every reason it cannot run these inputs here: availability first, then support."""
        reason = cls.unavailable_reason()
        return ([reason] if reason else []) + cls.not_supported_reasons(inputs)


PriorityFn = Callable[[str, torch.dtype, bool], tuple[str, ...]]


class Registry:
    """The backends of one op, its environment variable and its automatic order.

    Args:
        op: the op's name in messages ("attention", "fused epilogue").
        env_var: the environment variable that picks a backend (below `backend=`, above `config=`).
        backends: the backend classes (their `NAME`s are the valid names).
        priority: (device type, dtype, needs grad) -> backend names in order of preference; pure.
    """

    def __init__(self, op: str, env_var: str, backends: Iterable[type[Backend]], priority: PriorityFn):
        self.op = op
        self.env_var = env_var
        self.backends: dict[str, type[Backend]] = {b.NAME: b for b in backends}
        self.priority_fn = priority

    def __getitem__(self, name: str) -> type[Backend]:
        return self.backends[name]

    def names(self) -> list[str]:
        return sorted(self.backends)

    def priority(self, device_type: str, dtype: torch.dtype, needs_grad: bool) -> tuple[str, ...]:
        """The automatic order for these inputs (names of registered backends only)."""
        return tuple(n for n in self.priority_fn(device_type, dtype, needs_grad) if n in self.backends)

    def env_choice(self) -> str | None:
        """The environment variable's backend name (None when unset); unknown names are an error."""
        value = os.environ.get(self.env_var, "").strip().lower() or None
        if value is not None and value not in self.backends:
            raise ValueError(
                f"{self.env_var}={value!r} is not a known {self.op} backend; choose one of {self.names()}"
            )
        return value

    def resolve(self, inputs: Inputs, *, backend: str | None = None, config: str | None = None) -> str:
        """The backend that runs calls with these static properties (order: see the module docstring)."""
        if backend is not None:
            source, name = "backend=", backend
        elif (env := self.env_choice()) is not None:  # read only when no backend is passed
            source, name = f"{self.env_var}=", env
        else:
            source, name = "config ", config
        if name is not None:
            if name not in self.backends:
                raise ValueError(f"unknown {self.op} backend {name!r}; choose one of {self.names()}")
            reasons = self.backends[name].reasons(inputs)
            if reasons:
                usable = [n for n in self.names() if not self.backends[n].reasons(inputs)]
                raise RuntimeError(
                    f"{self.op} backend {name!r} cannot run these inputs: {'; '.join(reasons)}\n"
                    f"     {inputs.describe()}\n(chosen by {source}{name!r}; usable here: {usable})"
                )
            return name
        skipped = []
        for name in self.priority(inputs.device_type, inputs.dtype, inputs.needs_grad):
            reasons = self.backends[name].reasons(inputs)
            if not reasons:
                for skipped_name, why in skipped:
                    _log_once(f"{self.op} backend {skipped_name!r} skipped: {why}")
                _log_once(f"{self.op} backend: {name} (automatic, {inputs.describe()})")
                return name
            skipped.append((name, "; ".join(reasons)))
        lines = "\n".join(f"`{n}` cannot run them: {why}" for n, why in skipped)
        raise NotImplementedError(
            f"No {self.op} backend can run these inputs:\n     {inputs.describe()}\n{lines}\n"
            f"Pass backend=, or set {self.env_var}, to one of: {self.names()}"
        )


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


class BackendCache:
    """A module's resolved backends, one per static key (device, dtype, needs grad, mask kind, ...).

    `get(key, resolve)` returns the cached name, or calls `resolve()` once and keeps its result. While
    torch.compile traces, the result is not stored (the resolvers are constants of the graph there, and a
    mutation would be replayed as a side effect). Not a module buffer: it is not in the state dict.
    """

    def __init__(self) -> None:
        self.names: dict[tuple, str] = {}

    def get(self, key: tuple, resolve: Callable[[], str]) -> str:
        name = self.names.get(key)
        if name is None:
            name = resolve()
            if not torch.compiler.is_compiling():
                self.names[key] = name
        return name

    def clear(self) -> None:
        self.names.clear()


class AttentionBackend(Backend):
    """An attention backend: `run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index)`
    computes softmax(q k^T * scale) v under the masks, [B, H, Lq, Dh] (semantics of `ops/reference.py`)."""

    @staticmethod
    def run(q, k, v, *, key_padding_mask, causal, dropout_p, scale, kv_index):  # pragma: no cover
        raise NotImplementedError


# ---- Triton availability, shared by the Triton backends of attention and the fused epilogues ------------


@functools.cache
def triton_kernels_status(*modules: str) -> str:
    """Import the Triton kernel modules (once): "compiled", "interpreted", or why they cannot be used.

    The kernels are an optional dependency: they are imported here, on first resolution, never when
    `mplug_fast` is imported.
    """
    if importlib.util.find_spec("triton") is None:
        return "package not installed (pip install triton)"
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError as e:
        return f"cannot import the Triton kernels: {e}"
    return "interpreted" if any(m.INTERPRETED for m in loaded) else "compiled"
