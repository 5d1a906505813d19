"""`mplug-fast caption | vqa | ground | rank` end to end on checkpoints written by save_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mplug_fast.checkpoint import save_pretrained
from mplug_fast.cli import main


@pytest.fixture(scope="module")
def workdir(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for task, model in models.items():
        save_pretrained(model, root / task)
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 56)), ("b.jpg", (64, 32))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
    return root


def _run(capsys, argv):
    assert main(argv) == 0
    return capsys.readouterr().out


def test_caption_cli(workdir, capsys, models, tokenizer):
    from mplug_fast.pipeline import Pipeline

    a, b = str(workdir / "a.png"), str(workdir / "b.jpg")
    argv = [
        "predict",
        "caption",
        a,
        b,
        "--checkpoint",
        str(workdir / "caption"),
        "--beams",
        "2",
        "--max-length",
        "5",
    ]
    doc = json.loads(_run(capsys, [*argv, "--min-length", "1", "--json"]))
    expected = Pipeline(models["caption"], tokenizer, beam_size=2, max_length=5, min_length=1).caption([a, b])
    assert [d["caption"] for d in doc] == expected and [d["image"] for d in doc] == [a, b]
    text = _run(capsys, [*argv, "--min-length", "1"])
    assert text.splitlines() == [f"{a}\t{expected[0]}", f"{b}\t{expected[1]}"]


def test_vqa_ground_rank_cli(workdir, capsys, models, tokenizer):
    from mplug_fast.pipeline import Pipeline

    a = str(workdir / "a.png")
    doc = json.loads(
        _run(capsys, ["predict", "vqa", a, "what is it?", "--checkpoint", str(workdir / "vqa"), "--json"])
    )
    assert doc["answer"] == Pipeline(models["vqa"], tokenizer).answer(a, "what is it?")
    doc = json.loads(
        _run(
            capsys,
            ["predict", "ground", a, "the left block", "--checkpoint", str(workdir / "grounding"), "--json"],
        )
    )
    box = doc["box_xyxy"]
    assert len(box) == 4 and 0 <= box[0] <= box[2] <= 56 and 0 <= box[1] <= box[3] <= 40
    out = _run(capsys, ["predict", "ground", a, "the left block", "--checkpoint", str(workdir / "grounding")])
    assert [float(x) for x in out.split()] == box
    argv = [
        "predict",
        "rank",
        "--images",
        a,
        str(workdir / "b.jpg"),
        "--texts",
        "a dog",
        "two cats",
        "--k",
        "1",
    ]
    doc = json.loads(_run(capsys, [*argv, "--checkpoint", str(workdir / "retrieval"), "--json"]))
    assert np.array(doc["i2t"]).shape == (2, 2) and np.array(doc["t2i"]).shape == (2, 2)
    assert len(doc["best_text_per_image"]) == 2


def test_cli_in_a_fresh_process(workdir):
    """`python -m mplug_fast predict caption` in a new interpreter (what an installed `mplug-fast` runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "mplug_fast",
        "predict",
        "caption",
        str(workdir / "a.png"),
        "--checkpoint",
        str(workdir / "caption"),
        "--max-length",
        "3",
        "--min-length",
        "1",
        "--beams",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(workdir / "a.png") + "\t")


def test_cli_user_errors_exit_2(workdir, capsys):
    assert (
        main(["predict", "vqa", str(workdir / "missing.png"), "what?", "--checkpoint", str(workdir / "vqa")])
        == 2
    )
    assert "missing.png" in capsys.readouterr().err
    assert main(["predict", "vqa", str(workdir / "a.png"), " ", "--checkpoint", str(workdir / "vqa")]) == 2
    assert "question is empty" in capsys.readouterr().err
