"""A run config -> the parts a training run is made of: the task, the model, its objective, the data.

    parts = build_parts(config)       # task, tokenizer, model, objective, dataset, collate_fn
    trainer = Trainer(config, parts.objective, parts.dataset, parts.collate_fn)

The task is ``config.objective.name or config.model.task``, looked up in ``mplug_fast.tasks.TASKS``; every
task-specific decision is the task's (its model class, options, loss, collate, readers). This module only
turns the config's sections into the arguments the task asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mplug_fast.config import get_config
from mplug_fast.data import Tokenizer
from mplug_fast.modeling import MPlug
from mplug_fast.objectives.base import Objective
from mplug_fast.tasks import DataSource, Task, from_pretrained, get_task, load_official_checkpoint
from mplug_fast.train.config import RunConfig

logger = logging.getLogger(__name__)


@dataclass
class RunParts:
    """What `build_parts` makes of a run config."""

    task: Task
    tokenizer: Tokenizer
    model: MPlug
    objective: Objective
    dataset: Dataset
    collate_fn: Callable[[list], dict[str, Any]]


def run_task(config: RunConfig) -> Task:
    """The task a run config trains: ``objective.name`` when set, else ``model.task``."""
    return get_task(config.objective.name or config.model.task)


def data_source(config: RunConfig) -> DataSource:
    """The config's data section as the tasks see it."""
    return DataSource(config.data.source, asdict(config.data.synthetic), dict(config.data.official))


def build_model(config: RunConfig) -> MPlug:
    """The task model of ``config.model`` (the synthetic world's image size becomes the model resolution
    unless ``model.overrides`` sets ``vision.image_size``).

    ``model.init_from``: a ``save_pretrained`` directory (its own config), or an official mPLUG checkpoint
    file (``mplug_base.pth``, ...) read at the run's resolution and fusion stride (the position table is
    resized to ``vision.image_size``; the rest of the shape comes from the weights)."""
    task = config.model.task
    overrides = dict(config.model.overrides)
    if config.data.source == "synthetic" and "vision.image_size" not in overrides:
        overrides["vision.image_size"] = config.data.synthetic.image_size
    init_from = config.model.init_from
    if not init_from:
        return get_task(task).build_model(get_config(config.model.preset, **overrides))
    if Path(init_from).is_dir():
        return from_pretrained(init_from, task=task)
    if not Path(init_from).is_file():
        raise FileNotFoundError(
            f"model.init_from {init_from!r} is neither a save_pretrained directory nor a checkpoint file"
        )
    wanted = get_config(config.model.preset, **overrides)
    loaded = load_official_checkpoint(
        init_from,
        task,
        image_res=wanted.vision.image_size,
        stride=wanted.fusion.stride,
        strict=config.model.init_strict,
    )
    if config.model.init_strict:
        return loaded
    model, report = loaded
    if report.missing or report.unexpected:
        logger.warning(
            "model.init_from %s (init_strict false): %d tensors missing (fresh init), %d unused: "
            "missing %s; unused %s",
            init_from,
            len(report.missing),
            len(report.unexpected),
            report.missing[:8],
            report.unexpected[:8],
        )
    return model


def build_objective(config: RunConfig, model: MPlug, tokenizer: Tokenizer) -> Objective:
    """The run task's objective around ``model``, with ``objective.options`` as the task's typed options."""
    task = run_task(config)
    options = task.options(config.objective.options, where="objective.options")
    return task.build_objective(model, tokenizer, options, data_source(config))


def build_dataset(config: RunConfig, task: str | None = None, split: str = "train") -> Dataset:
    """The dataset of ``task`` (default: the run task) for ``split``: the synthetic world's scenes
    (``data.synthetic``), or the task's official-format reader built with ``data.official`` as its keyword
    arguments."""
    spec = run_task(config) if task is None else get_task(task)
    if config.data.source == "official":
        return spec.official_dataset(split, **config.data.official)
    return spec.synthetic_dataset(split, **asdict(config.data.synthetic))


def build_collate(config: RunConfig, tokenizer: Tokenizer) -> Callable[[list], dict[str, Any]]:
    """The run task's collator, with ``data.max_length`` as its text length cap when set."""
    task = run_task(config)
    options = {} if config.data.max_length is None else {task.length_option: config.data.max_length}
    return task.collate(tokenizer, **options)


def build_parts(config: RunConfig) -> RunParts:
    """Everything a run trains, in a fixed order (model weights first: the RNG draws are reproducible)."""
    task = run_task(config)
    if not task.trainable:
        raise ValueError(task.not_trainable_reason())
    tokenizer = Tokenizer()
    model = build_model(config)
    objective = build_objective(config, model, tokenizer)
    dataset = build_dataset(config, split="train")
    return RunParts(task, tokenizer, model, objective, dataset, build_collate(config, tokenizer))
