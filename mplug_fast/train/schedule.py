"""Per-step learning rate: linear warm-up, then cosine decay (each parameter group from its own base lr).

    step < W:        lr = a + (base - a) * (step + 1) / W      a = warmup_lr, or base * warmup_start
    W <= step <= T:  lr = m + (base - m) * (1 + cos(pi * (step - W) / (T - W))) / 2,   m = min(min_lr, base)
    step > T:        lr = m

``step`` counts optimizer steps from 0 (the lr used by update number ``step + 1``); the first update
already moves (base / W) and update W uses the full base lr. The official schedule (fidelity §9) warms up
per 100 iterations and decays per epoch; this one moves every step, which is smoother and independent of
the epoch length. The state is the step counter alone, so a resumed run gets exactly the same
learning rates.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(
    step: int,
    base_lr: float,
    warmup_steps: int,
    max_steps: int,
    min_lr: float = 0.0,
    warmup_start: float = 0.0,
    warmup_lr: float | None = None,
) -> float:
    """The learning rate of update ``step`` (0-based) for a group whose base lr is ``base_lr``; the warm-up
    starts at ``warmup_lr`` (absolute, the same for every group, as the official ``warmup_lr``: a decrease
    for a group whose lr is below it) or, when None, at ``warmup_start`` x ``base_lr``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    floor = min(min_lr, base_lr)
    if step < warmup_steps:
        if warmup_lr is None:
            return base_lr * (warmup_start + (1.0 - warmup_start) * (step + 1) / warmup_steps)
        return warmup_lr + (base_lr - warmup_lr) * (step + 1) / warmup_steps
    if step >= max_steps or max_steps == warmup_steps:
        return floor if step >= max_steps else base_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets ``group["lr"]`` of every optimizer group for the coming update; call ``step()`` after each update.

    The base lr of each group is taken from the optimizer at construction (stored as ``group["base_lr"]``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        max_steps: int,
        min_lr: float = 0.0,
        warmup_start: float = 0.0,
        warmup_lr: float | None = None,
    ):
        if not 0 <= warmup_steps <= max_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= max_steps ({max_steps})")
        if not 0.0 <= warmup_start <= 1.0:
            raise ValueError(f"warmup_start must be in [0, 1], got {warmup_start}")
        self.optimizer = optimizer
        # the arguments of lr_at after the group's base lr
        self.shape = (warmup_steps, max_steps, min_lr, warmup_start, warmup_lr)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.last_step = 0
        self._apply()

    def lrs(self, step: int | None = None) -> list[float]:
        """The learning rate of each group at ``step`` (default: the coming update)."""
        step = self.last_step if step is None else step
        return [lr_at(step, g["base_lr"], *self.shape) for g in self.optimizer.param_groups]

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs()):
            group["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": [g["base_lr"] for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        for group, base in zip(self.optimizer.param_groups, state["base_lrs"], strict=True):
            group["base_lr"] = base
        self._apply()
