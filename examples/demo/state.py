"""A stage's ``stage.json`` (hashes, status, time, steps) and its run folder: what is done, what resumes,
what starts over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mplug_fast.io import atomic_write_json
from mplug_fast.tasks import get_task

from .settings import DemoError

STATE_FILE = "stage.json"  # per stage: hashes, status, time and steps


def read_state(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(stage_dir: Path, state: dict[str, Any]) -> None:

    atomic_write_json(stage_dir / STATE_FILE, state)


def stage_done(stage_dir: Path, state: dict[str, Any] | None, t_hash: str, e_hash: str, stage: str) -> bool:
    """True when the stage finished with these hashes and its outputs are still there."""
    if not state or state.get("status") != "finished":
        return False
    if state.get("train_hash") != t_hash or state.get("eval_hash") != e_hash:
        return False
    outputs = [stage_dir / "model" / "config.json"] + (
        [stage_dir / "metrics.json"] if get_task(stage).evaluable else []
    )
    return all(p.is_file() for p in outputs)


def prepare_stage_dir(stage_dir: Path, state: dict[str, Any] | None, t_hash: str) -> dict[str, Any]:
    """The state to continue from: the stored one when its training hash matches, else a new one (the old
    stage directory is deleted). A non-empty directory the demo did not write is an error."""
    if state is not None and state.get("train_hash") == t_hash:
        return state
    if stage_dir.exists():
        if state is None and any(stage_dir.iterdir()):
            raise DemoError(
                f"{stage_dir} exists and was not written by the demo; remove it or use another --out"
            )
        shutil.rmtree(stage_dir)
    return {"train_hash": t_hash, "status": "new", "steps": 0, "train_s": 0.0, "eval_s": 0.0, "wall_s": 0.0}


def fresh(out: Path) -> None:
    """Deletes the demo's outputs under ``out`` (stage directories with a stage.json, report, gallery)."""
    for state_file in sorted(out.glob(f"*/{STATE_FILE}")):
        shutil.rmtree(state_file.parent)
    for name in ("report.md", "summary.json", "gallery"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
