"""Helpers shared by the benchmark scripts: machine description, timing, memory, JSON and Markdown output.

Import from a script in `benchmarks/` with the folder on `sys.path` (as `python benchmarks/x.py` has it):

    from common import machine_info, time_ms, summarize, markdown_table, write_json
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Scripts write here unless given --out; benchmarks/results/ holds the numbers committed on purpose.
OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (None: bfloat16 on CUDA, float32 elsewhere)."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info(device: torch.device) -> dict[str, Any]:
    """Name, memory and clocks of a CUDA device: torch's view, plus nvidia-ml-py (pynvml) when installed."""
    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 2),
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
    }
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        info["nvml"] = "nvidia-ml-py not installed: no clocks"
        return info
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        info["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        info["sm_clock_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        info["mem_clock_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
        info["memory_total_gib"] = round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 2)
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - NVML errors vary by driver; the benchmark must still run
        info["nvml"] = f"nvml query failed: {exc}"
    return info


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def machine_info(device: torch.device, dtype: torch.dtype, backend: str | None) -> dict[str, Any]:
    """Everything needed to read a result later: host, CPU, GPU, versions, dtype, attention backend."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend or "auto",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except OSError:
        info["git_commit"] = None
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = gpu_info(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    warmup: int,
    cpu_times: list[float] | None = None,
) -> list[float]:
    """Run `fn` warmup times untimed, then `repeats` times; wall milliseconds per run.

    CUDA: events around each run (synchronised after each); elsewhere `time.perf_counter`. When a list
    is given as `cpu_times`, the process CPU time of each run (`time.process_time`, ms) is appended to it:
    on a shared CPU it measures the work done rather than the share of the cores the run was given."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if cpu_times is not None:
                cpu_times.append((time.process_time() - c0) * 1e3)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """median, p20, p80, min of a list of milliseconds (p20 / p80 = min / max below 5 samples)."""
    ordered = sorted(times)
    if len(ordered) >= 5:
        p20, *_, p80 = statistics.quantiles(ordered, n=5)
    else:
        p20, p80 = ordered[0], ordered[-1]
    return {
        "median": statistics.median(ordered),
        "p20": p20,
        "p80": p80,
        "min": ordered[0],
        "n": len(ordered),
    }


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak CUDA memory allocated during `fn`, above what was allocated before it (bytes)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@contextlib.contextmanager
def saved_activation_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[list[int]]:
    """Bytes of the tensors autograd saves for backward inside the block (each storage counted once,
    storages of `exclude` -- the model's parameters -- left out).

    Yields a one-element list whose value is set when the block exits. This is the activation memory a
    training step holds at the end of its forward: measured, device independent, and the quantity that
    differs between model designs (weights, gradients and allocator caching are left out).
    """
    seen: dict[tuple[int, str], int] = {}
    skip = {(t.untyped_storage().data_ptr(), str(t.device)) for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        if key not in skip:
            seen[key] = max(seen.get(key, 0), storage.nbytes())
        return t

    result = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result[0] = sum(seen.values())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are written with 3 significant digits (ints as they are)."""

    def cell(x: Any) -> str:
        if x is None:
            return "–"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
