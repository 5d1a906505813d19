"""``mplug-fast demo`` (``make demo``): mPLUG trained and evaluated end to end on the synthetic world.

    mplug-fast demo [--out runs/demo] [--quick] [--fresh] [--config-dir DIR] [--set KEY=VALUE ...]

The stages and the stage each starts from are listed in ``<config-dir>/demo.yaml`` (``stages:``): the first
trains from scratch (pretraining: ITC + ITM + MLM + PrefixLM), every other one finetunes the saved model of
the stage it names, then is evaluated on the held-out scenes against its task's model-free baseline
(``mplug_fast.train.evaluation.run_evaluation``). Each stage is a run folder ``<out>/<stage>/`` of the shared
trainer with ``model/`` (``save_pretrained``) and, for finetunes, ``metrics.json``.

Every stage reads its run config from ``<config-dir>/<stage>.yaml`` (plain run configs: ``mplug-fast train
--task vqa --config demo/vqa`` runs the shipped one by hand); ``demo.yaml`` also holds the demo's own
settings (`DemoSettings`: evaluation options, ``--quick`` scaling, gallery). All stages must build the same
model (preset, overrides, resolution), so a finetune can start from the pretrained weights. ``--quick``
divides the steps (and warm-up, checkpoint interval) by ``quick.step_divisor`` and evaluates on the first
``quick.eval_scenes`` held-out scenes; its default output is ``runs/demo-quick``.

Resuming: ``<out>/<stage>/stage.json`` records the stage's config hash (the hash of the stage it starts
from is part of every finetune's) and how far it got. A finished stage with the same hashes is skipped; a
stage whose training stopped (Ctrl-C: the trainer finishes the step and saves a checkpoint) resumes from its
newest checkpoint; a trained stage whose evaluation settings changed is only re-evaluated; a changed config
starts the stage over. ``--fresh`` deletes the demo's outputs first.

Outputs: ``<out>/report.md`` (metric table, per-stage time and steps/s, loss curves, gallery),
``<out>/summary.json`` and ``<out>/gallery/scene_*.png``: held-out images upscaled (nearest) with the
predicted caption, a VQA question with the predicted and gold answer, the retrieval top-1 text, and the
grounding box (gold green, predicted red) drawn on them.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mplug_fast.checkpoint import save_pretrained
from mplug_fast.data import Tokenizer
from mplug_fast.data.synthetic import SyntheticWorld
from mplug_fast.io import atomic_write_json
from mplug_fast.tasks import from_pretrained, get_task
from mplug_fast.train.checkpointer import latest_checkpoint
from mplug_fast.train.distributed import resolve_device
from mplug_fast.train.evaluation import run_evaluation
from mplug_fast.train.metrics_log import MetricsLog
from mplug_fast.train.trainer import Trainer

from .gallery import draw_gallery, gallery_predictions
from .report import fmt_seconds, stage_line, write_report
from .settings import DemoInterrupted, load_settings
from .stages import check_same_model, digest, eval_settings, stage_config, train_hash
from .state import prepare_stage_dir, read_state, stage_done, write_state


def _losses(stage_dir: Path) -> tuple[float | None, float | None]:
    """First and last logged loss of the stage's metrics.jsonl."""
    losses = [r["loss"] for r in MetricsLog(stage_dir).read() if "loss" in r]
    return (losses[0], losses[-1]) if losses else (None, None)


def run_stage(
    stage: str, config: Any, t_hash: str, e_hash: str, e_settings: dict[str, Any], say: Any
) -> dict[str, Any]:
    """Trains (or resumes) and evaluates one stage; returns its state (also written to stage.json).

    Raises `DemoInterrupted` when Ctrl-C stopped the training (the checkpoint is saved).
    """

    stage_dir = Path(config.output_dir)
    state = prepare_stage_dir(stage_dir, read_state(stage_dir), t_hash)
    start = time.perf_counter()
    state.update(stage=stage, max_steps=config.schedule.max_steps)
    model = tokenizer = None
    if state["status"] not in ("trained", "finished") or not (stage_dir / "model" / "config.json").is_file():
        resume = latest_checkpoint(stage_dir / "checkpoints")
        if resume is None:  # nothing to continue from (e.g. killed before the first checkpoint): start clean
            MetricsLog(stage_dir).path.unlink(missing_ok=True)
            state.update(steps=0, train_s=0.0, train_cpu_s=0.0, train_steps_run=0)
        what = f"resuming at step {state['steps']}" if resume else "training"
        say(f"{what} {config.schedule.max_steps} steps -> {stage_dir}")
        state["status"] = "training"
        write_state(stage_dir, state)
        trainer = Trainer.from_config(config)
        t0, c0 = time.perf_counter(), time.process_time()
        summary = trainer.fit(resume=str(resume) if resume else None)
        state["train_s"] += time.perf_counter() - t0
        state["train_cpu_s"] = state.get("train_cpu_s", 0.0) + time.process_time() - c0
        state["steps"] = summary["step"]
        state["train_steps_run"] = state.get("train_steps_run", 0) + summary["steps"]
        state["steps_per_s"] = state["train_steps_run"] / max(state["train_s"], 1e-9)
        state["first_loss"], state["last_loss"] = _losses(stage_dir)
        if summary["status"] != "finished":
            state["wall_s"] += time.perf_counter() - start
            write_state(stage_dir, state)
            raise DemoInterrupted(stage, summary["step"])
        model = trainer.objective.model
        save_pretrained(model, stage_dir / "model")
        state["status"] = "trained"
        write_state(stage_dir, state)
    if get_task(stage).evaluable:
        if model is None:
            model = from_pretrained(stage_dir / "model", task=stage, device=resolve_device(config.device))
        tokenizer = tokenizer or Tokenizer()
        say(f"evaluating on {config.data.synthetic.eval_scenes} held-out scenes")
        t0, c0 = time.perf_counter(), time.process_time()
        record = run_evaluation(
            model,
            tokenizer,
            config,
            stage,
            device=next(model.parameters()).device,
            out_dir=stage_dir,
            batch_size=e_settings["batch_size"],
            options=e_settings["options"],
            extra={"step": state["steps"]},
        )
        state["eval_s"] = time.perf_counter() - t0
        state["eval_cpu_s"] = time.process_time() - c0
        state["headline"] = record["headline"]
    state.update(status="finished", eval_hash=e_hash)
    state["wall_s"] += time.perf_counter() - start
    write_state(stage_dir, state)
    return state


