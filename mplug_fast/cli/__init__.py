"""The one ``mplug-fast`` command (also ``python -m mplug_fast``).

mplug-fast info                                   versions, tasks, attention backends
mplug-fast train --task T --config C [--set k=v]  train any task (pretraining is one), then evaluate
mplug-fast evaluate --task T --checkpoint RUN     a trained model against the task's baseline
mplug-fast predict {caption,vqa,ground,rank} ...  the pipeline on images and text
mplug-fast demo [--quick]                         every task end to end on the synthetic world
mplug-fast --version
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import mplug_fast
from mplug_fast.cli import demo, evaluate, info, predict, train
from mplug_fast.cli.common import run_command

COMMANDS = (info, train, evaluate, predict, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mplug-fast", description="mplug_fast: a fast PyTorch implementation of mPLUG."
    )
    parser.add_argument("--version", action="version", version=f"mplug_fast {mplug_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mplug-fast``; returns the process exit code (2: bad input, one line on stderr;
    1: a bug, with its traceback)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):  # a command whose own parser reads its flags (cli/demo.py)
        args.args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_command(args)
