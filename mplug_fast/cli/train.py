"""``mplug-fast train``: train any task (pretraining is a task) from a run config, then evaluate it.

    mplug-fast train --task vqa --config vqa_tiny_synthetic [--set optim.lr=1e-4 ...] [--resume [PATH]]
    mplug-fast train --config pretrain_tiny_synthetic        # the task the config names
    torchrun --nproc-per-node 2 -m mplug_fast train --task ...   (evaluation runs on rank 0)

``--task`` sets ``model.task`` (a config naming another task is an error). After a finished run, on rank 0,
the run folder gets ``model/`` (``save_pretrained``) and, for tasks with an evaluation, ``metrics.json``
(metrics, headline metric vs baseline) and the task's predictions JSON: synthetic data is evaluated on the
``data.synthetic.eval_scenes`` held-out scenes, official data on ``data.official`` with ``--eval-data
key=value`` overrides (e.g. ``--eval-data ann=test.json``). ``--no-eval`` trains only. A new run refuses an
output folder holding another run unless ``--overwrite``. stdout gets a short summary (the headline metric,
the run folder, the model); the full record is the run folder's ``summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from mplug_fast.checkpoint import save_pretrained
from mplug_fast.cli.common import add_config_flags, add_eval_flags, config_overrides, key_values
from mplug_fast.data import Tokenizer
from mplug_fast.io import atomic_write_json
from mplug_fast.tasks import TASKS, get_task, task_name
from mplug_fast.train.config import ConfigError, RunConfig, load_config, read_config_file
from mplug_fast.train.distributed import cleanup_distributed
from mplug_fast.train.evaluation import run_evaluation
from mplug_fast.train.trainer import NonFiniteLossError, Trainer

EXIT_NONFINITE, EXIT_INTERRUPTED = 3, 130


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """The run config of ``--config`` + ``--set`` with ``--task`` applied and checked."""
    task = args.task
    overrides = config_overrides(args)
    if task is not None:
        named = _config_task(args.config) if args.config else None
        if named is not None and task_name(named) != task:
            raise ConfigError(f"{args.config} trains model.task {named!r}, not --task {task!r}")
        overrides = [f"model.task={task}", *overrides]
    config = load_config(args.config, overrides)
    task = task or config.model.task
    spec = get_task(task)
    if not spec.trainable:
        raise ConfigError(spec.not_trainable_reason())
    if (config.objective.name or task) != task:
        raise ConfigError(
            f"--task {task} needs objective.name {task!r} (or none), got {config.objective.name!r}"
        )
    spec.options(config.objective.options, where=args.config or "objective.options")  # fail before training
    spec.check_eval_options(config.eval.options, "eval.options")
    return config


def train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = resolve_run_config(args)  # a bad input raises: `run_command` prints it as one line, exit code 2
    task = get_task(config.model.task)
    eval_options = key_values(args.eval_option, "--eval-option")
    task.check_eval_options(eval_options)
    official_overrides = key_values(args.eval_data, "--eval-data")
    config.overwrite = config.overwrite or args.overwrite
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    record = None
    try:
        trainer = Trainer.from_config(config)
        summary = trainer.fit(resume=args.resume)
        if trainer.env.is_main and summary["status"] == "finished":
            model = trainer.objective.model
            out_dir = Path(config.output_dir)
            save_model(model, out_dir / "model")
            if not args.no_eval and task.evaluable:
                record = run_evaluation(
                    model,
                    Tokenizer(),
                    config,
                    task.name,
                    device=trainer.env.device,
                    out_dir=out_dir,
                    batch_size=args.eval_batch_size,
                    limit=args.eval_limit,
                    options=eval_options,
                    official_overrides=official_overrides,
                    extra={"step": summary["step"], "checkpoint": summary["checkpoint"]},
                )
    except NonFiniteLossError as e:
        print(f"mplug-fast {args.command}: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        cleanup_distributed()
    if trainer.env.is_main:
        report(summary, record, Path(config.output_dir))
    return 0 if summary["status"] == "finished" else EXIT_INTERRUPTED


def save_model(model: Any, path: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then renamed onto ``path``: a kill leaves the old
    model folder or the new one, never a partial one."""
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def report(summary: dict[str, Any], record: dict[str, Any] | None, out_dir: Path) -> None:
    """Writes ``summary.json`` (the training summary and the evaluation record) and prints a few lines."""
    atomic_write_json(out_dir / "summary.json", {"train": summary, "eval": record})
    loss = (summary["last"] or {}).get("loss")
    print(
        f"{summary['status']} at step {summary['step']} ({summary['steps']} steps in this run, "
        f"{summary['steps_per_s']:.3g} steps/s)" + ("" if loss is None else f", loss {loss:.4g}")
    )
    if record is not None:
        head = record["headline"]
        print(f"{record['task']} {head['metric']}: {head['value']} (baseline {head['baseline']})")
    print(f"run folder: {out_dir} (summary.json, metrics.jsonl, checkpoints/)")
    if summary["status"] == "finished":
        print(f"model: {out_dir / 'model'}")
    else:
        print(f"checkpoint: {summary['checkpoint']} (continue with --resume)")


def _config_task(path_or_name: str) -> str | None:
    """The ``model.task`` a run config (a file or a shipped name) names (None when it names none)."""
    model = read_config_file(path_or_name)[0].get("model")
    return model.get("task") if isinstance(model, dict) else None


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train", help="train a task from a run config (pretraining is a task), then evaluate"
    )
    # every task name is accepted, so an evaluate-only task gets its reason (and what to train instead)
    p.add_argument(
        "--task",
        type=task_name,
        choices=list(TASKS),
        help="the task to train (default: the config's model.task)",
    )
    add_config_flags(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from the newest checkpoint of the output dir, or from PATH (a file or directory)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="a new run replaces another run's files in the output dir"
    )
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_eval_flags(p)
    p.set_defaults(func=train)
