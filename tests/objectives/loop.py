"""The hand-written training loop of the objective learning tests: AdamW, a 12-step linear warm-up, gradient
clipping, the objective's after-step hook; one loss recorded per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def train_steps(
    objective: nn.Module,
    next_batch: Callable[[], dict[str, Any]],
    steps: int,
    *,
    lr: float,
    weight_decay: float,
    clip: float,
    record: str,
) -> list[float]:
    """Runs `steps` optimiser steps on batches from `next_batch()`; returns ``out[record]`` of each step."""
    optimizer = torch.optim.AdamW(
        [p for p in objective.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 12))
    losses = []
    objective.train()
    for _step in range(steps):
        out = objective(next_batch())
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), clip)
        optimizer.step()
        warmup.step()
        objective.after_optimizer_step()
        losses.append(float(out[record]))
    return losses
