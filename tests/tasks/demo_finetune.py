"""A downstream task's finetune from scratch on the demo's synthetic world (the ``demo/<task>`` configs),
evaluated on held-out scenes against the task's model-free baseline: the learning-margin tests
(``test_*_margin.py``, one file per task so that ``make test``'s two workers can share them).

VQA's learnability is asserted in ``tests/train/test_learnability.py`` (colour read from the image, with a
shuffled-image control); SCST's gain over its CE start in ``tests/tasks/test_scst.py``. Grounding needs ~1200
steps (3+ minutes) for a small margin, so its check is the slow full-demo test in ``tests/test_demo.py``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mplug_fast.checkpoint import save_pretrained
from mplug_fast.data import Tokenizer
from mplug_fast.tasks import get_task
from mplug_fast.train.config import load_config
from mplug_fast.train.trainer import Trainer

DEMO = Path(__file__).resolve().parents[2] / "mplug_fast" / "configs" / "demo"
EVAL_SCENES = 100


def finetune_and_evaluate(
    task: str, tmp_path: Path, overrides: list[str], save_to: Path | None = None, **eval_options: Any
) -> tuple[dict[str, Any], float]:
    """Trains the ``demo/<task>`` config from scratch (unless ``overrides`` set ``model.init_from``) with
    ``overrides``; returns (evaluation result on the first EVAL_SCENES held-out scenes, baseline value);
    ``save_to``: also ``save_pretrained`` the model there."""
    cfg = load_config(
        DEMO / f"{task}.yaml",
        [
            f"output_dir={tmp_path}",
            "device=cpu",
            "model.init_from=null",
            "logging.progress=false",
            "logging.plots=false",
            "checkpoint.every_steps=100000",
            *overrides,
        ],
    )
    spec = get_task(task)
    trainer = Trainer.from_config(cfg)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    world = {**asdict(cfg.data.synthetic), "eval_scenes": EVAL_SCENES}
    test = spec.synthetic_dataset("test", **world)
    options = {**spec.eval_options, **eval_options}
    result = spec.evaluate(trainer.objective.model, test, Tokenizer(), batch_size=50, **options)
    base = spec.baseline(spec.synthetic_dataset("train", **world), test)
    print(f"\n{task}: {spec.metric} {result[spec.metric]:.3f} vs baseline {base.value:.3f} ({seconds:.0f} s)")
    if save_to is not None:
        save_pretrained(trainer.objective.model, save_to)
    return result, base.value
