"""``mplug-fast pretrain`` (and ``train``): run the trainer from a YAML run config.

    mplug-fast pretrain --config configs/pretrain_tiny_synthetic.yaml [--set optim.lr=1e-4 ...] [--resume]
    torchrun --nproc-per-node 2 -m mplug_fast pretrain --config ...

``--resume`` alone continues from the newest checkpoint of the run's output directory (error when there is
none); ``--resume PATH`` from a checkpoint file or directory. ``train`` is the same command without the
pretraining defaults (the config's ``model.task`` / ``objective.name`` decide what is trained).
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a run config YAML (configs/*.yaml); omitted: all defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, value parsed as YAML (repeatable): --set optim.lr=1e-4",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from the newest checkpoint of the output dir, or from PATH (a file or directory)",
    )
    parser.add_argument("--output-dir", help="shortcut for --set output_dir=...")
    parser.add_argument("--max-steps", type=int, help="shortcut for --set schedule.max_steps=...")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _run(args: argparse.Namespace, default_task: str | None) -> int:
    import logging

    from mplug_fast.train.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"schedule.max_steps={args.max_steps}")
    try:
        config = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mplug-fast {args.command}: {e}", file=sys.stderr)
        return 2
    if default_task is not None and config.model.task != default_task:
        print(
            f"mplug-fast {args.command}: model.task is {config.model.task!r}; pretraining needs 'pretrain' "
            f"(use `mplug-fast train` for other tasks)",
            file=sys.stderr,
        )
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0

    from mplug_fast.train.distributed import cleanup_distributed
    from mplug_fast.train.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(config)
        summary = trainer.fit(resume=args.resume)
    except NonFiniteLossError as e:
        print(f"mplug-fast {args.command}: {e}", file=sys.stderr)
        return 3
    except FileNotFoundError as e:
        print(f"mplug-fast {args.command}: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    if trainer.env.is_main:
        print(json.dumps(summary, indent=1, default=str))
    return 0 if summary["status"] == "finished" else 130


def _pretrain(args: argparse.Namespace) -> int:
    return _run(args, "pretrain")


def _train(args: argparse.Namespace) -> int:
    return _run(args, None)


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``pretrain`` and ``train`` to the ``mplug-fast`` sub-commands."""
    p = commands.add_parser("pretrain", help="pretrain (ITC + ITM + MLM + PrefixLM) from a run config")
    _add_common(p)
    p.set_defaults(func=_pretrain)
    t = commands.add_parser("train", help="train any task objective from a run config")
    _add_common(t)
    t.set_defaults(func=_train)
