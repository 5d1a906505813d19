"""`Objective`: what the trainer trains. An `nn.Module` holding its model, with

    forward(batch) -> {"loss": scalar to back-propagate, <part>: detached scalars to log, ...}
    after_optimizer_step()   # called once after every optimizer step that was applied (momentum EMA)

The trainer knows nothing else about it: no task names, no attribute probing.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn


class Objective(nn.Module, abc.ABC):
    """Base class of every training objective (see the module docstring)."""

    @abc.abstractmethod
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch -> {"loss": Tensor [], <part>: Tensor [] (detached), ...}."""

    def after_optimizer_step(self) -> None:
        """Hook after each applied optimizer step (default: nothing)."""
