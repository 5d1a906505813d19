"""``mplug-fast info``: versions (Python, torch, triton, CUDA), the CPU's precision (native bf16 or not, and
the inference dtype chosen from it), the tasks, which attention backends can
run here, with the reason for each one that cannot, and which native ops (kernels/) run natively."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

import mplug_fast
from mplug_fast.inference.layout import describe_cpu_layout
from mplug_fast.inference.precision import describe_cpu_precision
from mplug_fast.ops import available_backends, native, small_linear
from mplug_fast.tasks import TASKS


def _version(module_name: str) -> str:
    """``module.__version__``, or why it cannot be imported."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return f"not installed ({e.__class__.__name__}: {e})"
    return str(getattr(module, "__version__", "unknown"))


def info(args: argparse.Namespace) -> int:
    """Prints the environment, the tasks and the attention-backend availability table."""
    print(f"mplug_fast  {mplug_fast.__version__}")
    print(f"python      {platform.python_version()} ({platform.python_implementation()}, {sys.executable})")
    print(f"torch       {torch.__version__}")
    print(f"triton      {_version('triton')}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"cuda        {torch.version.cuda} ({torch.cuda.device_count()} device(s): {names})")
    else:
        print("cuda        not available")
    print(f"cpu         {describe_cpu_precision()}")
    print(f"            decoder weight layout on cpu float32: {describe_cpu_layout()} (layout='auto')")
    print(f"tasks       {', '.join(TASKS)}")
    print("attention backends:")
    backends = available_backends()
    width = max((len(name) for name in backends), default=0)
    for name, reason in backends.items():
        print(f"  {name:<{width}}  {'available' if reason is None else 'unavailable: ' + reason}")
    print("native ops (mplug_fast._C):")
    ops = native.status()
    width = max((len(name) for name in ops), default=0)
    for name, line in ops.items():
        print(f"  {name:<{width}}  {line}")
    threads = native.cpu_threads()
    if threads is not None:
        note = "" if threads == torch.get_num_threads() else " (built without OpenMP: one thread only)"
        print(f"  CPU ops run on {threads} of torch's {torch.get_num_threads()} threads{note}")
    use = "used" if small_linear.enabled() else "not used"
    print(f"  small_linear is {use} by the decoding layers here ({small_linear.ENV}=1 / 0: on / off)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "info", help="print versions, the tasks, the attention backends and the native ops available here"
    )
    p.set_defaults(func=info)
