"""Training checkpoints: atomic writes, keep-last-N, RNG capture, resume; the files of a run folder.

A checkpoint is one ``torch.save`` file ``<dir>/step-<00000123>.pt`` holding a dict:

    step, objective (model + objective state: momentum copies, queues), optimizer, scheduler, precision
    (GradScaler), rng (python, numpy, torch, cuda; one entry per rank), data (epoch, offset), extra

Writes are atomic (`mplug_fast.io`): a kill mid-write leaves the previous checkpoints intact and at worst a
stray ``.step-<n>.pt.tmp`` (ignored, removed by the next save). Pruning runs once the new file is durable and
never removes it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mplug_fast.checkpoint.resolve import newest_step_file, step_files
from mplug_fast.io import atomic_torch_save, torch_load

# what a run writes in its folder: the trainer's files, the CLI's model and summaries (`clear_run_folder`)
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss_curves.png", "metrics.json", "summary.json")
RUN_FOLDERS = ("checkpoints", "tensorboard", "model")


class RunFolderError(ValueError):
    """A new run was started in a folder that holds another run."""


def clear_run_folder(output_dir: str | Path) -> None:
    """Removes a run's own files (`RUN_FILES`, `RUN_FOLDERS`) from ``output_dir``; other files stay."""
    for name in RUN_FILES:
        (Path(output_dir) / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


list_checkpoints = step_files  # (step, path) of the finished checkpoints in a folder, oldest first
latest_checkpoint = newest_step_file  # the newest checkpoint in a folder by step (None when it has none)
atomic_save = atomic_torch_save  # torch.save(obj, path) atomically, parent folders created (mplug_fast.io)


def prune_checkpoints(directory: str | Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Deletes all but ``keep`` (the checkpoint just saved) and the newest others by step, ``keep_last`` in
    all, and any stray temp files; returns them."""
    directory = Path(directory)
    removed = []
    others = [p for _, p in list_checkpoints(directory) if keep is None or p != Path(keep)]
    for p in others[: max(len(others) - keep_last + (keep is not None), 0)] if keep_last > 0 else []:
        p.unlink(missing_ok=True)
        removed.append(p)
    for p in directory.glob(".step-*.pt.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and every CUDA device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch_load(path)
    except Exception as e:
        raise RuntimeError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from e


def resolve_resume(resume: str | None, directory: str | Path) -> Path | None:
    """``--resume`` -> a checkpoint path: None (no resume), "latest"/"auto" (the newest in ``directory``, None
    when there is none for "auto", an error for "latest"), or a file / directory path."""
    if resume is None:
        return None
    p = Path(directory if resume in ("latest", "auto") else resume)
    if resume in ("latest", "auto") or p.is_dir():
        found = latest_checkpoint(p)
        if found is None and resume != "auto":
            where = f"in {str(directory)!r}" if resume == "latest" else "in that directory"
            raise FileNotFoundError(f"--resume {resume}: no checkpoint (step-*.pt) {where}")
        return found
    if not p.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return p


class CheckpointManager:
    """Owns a run's ``checkpoints/`` folder: where step files go, how many are kept, what a resume reads.

    Args:
        directory: the folder of ``step-*.pt`` files.
        keep_last: the newest N checkpoints kept after each save (0: keep all).
        every_steps: save every N optimizer steps (0: only at the end and on a stop).
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, every_steps: int = 0):
        self.directory, self.keep_last, self.every_steps = Path(directory), keep_last, every_steps

    def due(self, step: int, max_steps: int) -> bool:
        """Whether the interval asks for a checkpoint after ``step`` (the final one is saved by the loop)."""
        return bool(self.every_steps) and step % self.every_steps == 0 and step < max_steps

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Writes ``state`` as ``step-<step>.pt`` atomically, then (once it is durable) prunes to it and the
        newest ``keep_last - 1`` others by step."""
        path = atomic_save(state, checkpoint_path(self.directory, step))
        prune_checkpoints(self.directory, self.keep_last, keep=path)
        return path
