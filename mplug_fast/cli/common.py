"""Flag plumbing the ``mplug-fast`` commands share, written once: run-config flags, evaluation flags, the
``key=value`` parser and the error policy (expected errors: one line on stderr, exit code 2)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

import yaml

# What a user's input can cause (ConfigError and TaskError are ValueErrors); anything else is a bug and keeps
# its traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, IsADirectoryError, ValueError)
EXIT_USAGE = 2


def fail(command: str, message: object) -> int:
    """Prints ``mplug-fast <command>: error: <message>`` on stderr; returns the usage exit code."""
    print(f"mplug-fast {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def user_errors(
    fn: Callable[[argparse.Namespace], int], expected: tuple[type[Exception], ...] = EXPECTED_ERRORS
) -> Callable[[argparse.Namespace], int]:
    """Expected errors of a command (bad input, missing file, bad option) -> `fail` instead of a traceback."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except expected as e:
            return fail(args.command, e)

    return run


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """["a=1", "b=x"] -> {"a": 1, "b": "x"} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {text!r} must look like key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def add_config_flags(parser: argparse.ArgumentParser, *, run: bool = True) -> None:
    """--config / --set (and for runs --output-dir / --max-steps)."""
    parser.add_argument("--config", help="a run config: a YAML path or a shipped config name")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config field, value parsed as YAML (repeatable): --set optim.lr=1e-4",
    )
    if run:
        parser.add_argument("--output-dir", help="shortcut for --set output_dir=...")
        parser.add_argument("--max-steps", type=int, help="shortcut for --set schedule.max_steps=...")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides plus those of the shortcut flags."""
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"schedule.max_steps={args.max_steps}")
    return overrides


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    """--eval-batch-size / --eval-limit / --eval-option / --eval-data."""
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="evaluation batch size (default: the run config's eval.batch_size, else 32)",
    )
    parser.add_argument(
        "--eval-limit",
        type=int,
        help="evaluate at most this many scenes / samples (default: the whole split)",
    )
    parser.add_argument(
        "--eval-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task's evaluate function (repeatable): --eval-option beam_size=3",
    )
    parser.add_argument(
        "--eval-data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="official data: override a data.official key for the evaluation set (--eval-data ann=test.json)",
    )
