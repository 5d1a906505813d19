"""``report.md``: the metric table against the baselines, the stage table, loss curves and the gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the line (and blank line) above a --quick run's metric table
QUICK_NOTE = (
    "**Quick run**: too few training steps and held-out scenes for these numbers to be meaningful; "
    "a task can end below its baseline.",
    "",
)


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def stage_line(state: dict[str, Any]) -> str:
    speed = f"{state.get('steps_per_s', 0):.2f} steps/s"
    parts = [f"{state['steps']} steps in {fmt_seconds(state['train_s'])} ({speed})"]
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


def _value(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}"


def write_report(
    out: Path, states: dict[str, dict[str, Any]], gallery: list[dict[str, Any]], meta: dict
) -> Path:
    """``out/report.md``: metric table, stage table, loss curves, gallery (paths relative to ``out``).
    ``states``: stage -> its state, in run order (finetunes are the stages with a headline metric)."""
    tasks = [stage for stage, state in states.items() if "headline" in state]
    lines = [
        "# mplug_fast demo report",
        "",
        f"Mode: **{meta['mode']}** · configs: `{meta['config_dir']}` · device: {meta['device']} · "
        f"torch threads: {meta['threads']} · written {meta['date']}",
        "",
        f"Stage time in total: **{fmt_seconds(meta['stages_wall_s'])}** "
        f"(this invocation: {fmt_seconds(meta['invocation_s'])}).",
        "",
        "## Metrics on the held-out scenes",
        "",
        *(QUICK_NOTE if meta["mode"] == "quick" else ()),
        "| task | metric | value | baseline | above? |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for task in tasks:
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
    for stage, s in states.items():
        loss = "–" if s.get("first_loss") is None else f"{s['first_loss']:.3f} → {s['last_loss']:.3f}"
        lines.append(
            f"| {stage} | {s['steps']} | {fmt_seconds(s['train_s'])} | {s.get('steps_per_s', 0):.2f} | "
            f"{fmt_seconds(s['eval_s']) if stage in tasks else '–'} | {fmt_seconds(s['wall_s'])} | "
            f"{fmt_seconds(s.get('train_cpu_s', 0.0) + s.get('eval_cpu_s', 0.0))} | {loss} | "
            f"{s.get('this_run', '?')} |"
        )
    lines += [
        "",
        "Steps/s and times are wall clock (shared with whatever else ran); CPU time is this process's CPU "
        "seconds over all threads (with one thread on an idle machine it is about the wall time).",
    ]
    lines += ["", "## Loss curves", ""]
    curves = [stage for stage in states if (out / stage / "loss_curves.png").is_file()]
    for stage in curves:
        lines += [f"**{stage}**", "", f"![{stage} loss curves]({stage}/loss_curves.png)", ""]
    if not curves:  # matplotlib is optional (the plot extra); each stage's metrics.jsonl has the values
        lines += ["None drawn: the plots need matplotlib (`pip install 'mplug_fast[plot]'`).", ""]
    lines += [
        "## Gallery",
        "",
        "Held-out scenes, upscaled; grounding box gold green, predicted red; answers and retrieved texts "
        "green when right.",
        "",
    ]
    for row in gallery:
        alt = f"scene {row['scene'].index}: {row.get('caption', '')}"
        lines += [f"![{alt}](gallery/scene_{row['scene'].index}.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
