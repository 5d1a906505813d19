"""The demo's command line: ``make demo``, ``mplug-fast demo`` (from a source checkout) or, with this
folder's parent on the path, ``python -m demo``. Resumable after Ctrl-C; a DemoError (a ValueError): one
line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mplug_fast.cli.common import add_set_flag, expected_error, fail
from mplug_fast.train.config import CONFIG_ROOT

from .runner import run_demo
from .settings import DemoInterrupted
from .state import fresh

RESUME_HINT = "`make demo` (or the same `mplug-fast demo` command) resumes where it stopped"


def default_config_dir(given: str | None) -> Path:
    """``given``, else ``configs/demo`` of the working directory, else the shipped one (package data)."""
    if given:
        return Path(given)
    local = Path("configs/demo")
    return local if local.is_dir() else CONFIG_ROOT / "demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mplug-fast demo",
        description="pretrain + finetune + evaluate every task on the synthetic world; writes a report",
    )
    p.add_argument("--out", help="output directory (default runs/demo, with --quick runs/demo-quick)")
    p.add_argument("--quick", action="store_true", help="a short run: steps / 10, 50 evaluation scenes")
    p.add_argument("--fresh", action="store_true", help="delete the demo's previous outputs and start over")
    p.add_argument(
        "--config-dir",
        help="stage configs <stage>.yaml + demo.yaml (default: configs/demo of the working directory, else "
        "the shipped mplug_fast/configs/demo)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: torch's choice; 1 is far faster on a machine busy with other jobs)",
    )
    add_set_flag(p, "override a run-config field in every stage (repeatable): --set device=cpu")
    return p


def run(args: argparse.Namespace) -> int:
    """Runs the demo with parsed `args`; returns the exit code (130 after an interrupt)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.fresh:
            fresh(out)
        print(f"mplug-fast demo ({'quick' if args.quick else 'full'}) -> {out}", flush=True)
        run_demo(out, default_config_dir(args.config_dir), quick=args.quick, overrides=args.overrides)
    except DemoInterrupted as e:
        print(f"\nInterrupted: {e}; the checkpoint is saved. {RESUME_HINT}.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nInterrupted. {RESUME_HINT}.", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` and runs the demo. Expected errors (bad configs, a foreign output folder): one line on
    stderr, exit code 2; anything else keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Exception as e:
        if expected_error(e):
            return fail("demo", e)
        raise
