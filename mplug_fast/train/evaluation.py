"""Evaluating a run: the evaluation set a run config names, a model loaded from what a run leaves behind,
and ``metrics.json`` (the task's metrics, its headline metric against the model-free baseline).

    model, config, run_dir, source = load_for_evaluation("runs/vqa", "vqa")
    record = run_evaluation(model, tokenizer, config, "vqa", device="cpu", out_dir=run_dir)  # metrics.json
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mplug_fast.checkpoint import CheckpointSource, resolve_checkpoint
from mplug_fast.config import apply_overrides
from mplug_fast.io import atomic_write_json
from mplug_fast.tasks import from_pretrained, get_task, task_name
from mplug_fast.tasks.evaluation import limit_dataset
from mplug_fast.train.build import build_dataset, build_model
from mplug_fast.train.config import RunConfig, from_dict, load_config

DEFAULT_EVAL_BATCH_SIZE = 32


def eval_dataset(
    config: RunConfig, task: str, split: str, limit: int | None, official_overrides: dict[str, Any]
) -> Dataset:
    """The evaluation set of a run config: synthetic held-out scenes (capped at ``limit``) or the official
    reader with ``data.official`` updated by ``official_overrides``."""
    spec = get_task(task)
    if config.data.source == "synthetic":
        world = asdict(config.data.synthetic)
        if split == "train":
            raise ValueError("--split train is not supported on the synthetic world (use test or val)")
        if limit is not None:
            world["eval_scenes"] = min(world["eval_scenes"], limit)
        return spec.synthetic_dataset(split, **world)
    dataset = spec.official_dataset(split, **{**config.data.official, **official_overrides})
    if limit is not None and not spec.limitable:
        raise ValueError(
            f"--eval-limit does not apply to {task} on official data (the whole split is the set)"
        )
    return limit_dataset(dataset, limit)


def run_evaluation(
    model: nn.Module,
    tokenizer: Any,
    config: RunConfig,
    task: str,
    *,
    device: torch.device | str,
    out_dir: Path,
    split: str = "test",
    metrics_name: str = "metrics.json",
    batch_size: int | None = None,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    official_overrides: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates ``model``, computes the baseline, writes ``out_dir/metrics_name`` and the predictions JSON;
    returns the written record. Defaults, weakest first: the task's ``eval_options``, the run config's
    ``eval`` section (``batch_size``, ``options``, ``official``), then the arguments (the CLI flags)."""
    spec, run_eval, options = get_task(task), config.eval, dict(options or {})
    spec.check_eval_options(run_eval.options, "eval.options")
    spec.check_eval_options(options)
    if batch_size is None:
        batch_size = run_eval.batch_size or DEFAULT_EVAL_BATCH_SIZE
    dataset = eval_dataset(config, task, split, limit, {**run_eval.official, **(official_overrides or {})})
    opts = {**spec.eval_options, **run_eval.options, **options}
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
        base = spec.baseline(build_dataset(config, task, "train"), dataset)  # majority answer, ...
        baseline = {"value": base.value, "description": base.description}
    except Exception as e:  # the baseline is informative only: a reader without answers must not fail the run
        baseline = {"value": None, "description": f"not computed ({type(e).__name__}: {e})"}
    value = metrics.get(spec.metric)
    above = None if baseline["value"] is None or value is None else value > baseline["value"]
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
            "above_baseline": above,
        },
        "eval_options": {"batch_size": batch_size, "limit": limit, **opts},
        "predictions_file": str(out_dir / spec.predictions_file),
    }
    atomic_write_json(out_dir / metrics_name, record)
    return record


def load_for_evaluation(
    checkpoint: str | Path | CheckpointSource,
    task: str,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> tuple[nn.Module, RunConfig, Path, CheckpointSource]:
    """(model, run config, run directory, what was loaded) from any checkpoint `resolve_checkpoint` tells
    apart (or its result): a run folder's final model or a ``save_pretrained`` folder (its run config:
    ``--config``, else ``../config.yaml`` beside it, else the defaults), a trainer checkpoint (its stored run
    config; ``--config`` / ``--set`` change the data side), or an official .pth (read at the resolution of
    ``--config``; run directory: its output_dir). A zero-shot video task loads its image task's model."""
    overrides = list(overrides or [])
    model_name = get_task(task).checkpoint_task.name
    source = checkpoint if isinstance(checkpoint, CheckpointSource) else resolve_checkpoint(checkpoint)
    path, task_override = source.path, f"model.task={model_name}"
    if source.kind in ("run", "pretrained"):
        model = from_pretrained(path, task=model_name)
        run_config = config_path or (
            path.parent / "config.yaml" if (path.parent / "config.yaml").is_file() else None
        )
        return model, load_config(run_config, [task_override, *overrides]), path.parent, source
    if source.kind == "official":
        config = load_config(config_path, [task_override, *overrides])
        config.model.init_from = str(path)
        return build_model(config), config, Path(config.output_dir), source
    if config_path:
        config = load_config(config_path, [task_override, *overrides])
    else:
        config = from_dict(apply_overrides(RunConfig, source.state["config"], overrides))
    if task_name(config.model.task) != model_name:
        raise ValueError(f"{path} holds a {config.model.task!r} model, not the {model_name!r} model")
    config.model.init_from = None  # the checkpoint has every weight
    model = build_model(config)
    weights = {k[len("model.") :]: v for k, v in source.state["objective"].items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return model, config, run_dir, source
