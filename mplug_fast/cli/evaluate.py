"""``mplug-fast evaluate``: a trained model on a task's evaluation split, against the task's baseline.

    mplug-fast evaluate --task vqa --checkpoint RUN|MODEL_DIR|STEP.pt|OFFICIAL.pth [--split test]

The checkpoint kind is detected (`mplug_fast.checkpoint.resolve_checkpoint`) and named on stderr. The model
is a run folder's final model or a ``save_pretrained`` folder (run config: ``--config``, else the run's
config.yaml), rebuilt from a trainer checkpoint (its stored run config; ``--config`` / ``--set`` change the
data side), or an official .pth at the resolution of ``--config``; ``metrics_<split>.json`` and the
predictions go to ``--output-dir`` (default: the run folder; for an official .pth the run config's
output_dir). A zero-shot video task evaluates its image task's checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mplug_fast.cli.common import add_config_flags, add_eval_flags, announce, key_values
from mplug_fast.data import Tokenizer
from mplug_fast.tasks import TASKS, get_task, task_name
from mplug_fast.train.distributed import check_device
from mplug_fast.train.evaluation import load_for_evaluation, run_evaluation


def evaluate(args: argparse.Namespace) -> int:
    eval_options = key_values(args.eval_option, "--eval-option")
    get_task(args.task).check_eval_options(eval_options)
    official_overrides = key_values(args.eval_data, "--eval-data")
    device = check_device(args.device) if args.device else None
    model, config, run_dir, source = load_for_evaluation(
        args.checkpoint, args.task, args.config, args.overrides
    )
    announce(args.command, source)
    device = device or check_device(config.device)
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
        extra={"checkpoint": str(source.path), "checkpoint_kind": source.kind},
    )
    print(json.dumps(record, indent=1, default=str))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="evaluate a trained model on a task's evaluation split")
    p.add_argument(
        "--task", required=True, type=task_name, choices=[n for n, t in TASKS.items() if t.evaluable]
    )
    add_config_flags(p, run=False)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder, a save_pretrained folder, a trainer step-*.pt or an official .pth",
    )
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="evaluation split")
    p.add_argument(
        "--output-dir", help="where metrics_<split>.json and predictions go (default: the run dir)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N, auto (default: the run config's device)")
    add_eval_flags(p)
    p.set_defaults(func=evaluate)
