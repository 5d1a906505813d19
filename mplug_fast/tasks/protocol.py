"""The Task protocol: the one home of everything task-specific.

A task is one object in ``mplug_fast/tasks/<name>.py``, registered once in ``mplug_fast.tasks.TASKS``. The
trainer, the CLI, the pipeline and the demo ask the registry; none of them holds a table of task names.

    task = TASKS["vqa"]
    model = task.build_model(config)                       # backbone + the heads the task needs
    options = task.options({"alpha": 0.4}, where="run.yaml")   # typed `Options` (unknown keys are errors)
    objective = task.build_objective(model, tokenizer, options, data)   # the loss: forward(batch) -> dict
    collate = task.collate(tokenizer, max_length=30)       # samples -> batch (options: the collator's)
    train = task.synthetic_dataset("train", image_size=64) # or task.official_dataset("train", ann=...)
    result = task.evaluate(model, test, tokenizer, device="cpu", **task.eval_options)  # predict + score
    base = task.baseline(train, test)                      # a model-free reference of `task.metric`

Adding a task = one new file with a `Task` subclass + one line in ``tasks/__init__.py`` (worked example in
``docs/architecture.md``).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn
from torch.utils.data import Dataset

from mplug_fast.config import MPlugConfig
from mplug_fast.config.coerce import from_mapping
from mplug_fast.modeling import MPlug
from mplug_fast.objectives.base import Objective
from mplug_fast.tasks.sources import synthetic_scenes


@dataclass(frozen=True)
class Baseline:
    """A model-free reference value of a task's headline metric, and how it was obtained."""

    metric: str
    value: float
    description: str


@dataclass(frozen=True)
class NoOptions:
    """The options of a task that has none."""


@dataclass(frozen=True)
class DataSource:
    """Where a run's training data comes from: ``source`` "synthetic" (``synthetic``: the world's options)
    or "official" (``official``: the reader's keyword arguments). Tasks whose loss needs the training data
    itself (SCST's CIDEr-D document frequencies) read it from here."""

    source: str = "synthetic"
    synthetic: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    official: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class TaskError(ValueError):
    """A task cannot do what was asked (unknown option, no reader, not trainable)."""


