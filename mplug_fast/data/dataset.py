"""Protocols a dataset may implement for the trainer."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class EpochAware(Protocol):
    """A dataset whose items depend on the epoch (e.g. a caption drawn per epoch from an image's list):
    the trainer calls ``set_epoch(epoch)`` before each pass, and again after a resume."""

    def set_epoch(self, epoch: int) -> None: ...
