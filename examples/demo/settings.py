"""The demo's own settings (``<config-dir>/demo.yaml``): the stages and what each starts from, the
evaluation options, the ``--quick`` scaling and the gallery; and the demo's errors."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from mplug_fast.config import coerce
from mplug_fast.tasks import get_task


class DemoError(ValueError):
    """A demo configuration or output-directory problem the user can fix (the message says how)."""


class DemoInterrupted(Exception):
    """Ctrl-C stopped a stage's training; its checkpoint is saved."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"{stage} stopped at step {step}")
        self.stage, self.step = stage, step


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's own knobs (``<config-dir>/demo.yaml``; every key optional).

    Attributes:
        stages: stage -> the stage whose saved model it starts from (None: the first stage, trained from
            scratch), in run order; each stage is a task name (``mplug_fast.tasks.TASKS``).
        eval_batch_size: evaluation batch size of every task (None: the run config's, else 32).
        eval_options: task -> options of its evaluate function (over the task's defaults, e.g. beam_size).
        quick_step_divisor: ``--quick`` runs max_steps // this (at least 1) steps per stage.
        quick_eval_scenes: ``--quick`` evaluates on at most this many held-out scenes.
        gallery_images: held-out scenes drawn in the gallery.
        gallery_size: side in pixels of the upscaled gallery images.
        gallery_world: the stage whose ``data.synthetic`` world the gallery scenes come from.
    """

    stages: dict[str, str | None] = dataclasses.field(default_factory=dict)
    eval_batch_size: int | None = None
    eval_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    quick_step_divisor: int = 10
    quick_eval_scenes: int = 50
    gallery_images: int = 6
    gallery_size: int = 256
    gallery_world: str = "vqa"

    @property
    def finetunes(self) -> tuple[str, ...]:
        """The stages that start from another stage's model (each evaluated against its baseline)."""
        return tuple(s for s, up in self.stages.items() if up is not None)

    def upstream(self, stage: str) -> str | None:
        """The stage whose saved model ``stage`` starts from (None: the first stage)."""
        return self.stages[stage]


# demo.yaml "section: {key: value}" -> the DemoSettings field
SETTING_KEYS: dict[str, str] = {
    "eval.batch_size": "eval_batch_size",
    "eval.options": "eval_options",
    "quick.step_divisor": "quick_step_divisor",
    "quick.eval_scenes": "quick_eval_scenes",
    "gallery.images": "gallery_images",
    "gallery.size": "gallery_size",
    "gallery.world": "gallery_world",
}


def load_settings(config_dir: Path) -> DemoSettings:
    """`DemoSettings` from ``config_dir/demo.yaml`` (defaults when absent); unknown keys and wrong types are
    errors naming the key (types checked by the config engine, `mplug_fast.config.coerce`)."""

    path = config_dir / "demo.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    values: dict[str, Any] = {}
    stages = raw.pop("stages", None) if isinstance(raw, dict) else None
    for section, entries in (raw if isinstance(raw, dict) else {"<top level>": raw}).items():
        if not isinstance(entries, dict):
            raise DemoError(
                f"{path}: {section!r} must be a mapping of settings; valid: {sorted(SETTING_KEYS)}"
            )
        for key, value in entries.items():
            name = f"{section}.{key}"
            if name not in SETTING_KEYS:
                raise DemoError(f"{path}: unknown setting {name!r}; valid: {sorted(SETTING_KEYS)}")
            annotation = typing.get_type_hints(DemoSettings)[SETTING_KEYS[name]]
            values[SETTING_KEYS[name]] = coerce(annotation, value, name=name, where=str(path))  # its type
    settings = DemoSettings(**values)
    options = settings.eval_options
    for key, field_name in SETTING_KEYS.items():  # the counts and sizes
        value = getattr(settings, field_name)
        if isinstance(value, int) and value < 1:
            raise DemoError(f"{path}: {key} must be an integer >= 1, got {value!r}")
    settings = dataclasses.replace(settings, stages=_stages(stages, path))
    finetunes = settings.finetunes
    if sorted(set(options) - set(finetunes)):
        raise DemoError(
            f"{path}: eval.options for unknown task(s) {sorted(set(options) - set(finetunes))}; "
            f"tasks: {list(finetunes)}"
        )
    if settings.gallery_world not in settings.stages:
        raise DemoError(
            f"{path}: gallery.world {settings.gallery_world!r} is not a stage of {list(settings.stages)}"
        )
    for task, task_options in options.items():
        try:
            get_task(task).check_eval_options(task_options)
        except ValueError as e:
            raise DemoError(f"{path}: eval.options.{task}: {e}") from None
    return settings


def _stages(raw: Any, path: Path) -> dict[str, str | None]:
    """demo.yaml's ``stages`` (stage -> the stage it starts from, null for the one trained from scratch) in
    run order: every stage after the stage it starts from, otherwise in the file's order. Checked: every
    stage a trainable task, exactly one starting from scratch, every start a stage, no cycle, every finetune
    an evaluable task."""
    if not isinstance(raw, dict) or not raw:
        raise DemoError(
            f"{path}: 'stages' must map each stage (a task) to the stage it starts from "
            f"(null: from scratch); got {raw!r}"
        )
    for stage, start in raw.items():
        try:
            task = get_task(stage)
        except ValueError as e:
            raise DemoError(f"{path}: stages: {e}") from None
        if not task.trainable:
            raise DemoError(f"{path}: stages: {stage!r} cannot be trained ({task.not_trainable_reason()})")
        if start is not None and start not in raw:
            raise DemoError(f"{path}: stages: {stage!r} starts from {start!r}, which is not a stage")
        if start is not None and not task.evaluable:
            raise DemoError(f"{path}: stages: {stage!r} has no evaluation; only the first stage may lack one")
    roots = [stage for stage, start in raw.items() if start is None]
    if len(roots) != 1:
        raise DemoError(f"{path}: stages: exactly one stage starts from scratch (null), got {roots}")
    ordered: dict[str, str | None] = {}
    while len(ordered) < len(raw):
        ready = [s for s, start in raw.items() if s not in ordered and (start is None or start in ordered)]
        if not ready:
            cycle = sorted(set(raw) - set(ordered))
            raise DemoError(f"{path}: stages: {cycle} start from each other (a cycle)")
        ordered.update((s, raw[s]) for s in ready)
    return ordered
