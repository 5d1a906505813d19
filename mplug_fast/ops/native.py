"""The native ops of `kernels/` (`mplug_fast._C`, built by setup.py with CMake): loading and status.

Importing `mplug_fast._C` registers `torch.ops.mplug_fast.beam_step` and `.reorder_caches` (CPU, CUDA when
built with CUDA, Meta), `.small_linear` (CPU, Meta; `mplug_fast.ops.small_linear`), `.packed_linear` (CPU,
Meta; `mplug_fast.ops.packed_linear`), `.short_query_attention` (CPU, Meta; the `short_query` attention
backend, `mplug_fast.ops.short_query`), `.decode_layers` (CPU, Meta; `mplug_fast.modeling.native_decode`)
and `.parallel_threads`. A missing or unloadable `_C` is not an error:
callers then run the Python twins (`mplug_fast.generation.beam_step`, `KVCache.reorder`, `F.linear`, the
`sdpa` backend, the Python decoder layers). `MPLUG_FAST_NATIVE=0` turns the native ops off.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

NATIVE_OPS = (
    "beam_step",
    "reorder_caches",
    "small_linear",
    "packed_linear",
    "short_query_attention",
    "decode_layers",
)
# CPU techniques for the few rows of a decoding step: GPUs run their GEMMs and attention kernels
CPU_ONLY_OPS = ("small_linear", "packed_linear", "short_query_attention", "decode_layers")


@functools.cache
def load_error() -> str | None:
    """Why the native ops cannot run in this process (None when `_C` is loaded); never raises."""
    if os.environ.get("MPLUG_FAST_NATIVE", "1") == "0":
        return "MPLUG_FAST_NATIVE=0"
    try:
        importlib.import_module("mplug_fast._C")
    except ImportError as e:  # not built (MPLUG_FAST_SKIP_EXT=1, no torch/cmake at install) or mismatched
        return f"mplug_fast._C not loadable ({e}); reinstall with `pip install --no-build-isolation .`"
    return None


@functools.cache
def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why native op `name` cannot run on `device_type` ("cpu", "cuda", ...); None when it can."""
    error = load_error()
    if error is not None:
        return error
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
    if dispatch_key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"mplug_fast::{name}", dispatch_key
    ):
        return f"_C has no {device_type} kernel for {name} (built without CUDA?)"
    return None


def native_op(name: str, device_type: str):
    """`torch.ops.mplug_fast.<name>` when it can run on `device_type`, else None."""
    return None if unavailable_reason(name, device_type) else getattr(torch.ops.mplug_fast, name)


def cpu_threads() -> int | None:
    """How many threads the native CPU ops split their work over under the current
    `torch.set_num_threads` (1 in a `_C` built without OpenMP); None when `_C` is not loaded."""
    if load_error() is not None:
        return None
    return int(torch.ops.mplug_fast.parallel_threads())


def status() -> dict[str, str]:
    """Per native op: which devices it runs on here, or why it cannot (for `mplug-fast info`)."""
    lines = {}
    for name in NATIVE_OPS:
        devices = [d for d in ("cpu", "cuda") if unavailable_reason(name, d) is None]
        cuda_reason = unavailable_reason(name, "cuda")
        if not devices:
            lines[name] = f"Python twin: {load_error() or cuda_reason}"
        elif name in CPU_ONLY_OPS:
            lines[name] = "native on cpu (a CPU-only op)"
        elif cuda_reason is not None:
            lines[name] = f"native on {', '.join(devices)}; cuda: {cuda_reason}"
        else:
            lines[name] = f"native on {', '.join(devices)}"
    return lines
