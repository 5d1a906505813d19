"""Tasks: the one home of everything task-specific (model, options, loss, collate, data, evaluation,
baseline), behind the `Task` protocol (``tasks/protocol.py``). ``TASKS`` is the only table of task names in
the package; the trainer, the CLI, the pipeline and the demo ask it.

    TASKS["vqa"] -> Task;  get_task(name or alias) -> Task (a clear error listing the names)
    build_model(config, task), build_objective(task, model, tokenizer, **options)
    from_pretrained(dir, task=None), load_official_checkpoint(path, task, ...)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mplug_fast.checkpoint import io as checkpoint_io
from mplug_fast.checkpoint import official as checkpoint_official
from mplug_fast.checkpoint.keymap import ConversionReport
from mplug_fast.config import MPlugConfig
from mplug_fast.modeling import MPlug
from mplug_fast.objectives.base import Objective
from mplug_fast.tasks.caption import CaptionTask
from mplug_fast.tasks.classification import NLVR2Task, VisualEntailmentTask
from mplug_fast.tasks.grounding import GroundingTask
from mplug_fast.tasks.pretrain import PretrainTask
from mplug_fast.tasks.protocol import Baseline, DataSource, Task, TaskError
from mplug_fast.tasks.retrieval import RetrievalTask
from mplug_fast.tasks.scst import SCSTTask
from mplug_fast.tasks.video import VideoCaptionTask, VideoQATask, VideoRetrievalTask
from mplug_fast.tasks.vqa import VQATask

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        PretrainTask(),
        VQATask(),
        CaptionTask(),
        SCSTTask(),
        RetrievalTask(),
        GroundingTask(),
        VisualEntailmentTask(),
        NLVR2Task(),
        VideoQATask(),
        VideoCaptionTask(),
        VideoRetrievalTask(),
    )
}


# another name of a task (``Task.aliases``: an old name, a pipeline name) -> its registry key
ALIASES: dict[str, str] = {alias: task.name for task in TASKS.values() for alias in task.aliases}


def task_name(name: str) -> str:
    """The registry key of ``name`` (a task name or alias; other names unchanged): the CLI's ``--task``
    type, so that argparse's ``choices`` accept the aliases and report unknown names."""
    return ALIASES.get(name, name)


def get_task(name: str) -> Task:
    """The `Task` called ``name`` (or aliased so); a `TaskError` lists the available tasks."""
    if task_name(name) not in TASKS:
        raise TaskError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[task_name(name)]


def build_model(config: MPlugConfig, task: str = "pretrain", *, init: bool = True) -> MPlug:
    """The model of ``task`` for ``config``; ``init=False`` leaves torch's default init (before loading)."""
    return get_task(task).build_model(config, init=init)


def build_objective(task: str, model: nn.Module, tokenizer: Any = None, **options: Any) -> Objective:
    """The objective of ``task`` around ``model`` with ``options`` as the task's typed `Task.Options`."""
    spec = get_task(task)
    return spec.build_objective(model, tokenizer, spec.options(options))


def from_pretrained(
    directory: str | os.PathLike,
    *,
    task: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> MPlug:
    """A ``save_pretrained`` directory as the model of ``task`` (default: the task it was saved as); another
    task loads the components it shares (e.g. a pretrained model as a VQA model) and reports the rest."""
    if task is None:
        task = checkpoint_io.read_pretrained_meta(directory)["task"]
        if not isinstance(task, str) or task_name(task) not in TASKS:
            config_path = os.path.join(directory, checkpoint_io.CONFIG_NAME)
            raise TaskError(f"{config_path}: unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
    return checkpoint_io.load_pretrained(directory, get_task(task).new_model, device=device, dtype=dtype)


def load_official_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    task: str,
    *args: Any,
    **kwargs: Any,
) -> MPlug | tuple[MPlug, ConversionReport]:
    """An official mPLUG checkpoint as the model of ``task`` (see
    ``mplug_fast.checkpoint.official.load_official`` for the other arguments)."""
    return checkpoint_official.load_official(path_or_state_dict, get_task(task).new_model, *args, **kwargs)


__all__ = [
    "ALIASES",
    "TASKS",
    "Baseline",
    "DataSource",
    "Task",
    "TaskError",
    "build_model",
    "build_objective",
    "from_pretrained",
    "get_task",
    "load_official_checkpoint",
    "task_name",
]