class Task(abc.ABC):
    """One task. Subclasses set the class attributes (what each is: the comments) and implement the abstract
    methods."""

    name: ClassVar[str]  # the registry key (also the label saved with the task's models)
    metric: ClassVar[str]  # the headline key of `evaluate`'s result (higher is better)
    model_class: ClassVar[type[MPlug]]  # the `MPlug` variant (backbone + heads) it trains and evaluates
    Options: ClassVar[type] = NoOptions  # a frozen dataclass: the run config's ``objective.options``
    # samples -> batch: ``collator(tokenizer, **options)``
    collator: ClassVar[Callable[..., Callable[[list], dict[str, Any]]]]
    reader: ClassVar[Callable[..., Dataset]]  # the official-format dataset: ``reader(**kwargs, split=)``
    objective_class: ClassVar[Callable[..., Objective]]  # the default `_objective`: ``(model, **options)``
    synthetic_class: ClassVar[Callable[..., Dataset]]  # the dataset the default `synthetic_dataset` builds
    eval_options: ClassVar[Mapping[str, Any]] = {}  # defaults of `evaluate`'s keyword options
    predictions_file: ClassVar[str] = "predictions.json"  # what `evaluate` writes under a run directory
    trainable: ClassVar[bool] = True  # False for evaluate-only tasks (zero-shot video)
    evaluable: ClassVar[bool] = True  # False for tasks without an evaluation of their own (pretraining)
    limitable: ClassVar[bool] = True  # False where an official evaluation set cannot be cut short
    length_option: ClassVar[str] = "max_length"  # the collate keyword the run config's data.max_length sets
    text_length: ClassVar[int] = 30  # official training text length in tokens (the pipeline's truncation)
    # the `mplug_fast.pipeline` method the task's model serves (None: not served), also a pipeline task name
    pipeline_method: ClassVar[str | None] = None
    aliases: ClassVar[tuple[str, ...]] = ()  # other names `get_task`, ``--task`` and the pipeline accept

    def __repr__(self) -> str:
        return f"<task {self.name!r}>"

    # ---- model ---------------------------------------------------------------------------------------

    @property
    def checkpoint_task(self) -> Task:
        """The task whose models (and run checkpoints) this task loads: itself, or for a zero-shot task the
        task it borrows its model from."""
        return self

    def new_model(self, config: MPlugConfig) -> MPlug:
        """The task model with torch's default init (for loaders that fill the weights)."""
        return self.model_class(config, task=self.name)

    def build_model(self, config: MPlugConfig, *, init: bool = True) -> MPlug:
        """The task model with fresh weights (`MPlug.init_weights`); ``init=False`` leaves torch's default."""
        model = self.new_model(config)
        if init:
            model.init_weights()
        return model

    # ---- training ------------------------------------------------------------------------------------

    def options(self, values: Mapping[str, Any] | None = None, *, where: str = "") -> Any:
        """The typed `Options` from a mapping (the run config's ``objective.options``), every key and value
        checked by the config engine: an unknown option or a value of the wrong type is a `ConfigError`
        naming ``objective.options.<key>``, what it accepts, and ``where`` (the file)."""
        return from_mapping(self.Options, dict(values or {}), where=where, prefix="objective.options")

    def build_objective(
        self, model: nn.Module, tokenizer: Any, options: Any = None, data: DataSource | None = None
    ) -> Objective:
        """The training loss around ``model`` (built by `build_model`): an `Objective`."""
        if not self.trainable:
            raise TaskError(self.not_trainable_reason())
        options = self.options() if options is None else options
        if type(options) is not self.Options:
            raise TaskError(f"task {self.name!r} needs {self.Options.__name__} options, got {options!r}")
        if model.task != self.name or not isinstance(model, self.model_class):
            raise TaskError(
                f"the {self.name!r} objective needs the {self.name!r} model "
                f"({self.model_class.__name__}), got a {model.task!r} model"
            )
        return self._objective(model, tokenizer, options, data)

    def not_trainable_reason(self) -> str:
        """Why `build_objective` refuses this task (for tasks with ``trainable`` False)."""
        return f"task {self.name!r} is evaluate-only; it has no training objective"

    def _objective(
        self, model: nn.Module, tokenizer: Any, options: Any, data: DataSource | None
    ) -> Objective:
        """Builds the objective (arguments already checked by `build_objective`; ``data``: the run's data
        source, None outside a run): ``objective_class(model, **options)`` unless a task overrides it."""
        return self.objective_class(model, **vars(options))

    def collate(self, tokenizer: Any = None, **options: Any) -> Callable[[list], dict[str, Any]]:
        """samples -> batch (a ``DataLoader`` ``collate_fn``): ``collator(tokenizer, **options)``; the run
        config's ``data.max_length`` is the option named `length_option`."""
        return self.collator(tokenizer, **options)

    # ---- data ----------------------------------------------------------------------------------------

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        """The task's dataset on the synthetic world (``world``: the run config's ``data.synthetic``): split
        "train" reads scenes 0..num_scenes-1, any other split the held-out scenes after them
        (``synthetic_class(world, count, start)`` unless a task overrides it)."""
        s = synthetic_scenes(split, **world)
        return self.synthetic_class(s.world, s.count, s.start)

    def official_dataset(self, split: str = "train", **kwargs: Any) -> Dataset:
        """The task's official-format reader (`reader`) for ``split`` (``kwargs``: the reader's arguments)."""
        return call_reader(self.reader, self.name, {**kwargs, "split": split})

    # ---- evaluation ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset, tokenizer: Any, **options: Any) -> dict[str, Any]:
        """Predict on ``dataset`` and score: ``{metric: value, ..., "predictions": ...}``; keyword options
        ``batch_size``, ``device``, ``output`` (predictions JSON path) and the task's own."""

    @abc.abstractmethod
    def baseline(self, train: Dataset, evaluation: Dataset) -> Baseline:
        """A model-free reference value of `metric` (majority answer, chance recall, constant box, ...)."""

    def check_eval_options(self, options: Mapping[str, Any], where: str = "--eval-option") -> None:
        """TaskError naming the unknown ones when ``options`` are not keyword options of `evaluate`."""
        params = inspect.signature(self.evaluate).parameters
        fixed = {"model", "dataset", "tokenizer", "batch_size", "device", "output"}
        valid = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in fixed)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TaskError(f"{where} {unknown} unknown for task {self.name!r}; valid: {valid}")


def call_reader(reader: Callable[..., Dataset], task: str, kwargs: Mapping[str, Any]) -> Dataset:
    """``reader(**kwargs)``; a TypeError from wrong keyword arguments becomes a `TaskError` naming it."""
    try:
        return reader(**kwargs)
    except TypeError as e:
        name = getattr(reader, "__name__", "the reader")
        raise TaskError(f"the official {task} options do not fit {name} ({e})") from e
