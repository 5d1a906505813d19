"""``mplug-fast demo`` (``make demo``): mPLUG trained and evaluated end to end on the synthetic world.

    mplug-fast demo [--out runs/demo] [--quick] [--fresh] [--config-dir configs/demo] [--set KEY=VALUE ...]

Stages, each a run directory ``<out>/<stage>/`` of the shared trainer:

    pretrain    ITC + ITM + MLM + PrefixLM                      -> <out>/pretrain/model (save_pretrained)
    vqa, caption, retrieval, grounding, ve
                finetune from <out>/pretrain/model, then evaluate on the held-out scenes against the task's
                model-free baseline (``mplug_fast.tasks.cli.run_evaluation``)  -> <out>/<task>/metrics.json
    nlvr        the same, finetuned from <out>/ve/model (``UPSTREAM``): two-image statements need the
                image-text matching that the VE stage learns first (docs/experiments.md says why)

Every stage reads its run config from ``<config-dir>/<stage>.yaml`` (plain run configs: ``mplug-fast finetune
--task vqa --config demo/vqa`` runs one by hand); ``<config-dir>/demo.yaml`` (optional) holds the
demo's own settings (`DemoSettings`: evaluation options, ``--quick`` scaling, gallery). All stages must build
the same model (preset, overrides, resolution), so a finetune can start from the pretrained weights.
``--quick`` divides the steps (and warm-up, checkpoint interval) by ``quick.step_divisor`` and evaluates on
the first ``quick.eval_scenes`` held-out scenes; its default output is ``runs/demo-quick``.

Resuming: ``<out>/<stage>/stage.json`` records the stage's config hash (the hash of the stage it starts
from is part of every finetune's) and how far it got. A finished stage with the same hashes is skipped; a
stage whose training stopped (Ctrl-C: the trainer finishes the step and saves a checkpoint) resumes from its
newest checkpoint; a trained stage whose evaluation settings changed is only re-evaluated; a changed config
starts the stage over.
``--fresh`` deletes the demo's outputs first.

Outputs: ``<out>/report.md`` (metric table, per-stage time and steps/s, loss curves, gallery),
``<out>/summary.json`` and ``<out>/gallery/scene_*.png``: held-out images upscaled (nearest) with the
predicted caption, a VQA question with the predicted and gold answer, the retrieval top-1 text, and the
grounding box (gold green, predicted red) drawn on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

STAGES: tuple[str, ...] = ("pretrain", "vqa", "caption", "retrieval", "grounding", "ve", "nlvr")
TASKS: tuple[str, ...] = STAGES[1:]
GALLERY_TASKS: tuple[str, ...] = ("vqa", "caption", "retrieval", "grounding")  # drawn on the gallery scenes
UPSTREAM: dict[str, str] = {"nlvr": "ve"}  # the stage a finetune starts from when not the pretrain stage
STATE_FILE = "stage.json"  # per stage: hashes, status, time and steps
RESUME_HINT = "`make demo` (or the same `mplug-fast demo` command) resumes where it stopped"


def upstream(stage: str) -> str:
    """The stage whose saved model a finetune stage starts from (``UPSTREAM``, else the pretrain stage)."""
    return UPSTREAM.get(stage, "pretrain")


class DemoError(ValueError):
    """A demo configuration or output-directory problem the user can fix (the message says how)."""


class DemoInterrupted(Exception):
    """Ctrl-C stopped a stage's training; its checkpoint is saved."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"{stage} stopped at step {step}")
        self.stage, self.step = stage, step


