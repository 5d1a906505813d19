"""``mplug-fast demo``: the ``--quick`` run on the shipped configs (report, gallery, summary, skip on rerun),
and the stage logic (Ctrl-C in training or evaluation, resume, config changes, ``--fresh``)
on micro configs."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import demo
import pytest
import torch
import yaml

from mplug_fast.cli import main
from tests.train.helpers import micro_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "mplug_fast" / "configs" / "demo"
SETTINGS = demo.load_settings(CONFIGS)  # the shipped demo: its stages, in run order
STAGES, TASKS = tuple(SETTINGS.stages), SETTINGS.finetunes


@pytest.fixture(autouse=True)
def _threads():
    """The demo's --threads changes the process-wide torch setting: restore it."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def micro_configs(directory: Path, max_steps: int = 4) -> Path:
    """The shipped demo configs shrunk to a micro model, 16 px world, 4 steps, 4 evaluation scenes."""
    directory.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        c = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())
        c["model"]["overrides"] = {**micro_overrides(), "fusion.layers": 2, "fusion.stride": 1}
        c["data"]["synthetic"].update(image_size=16, num_scenes=32, eval_scenes=4)
        c["data"]["batch_size"] = 4
        c["schedule"].update(max_steps=max_steps, warmup_steps=1)
        c["checkpoint"]["every_steps"] = 0
        c["device"] = "cpu"
        c["logging"].update(every_steps=1, progress=False)
        options = c.get("objective", {}).get("options", {})
        if "queue_size" in options:
            options["queue_size"] = 8
        (directory / f"{stage}.yaml").write_text(yaml.safe_dump(c))
    settings = {
        "eval": {
            "batch_size": 4,
            "options": {
                "vqa": {"beam_size": 2},
                "caption": {"beam_size": 2, "max_length": 8, "min_length": 2},
                "retrieval": {"k": 3},
            },
        },
        "gallery": {"images": 2, "size": 32},
        "stages": dict(SETTINGS.stages),
    }
    (directory / "demo.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return directory


def run(out: Path, config_dir: Path | None = None, *extra: str) -> int:
    args = ["demo", "--out", str(out), "--threads", "1", *extra]
    return main(args + (["--config-dir", str(config_dir)] if config_dir else []))


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def this_run(out: Path) -> dict[str, str]:
    return {s: v["this_run"] for s, v in summary(out)["stages"].items()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


# ---- the shipped --quick demo ---------------------------------------------------------------------------


def test_quick_demo_report_and_skip_on_rerun(tmp_path, capsys):
    """``--quick`` over the demo's stages (the shipped configs shrunk to micro): steps / 10, every stage's
    metrics against its baseline in the report, the gallery, and a rerun that skips every stage."""
    configs = micro_configs(tmp_path / "configs", max_steps=20)
    gallery = yaml.safe_load((configs / "demo.yaml").read_text())["gallery"]
    out = tmp_path / "demo"
    assert run(out, configs, "--quick") == 0
    s = summary(out)
    assert s["mode"] == "quick" and sorted(s["tasks"]) == sorted(TASKS)
    for task, head in s["tasks"].items():
        assert head["metric"] and isinstance(head["value"], float) and isinstance(head["baseline"], float)
        assert (out / task / "metrics.json").is_file() and (out / task / "loss_curves.png").is_file()
    for stage, state in s["stages"].items():
        quick_steps = max(
            1, yaml.safe_load((configs / f"{stage}.yaml").read_text())["schedule"]["max_steps"] // 10
        )
        assert state["status"] == "finished" and state["steps"] == quick_steps, stage
    report = (out / "report.md").read_text()
    for task in TASKS:
        assert re.search(rf"^\| {task} \| \S+ \| [\d.]+ \| [\d.]+ \| (\*\*yes\*\*|no) \|$", report, re.M), (
            task
        )
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == len(STAGES) + gallery["images"] and all((out / link).is_file() for link in links)
    from PIL import Image

    pngs = sorted((out / "gallery").glob("scene_*.png"))
    assert len(pngs) == gallery["images"] and all(Image.open(p).size[0] >= gallery["size"] for p in pngs)
    assert len(s["gallery"]) == gallery["images"]
    assert all(row["caption"] and "answer" in row for row in s["gallery"])
    printed = capsys.readouterr().out
    n = len(STAGES)
    assert all(f"[{i}/{n}]" in printed for i in range(1, n + 1)) and "demo finished" in printed

    assert run(out, configs, "--quick") == 0
    assert set(this_run(out).values()) == {"skipped (up to date)"}  # no training, evaluation or gallery


# ---- stage logic on micro configs --------------------------------------------------------------------------


def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch, capsys, default_sigint):
    """Ctrl-C (a real SIGINT) at step 2 of the VQA stage: exit 130 with the resume hint, a checkpoint; the
    next call skips pretraining, resumes VQA at step 2 and ends with the weights of an uninterrupted run."""
    from mplug_fast.train.trainer import Trainer

    configs = micro_configs(tmp_path / "configs")
    original = Trainer.train_step

    def train_step(self):
        metrics = original(self)
        if self.config.model.task == "vqa" and self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    out = tmp_path / "demo"
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert run(out, configs) == 130
    assert "make demo" in capsys.readouterr().err
    state = json.loads((out / "vqa" / demo.STATE_FILE).read_text())
    assert state["status"] == "training" and state["steps"] == 2
    assert (out / "vqa" / "checkpoints" / "step-00000002.pt").is_file()
    assert not (out / "caption").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(Trainer, "train_step", original)

    assert run(out, configs) == 0
    assert this_run(out) == {
        "pretrain": "skipped (up to date)",
        "vqa": "resumed",
        "caption": "ran",
        "retrieval": "ran",
        "grounding": "ran",
        "ve": "ran",
        "nlvr2": "ran",
    }
    vqa = summary(out)["stages"]["vqa"]
    assert vqa["steps"] == 4 and vqa["train_steps_run"] == 4
    logged = [json.loads(x)["step"] for x in (out / "vqa" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]

    reference = tmp_path / "reference"
    assert run(reference, configs) == 0
    for stage in ("pretrain", "vqa"):
        got, want = weights(out / stage), weights(reference / stage)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), stage
    assert summary(out)["tasks"]["vqa"] == summary(reference)["tasks"]["vqa"]


def test_interrupted_evaluation_and_config_changes(tmp_path, monkeypatch, capsys):
    import demo.runner as demo_runner

    configs = micro_configs(tmp_path / "configs")
    out = tmp_path / "demo"
    original = demo_runner.run_evaluation

    def run_evaluation(model, tokenizer, config, task, **kwargs):
        if task == "caption":
            raise KeyboardInterrupt
        return original(model, tokenizer, config, task, **kwargs)

    monkeypatch.setattr(demo_runner, "run_evaluation", run_evaluation)
    assert run(out, configs) == 130
    assert "make demo" in capsys.readouterr().err
    assert json.loads((out / "caption" / demo.STATE_FILE).read_text())["status"] == "trained"
    monkeypatch.setattr(demo_runner, "run_evaluation", original)

    assert run(out, configs) == 0  # caption: evaluated from its saved model, not trained again
    caption = summary(out)["stages"]["caption"]
    assert this_run(out)["caption"] == "resumed" and caption["train_steps_run"] == 4
    assert this_run(out)["retrieval"] == "ran"

    # a changed evaluation option re-evaluates that task only; a changed training option retrains that stage
    settings = yaml.safe_load((configs / "demo.yaml").read_text())
    settings["eval"]["options"]["vqa"]["beam_size"] = 1
    (configs / "demo.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    grounding = yaml.safe_load((configs / "grounding.yaml").read_text())
    grounding["optim"]["lr"] = 5e-4
    (configs / "grounding.yaml").write_text(yaml.safe_dump(grounding))
    assert run(out, configs) == 0
    assert this_run(out) == {
        "pretrain": "skipped (up to date)",
        "vqa": "resumed",
        "caption": "skipped (up to date)",
        "retrieval": "skipped (up to date)",
        "grounding": "ran",
        "ve": "skipped (up to date)",
        "nlvr2": "skipped (up to date)",
    }
    assert summary(out)["stages"]["vqa"]["train_steps_run"] == 4
    assert summary(out)["tasks"]["vqa"] is not None

    # nlvr2 starts from the ve stage: a changed ve config retrains both, nothing else
    ve = yaml.safe_load((configs / "ve.yaml").read_text())
    ve["optim"]["lr"] = 5e-4
    (configs / "ve.yaml").write_text(yaml.safe_dump(ve))
    assert run(out, configs) == 0
    assert {k for k, v in this_run(out).items() if v == "ran"} == {"ve", "nlvr2"}

    # a changed pretraining reruns everything (every finetune starts from it); so does --fresh
    pretrain = yaml.safe_load((configs / "pretrain.yaml").read_text())
    pretrain["seed"] = 7
    (configs / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    assert run(out, configs) == 0
    assert set(this_run(out).values()) == {"ran"}
    assert run(out, configs, "--fresh") == 0
    assert set(this_run(out).values()) == {"ran"}


# ---- configuration checks ----------------------------------------------------------------------------------


def test_quick_scaling_reads_the_stage_configs(tmp_path):
    settings = demo.load_settings(CONFIGS)
    for stage in STAGES:
        raw = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())
        full = demo.stage_config(stage, CONFIGS, tmp_path, quick=False, settings=settings, overrides=[])
        quick = demo.stage_config(stage, CONFIGS, tmp_path, quick=True, settings=settings, overrides=[])
        assert full.schedule.max_steps == raw["schedule"]["max_steps"]
        assert quick.schedule.max_steps == max(1, raw["schedule"]["max_steps"] // settings.quick_step_divisor)
        assert quick.schedule.warmup_steps <= quick.schedule.max_steps
        assert quick.data.synthetic.eval_scenes == min(
            raw["data"]["synthetic"]["eval_scenes"], settings.quick_eval_scenes
        )
        assert full.output_dir == str(tmp_path / stage) and full.model.task == stage
        assert full.model.init_from == (
            None if stage == "pretrain" else str(tmp_path / SETTINGS.upstream(stage) / "model")
        )
        assert demo.model_signature(full) == demo.model_signature(
            demo.stage_config("pretrain", CONFIGS, tmp_path, quick=False, settings=settings, overrides=[])
        )


def test_quick_report_says_its_numbers_are_not_meaningful(tmp_path):
    from demo.report import write_report

    head = {"metric": "accuracy", "value": 40.0, "baseline": 50.0, "above_baseline": False}
    state = {"steps": 2, "train_s": 1.0, "eval_s": 1.0, "wall_s": 2.0, "headline": head}
    meta = {"config_dir": "c", "device": "cpu", "threads": 1, "date": "d"}
    meta.update(stages_wall_s=2.0, invocation_s=2.0)
    for mode in ("quick", "full"):
        lines = write_report(tmp_path, {"ve": state}, [], {**meta, "mode": mode}).read_text().splitlines()
        above = lines[lines.index("| task | metric | value | baseline | above? |") - 2]
        assert ("meaningful" in above and "below its baseline" in above) == (mode == "quick"), mode
        assert sum("meaningful" in line for line in lines) == (mode == "quick")


def test_config_errors_name_the_problem(tmp_path):
    configs = micro_configs(tmp_path / "configs")
    vqa = yaml.safe_load((configs / "vqa.yaml").read_text())
    vqa["model"]["overrides"]["vision.patch_size"] = 4
    (configs / "vqa.yaml").write_text(yaml.safe_dump(vqa))
    with pytest.raises(demo.DemoError, match=r"vqa\.yaml builds another model .*vision\.patch_size"):
        demo.run_demo(tmp_path / "out", configs)

    (configs / "demo.yaml").write_text("gallery: {imagez: 3}\n")
    with pytest.raises(demo.DemoError, match="unknown setting 'gallery.imagez'"):
        demo.load_settings(configs)
    assert run(tmp_path / "out", configs) == 2
    (configs / "demo.yaml").write_text("quick: {step_divisor: 0}\n")
    with pytest.raises(demo.DemoError, match="quick.step_divisor must be an integer >= 1, got 0"):
        demo.load_settings(configs)

    foreign = tmp_path / "foreign"
    (foreign / "pretrain").mkdir(parents=True)
    (foreign / "pretrain" / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="not written by the demo"):
        demo.prepare_stage_dir(foreign / "pretrain", None, "abc")
    assert (foreign / "pretrain" / "notes.txt").is_file()


@pytest.mark.slow
def test_full_demo_every_task_above_its_baseline(tmp_path):
    """The full `make demo` (~9 minutes on 2 idle cores): every task clearly above its model-free baseline
    (the margins sit below every full run in docs/experiments.md, "Results of full runs"). Run with
    ``pytest -m slow tests/test_demo.py``."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config-dir", str(CONFIGS)]) == 0
    tasks = json.loads((tmp_path / "demo" / "summary.json").read_text())["tasks"]
    assert tasks["vqa"]["value"] > tasks["vqa"]["baseline"] + 30
    assert tasks["caption"]["value"] > tasks["caption"]["baseline"] + 1.0
    # with the contrastive fixes mean recall is 7-9x the random ranking (19.4 and 23.3 vs 2.66)
    assert tasks["retrieval"]["value"] > 3 * tasks["retrieval"]["baseline"]
    assert tasks["grounding"]["value"] > tasks["grounding"]["baseline"] + 15
    assert tasks["ve"]["value"] > tasks["ve"]["baseline"] + 20
    assert tasks["nlvr2"]["value"] > tasks["nlvr2"]["baseline"] + 10
