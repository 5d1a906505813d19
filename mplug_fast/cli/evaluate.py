"""``mplug-fast evaluate``: a trained model on a task's evaluation split, against the task's baseline.

    mplug-fast evaluate --task vqa --checkpoint RUN_DIR|STEP.pt|SAVE_PRETRAINED_DIR [--split test]

The model is rebuilt from a trainer checkpoint (its stored run config; ``--config`` / ``--set`` change the
data side) or read from a ``save_pretrained`` folder; ``metrics_<split>.json`` and the predictions go to
``--output-dir`` (default: the run folder). A zero-shot video task evaluates its image task's checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mplug_fast.cli.common import EXPECTED_ERRORS, add_config_flags, add_eval_flags, key_values, user_errors
from mplug_fast.data import Tokenizer
from mplug_fast.tasks import TASKS, get_task, task_name
from mplug_fast.train.evaluation import load_for_evaluation, run_evaluation


def _evaluate(args: argparse.Namespace) -> int:
    eval_options = key_values(args.eval_option, "--eval-option")
    get_task(args.task).check_eval_options(eval_options)
    official_overrides = key_values(args.eval_data, "--eval-data")
    model, config, run_dir, source = load_for_evaluation(
        args.checkpoint, args.task, args.config, args.overrides
    )
    device_name = args.device or config.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    out_dir = Path(args.output_dir) if args.output_dir else run_dir
    record = run_evaluation(
        model.to(device),
        Tokenizer(),
        config,
        args.task,
        split=args.split,
        device=device,
        out_dir=out_dir,
        metrics_name=f"metrics_{args.split}.json",
        batch_size=args.eval_batch_size,
        limit=args.eval_limit,
        options=eval_options,
        official_overrides=official_overrides,
        extra={"checkpoint": str(source)},
    )
    print(json.dumps(record, indent=1, default=str))
    return 0


# an unreadable checkpoint file is a user's problem too (load_checkpoint raises RuntimeError for it)
evaluate = user_errors(_evaluate, (*EXPECTED_ERRORS, RuntimeError))


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="evaluate a trained model on a task's evaluation split")
    p.add_argument(
        "--task", required=True, type=task_name, choices=[n for n, t in TASKS.items() if t.evaluable]
    )
    add_config_flags(p, run=False)
    p.add_argument(
        "--checkpoint", required=True, help="a run directory, a step-*.pt file or a save_pretrained dir"
    )
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="evaluation split")
    p.add_argument(
        "--output-dir", help="where metrics_<split>.json and predictions go (default: the run dir)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the run config's device)")
    add_eval_flags(p)
    p.set_defaults(func=evaluate)
