"""``mplug-fast finetune`` and ``mplug-fast evaluate``: train a downstream task with the shared trainer, then
measure it against its model-free baseline.

    mplug-fast finetune --task vqa|caption|retrieval|grounding --config FILE [--set a.b=v] [--resume [PATH]]
    mplug-fast evaluate --task ... --checkpoint RUN_DIR|CHECKPOINT.pt|SAVE_PRETRAINED_DIR [--split test]
    torchrun --nproc-per-node 2 -m mplug_fast finetune --task ... (evaluation runs on rank 0)

``finetune`` = ``mplug-fast train`` with ``model.task`` set to ``--task`` (a config naming another task is an
error), then, on rank 0: the evaluation split (synthetic: the ``data.synthetic.eval_scenes`` held-out scenes;
official: ``data.official`` with ``--eval-data key=value`` overrides, e.g. ``--eval-data ann=test.json``) is
evaluated, and the run directory gets ``metrics.json`` (metrics, headline metric vs baseline), the task's
predictions JSON (EvalAI / COCO format where one exists) and ``model/`` (``save_pretrained``).
``evaluate`` rebuilds the model from a trainer checkpoint (its stored run config; ``--config`` / ``--set``
change the data side) or from a ``save_pretrained`` directory, and writes ``metrics_<split>.json`` and the
predictions under ``--output-dir`` (default: the run directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TASK_CHOICES = (
    "vqa",
    "caption",
    "retrieval",
    "grounding",
    "nlvr",
    "ve",
    "scst",
    "video_qa",
    "video_caption",
    "video_retrieval",
)


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    """["a=1", "b=x"] -> {"a": 1, "b": "x"} (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {text!r} must look like key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
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


def check_eval_options(task: str, options: dict[str, Any], where: str = "--eval-option") -> None:
    """ValueError naming the unknown ones when ``options`` are not keyword options of the task's evaluate."""
    import inspect

    from mplug_fast.tasks import get_task

    params = inspect.signature(get_task(task).evaluate).parameters
    fixed = {"model", "dataset", "tokenizer", "batch_size", "device", "output"}
    valid = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in fixed)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{where} {unknown} unknown for task {task!r}; valid: {valid}")


def _config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"schedule.max_steps={args.max_steps}")
    return overrides


def eval_dataset(config: Any, task: str, split: str, limit: int | None, official_overrides: dict[str, Any]):
    """The evaluation set of a run config: synthetic held-out scenes (capped at ``limit``) or the official
    reader with ``data.official`` updated by ``official_overrides``."""
    from dataclasses import asdict

    from mplug_fast.tasks import get_task
    from mplug_fast.tasks.base import limit_dataset

    spec = get_task(task)
    if config.data.source == "synthetic":
        world = asdict(config.data.synthetic)
        if split == "train":
            raise ValueError("--split train is not supported on the synthetic world (use test or val)")
        if limit is not None:
            world["eval_scenes"] = min(world["eval_scenes"], limit)
        return spec.synthetic_dataset(split, **world)
    dataset = spec.official_dataset(split, **{**config.data.official, **official_overrides})
    if limit is not None and task == "retrieval":
        raise ValueError(
            "--eval-limit does not apply to retrieval on official data (the gallery is the split)"
        )
    return limit_dataset(dataset, limit)


def train_dataset_for_baseline(config: Any, task: str):
    from dataclasses import asdict

    from mplug_fast.tasks import get_task

    spec = get_task(task)
    if config.data.source == "synthetic":
        return spec.synthetic_dataset("train", **asdict(config.data.synthetic))
    return spec.official_dataset("train", **config.data.official)


