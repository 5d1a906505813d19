"""The metrics sink of a run: ``metrics.jsonl`` (one record per logged step), TensorBoard scalars when the
package is installed, and the ``loss_curves.png`` plot (matplotlib, the optional ``plot`` extra: without it
the plot alone is skipped, said once in the log).

Each record is one ``write`` of one line at the end of the file (a kill lands before or after it); a resume
rewrites the file atomically without the records past its step, and readers skip a torn last line (a power
loss), so ``metrics.jsonl`` always parses and its steps never run backwards."""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

from mplug_fast.io import atomic_path, atomic_write_text

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

    def open(self, purge_step: int | None = None) -> None:
        """Creates the run folder and, when asked for and installed, the TensorBoard writer (``purge_step``:
        a resumed run's step; TensorBoard hides the events logged past it)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.tensorboard and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency: deferred
            except ImportError:
                return
            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """One record (``step`` and scalars) as a JSON line and as TensorBoard scalars."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def read(self) -> list[dict[str, Any]]:
        """The records, oldest first (a torn last line is skipped)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Atomically drops the records past ``step`` (a resume continues from there)."""
        if self.path.is_file():
            kept = [r for r in self.read() if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

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
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        return path