# ---- settings and stage configs ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's own knobs (``<config-dir>/demo.yaml``; every key optional).

    Attributes:
        eval_batch_size: evaluation batch size of every task (None: the run config's, else 32).
        eval_options: task -> options of its evaluate function (over the task's defaults, e.g. beam_size).
        quick_step_divisor: ``--quick`` runs max_steps // this (at least 1) steps per stage.
        quick_eval_scenes: ``--quick`` evaluates on at most this many held-out scenes.
        gallery_images: held-out scenes drawn in the gallery.
        gallery_size: side in pixels of the upscaled gallery images.
        gallery_world: the stage whose ``data.synthetic`` world the gallery scenes come from.
    """

    eval_batch_size: int | None = None
    eval_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    quick_step_divisor: int = 10
    quick_eval_scenes: int = 50
    gallery_images: int = 6
    gallery_size: int = 256
    gallery_world: str = "vqa"


# demo.yaml "section: {key: value}" -> the DemoSettings field
SETTING_KEYS: dict[str, str] = {
    "eval.batch_size": "eval_batch_size",
    "eval.options": "eval_options",
    "quick.step_divisor": "quick_step_divisor",
    "quick.eval_scenes": "quick_eval_scenes",
    "gallery.images": "gallery_images",
    "gallery.size": "gallery_size",
    "gallery.world": "gallery_world",
}


def load_settings(config_dir: Path) -> DemoSettings:
    """`DemoSettings` from ``config_dir/demo.yaml`` (defaults when absent); unknown keys and wrong types are
    errors naming the key."""
    import yaml

    path = config_dir / "demo.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    values: dict[str, Any] = {}
    for section, entries in (raw if isinstance(raw, dict) else {"<top level>": raw}).items():
        if not isinstance(entries, dict):
            raise DemoError(
                f"{path}: {section!r} must be a mapping of settings; valid: {sorted(SETTING_KEYS)}"
            )
        for key, value in entries.items():
            name = f"{section}.{key}"
            if name not in SETTING_KEYS:
                raise DemoError(f"{path}: unknown setting {name!r}; valid: {sorted(SETTING_KEYS)}")
            values[SETTING_KEYS[name]] = value
    settings = DemoSettings(**values)
    options = settings.eval_options
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise DemoError(f"{path}: eval.options must map a task to its options, got {options!r}")
    if sorted(set(options) - set(TASKS)):
        raise DemoError(
            f"{path}: eval.options for unknown task(s) {sorted(set(options) - set(TASKS))}; "
            f"tasks: {list(TASKS)}"
        )
    if settings.gallery_world not in STAGES:
        raise DemoError(f"{path}: gallery.world {settings.gallery_world!r} is not a stage of {list(STAGES)}")
    from mplug_fast.tasks.cli import check_eval_options

    for task, task_options in options.items():
        try:
            check_eval_options(task, task_options)
        except ValueError as e:
            raise DemoError(f"{path}: eval.options.{task}: {e}") from None
    for key, field_name in SETTING_KEYS.items():
        value = getattr(settings, field_name)
        if field_name in ("eval_options", "gallery_world") or (
            field_name == "eval_batch_size" and value is None
        ):
            continue
        if type(value) is not int or value < 1:
            raise DemoError(f"{path}: {key} must be an integer >= 1, got {value!r}")
    return settings


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
    out/<upstream(stage)>/model`` and the task's objective defaults, and the ``--quick`` scaling."""
    from mplug_fast.train.config import ConfigError, load_config

    path = config_dir / f"{stage}.yaml"
    if not path.is_file():
        raise DemoError(f"stage config {path} does not exist (expected one per stage: {list(STAGES)})")
    sets = [*overrides, f"output_dir={out / stage}", f"model.task={stage}"]
    if stage != "pretrain":
        sets.append(f"model.init_from={out / upstream(stage) / 'model'}")
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
    if stage != "pretrain":
        from mplug_fast.tasks import get_task

        spec = get_task(stage)
        config.objective.options = {**spec.objective_options, **config.objective.options}
    return config


def model_signature(config: Any) -> dict[str, Any]:
    """What decides the model's architecture: preset, overrides and the input resolution."""
    overrides = dict(config.model.overrides)
    overrides.setdefault("vision.image_size", config.data.synthetic.image_size)
    return {"preset": config.model.preset, "overrides": overrides}


def check_same_model(configs: dict[str, Any], config_dir: Path) -> None:
    """DemoError naming the stage when a stage would build another model than the pretrain stage."""
    ref = model_signature(configs["pretrain"])
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
                f"{config_dir / (stage + '.yaml')} builds another model than pretrain.yaml (differs in "
                f"{what}); every stage must use the same model.preset, model.overrides and "
                f"data.synthetic.image_size"
            )


def _digest(obj: Any) -> str:
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
    return _digest({"config": d, "upstream": upstream})


def eval_settings(stage: str, config: Any, settings: DemoSettings) -> dict[str, Any]:
    """A finetune stage's evaluation: batch size and evaluate options (weakest first: the task's defaults, the
    run config's ``eval`` section where it has one, demo.yaml), and the world it runs on."""
    from mplug_fast.tasks import get_task

    if stage == "pretrain":
        return {}
    run_eval = getattr(config, "eval", None)
    options = {
        **get_task(stage).eval_options,
        **(getattr(run_eval, "options", None) or {}),
        **settings.eval_options.get(stage, {}),
    }
    batch_size = settings.eval_batch_size or getattr(run_eval, "batch_size", None) or 32
    return {"batch_size": batch_size, "options": options, "world": config.to_dict()["data"]}


# ---- stage state -------------------------------------------------------------------------------------------


def read_state(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(stage_dir: Path, state: dict[str, Any]) -> None:
    from mplug_fast.tasks.base import write_json

    write_json(state, stage_dir / STATE_FILE)


def stage_done(stage_dir: Path, state: dict[str, Any] | None, t_hash: str, e_hash: str, stage: str) -> bool:
    """True when the stage finished with these hashes and its outputs are still there."""
    if not state or state.get("status") != "finished":
        return False
    if state.get("train_hash") != t_hash or state.get("eval_hash") != e_hash:
        return False
    outputs = [stage_dir / "model" / "config.json"] + (
        [] if stage == "pretrain" else [stage_dir / "metrics.json"]
    )
    return all(p.is_file() for p in outputs)


def prepare_stage_dir(stage_dir: Path, state: dict[str, Any] | None, t_hash: str) -> dict[str, Any]:
    """The state to continue from: the stored one when its training hash matches, else a new one (the old
    stage directory is deleted). A non-empty directory the demo did not write is an error."""
    if state is not None and state.get("train_hash") == t_hash:
        return state
    if stage_dir.exists():
        if state is None and any(stage_dir.iterdir()):
            raise DemoError(
                f"{stage_dir} exists and was not written by the demo; remove it or use another --out"
            )
        shutil.rmtree(stage_dir)
    return {"train_hash": t_hash, "status": "new", "steps": 0, "train_s": 0.0, "eval_s": 0.0, "wall_s": 0.0}


def fresh(out: Path) -> None:
    """Deletes the demo's outputs under ``out`` (stage directories with a stage.json, report, gallery)."""
    for stage in STAGES:
        if (out / stage / STATE_FILE).is_file():
            shutil.rmtree(out / stage)
    for name in ("report.md", "summary.json", "gallery"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ---- running a stage ---------------------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _device(name: str) -> Any:
    """A run config's ``device`` ("auto": CUDA when available) as a torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _losses(stage_dir: Path) -> tuple[float | None, float | None]:
    """First and last logged loss of the stage's metrics.jsonl."""
    path = stage_dir / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    losses = [r["loss"] for r in records if "loss" in r]
    return (losses[0], losses[-1]) if losses else (None, None)


def run_stage(
    stage: str, config: Any, t_hash: str, e_hash: str, e_settings: dict[str, Any], say: Any
) -> dict[str, Any]:
    """Trains (or resumes) and evaluates one stage; returns its state (also written to stage.json).

    Raises `DemoInterrupted` when Ctrl-C stopped the training (the checkpoint is saved).
    """
    from mplug_fast.checkpoint import from_pretrained, save_pretrained
    from mplug_fast.data import Tokenizer
    from mplug_fast.train.checkpointing import latest_checkpoint
    from mplug_fast.train.trainer import Trainer

    stage_dir = Path(config.output_dir)
    state = prepare_stage_dir(stage_dir, read_state(stage_dir), t_hash)
    start = time.perf_counter()
    state.update(stage=stage, max_steps=config.schedule.max_steps)
    model = tokenizer = None
    if state["status"] not in ("trained", "finished") or not (stage_dir / "model" / "config.json").is_file():
        resume = latest_checkpoint(stage_dir / "checkpoints")
        if resume is None:  # nothing to continue from (e.g. killed before the first checkpoint): start clean
            (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
            state.update(steps=0, train_s=0.0, train_cpu_s=0.0, train_steps_run=0)
        what = f"resuming at step {state['steps']}" if resume else "training"
        say(f"{what} {config.schedule.max_steps} steps -> {stage_dir}")
        state["status"] = "training"
        write_state(stage_dir, state)
        trainer = Trainer(config)
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
        model, tokenizer = trainer.objective.model, trainer.tokenizer
        save_pretrained(model, stage_dir / "model")
        state["status"] = "trained"
        write_state(stage_dir, state)
    if stage != "pretrain":
        from mplug_fast.tasks.cli import run_evaluation

        if model is None:
            model = from_pretrained(stage_dir / "model", task=stage, device=_device(config.device))
        tokenizer = tokenizer or Tokenizer()
        say(f"evaluating on {config.data.synthetic.eval_scenes} held-out scenes")
        t0, c0 = time.perf_counter(), time.process_time()
        record = run_evaluation(
            model,
            tokenizer,
            config,
            stage,
            split="test",
            device=next(model.parameters()).device,
            out_dir=stage_dir,
            metrics_name="metrics.json",
            batch_size=e_settings["batch_size"],
            limit=None,
            options=e_settings["options"],
            official_overrides={},
            extra={"step": state["steps"]},
        )
        state["eval_s"] = time.perf_counter() - t0
        state["eval_cpu_s"] = time.process_time() - c0
        state["headline"] = record["headline"]
    state.update(status="finished", eval_hash=e_hash)
    state["wall_s"] += time.perf_counter() - start
    write_state(stage_dir, state)
    return state


def _stage_line(state: dict[str, Any]) -> str:
    parts = [
        f"{state['steps']} steps in {_fmt_s(state['train_s'])} ({state.get('steps_per_s', 0):.2f} steps/s)"
    ]
    if state.get("first_loss") is not None:
        parts.append(f"loss {state['first_loss']:.3f} -> {state['last_loss']:.3f}")
    head = state.get("headline")
    if head and head.get("value") is not None:
        verdict = (
            ""
            if head["baseline"] is None
            else (
                f" vs baseline {head['baseline']:.2f} ({'above' if head['above_baseline'] else 'NOT above'})"
            )
        )
        parts.append(f"{head['metric']} {head['value']:.2f}{verdict}")
    return "; ".join(parts)


# ---- gallery -----------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width: int, draw: Any) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = "  " + word
        else:
            line = trial
    return lines + ([line] if line else [])


def gallery_predictions(
    configs: dict[str, Any], evals: dict[str, dict[str, Any]], out: Path, settings: DemoSettings
) -> list[dict[str, Any]]:
    """Every task model's prediction on the first ``gallery_images`` held-out scenes of the gallery world,
    obtained with the tasks' own evaluate functions (same options as the evaluation)."""
    import tempfile

    import torch

    from mplug_fast.checkpoint import from_pretrained
    from mplug_fast.data import Tokenizer
    from mplug_fast.data.synthetic import SyntheticWorld
    from mplug_fast.tasks import get_task

    tokenizer = Tokenizer()
    world = dataclasses.asdict(configs[settings.gallery_world].data.synthetic)
    n = min(settings.gallery_images, world["eval_scenes"])
    w = SyntheticWorld.from_config(world)
    rows = [{"scene": w.scene(world["num_scenes"] + k)} for k in range(n)]
    for task in GALLERY_TASKS:
        spec = get_task(task)
        model = from_pretrained(out / task / "model", task=task)
        # retrieval ranks against the texts of more scenes than the gallery shows (its first n are these)
        scenes = min(world["eval_scenes"], max(n, settings.quick_eval_scenes)) if task == "retrieval" else n
        dataset = spec.synthetic_dataset("test", **{**world, "eval_scenes": scenes})
        with tempfile.TemporaryDirectory() as tmp:
            output = Path(tmp) / "predictions.json"
            with torch.no_grad():
                result = spec.evaluate(
                    model,
                    dataset,
                    tokenizer,
                    batch_size=evals[task]["batch_size"],
                    device="cpu",
                    output=output,
                    **evals[task]["options"],
                )
            written = json.loads(output.read_text())
        for k, row in enumerate(rows):
            if task == "vqa":
                item = dataset[k]
                row["question"], row["gold_answer"] = item["question"], item["answers"][0]
                row["answer"] = result["predictions"][item["question_id"]]
            elif task == "caption":
                row["caption"] = result["predictions"][row["scene"].index]
            elif task == "retrieval":
                top = written["i2t"][k][0]
                row["retrieved"], row["retrieved_correct"] = dataset.texts[top], top in dataset.img2txt[k]
            else:
                item = dataset[k]
                row["expression"] = item["expression"]
                row["gold_box"] = item["box"].tolist()
                row["box"] = result["boxes"][k].tolist()
    return rows


def draw_gallery(rows: list[dict[str, Any]], directory: Path, size: int) -> list[Path]:
    """One PNG per gallery row: the scene upscaled (nearest) to ``size`` px with the gold (green) and
    predicted (red) grounding boxes, and a text panel with the predictions."""
    import torch
    from PIL import Image, ImageDraw

    from mplug_fast.metrics.grounding import box_cxcywh_to_xyxy, box_iou_aligned

    directory.mkdir(parents=True, exist_ok=True)
    font, small = _font(15), _font(13)
    panel, pad = 430, 10
    paths = []
    for row in rows:
        scene = row["scene"]
        image = scene.image().convert("RGB")
        scale = max(1, size // image.width)
        side = image.width * scale
        canvas = Image.new("RGB", (side + panel, max(side, 300)), "white")
        canvas.paste(image.resize((side, side), Image.NEAREST), (0, 0))
        draw = ImageDraw.Draw(canvas)
        gold = box_cxcywh_to_xyxy(torch.tensor([row["gold_box"]], dtype=torch.float64))
        pred = box_cxcywh_to_xyxy(torch.tensor([row["box"]], dtype=torch.float64)).clamp(0, 1)
        iou = float(box_iou_aligned(pred, gold).nan_to_num(0.0)[0])
        for box, colour, width in ((gold, (0, 200, 0), 3), (pred, (230, 0, 0), 2)):
            x0, y0, x1, y1 = (box[0] * side).tolist()
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
        ok, bad, ink = (0, 130, 0), (200, 0, 0), (20, 20, 20)
        answer_ok = row["answer"].strip().lower() == row["gold_answer"].strip().lower()
        blocks = [
            (f"held-out scene {scene.index}", ink, small),
            (f"caption: {row['caption']}", ink, font),
            (f"Q: {row['question']}", ink, font),
            (f"A: {row['answer']}   (gold: {row['gold_answer']})", ok if answer_ok else bad, font),
            (f"retrieval top-1: {row['retrieved']}", ok if row["retrieved_correct"] else bad, font),
            (f"grounding: {row['expression']}", ink, font),
            (f"IoU {iou:.2f}  (gold box green, predicted red)", ok if iou >= 0.5 else bad, small),
        ]
        y = pad
        for text, colour, f in blocks:
            for line in _wrap(text, f, panel - 2 * pad, draw):
                draw.text((side + pad, y), line, fill=colour, font=f)
                y += f.size + 5 if hasattr(f, "size") else 16
            y += 6
        row["iou"] = iou
        path = directory / f"scene_{scene.index}.png"
        canvas.save(path)
        paths.append(path)
    return paths


# ---- report ------------------------------------------------------------------------------------------------


def _value(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}"


def write_report(
    out: Path, states: dict[str, dict[str, Any]], gallery: list[dict[str, Any]], meta: dict
) -> Path:
    """``out/report.md``: metric table, stage table, loss curves, gallery (paths relative to ``out``)."""
    lines = [
        "# mplug_fast demo report",
        "",
        f"Mode: **{meta['mode']}** · configs: `{meta['config_dir']}` · device: {meta['device']} · "
        f"torch threads: {meta['threads']} · written {meta['date']}",
        "",
        f"Stage time in total: **{_fmt_s(meta['stages_wall_s'])}** "
        f"(this invocation: {_fmt_s(meta['invocation_s'])}).",
        "",
        "## Metrics on the held-out scenes",
        "",
        "| task | metric | value | baseline | above? |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for task in TASKS:
        head = states[task].get("headline") or {}
        above = head.get("above_baseline")
        mark = "–" if above is None else "**yes**" if above else "no"
        lines.append(
            f"| {task} | {head.get('metric', '?')} | {_value(head.get('value'))} | "
            f"{_value(head.get('baseline'))} | {mark} |"
        )
        notes.append(f"- {task} baseline: {head.get('baseline_description', 'not computed')}")
    lines += [
        "",
        "VQA, VE and NLVR accuracy, mean recall and Acc@IoU≥0.5 are percentages; CIDEr-D is the "
        "pycocoevalcap scale.",
        "",
        *notes,
        "",
        "## Stages",
        "",
        "| stage | steps | train time | steps/s | eval time | stage time | CPU time (train + eval) "
        "| first → last loss | this run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        s = states[stage]
        loss = "–" if s.get("first_loss") is None else f"{s['first_loss']:.3f} → {s['last_loss']:.3f}"
        lines.append(
            f"| {stage} | {s['steps']} | {_fmt_s(s['train_s'])} | {s.get('steps_per_s', 0):.2f} | "
            f"{_fmt_s(s['eval_s']) if stage != 'pretrain' else '–'} | {_fmt_s(s['wall_s'])} | "
            f"{_fmt_s(s.get('train_cpu_s', 0.0) + s.get('eval_cpu_s', 0.0))} | {loss} | "
            f"{s.get('this_run', '?')} |"
        )
    lines += [
        "",
        "Steps/s and times are wall clock (shared with whatever else ran); CPU time is this process's CPU "
        "seconds over all threads (with one thread on an idle machine it is about the wall time).",
    ]
    lines += ["", "## Loss curves", ""]
    for stage in STAGES:
        if (out / stage / "loss_curves.png").is_file():
            lines += [f"**{stage}**", "", f"![{stage} loss curves]({stage}/loss_curves.png)", ""]
    lines += [
        "## Gallery",
        "",
        "Held-out scenes, upscaled; grounding box gold green, predicted red; answers and retrieved texts "
        "green when right.",
        "",
    ]
    for row in gallery:
        alt = f"scene {row['scene'].index}: {row['caption']}"
        lines += [f"![{alt}](gallery/scene_{row['scene'].index}.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the command -------------------------------------------------------------------------------------------


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
    import datetime

    import torch

    stream = stream or sys.stdout
    t_start = time.perf_counter()
    settings = load_settings(config_dir)
    configs = {
        s: stage_config(s, config_dir, out, quick=quick, settings=settings, overrides=list(overrides or []))
        for s in STAGES
    }
    check_same_model(configs, config_dir)
    hashes: dict[str, str] = {"pretrain": train_hash(configs["pretrain"], None)}
    for task in TASKS:  # STAGES lists every upstream stage before the stages that start from it
        hashes[task] = train_hash(configs[task], hashes[upstream(task)])
    states: dict[str, dict[str, Any]] = {}
    evals: dict[str, dict[str, Any]] = {}
    for i, stage in enumerate(STAGES, 1):
        config = configs[stage]
        e_settings = evals[stage] = eval_settings(stage, config, settings)
        e_hash = _digest(e_settings)

        def say(message: str, _i: int = i, _stage: str = stage) -> None:
            elapsed = _fmt_s(time.perf_counter() - t_start)
            print(f"[{_i}/{len(STAGES)}] {_stage:<9} {message}  (elapsed {elapsed})", file=stream, flush=True)

        stage_dir = Path(config.output_dir)
        state = read_state(stage_dir)
        if stage_done(stage_dir, state, hashes[stage], e_hash, stage):
            state["this_run"] = "skipped (up to date)"
            say(f"up to date, skipped: {_stage_line(state)}")
        else:
            resumed = state is not None and state.get("train_hash") == hashes[stage]
            state = run_stage(stage, config, hashes[stage], e_hash, e_settings, say)
            state["this_run"] = "resumed" if resumed else "ran"
            say(f"done: {_stage_line(state)}")
        states[stage] = state

    gallery_hash = _digest(
        {"train": [states[s]["train_hash"] for s in STAGES], "eval": evals, "settings": str(settings)}
    )
    gallery_dir = out / "gallery"
    stored = (
        json.loads((gallery_dir / "gallery.json").read_text())
        if (gallery_dir / "gallery.json").is_file()
        else {}
    )
    print(f"gallery: {settings.gallery_images} held-out scenes -> {gallery_dir}", file=stream, flush=True)
    if stored.get("hash") == gallery_hash and all(
        (gallery_dir / p).is_file() for p in stored.get("files", [])
    ):
        from mplug_fast.data.synthetic import SyntheticWorld

        world = configs[settings.gallery_world].data.synthetic
        w = SyntheticWorld.from_config(world)
        gallery = [{**row, "scene": w.scene(row["scene"])} for row in stored["rows"]]
    else:
        gallery = gallery_predictions(configs, evals, out, settings)
        files = draw_gallery(gallery, gallery_dir, settings.gallery_size)
        rows = [{**row, "scene": row["scene"].index} for row in gallery]
        (gallery_dir / "gallery.json").write_text(
            json.dumps({"hash": gallery_hash, "files": [p.name for p in files], "rows": rows}, indent=1)
        )
    invocation_s = time.perf_counter() - t_start
    meta = {
        "mode": "quick" if quick else "full",
        "config_dir": str(config_dir),
        "device": str(_device(configs["pretrain"].device)),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "stages_wall_s": sum(states[s]["wall_s"] for s in STAGES),
        "invocation_s": invocation_s,
    }
    report = write_report(out, states, gallery, meta)
    summary = {
        **meta,
        "out": str(out),
        "report": str(report),
        "stages": states,
        "tasks": {t: states[t].get("headline") for t in TASKS},
        "gallery": [
            {
                **{k: v for k, v in row.items() if k != "scene"},
                "scene": row["scene"].index,
                "image": f"gallery/scene_{row['scene'].index}.png",
            }
            for row in gallery
        ],
    }
    from mplug_fast.tasks.base import write_json

    write_json(summary, out / "summary.json")
    print(
        f"demo finished in {_fmt_s(invocation_s)} (stages {_fmt_s(meta['stages_wall_s'])} in total): "
        f"{report}",
        file=stream,
        flush=True,
    )
    return summary


def default_config_dir(given: str | None) -> Path:
    """``given``, else ``configs/demo`` of the working directory, else the shipped one (package data)."""
    if given:
        return Path(given)
    local = Path("configs/demo")
    return local if local.is_dir() else Path(__file__).resolve().parent / "configs" / "demo"


def _demo(args: argparse.Namespace) -> int:
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    if args.threads < 0:
        print(f"mplug-fast demo: --threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.fresh:
            fresh(out)
        print(f"mplug-fast demo ({'quick' if args.quick else 'full'}) -> {out}", flush=True)
        run_demo(out, default_config_dir(args.config_dir), quick=args.quick, overrides=args.overrides)
    except DemoInterrupted as e:
        print(f"\nInterrupted: {e}; the checkpoint is saved. {RESUME_HINT}.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nInterrupted. {RESUME_HINT}.", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"mplug-fast demo: {e}", file=sys.stderr)
        return 2
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``demo`` to the ``mplug-fast`` sub-commands."""
    p = commands.add_parser(
        "demo", help="pretrain + finetune + evaluate every task on the synthetic world; writes a report"
    )
    p.add_argument("--out", help="output directory (default runs/demo, with --quick runs/demo-quick)")
    p.add_argument("--quick", action="store_true", help="a short run: steps / 10, 50 evaluation scenes")
    p.add_argument("--fresh", action="store_true", help="delete the demo's previous outputs and start over")
    p.add_argument(
        "--config-dir",
        help="stage configs <stage>.yaml + demo.yaml (default: configs/demo of the working directory, else "
        "the shipped mplug_fast/configs/demo)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: torch's choice; 1 is far faster on a machine busy with other jobs)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config field in every stage (repeatable): --set device=cpu",
    )
    p.set_defaults(func=_demo)