def run_evaluation(
    model: Any,
    tokenizer: Any,
    config: Any,
    task: str,
    *,
    split: str,
    device: Any,
    out_dir: Path,
    metrics_name: str,
    batch_size: int | None,
    limit: int | None,
    options: dict[str, Any],
    official_overrides: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates ``model``, computes the baseline, writes ``out_dir/metrics_name`` and the predictions JSON;
    returns the written record. Defaults, weakest first: the task's ``eval_options``, the run config's
    ``eval`` section (``batch_size``, ``options``, ``official``), then the arguments (the CLI flags)."""
    from mplug_fast.tasks import get_task
    from mplug_fast.tasks.base import write_json

    spec = get_task(task)
    run_eval = getattr(config, "eval", None)  # absent in configs stored before the eval section existed
    if run_eval is not None:
        check_eval_options(task, run_eval.options, "eval.options")
        official_overrides = {**run_eval.official, **official_overrides}
        if batch_size is None:
            batch_size = run_eval.batch_size
    batch_size = 32 if batch_size is None else batch_size
    dataset = eval_dataset(config, task, split, limit, official_overrides)
    opts = {**spec.eval_options, **(run_eval.options if run_eval is not None else {}), **options}
    try:
        result = spec.evaluate(
            model,
            dataset,
            tokenizer,
            batch_size=batch_size,
            device=device,
            output=out_dir / spec.predictions_file,
            **opts,
        )
    except TypeError as e:
        raise ValueError(f"--eval-option: {e} (options given: {sorted(opts)})") from e
    metrics = {
        k: v for k, v in result.items() if isinstance(v, (int, float, str, list)) and k != "predictions"
    }
    try:
        base = spec.baseline(train_dataset_for_baseline(config, task), dataset)
        baseline = {"value": base.value, "description": base.description}
    except Exception as e:  # the baseline is informative only: a reader without answers must not fail the run
        baseline = {"value": None, "description": f"not computed ({type(e).__name__}: {e})"}
    value = metrics.get(spec.metric)
    record = {
        "task": task,
        "split": split,
        **(extra or {}),
        "metrics": metrics,
        "headline": {
            "metric": spec.metric,
            "value": value,
            "baseline": baseline["value"],
            "baseline_description": baseline["description"],
            "above_baseline": None
            if baseline["value"] is None or value is None
            else value > baseline["value"],
        },
        "eval_options": {"batch_size": batch_size, "limit": limit, **opts},
        "predictions_file": str(out_dir / spec.predictions_file),
    }
    write_json(record, out_dir / metrics_name)
    return record


def _finetune(args: argparse.Namespace) -> int:
    import logging

    import yaml

    from mplug_fast.train.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    task = args.task
    try:
        from mplug_fast.tasks.video import check_trainable

        check_trainable(task)  # zero-shot video tasks are evaluate-only
        if args.config:
            raw = yaml.safe_load(Path(args.config).read_text()) if Path(args.config).is_file() else None
            named = ((raw or {}).get("model") or {}).get("task") if isinstance(raw, dict) else None
            if named not in (None, task):
                raise ConfigError(f"{args.config} trains model.task {named!r}, not --task {task!r}")
        config = load_config(args.config, [f"model.task={task}", *_config_overrides(args)])
        if config.model.task != task or (config.objective.name or task) != task:
            raise ConfigError(
                f"--task {task} needs model.task and objective.name {task!r}, got {config.model.task!r} / "
                f"{config.objective.name!r}"
            )
        eval_options = _key_values(args.eval_option, "--eval-option")
        check_eval_options(task, eval_options)
        check_eval_options(task, config.eval.options, "eval.options")  # fail before training, not after
        official_overrides = _key_values(args.eval_data, "--eval-data")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mplug-fast finetune: {e}", file=sys.stderr)
        return 2
    from mplug_fast.tasks import get_task

    spec = get_task(task)
    if spec.objective_options:
        config.objective.options = {**spec.objective_options, **config.objective.options}
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0

    from mplug_fast.train.distributed import cleanup_distributed
    from mplug_fast.train.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(config)
        summary = trainer.fit(resume=args.resume)
        record = None
        if trainer.env.is_main and summary["status"] == "finished" and not args.no_eval:
            from mplug_fast.checkpoint import save_pretrained

            model = trainer.objective.model
            out_dir = Path(config.output_dir)
            save_pretrained(model, out_dir / "model")
            record = run_evaluation(
                model,
                trainer.tokenizer,
                config,
                task,
                split="test",
                device=trainer.env.device,
                out_dir=out_dir,
                metrics_name="metrics.json",
                batch_size=args.eval_batch_size,
                limit=args.eval_limit,
                options=eval_options,
                official_overrides=official_overrides,
                extra={"step": summary["step"], "checkpoint": summary["checkpoint"]},
            )
    except NonFiniteLossError as e:
        print(f"mplug-fast finetune: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"mplug-fast finetune: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    if trainer.env.is_main:
        print(json.dumps({"train": summary, "eval": record}, indent=1, default=str))
    return 0 if summary["status"] == "finished" else 130


def load_for_evaluation(checkpoint: str, task: str, config_path: str | None, overrides: list[str]):
    """(model, run config, run directory, checkpoint file) from a trainer checkpoint file, a run directory
    (its newest ``checkpoints/step-*.pt``) or a ``save_pretrained`` directory (its run config: ``--config``,
    else ``../config.yaml`` beside it, else the defaults)."""
    from mplug_fast.tasks.video import model_task
    from mplug_fast.train.checkpointing import latest_checkpoint, load_checkpoint
    from mplug_fast.train.config import apply_overrides, from_dict, load_config

    task = model_task(task)  # a zero-shot video task runs (and loads) its image task's model
    path = Path(checkpoint)
    if path.is_dir() and (path / "config.json").is_file():
        from mplug_fast.checkpoint import from_pretrained

        model = from_pretrained(path, task=task)
        run_config = config_path or (
            path.parent / "config.yaml" if (path.parent / "config.yaml").is_file() else None
        )
        config = load_config(run_config, [f"model.task={task}", *overrides])
        return model, config, path.parent, path
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no checkpoints/step-*.pt, step-*.pt or save_pretrained config.json"
            )
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    state = load_checkpoint(path)
    if "objective" not in state or "config" not in state:
        raise ValueError(f"{path} is not a trainer checkpoint (no 'objective' / 'config' entries)")
    if config_path:
        config = load_config(config_path, [f"model.task={task}", *overrides])
    else:
        config = from_dict(apply_overrides(state["config"], overrides))
    if config.model.task != task:
        raise ValueError(f"{path} holds a {config.model.task!r} model, not --task {task!r}")
    from mplug_fast.train.trainer import build_model_from_config

    config.model.init_from = None  # the checkpoint has every weight
    model = build_model_from_config(config)
    weights = {k[len("model.") :]: v for k, v in state["objective"].items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return model, config, run_dir, path


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from mplug_fast.data import Tokenizer
    from mplug_fast.train.config import ConfigError

    try:
        eval_options = _key_values(args.eval_option, "--eval-option")
        check_eval_options(args.task, eval_options)
        official_overrides = _key_values(args.eval_data, "--eval-data")
        model, config, run_dir, ckpt = load_for_evaluation(
            args.checkpoint, args.task, args.config, args.overrides
        )
        device_name = args.device or config.device
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_name)
        model = model.to(device)
        out_dir = Path(args.output_dir) if args.output_dir else run_dir
        record = run_evaluation(
            model,
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
            extra={"checkpoint": str(ckpt)},
        )
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"mplug-fast evaluate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=1, default=str))
    return 0


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=TASK_CHOICES)
    parser.add_argument("--config", help="a run config YAML (configs/<task>_*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config field, value parsed as YAML (repeatable)",
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``finetune`` and ``evaluate`` to the ``mplug-fast`` sub-commands."""
    f = commands.add_parser("finetune", help="finetune a downstream task, then evaluate it (metrics.json)")
    _add_config_options(f)
    f.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from the newest checkpoint of the output dir, or from PATH",
    )
    f.add_argument("--output-dir", help="shortcut for --set output_dir=...")
    f.add_argument("--max-steps", type=int, help="shortcut for --set schedule.max_steps=...")
    f.add_argument("--no-eval", action="store_true", help="train only")
    f.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_eval_options(f)
    f.set_defaults(func=_finetune)

    e = commands.add_parser("evaluate", help="evaluate a finetuned checkpoint on a task's evaluation split")
    _add_config_options(e)
    e.add_argument(
        "--checkpoint", required=True, help="a run directory, a step-*.pt file or a save_pretrained dir"
    )
    e.add_argument("--split", default="test", choices=("test", "val", "train"), help="evaluation split")
    e.add_argument(
        "--output-dir", help="where metrics_<split>.json and predictions go (default: the run dir)"
    )
    e.add_argument("--device", help="cpu, cuda, cuda:N (default: the run config's device)")
    _add_eval_options(e)
    e.set_defaults(func=_evaluate)
