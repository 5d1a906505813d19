"""Flag plumbing the ``mplug-fast`` commands share, written once: run-config flags, evaluation flags, the
``key=value`` parser and the error policy (expected errors: one line on stderr, exit code 2; others: a
traceback and a line saying it is a bug)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

import yaml

# What a user's input can cause (ConfigError, TaskError, CheckpointError and UnreadableFileError are
# ValueErrors), or an error raised from one of these; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, IsADirectoryError, ValueError)
EXIT_USAGE, EXIT_BUG = 2, 1
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader closed the pipe
BUG_REPORT = (
    "this is a bug in mplug_fast, not in your input: please report it on the mplug_fast issue tracker with "
    "the command line, the traceback above and the output of `mplug-fast info`"
)


def fail(command: str, message: object) -> int:
    """Prints ``mplug-fast <command>: error: <message>`` as one line on stderr; returns the usage exit
    code."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"mplug-fast {command}: error: {text}", file=sys.stderr)
    return EXIT_USAGE


def expected_error(error: BaseException | None) -> bool:
    """Whether `error` (or an error it was raised from) is one of EXPECTED_ERRORS."""
    while error is not None:
        if isinstance(error, EXPECTED_ERRORS):
            return True
        error = error.__cause__
    return False


def run_command(args: argparse.Namespace) -> int:
    """Runs ``args.func``: expected errors -> `fail` (one line, exit code 2); stdout closed by its reader ->
    exit code 141, silently (as a shell pipeline's SIGPIPE); any other exception -> its traceback and the
    `BUG_REPORT` line on stderr (exit code 1)."""
    command = " ".join(filter(None, (args.command, getattr(args, "what", None))))  # "predict caption"
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`mplug-fast info | head -3`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
        return EXIT_BROKEN_PIPE
    except Exception as e:
        if expected_error(e):
            return fail(command, e)
        traceback.print_exc()
        print(f"mplug-fast {command}: {BUG_REPORT}", file=sys.stderr)
        return EXIT_BUG


def announce(command: str, source: object) -> None:
    """One stderr line saying what a command loaded (`mplug_fast.checkpoint.CheckpointSource`)."""
    if source is not None:
        print(f"mplug-fast {command}: loaded {source}", file=sys.stderr)


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """["a=1", "b=x"] -> {"a": 1, "b": "x"} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {text!r} must look like key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def add_set_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE (repeatable) into ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_config_flags(parser: argparse.ArgumentParser, *, run: bool = True) -> None:
    """--config / --set (and for runs --output-dir / --max-steps)."""
    parser.add_argument("--config", help="a run config: a YAML path or a shipped config name")
    add_set_flag(
        parser, "override one run-config field, value parsed as YAML (repeatable): --set optim.lr=1e-4"
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
