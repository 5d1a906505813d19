"""A run folder belongs to one run; resumes truncate the metrics; pruning keeps the checkpoint just saved;
run-config ranges are checked where the config is read; the warm-up is clipped to a shorter run."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mplug_fast.cli import main
from mplug_fast.config import ConfigError
from mplug_fast.train.checkpointer import (
    CheckpointManager,
    RunFolderError,
    atomic_save,
    checkpoint_path,
    list_checkpoints,
)
from mplug_fast.train.config import load_config
from mplug_fast.train.trainer import Trainer
from tests.train.helpers import collate, dataset, make_objective, run_config


def _trainer(cfg) -> Trainer:
    return Trainer(cfg, objective=make_objective(), dataset=dataset(), collate_fn=collate())


def _steps(folder) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_new_run_refuses_another_runs_folder_and_overwrite_replaces_it(tmp_path):
    _trainer(run_config(tmp_path, schedule={"max_steps": 2})).fit()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError) as error:
        _trainer(run_config(tmp_path, schedule={"max_steps": 1})).fit()
    message = str(error.value)
    assert str(tmp_path) in message and "--resume" in message and "--overwrite" in message
    assert "\n" not in message and _steps(tmp_path) == [1, 2]  # nothing was touched

    _trainer(run_config(tmp_path, schedule={"max_steps": 1}, overwrite=True)).fit()
    assert _steps(tmp_path) == [1] and [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files are removed


def test_resume_truncates_metrics_and_keeps_the_resumed_checkpoint(tmp_path, caplog):
    """A crash after step 3 was logged but before its checkpoint: the resume from step 2 rewrites
    metrics.jsonl to steps 1-2 first, so the steps never run backwards."""
    cfg = run_config(tmp_path, schedule={"max_steps": 4}, checkpoint={"every_steps": 2, "keep_last": 2})
    _trainer(cfg).fit(max_steps=3)
    (tmp_path / "checkpoints" / "step-00000003.pt").unlink()  # "killed" before step 3's checkpoint
    assert _steps(tmp_path) == [1, 2, 3]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a torn last line (power loss) is skipped
    with caplog.at_level(logging.INFO, logger="mplug_fast.train.trainer"):
        summary = _trainer(cfg).fit(resume="latest")
    assert summary["steps"] == 2 and _steps(tmp_path) == [1, 2, 3, 4]
    assert "step-00000002.pt at step 2" in caplog.text and "finished at step 4: 2 steps in" in caplog.text
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4]


def test_prune_never_deletes_the_checkpoint_just_saved(tmp_path):
    for step in (5, 6, 7):  # checkpoints past the step a run was resumed from
        atomic_save({"step": step}, checkpoint_path(tmp_path, step))
    manager = CheckpointManager(tmp_path, keep_last=2)
    saved = manager.save({"step": 3, "w": torch.ones(2)}, 3)
    assert saved.is_file() and [s for s, _ in list_checkpoints(tmp_path)] == [3, 7]


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("optim.grad_clip=-1", "optim.grad_clip=-1", "> 0 or null"),
        ("optim.lr=-0.1", "optim.lr=-0.1", ">= 0"),
        ("optim.lr_visual=-1e-5", "optim.lr_visual=-1e-05", ">= 0 or null"),
        ("optim.weight_decay=-0.02", "optim.weight_decay=-0.02", ">= 0"),
        ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]", "two values in [0, 1)"),
        ("data.batch_size=0", "data.batch_size=0", ">= 1"),
        ("schedule.max_steps=0", "schedule.max_steps=0", ">= 1"),
        ("schedule.warmup_steps=-5", "schedule.warmup_steps=-5", ">= 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0", ">= 1"),
    ],
)
def test_out_of_range_values_name_key_value_range_and_file(override, key, valid):
    with pytest.raises(ConfigError) as error:
        load_config("caption_tiny_synthetic", [override])
    message = str(error.value)
    assert "caption_tiny_synthetic.yaml" in message and key in message and valid in message, message


def test_short_run_of_a_shipped_config_clips_the_warmup(tmp_path, capsys, caplog):
    # the shipped header's `--set schedule.max_steps=20` (warm-up 100 steps) is accepted
    args = ["train", "--task", "caption", "--config", "caption_tiny_synthetic", "--print-config"]
    assert main([*args, "--set", "schedule.max_steps=20"]) == 0
    assert "max_steps: 20" in capsys.readouterr().out
    cfg = run_config(tmp_path, schedule={"max_steps": 2, "warmup_steps": 100})
    with caplog.at_level(logging.WARNING, logger="mplug_fast.train.trainer"):
        trainer = _trainer(cfg)
    assert "warmup_steps=100: clipped to the run's 2 steps" in caplog.text
    trainer.fit()
    lrs = [
        json.loads(line)["lr/rest/decay"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert lrs[0] == pytest.approx(1e-3 / 2)  # update 0 of a 2-step warm-up (not 1 % of a 100-step one)
