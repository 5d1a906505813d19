"""The training loop: exact resume, gradient accumulation, non-finite skipping, Ctrl-C, outputs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from mplug_fast.train.checkpointer import list_checkpoints, load_checkpoint
from mplug_fast.train.trainer import NonFiniteLossError, Trainer
from tests.train.helpers import collate, dataset, make_objective, run_config, state_equal


def _trainer(cfg, **objective_kwargs) -> Trainer:
    return Trainer(cfg, objective=make_objective(**objective_kwargs), dataset=dataset(), collate_fn=collate())


def test_resume_is_bitwise_equal(tmp_path):
    """4 steps, stop, resume, 4 more == 8 steps straight: weights, optimizer, buffers, RNG, data position.

    24 samples / batch 4 = 6 steps per epoch, so the run crosses an epoch boundary after the resume; dropout
    is on, so the restored torch RNG matters."""
    full_cfg = run_config(tmp_path / "full", schedule={"max_steps": 8, "warmup_steps": 2})
    full = _trainer(full_cfg, dropout=0.1)
    full.fit()
    part_cfg = run_config(tmp_path / "part", schedule={"max_steps": 8, "warmup_steps": 2})
    first = _trainer(part_cfg, dropout=0.1)
    first.fit(max_steps=4)
    assert [s for s, _ in list_checkpoints(tmp_path / "part" / "checkpoints")] == [4]
    second = _trainer(part_cfg, dropout=0.1, seed=123)  # different init: everything must come from the file
    summary = second.fit(resume="latest")
    assert summary["resumed_from"].endswith("step-00000004.pt") and summary["step"] == 8

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "step-00000008.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "step-00000008.pt")
    for key in ("objective", "optimizer", "scheduler", "rng", "data", "nonfinite"):
        assert state_equal(a[key], b[key]) == [], key
    assert a["objective"]["updates"].item() == 8 and a["data"]["epoch"] == 1
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("full", "part")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_resume_from_explicit_path_and_missing(tmp_path):
    cfg = run_config(tmp_path, schedule={"max_steps": 2})
    t = _trainer(cfg)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        t.fit(resume="latest")
    t.fit()
    ckpt = tmp_path / "checkpoints" / "step-00000002.pt"
    t2 = _trainer(run_config(tmp_path, schedule={"max_steps": 3}))
    assert t2.fit(resume=str(ckpt))["step"] == 3


def test_grad_accumulation_equals_big_batch(tmp_path):
    big = _trainer(run_config(tmp_path / "big", data={"batch_size": 8, "shuffle": False}))
    big.fit(max_steps=2)
    small = _trainer(
        run_config(tmp_path / "small", data={"batch_size": 4, "shuffle": False}, optim={"accum_steps": 2})
    )
    small.fit(max_steps=2)
    for (name, p), q in zip(big.objective.named_parameters(), small.objective.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    init = make_objective().state_dict()
    moved = [n for n, p in big.objective.named_parameters() if not torch.equal(p, init[n])]
    assert moved  # the runs did train


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    cfg = run_config(tmp_path, schedule={"max_steps": 4}, max_nonfinite=3)
    t = _trainer(cfg, nan_at={1, 2})
    before = {}

    def snapshot():
        before.update({n: p.detach().clone() for n, p in t.objective.named_parameters()})

    snapshot()
    t.train_step()  # call 0: finite
    changed = any(not torch.equal(p, before[n]) for n, p in t.objective.named_parameters())
    snapshot()
    m1, m2 = t.train_step(), t.train_step()  # calls 1, 2: NaN -> skipped
    assert changed and m1["skipped"] == 1.0 and m2["skipped"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in t.objective.named_parameters())
    assert t.nonfinite_total == 2 and t.nonfinite_in_row == 2 and t.step == 3
    assert t.objective.updates.item() == 1  # the after-step hook ran only for the real update
    t.train_step()
    assert t.nonfinite_in_row == 0 and t.objective.updates.item() == 2


def test_nonfinite_in_a_row_stops_with_checkpoint(tmp_path):
    cfg = run_config(tmp_path, schedule={"max_steps": 10}, max_nonfinite=3)
    t = _trainer(cfg, nan_at={2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        t.fit()
    ((step, path),) = list_checkpoints(tmp_path / "checkpoints")
    assert step == 5 and load_checkpoint(path)["nonfinite"] == {"total": 3, "in_row": 3}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 1, 1]  # the stopping step itself is not logged


def test_ctrl_c_saves_and_exits(tmp_path, default_sigint):
    cfg = run_config(tmp_path, schedule={"max_steps": 10})
    t = _trainer(cfg)
    forward = t.objective.forward

    def interrupting(batch):
        if t.objective.calls == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(batch)

    t.objective.forward = interrupting
    summary = t.fit()
    assert summary["status"] == "interrupted" and summary["step"] == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_outputs_metrics_plots_keep_last(tmp_path):
    cfg = run_config(
        tmp_path,
        schedule={"max_steps": 5},
        checkpoint={"every_steps": 1, "keep_last": 2},
        logging={"every_steps": 2, "plots": True},
    )
    summary = _trainer(cfg).fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 5]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert {"loss", "loss_vqa", "grad_norm", "samples_per_s", "lr/visual/decay", "lr/rest/no_decay"} <= set(
        records[0]
    )
    assert records[0]["lr/visual/decay"] == pytest.approx(records[0]["lr/rest/decay"] / 2)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000 and (tmp_path / "config.yaml").is_file()
    assert summary["steps_per_s"] > 0 and summary["first"]["step"] == 2


def test_grad_checkpointing_matches(tmp_path):
    a = _trainer(run_config(tmp_path / "a"))
    b = _trainer(run_config(tmp_path / "b", precision={"grad_checkpointing": True}))
    a.fit(max_steps=2)
    b.fit(max_steps=2)
    for (name, p), q in zip(a.objective.named_parameters(), b.objective.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert "forward" in b.objective.model.text_encoder.layers[0].__dict__


def test_bf16_autocast_runs(tmp_path):
    t = _trainer(run_config(tmp_path, precision={"dtype": "bf16"}))
    m = t.train_step()
    assert m["skipped"] == 0.0 and torch.isfinite(torch.tensor(m["loss"]))
