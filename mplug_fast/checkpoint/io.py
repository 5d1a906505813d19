"""Reading checkpoint files safely, and our own format (config JSON + safetensors).

save_pretrained(model, "out/")      -> out/config.json, out/model.safetensors
model = load_pretrained("out/", new_model)   -> the same weights in new_model(config) (by task name:
                                               mplug_fast.from_pretrained("out/"))
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mplug_fast.config import MPlugConfig
from mplug_fast.io import UnreadableFileError, atomic_path, atomic_write_json, torch_load
from mplug_fast.modeling import MPlug

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(UnreadableFileError):
    """A checkpoint file that cannot be read or does not fit the model; the message says why."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A `.pth`/`.pt`/`.bin` file (`mplug_fast.io.torch_load`: weights only, never code) or a
    `.safetensors` file, on the CPU, with one-line errors naming the file."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from exc
    try:
        return torch_load(path, mmap=zipfile.is_zipfile(path))
    except UnreadableFileError as exc:
        raise CheckpointError(str(exc)) from exc


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """The state dict inside a training checkpoint (`model` / `module` / `state_dict`), `module.` stripped."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"expected a state dict (or a dict with 'model'/'module'), got {type(obj).__name__}"
        )
    non_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise CheckpointError(f"the state dict has non-tensor entries: {non_tensors[:8]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def save_pretrained(model: MPlug, directory: str | os.PathLike) -> Path:
    """Write `config.json` (task + config) and `model.safetensors`; each file is replaced atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "task": model.task, "config": model.config.to_dict()}
    atomic_write_json(directory / CONFIG_NAME, meta, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"task": model.task})
    logger.info("saved %s model (%d tensors) to %s", model.task, len(state), directory)
    return directory


ModelFactory = Callable[[MPlugConfig], MPlug]
"""config -> a model with its task label and torch's default init (the task layer's ``Task.new_model``)."""


def read_pretrained_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a ``save_pretrained`` directory: {"format_version", "task", "config"}."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a directory written by save_pretrained")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not {"task", "config"} <= set(meta):
        raise CheckpointError(f"{config_path} is not a save_pretrained config (needs 'task' and 'config')")
    return meta


def load_pretrained(
    directory: str | os.PathLike,
    new_model: ModelFactory,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> MPlug:
    """Load a model written by `save_pretrained` into ``new_model(config)``. A model of another task than
    the saved one loads the components it shares (e.g. a pretrained model as a VQA model) and reports the
    rest."""
    directory = Path(directory)
    meta = read_pretrained_meta(directory)
    config = MPlugConfig.from_dict(meta["config"], where=str(directory / CONFIG_NAME))
    state = read_checkpoint(directory / WEIGHTS_NAME)
    with torch.device("meta"):
        model = new_model(config)
    task = model.task
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = set(shapes)
    fresh = tuple(getattr(model, "new_head_prefixes", ()))  # heads no other task has (the classifiers)
    new = sorted(k for k in expected - set(state) if fresh and k.startswith(fresh))
    if task != meta["task"]:  # another task's head of another shape (a VE model as NLVR): the whole head
        for prefix in fresh:  # is new, not a mix of saved and fresh tensors
            keys = sorted(k for k in expected if k.startswith(prefix))
            if any(k in state and tuple(state[k].shape) != shapes[k] for k in keys):
                logger.info(
                    "the saved %r model's %s* has another shape in %r: the whole head is reinitialised",
                    meta["task"],
                    prefix,
                    task,
                )
                new = sorted(set(new) | set(keys))
    missing = sorted(expected - set(state) - set(new))
    if missing:
        raise CheckpointError(
            f"{directory} lacks {len(missing)} tensors the {task!r} model needs: {missing[:8]}"
        )
    extra = sorted(set(state) - expected)
    if extra:
        logger.info(
            "%d tensors of the saved %r model are not used by %r (e.g. %s)",
            len(extra),
            meta["task"],
            task,
            extra[:3],
        )
    shared = {k: state[k] for k in expected if k not in new}
    if new:
        logger.info(
            "%d tensors of the %r model are new (not in the saved %r model), freshly initialised: %s",
            len(new),
            task,
            meta["task"],
            new,
        )
        model = model.to_empty(device="cpu")
        model.init_weights()
        model.load_state_dict(shared, strict=False)  # every other key was checked above
    else:
        model.load_state_dict(shared, assign=True, strict=True)
    return model.to(device=device, dtype=dtype)
