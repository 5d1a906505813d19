"""A non-finite step leaves no trace: a NaN batch in pretraining or in a finetune task (retrieval: ITC queue,
ITM hard negatives, momentum copies) changes neither the queue nor its pointer, the momentum copies, the
weights nor the optimizer state, and the run goes on."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.objectives.itc import FeatureQueue
from mplug_fast.objectives.itm import negative_weights
from mplug_fast.train.config import from_dict
from mplug_fast.train.trainer import Trainer
from tests.train.helpers import micro_overrides, state_equal


def micro_run_config(tmp_path, task: str, **options):
    """A CPU run of ``task`` on the micro model over 16 px synthetic scenes, batch 4, a 16-slot queue."""
    return from_dict(
        {
            "output_dir": str(tmp_path),
            "device": "cpu",
            "seed": 3,
            "model": {"task": task, "preset": "micro", "overrides": micro_overrides()},
            "data": {"batch_size": 4, "synthetic": {"image_size": 16, "num_scenes": 32}},
            "objective": {"options": {"queue_size": 16, "momentum": 0.9, **options}},
            "schedule": {"max_steps": 4, "warmup_steps": 1},
            "logging": {"every_steps": 1, "progress": False, "tensorboard": False, "plots": False},
        }
    )


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_nan_batch_keeps_queue_momentum_and_optimizer(tmp_path, task):
    trainer = Trainer.from_config(micro_run_config(tmp_path, task))
    objective, forward = trainer.objective, trainer.objective.forward
    poison = {"now": False}

    def maybe_nan(batch):
        if poison["now"]:
            batch = {**batch, "images": torch.full_like(batch["images"], float("nan"))}
        return forward(batch)

    objective.forward = maybe_nan
    trainer.train_step()  # a finite step: the queue holds its momentum features
    queue = next(m for m in objective.modules() if isinstance(m, FeatureQueue))
    assert int(queue.filled) == 4 and int(queue.ptr) == 4
    before = {k: v.clone() for k, v in objective.state_dict().items() if not k.endswith("step")}
    optimizer = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}

    poison["now"] = True
    metrics = trainer.train_step()  # NaN images: NaN features, NaN ITC similarities for the ITM draw
    assert metrics["skipped"] == 1.0 and trainer.nonfinite_in_row == 1
    after = {k: v for k, v in objective.state_dict().items() if not k.endswith("step")}
    assert state_equal(before, after) == []  # weights, momentum copies, queue contents, ptr, filled
    assert state_equal(optimizer, trainer.optimizer.state_dict()["state"][0]) == []
    assert queue.pending == []

    poison["now"] = False
    metrics = trainer.train_step()
    assert metrics["skipped"] == 0.0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert int(queue.filled) == 8 and int(queue.ptr) == 8 and bool(torch.isfinite(queue.image).all())


def test_itm_negative_weights_survive_nan_similarities():
    sim = torch.tensor([[float("nan"), 1.0, float("inf")], [0.5, float("nan"), 0.2]])
    positives = torch.eye(2, 3, dtype=torch.bool)
    weights = negative_weights(sim, positives)
    assert bool(torch.isfinite(weights).all()) and weights[positives].eq(0).all()
    torch.multinomial(weights, 1)  # the draw of a step that will be skipped does not crash
