"""SIGKILL at chosen moments of a pretraining run (during a training step, during a checkpoint write, during
a resume), then ``--resume``: the final weights equal an uninterrupted run's bitwise.

Each killed run is a fork of this process (no interpreter start-up) running ``mplug-fast train`` in-process
that sends itself SIGKILL at a fixed point of the code, so where the kill lands never depends on timing."""

from __future__ import annotations

import json
import logging
import os
import signal
import traceback
from collections.abc import Callable

import pytest
import torch

from mplug_fast import io
from mplug_fast.cli import main
from mplug_fast.train.checkpointer import list_checkpoints, load_checkpoint
from mplug_fast.train.precision import Precision
from tests.train.helpers import state_equal
from tests.train.test_cli import _args

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _die(*_, **__) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _killed(args: list[str], install_kill: Callable[[], None]) -> None:
    """Runs ``main(args)`` in a forked child that installs its kill point first; asserts it died by it."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            install_kill()
            main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)  # reached only when the kill point was not
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _kill_at_update(n: int) -> Callable[[], None]:
    """Kill point: the n-th optimizer update (after its forward and backward, before the weights move)."""

    def install() -> None:
        real, calls = Precision.step, []

        def step(self, optimizer):
            calls.append(1)
            if len(calls) == n:
                _die()
            return real(self, optimizer)

        Precision.step = step

    return install


def _kill_in_checkpoint_write() -> None:
    """Kill point: inside torch.save of a checkpoint, after some of its bytes reached the temp file."""

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK" + b"x" * 10000)
        f.flush()
        _die()

    torch.save = dying_save


def _kill_in_metrics_rewrite() -> None:
    """Kill point: the resume's rewrite of metrics.jsonl, its temp file written, before the rename."""
    real = io.os.replace

    def replace(src, dst):
        if str(dst).endswith("metrics.jsonl"):
            _die()
        return real(src, dst)

    io.os.replace = replace


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, caplog, capsys):
    def args(folder) -> list[str]:  # 4 steps, checkpoint every 2, dropout on (the RNG state matters)
        cheaper = ["--set", "logging.plots=false", "--set", "objective.options.weights={prefix_lm: 0}"]
        return [*_args(folder, 4), "--no-eval", *cheaper]  # ITC (queue), ITM (hard negatives), MLM

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(args(ref)) == 0

    _killed(args(run), _kill_at_update(4))  # during step 4 of the first run
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert [r["step"] for r in _records(run)] == [1, 2, 3]

    _killed([*args(run), "--resume"], _kill_in_checkpoint_write)  # writing step 4's checkpoint
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert (run / "checkpoints" / ".step-00000004.pt.tmp").is_file()
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4]  # truncated to step 2, then steps 3-4

    _killed([*args(run), "--resume"], _kill_in_metrics_rewrite)  # inside the next resume
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4]  # the old file, whole

    with caplog.at_level(logging.INFO, logger="mplug_fast.train.trainer"):
        assert main([*args(run), "--resume"]) == 0
    assert "step-00000002.pt at step 2" in caplog.text
    assert "finished at step 4: 2 steps in" in caplog.text  # the resumed run's own steps and time
    summary = json.loads((run / "summary.json").read_text())["train"]
    assert summary["step"] == 4 and summary["steps"] == 2

    final = [load_checkpoint(folder / "checkpoints" / "step-00000004.pt") for folder in (ref, run)]
    for key in ("objective", "optimizer", "rng", "data"):
        assert state_equal(final[0][key], final[1][key]) == [], key
    assert [r["loss"] for r in _records(run)] == [r["loss"] for r in _records(ref)]
    assert not list((run / "checkpoints").glob(".*.tmp")) and (run / "model" / "config.json").is_file()

    capsys.readouterr()
    assert main(args(run)) == 2  # a new run (no --resume) in this run's folder
    (error,) = capsys.readouterr().err.splitlines()
    assert str(run) in error and "--resume" in error and "--overwrite" in error
