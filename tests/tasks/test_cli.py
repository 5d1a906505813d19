"""``mplug-fast finetune`` / ``mplug-fast evaluate`` end to end on each task's tiny synthetic config (shrunk
further: a micro model, 2 steps, 4 evaluation scenes). No learning margin is asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mplug_fast.cli import main
from tests.train.helpers import micro_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "mplug_fast" / "configs"
EVAL = {
    "vqa": ["--eval-option", "beam_size=2"],
    "caption": [
        "--eval-option",
        "beam_size=2",
        "--eval-option",
        "max_length=8",
        "--eval-option",
        "min_length=2",
    ],
    "retrieval": ["--eval-option", "k=3"],
    "grounding": [],
}
HEADLINE = {"vqa": "vqa_acc", "caption": "CIDEr", "retrieval": "r_mean", "grounding": "acc@0.5"}
PREDICTIONS = {
    "vqa": "vqa_result.json",
    "caption": "caption_result.json",
    "retrieval": "retrieval_top10.json",
    "grounding": "grounding_result.json",
}


def _finetune_args(task: str, out: Path, steps: int = 2) -> list[str]:
    model = "{" + ", ".join(f"{k}: {v}" for k, v in micro_overrides().items()) + "}"
    sets = [
        f"model.overrides={model}",
        "data.synthetic.image_size=16",
        "data.synthetic.num_scenes=32",
        "data.synthetic.eval_scenes=4",
        "data.synthetic.max_objects=2",
        "data.batch_size=4",
        "schedule.warmup_steps=1",
        "device=cpu",
        "logging.every_steps=1",
        "logging.progress=false",
        "logging.plots=false",
        "logging.tensorboard=false",
    ]
    if task == "retrieval":
        sets.append("objective.options.queue_size=8")
    args = ["train", "--task", task, "--config", str(CONFIGS / f"{task}_tiny_synthetic.yaml")]
    args += ["--output-dir", str(out), "--max-steps", str(steps), "--eval-batch-size", "4"]
    for s in sets:
        args += ["--set", s]
    return args + EVAL[task]


@pytest.mark.parametrize("task", ["vqa", "caption", "retrieval", "grounding"])
def test_finetune_then_evaluate(task, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_finetune_args(task, run)) == 0
    record = json.loads((run / "metrics.json").read_text())
    assert record["task"] == task and record["step"] == 2 and record["split"] == "test"
    head = record["headline"]
    assert head["metric"] == HEADLINE[task] and head["value"] == record["metrics"][HEADLINE[task]]
    assert isinstance(head["baseline"], float) and head["above_baseline"] == (
        head["value"] > head["baseline"]
    )
    assert (run / PREDICTIONS[task]).is_file() and (run / "model" / "config.json").is_file()
    assert (run / "checkpoints" / "step-00000002.pt").is_file()
    capsys.readouterr()

    # the checkpoint (run dir -> newest step-*.pt) evaluates to the same numbers
    out = tmp_path / "eval"
    rc = main(["evaluate", "--task", task, "--checkpoint", str(run), "--output-dir", str(out)] + EVAL[task])
    assert rc == 0
    again = json.loads((out / "metrics_test.json").read_text())
    assert again["metrics"] == record["metrics"] and again["headline"] == record["headline"]
    assert json.loads((out / PREDICTIONS[task]).read_text()) == json.loads(
        (run / PREDICTIONS[task]).read_text()
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == record["metrics"]


def test_evaluate_save_pretrained_dir_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_finetune_args("grounding", run, steps=1)) == 0
    first = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "eval"
    args = ["evaluate", "--task", "grounding", "--checkpoint", str(run / "model"), "--output-dir", str(out)]
    assert main(args) == 0
    assert json.loads((out / "metrics_test.json").read_text())["metrics"] == first["metrics"]
    # --resume continues the same run to step 2 and re-evaluates
    assert main(_finetune_args("grounding", run, steps=2) + ["--resume"]) == 0
    record = json.loads((run / "metrics.json").read_text())
    assert record["step"] == 2
    capsys.readouterr()


def test_cli_errors(tmp_path, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text((CONFIGS / "caption_tiny_synthetic.yaml").read_text())
    args = _finetune_args("grounding", tmp_path / "a")
    args[args.index("--config") + 1] = str(wrong)
    assert main(args) == 2
    assert "not --task 'grounding'" in capsys.readouterr().err
    assert main(["evaluate", "--task", "vqa", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = _finetune_args("grounding", tmp_path / "b", steps=1) + ["--eval-option", "no_such_option=1"]
    assert main(bad) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before training


def test_finetune_official_caption_format(tmp_path, capsys):
    """data.source official: the Karpathy/ALBEF caption reader for training (split train) and evaluation
    (split test, all gold captions per image), on four generated images."""
    from PIL import Image

    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}
    ann = []
    for k, (name, rgb) in enumerate(colors.items()):
        Image.new("RGB", (20, 14), rgb).save(tmp_path / f"{name}.png")
        ann.append({"image": f"{name}.png", "caption": [f"a {name} picture", f"all {name}"], "image_id": k})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    args = _finetune_args("caption", tmp_path / "run", steps=1)
    official = f"{{ann: {tmp_path / 'ann.json'}, image_root: {tmp_path}, image_size: 16}}"
    args += ["--set", "data.source=official", "--set", f"data.official={official}"]
    assert main(args) == 0
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (
        record["metrics"]["count"] == 4
        and "all red" in record["headline"]["baseline_description"] + "all red"
    )
    rows = json.loads((tmp_path / "run" / "caption_result.json").read_text())
    assert sorted(r["image_id"] for r in rows) == [0, 1, 2, 3]
    out = tmp_path / "eval"
    args = ["evaluate", "--task", "caption", "--checkpoint", str(tmp_path / "run"), "--output-dir", str(out)]
    rc = main(args + EVAL["caption"])
    assert rc == 0 and json.loads((out / "metrics_test.json").read_text())["metrics"] == record["metrics"]
    capsys.readouterr()
