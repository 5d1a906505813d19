"""The ``mplug-fast`` command line (also ``python -m mplug_fast``).

Subcommands:
    info    versions (Python, torch, triton, CUDA) and which attention backends can run here, with reasons.

Further subcommands live beside the code they drive: each module of `COMMAND_MODULES` defines
`register(commands)` that adds its parsers (with `set_defaults(func=...)`) to the sub-parser action.
They are imported when the parser is built; heavy imports belong inside the command functions.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from importlib import import_module

# Modules that add subcommands (see the module docstring); a module that does not exist yet is skipped.
COMMAND_MODULES: tuple[str, ...] = (
    "mplug_fast.inference.cli",  # caption, vqa, ground, rank
    "mplug_fast.train.cli",  # pretrain
    "mplug_fast.tasks.cli",  # finetune, evaluate
    "mplug_fast.demo",  # demo
)


def _version(module_name: str) -> str:
    """``module.__version__``, or why it cannot be imported."""
    try:
        module = __import__(module_name)
    except ImportError as e:
        return f"not installed ({e.__class__.__name__}: {e})"
    return str(getattr(module, "__version__", "unknown"))


def _info(args: argparse.Namespace) -> int:
    """Prints the environment and the attention-backend availability table."""
    import torch

    import mplug_fast

    print(f"mplug_fast  {getattr(mplug_fast, '__version__', 'unknown')}")
    print(f"python      {platform.python_version()} ({platform.python_implementation()}, {sys.executable})")
    print(f"torch       {torch.__version__}")
    print(f"triton      {_version('triton')}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"cuda        {torch.version.cuda} ({torch.cuda.device_count()} device(s): {names})")
    else:
        print("cuda        not available")

    try:
        from mplug_fast.ops import available_backends
    except ImportError as e:
        print(f"attention backends: unknown (cannot import mplug_fast.ops: {e})")
        return 0
    print("attention backends:")
    backends = available_backends()
    width = max((len(name) for name in backends), default=0)
    for name, reason in backends.items():
        print(f"  {name:<{width}}  {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mplug-fast", description="mplug_fast: a fast PyTorch re-implementation of mPLUG."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="print versions and the attention backends available here")
    info.set_defaults(func=_info)
    for module_name in COMMAND_MODULES:
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # not written yet
            raise
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mplug-fast``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
