"""The metrics sink of a run: ``metrics.jsonl`` (one record per logged step), TensorBoard scalars when the
package is installed, and the ``loss_curves.png`` plot (matplotlib, the optional ``plot`` extra: without it
the plot alone is skipped, said once in the log)."""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@functools.cache
def _pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None (logged once) when matplotlib is not installed."""
    try:
        import matplotlib  # optional dependency (the plot extra): deferred
    except ImportError:
        logger.warning(
            "matplotlib is not installed: no loss_curves.png (pip install 'mplug_fast[plot]'; "
            "metrics.jsonl has every logged value)"
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class MetricsLog:
    """Appends step records to ``<output_dir>/metrics.jsonl`` (and TensorBoard under ``tensorboard/``).

    Args:
        output_dir: the run folder.
        tensorboard: also write TensorBoard scalars (skipped when ``torch.utils.tensorboard`` is missing).
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = False):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._tb = None

    def open(self) -> None:
        """Creates the run folder and, when asked for and installed, the TensorBoard writer."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.tensorboard and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency: deferred
            except ImportError:
                return
            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """One record (``step`` and scalars) as a JSON line and as TensorBoard scalars."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drops the records past ``step`` (a resume continues from there)."""
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def plot(self) -> Path | None:
        """``loss_curves.png``: one panel per logged loss (``loss`` and its parts) against the step; None
        when nothing is logged yet or matplotlib is not installed."""
        records = self.read()
        keys = [k for k in (records[0] if records else {}) if k == "loss" or k.startswith("loss")]
        plt = _pyplot() if keys else None
        if plt is None:
            return None
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts))
            ax.set_title(key)
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.tight_layout()
        path = self.output_dir / "loss_curves.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
