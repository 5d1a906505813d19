"""Each stage's run config (``<config-dir>/<stage>.yaml`` + the demo's overrides), the check that every
stage builds the same model, and the hashes that decide whether a stage must run again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mplug_fast.tasks import get_task
from mplug_fast.train.config import ConfigError, load_config

from .settings import DemoError, DemoSettings


def stage_config(
    stage: str,
    config_dir: Path,
    out: Path,
    *,
    quick: bool,
    settings: DemoSettings,
    overrides: list[str],
) -> Any:
    """The resolved run config of ``stage``: ``config_dir/<stage>.yaml`` + ``overrides`` (``--set``), with
    ``output_dir = out/<stage>``, ``model.task = stage``, for finetunes ``model.init_from =
    out/<upstream>/model``, and the ``--quick`` scaling."""

    path = config_dir / f"{stage}.yaml"
    if not path.is_file():
        raise DemoError(
            f"stage config {path} does not exist (expected one per stage: {list(settings.stages)})"
        )
    sets = [*overrides, f"output_dir={out / stage}", f"model.task={stage}"]
    start = settings.upstream(stage)
    if start is not None:
        sets.append(f"model.init_from={out / start / 'model'}")
    try:
        config = load_config(path, sets)
        if quick:
            d, s = settings.quick_step_divisor, config.schedule
            max_steps, eval_scenes = max(1, s.max_steps // d), config.data.synthetic.eval_scenes
            sets += [
                f"schedule.max_steps={max_steps}",
                f"schedule.warmup_steps={min(s.warmup_steps // d, max_steps)}",
                f"checkpoint.every_steps={config.checkpoint.every_steps // d}",
                f"logging.every_steps={max(1, min(config.logging.every_steps, max_steps // 5))}",
                f"data.synthetic.eval_scenes={min(eval_scenes, settings.quick_eval_scenes)}",
            ]
            config = load_config(path, sets)
    except (ConfigError, FileNotFoundError) as e:
        raise DemoError(f"{path}: {e}") from e
    if config.data.source != "synthetic":
        raise DemoError(
            f"{path}: the demo runs on the synthetic world; data.source is {config.data.source!r}"
        )
    return config


def model_signature(config: Any) -> dict[str, Any]:
    """What decides the model's architecture: preset, overrides and the input resolution."""
    overrides = dict(config.model.overrides)
    overrides.setdefault("vision.image_size", config.data.synthetic.image_size)
    return {"preset": config.model.preset, "overrides": overrides}


def check_same_model(configs: dict[str, Any], config_dir: Path) -> None:
    """DemoError naming the stage when a stage would build another model than the first stage."""
    first = next(iter(configs))
    ref = model_signature(configs[first])
    for stage, config in configs.items():
        sig = model_signature(config)
        if sig != ref:
            diff = sorted(
                k
                for k in set(sig["overrides"]) | set(ref["overrides"])
                if sig["overrides"].get(k) != ref["overrides"].get(k)
            )
            what = diff if sig["preset"] == ref["preset"] else ["model.preset", *diff]
            raise DemoError(
                f"{config_dir / (stage + '.yaml')} builds another model than {first}.yaml (differs in "
                f"{what}); every stage must use the same model.preset, model.overrides and "
                f"data.synthetic.image_size"
            )


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_hash(config: Any, upstream: str | None) -> str:
    """Hash of everything that changes a stage's training: the run config without output paths, logging and
    checkpoint intervals, and the hash of the stage it starts from."""
    d = config.to_dict()
    d.pop("output_dir", None)
    d["model"].pop("init_from", None)
    d.pop("logging", None)  # progress bars, plots and checkpoint intervals do not change the weights
    d.pop("checkpoint", None)
    d.pop("eval", None)  # a run config's evaluation section (where it has one) is part of eval_settings
    return digest({"config": d, "upstream": upstream})


def eval_settings(stage: str, config: Any, settings: DemoSettings) -> dict[str, Any]:
    """A finetune stage's evaluation: batch size and evaluate options (weakest first: the task's defaults, the
    run config's ``eval`` section, demo.yaml), and the world it runs on."""

    if not get_task(stage).evaluable:
        return {}
    options = {**get_task(stage).eval_options, **config.eval.options, **settings.eval_options.get(stage, {})}
    batch_size = settings.eval_batch_size or config.eval.batch_size or 32
    return {"batch_size": batch_size, "options": options, "world": config.to_dict()["data"]}