def run_demo(
    out: Path,
    config_dir: Path,
    *,
    quick: bool = False,
    overrides: list[str] | None = None,
    stream: Any = None,
) -> dict[str, Any]:
    """Runs (or resumes) every stage, then writes the gallery, ``report.md`` and ``summary.json``; returns
    the summary. Raises `DemoInterrupted` (Ctrl-C in training) and `DemoError` (bad configs)."""

    stream = stream or sys.stdout
    t_start = time.perf_counter()
    settings = load_settings(config_dir)
    configs = {
        s: stage_config(s, config_dir, out, quick=quick, settings=settings, overrides=list(overrides or []))
        for s in settings.stages
    }
    check_same_model(configs, config_dir)
    hashes: dict[str, str] = {}
    for stage, start in settings.stages.items():  # every stage comes after the stage it starts from
        hashes[stage] = train_hash(configs[stage], None if start is None else hashes[start])
    stages = list(settings.stages)
    states: dict[str, dict[str, Any]] = {}
    evals: dict[str, dict[str, Any]] = {}
    for i, stage in enumerate(stages, 1):
        config = configs[stage]
        e_settings = evals[stage] = eval_settings(stage, config, settings)
        e_hash = digest(e_settings)

        def say(message: str, _i: int = i, _stage: str = stage) -> None:
            elapsed = fmt_seconds(time.perf_counter() - t_start)
            print(f"[{_i}/{len(stages)}] {_stage:<9} {message}  (elapsed {elapsed})", file=stream, flush=True)

        stage_dir = Path(config.output_dir)
        state = read_state(stage_dir)
        if stage_done(stage_dir, state, hashes[stage], e_hash, stage):
            state["this_run"] = "skipped (up to date)"
            say(f"up to date, skipped: {stage_line(state)}")
        else:
            resumed = state is not None and state.get("train_hash") == hashes[stage]
            state = run_stage(stage, config, hashes[stage], e_hash, e_settings, say)
            state["this_run"] = "resumed" if resumed else "ran"
            say(f"done: {stage_line(state)}")
        states[stage] = state

    gallery_hash = digest(
        {"train": [states[s]["train_hash"] for s in stages], "eval": evals, "settings": str(settings)}
    )
    gallery_dir = out / "gallery"
    stored = (
        json.loads((gallery_dir / "gallery.json").read_text())
        if (gallery_dir / "gallery.json").is_file()
        else {}
    )
    print(f"gallery: {settings.gallery_images} held-out scenes -> {gallery_dir}", file=stream, flush=True)
    cached = stored.get("hash") == gallery_hash and all(
        (gallery_dir / p).is_file() for p in stored.get("files", [])
    )
    if cached:
        w = SyntheticWorld.from_config(configs[settings.gallery_world].data.synthetic)
        gallery = [{**row, "scene": w.scene(row["scene"])} for row in stored["rows"]]
    else:
        gallery = gallery_predictions(configs, evals, out, settings)
        files = [p.name for p in draw_gallery(gallery, gallery_dir, settings.gallery_size)]
    rows = [{**row, "scene": row["scene"].index} for row in gallery]  # as JSON: the scene's index
    if not cached:
        record = {"hash": gallery_hash, "files": files, "rows": rows}
        (gallery_dir / "gallery.json").write_text(json.dumps(record, indent=1))
    invocation_s = time.perf_counter() - t_start
    meta = {
        "mode": "quick" if quick else "full",
        "config_dir": str(config_dir),
        "device": str(resolve_device(configs[stages[0]].device)),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "stages_wall_s": sum(states[s]["wall_s"] for s in stages),
        "invocation_s": invocation_s,
    }
    report = write_report(out, states, gallery, meta)
    summary = {
        **meta,
        "out": str(out),
        "report": str(report),
        "stages": states,
        "tasks": {t: states[t].get("headline") for t in settings.finetunes},
        "gallery": [{**row, "image": f"gallery/scene_{row['scene']}.png"} for row in rows],
    }

    atomic_write_json(out / "summary.json", summary)
    print(
        f"demo finished in {fmt_seconds(invocation_s)} "
        f"(stages {fmt_seconds(meta['stages_wall_s'])} in total): {report}",
        file=stream,
        flush=True,
    )
    return summary
