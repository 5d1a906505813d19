"""Atomic checkpoint writes: a crash or a kill mid-write leaves the previous checkpoint loadable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mplug_fast.train import checkpointer as ck


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((64, 64), float(step))}


def test_exception_during_write_keeps_previous(tmp_path, monkeypatch):
    ck.atomic_save(_state(1), ck.checkpoint_path(tmp_path, 1))
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save(_state(2), ck.checkpoint_path(tmp_path, 2))
    monkeypatch.undo()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was removed
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["step"] == 1


def test_kill_during_write_keeps_previous(tmp_path):
    """A child process writes step 1, then is SIGKILLed in the middle of writing step 2."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from mplug_fast.train import checkpointer as ck
        d = {str(tmp_path)!r}
        ck.atomic_save({{"step": 1, "w": torch.ones(256, 256)}}, ck.checkpoint_path(d, 1))
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"PK" + b"x" * 100000)  # some bytes of the new file, then the process dies
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        ck.atomic_save({{"step": 2, "w": torch.zeros(256, 256)}}, ck.checkpoint_path(d, 2))
        """
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert len(list(tmp_path.glob(".step-00000002.pt.tmp"))) == 1  # the half-written temp file
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    state = ck.load_checkpoint(ck.resolve_resume("latest", tmp_path))
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(256, 256))
    ck.atomic_save(_state(3), ck.checkpoint_path(tmp_path, 3))
    ck.prune_checkpoints(tmp_path, keep_last=5)
    assert not list(tmp_path.glob(".*.tmp"))  # the next save cleans it up


def test_keep_last_and_resume_resolution(tmp_path):
    for step in (1, 2, 3, 10):
        ck.atomic_save(_state(step), ck.checkpoint_path(tmp_path, step))
    removed = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-00000001.pt", "step-00000002.pt"]
    assert ck.resolve_resume("latest", tmp_path).name == "step-00000010.pt"
    assert ck.resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "step-00000010.pt"
    assert ck.resolve_resume(None, tmp_path) is None
    assert ck.resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.resolve_resume("latest", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        ck.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot be read"):
        ck.load_checkpoint(tmp_path / "garbage.pt")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ck.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ck.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
