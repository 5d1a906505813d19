"""What a checkpoint path holds: the one resolver behind `pipeline(task, path)` and every `--checkpoint`.

    RUN/                  a run folder of `mplug-fast train`: its final model RUN/model/ ("run"), else its
                          newest trainer checkpoint RUN/checkpoints/step-*.pt (a run stopped early: "trainer")
    DIR/                  a `save_pretrained` folder: config.json + model.safetensors ("pretrained"; naming
                          either file works too)
    .../step-00000100.pt  a trainer checkpoint ("trainer"; a folder of them: the newest)
    mplug_base.pth        an official mPLUG checkpoint ("official")

A file is told apart by its content (read once, weights only): a trainer checkpoint is a dict with the
run's `config` and the `objective` state, whatever its name; anything else is read as an official one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mplug_fast.checkpoint.io import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint

TRAINER_CHECKPOINT = re.compile(r"^step-(\d+)\.pt$")
KINDS = {
    "run": "the final model of a run folder",
    "pretrained": "a save_pretrained folder",
    "trainer": "a trainer checkpoint",
    "official": "an official mPLUG checkpoint",
}


@dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint: `kind` (a key of KINDS), the `path` to read (a save_pretrained folder for
    "run" / "pretrained", the file otherwise), the path the user `given`, and for a file its loaded `state`
    (read weights-only, once)."""

    kind: str
    path: Path
    given: Path
    state: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{KINDS[self.kind]} {self.path}"


def step_files(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the trainer checkpoints ``step-<n>.pt`` in `directory`, oldest first (none when it
    does not exist)."""
    matches = ((TRAINER_CHECKPOINT.match(p.name), p) for p in Path(directory).glob("step-*.pt"))
    return sorted((int(m.group(1)), p) for m, p in matches if m)


def newest_step_file(directory: str | os.PathLike) -> Path | None:
    """The trainer checkpoint with the highest step in `directory` (None when it has none)."""
    found = step_files(directory)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Which kind of checkpoint `path` is (see the module docstring). FileNotFoundError when it does not
    exist or is a folder of none of these kinds; CheckpointError when a file cannot be read."""
    given = Path(path)
    target = given.parent if given.is_file() and given.name in (CONFIG_NAME, WEIGHTS_NAME) else given
    if target.is_dir():
        if (target / CONFIG_NAME).is_file():
            return CheckpointSource("pretrained", target, given)
        if (target / "model" / CONFIG_NAME).is_file():
            return CheckpointSource("run", target / "model", given)
        step = newest_step_file(target / "checkpoints") or newest_step_file(target)
        if step is None:
            raise FileNotFoundError(
                f"{target} is not a checkpoint folder: it has no {CONFIG_NAME} (save_pretrained), no "
                f"model/{CONFIG_NAME} (a finished run) and no checkpoints/step-*.pt or step-*.pt"
            )
        target = step
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint {str(given)!r} does not exist")
    state = read_checkpoint(target)
    trainer = isinstance(state, Mapping) and {"config", "objective"} <= set(state)  # run config + objective
    return CheckpointSource("trainer" if trainer else "official", target, given, state)
