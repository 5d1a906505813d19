"""`Objective`: what the trainer trains. An `nn.Module` holding its model, with

    forward(batch) -> {"loss": scalar to back-propagate, <part>: detached scalars to log, ...}
    after_optimizer_step()   # called once after every optimizer step that was applied (momentum EMA)
    hold_updates(); apply_updates(keep)   # the trainer: feature-queue writes wait until a step is finite

The trainer knows nothing else about it: no task names, no attribute probing.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mplug_fast.objectives.itc import FeatureQueue


class Objective(nn.Module, abc.ABC):
    """Base class of every training objective (see the module docstring)."""

    @abc.abstractmethod
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch -> {"loss": Tensor [], <part>: Tensor [] (detached), ...}."""

    def after_optimizer_step(self) -> None:
        """Hook after each applied optimizer step (default: nothing)."""

    def hold_updates(self) -> None:
        """From now on the forward's feature-queue writes (ITC) wait for `apply_updates`."""
        for module in self.modules():
            if isinstance(module, FeatureQueue):
                module.hold = True

    def apply_updates(self, keep: bool) -> None:
        """Writes (``keep``: the step was applied) or drops the queue writes held since the last call."""
        for module in self.modules():
            if isinstance(module, FeatureQueue):
                module.flush(keep)
