"""``mplug-fast pretrain`` end to end on the tiny synthetic config (shrunk further for the test)."""

from __future__ import annotations

import json
from pathlib import Path

from mplug_fast.cli import main
from tests.train.helpers import micro_overrides

CONFIG = str(Path(__file__).resolve().parents[2] / "mplug_fast" / "configs" / "pretrain_tiny_synthetic.yaml")


def _args(tmp_path, steps: int) -> list[str]:
    overrides = micro_overrides(dropout=0.1)
    model = "{" + ", ".join(f"{k}: {v}" for k, v in overrides.items()) + "}"
    return [
        "train",
        "--task",
        "pretrain",
        "--config",
        CONFIG,
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        str(steps),
        "--set",
        "model.preset=micro",
        "--set",
        f"model.overrides={model}",
        "--set",
        "data.synthetic.image_size=16",
        "--set",
        "data.synthetic.num_scenes=64",
        "--set",
        "data.batch_size=4",
        "--set",
        "objective.options.queue_size=16",
        "--set",
        "schedule.warmup_steps=1",
        "--set",
        "device=cpu",
        "--set",
        "logging.every_steps=1",
        "--set",
        "logging.progress=false",
        "--set",
        "checkpoint.every_steps=2",
    ]


def test_pretrain_cli_runs_and_resumes(tmp_path, capsys):
    assert main(_args(tmp_path, 3)) == 0
    printed = capsys.readouterr().out
    assert f"run folder: {tmp_path}" in printed and f"model: {tmp_path / 'model'}" in printed
    assert len(printed.splitlines()) <= 5  # a short summary; the full record is summary.json
    summary = json.loads((tmp_path / "summary.json").read_text())["train"]
    assert summary["status"] == "finished" and summary["step"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "itc", "itm", "mlm", "prefix_lm"} <= set(records[0]), sorted(records[0])
    assert all(r["skipped"] == 0 for r in records)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000002.pt",
        "step-00000003.pt",
    ]
    assert (tmp_path / "loss_curves.png").is_file()

    assert main([*_args(tmp_path, 4), "--resume"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["train"]
    assert (
        summary["resumed_from"].endswith("step-00000003.pt")
        and summary["step"] == 4
        and summary["steps"] == 1
    )


def test_pretrain_cli_errors(tmp_path, capsys):
    assert main(["train", "--task", "pretrain", "--config", CONFIG, "--set", "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--task", "pretrain", "--config", CONFIG, "--set", "model.task=vqa"]) == 2
    assert "mplug-fast train" in capsys.readouterr().err
    assert main(["train", "--task", "pretrain", "--config", str(tmp_path / "none.yaml")]) == 2
    assert (
        main(
            [
                "train",
                "--task",
                "pretrain",
                "--config",
                CONFIG,
                "--set",
                "schedule.max_steps=50",
                "--print-config",
            ]
        )
        == 0
    )
    assert "max_steps: 50" in capsys.readouterr().out
    assert main([*_args(tmp_path, 1), "--resume"]) == 2  # nothing to resume from
    assert "no checkpoint" in capsys.readouterr().err
