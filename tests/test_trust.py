"""Trust boundary and checkpoint kinds, through the public API and the CLI: nothing read from disk runs
code (a pickle that would create a marker file is refused by every reader, the marker never appears), and
every loader takes a run folder, a save_pretrained folder, an official .pth and a trainer checkpoint,
detects which and says so; batch inference shows a progress bar on long inputs only."""

from __future__ import annotations

import builtins
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mplug_fast
from mplug_fast.checkpoint import (
    CheckpointError,
    official_queue_state,
    read_checkpoint,
    resolve_checkpoint,
    save_pretrained,
    to_official_state_dict,
)
from mplug_fast.cli import main
from mplug_fast.tasks import from_pretrained, load_official_checkpoint
from mplug_fast.train.build import build_model
from mplug_fast.train.checkpointer import load_checkpoint, rng_state
from mplug_fast.train.config import load_config

CONFIG = "caption_tiny_synthetic"  # micro caption model, 32 px
FAST = ["--beams", "1", "--max-length", "3", "--min-length", "1"]


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def make_checkpoints(root: Path) -> dict[str, Path]:
    """One micro caption model saved as each kind of checkpoint, plus an image: {kind: path, "image": ...}."""
    config = load_config(CONFIG, [f"output_dir={root / 'run'}"])
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_pretrained(model, root / "pretrained")
    save_pretrained(model, root / "run" / "model")
    trainer = {
        "step": 3,
        "config": config.to_dict(),
        "objective": {f"model.{k}": v for k, v in model.state_dict().items()},
        "rng": [rng_state()],  # numpy's RNG state: the allowlisted non-tensor types
    }
    (root / "stopped" / "checkpoints").mkdir(parents=True)  # a run stopped before its final model
    torch.save(trainer, root / "stopped" / "checkpoints" / "step-00000003.pt")
    official = to_official_state_dict(model, num_hidden_layers=model.config.fusion.layers)
    torch.save({"model": official}, root / "mplug_micro.pth")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a.png")
    return {
        "run": root / "run",
        "pretrained": root / "pretrained",
        "trainer": root / "stopped",
        "official": root / "mplug_micro.pth",
        "image": root / "a.png",
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("trust"))


def test_resolver_tells_the_kinds_apart(files):
    run = resolve_checkpoint(files["run"])
    assert (run.kind, run.path) == ("run", files["run"] / "model")
    assert resolve_checkpoint(files["pretrained"]).kind == "pretrained"
    assert resolve_checkpoint(files["pretrained"] / "model.safetensors").path == files["pretrained"]
    stopped = resolve_checkpoint(files["trainer"])  # a run folder without model/: its newest step file
    assert (stopped.kind, stopped.path.name) == ("trainer", "step-00000003.pt")
    assert resolve_checkpoint(stopped.path).kind == "trainer"
    assert resolve_checkpoint(files["official"]).kind == "official"
    assert str(run) == f"the final model of a run folder {files['run'] / 'model'}"
    empty = files["image"].parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(files["image"].parent / "nope.pth")


def test_pipeline_and_predict_load_every_kind(files, capsys):
    image = str(files["image"])
    captions = {}
    for kind in ("run", "pretrained", "trainer", "official"):
        pipe = mplug_fast.pipeline("caption", files[kind], beam_size=1, max_length=3, min_length=1)
        assert pipe.source.kind == kind
        captions[kind] = pipe.caption(image)
        assert main(["predict", "caption", image, "--checkpoint", str(files[kind]), *FAST]) == 0
        out = capsys.readouterr()
        assert f"loaded {pipe.source}" in out.err and out.out == f"{image}\t{captions[kind]}\n"
    assert captions["run"] == captions["pretrained"] == captions["trainer"]  # the same weights


def test_evaluate_loads_run_trainer_and_official(files, tmp_path, capsys):
    for kind in ("run", "trainer", "official"):  # a save_pretrained folder: tests/tasks/test_cli.py
        argv = ["evaluate", "--task", "caption", "--checkpoint", str(files[kind]), "--eval-limit", "2"]
        assert main([*argv, "--output-dir", str(tmp_path / kind), "--set", "device=cpu"]) == 0
        out = capsys.readouterr()
        assert f"loaded {resolve_checkpoint(files[kind])}" in out.err
        assert json.loads(out.out)["checkpoint_kind"] == kind


def _evil_files(root: Path, marker: Path) -> dict[str, Path]:
    evil = {"w": torch.zeros(2), "payload": RunsCode(marker)}
    (root / "evil_run" / "checkpoints").mkdir(parents=True)
    paths = {
        "pth": root / "evil.pth",
        "step": root / "evil_run" / "checkpoints" / "step-00000001.pt",
        "legacy": root / "evil_legacy.pth",  # torch's pre-zip format: a bare pickle stream
    }
    torch.save({"model": evil}, paths["pth"])
    torch.save({"config": {}, "objective": evil}, paths["step"])
    torch.save({"model": evil}, paths["legacy"], _use_new_zipfile_serialization=False)
    (root / "evil_pretrained").mkdir()
    (root / "evil_pretrained" / "config.json").write_text('{"task": "caption", "config": {}}')
    torch.save(evil, root / "evil_pretrained" / "model.safetensors")  # a pickle posing as safetensors
    paths["pretrained"] = root / "evil_pretrained"
    return paths


def test_nothing_read_from_disk_runs_code(files, tmp_path, capsys):
    marker = tmp_path / "marker"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(RunsCode(control)))  # the payload works when unpickled unsafely
    assert control.exists()
    evil = _evil_files(tmp_path, marker)
    image = str(files["image"])
    for path in (evil["pth"], evil["step"], evil["legacy"]):
        for load in (read_checkpoint, official_queue_state, load_checkpoint, resolve_checkpoint):
            with pytest.raises((CheckpointError, RuntimeError), match="never runs code"):
                load(path)
        with pytest.raises(CheckpointError, match="holds a Python object"):
            mplug_fast.pipeline("caption", path)
        with pytest.raises(CheckpointError, match="never runs code"):
            load_official_checkpoint(path, "caption")
        for argv in (
            ["predict", "caption", image, "--checkpoint", str(path)],
            ["evaluate", "--task", "caption", "--checkpoint", str(path)],
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "never runs code" in err and "allow_pickle" not in err, err
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        from_pretrained(evil["pretrained"])
    run = tmp_path / "train"
    argv = ["train", "--config", CONFIG, "--output-dir", str(run), "--resume", str(evil["step"])]
    assert main([*argv, "--set", "data.synthetic.num_scenes=8", "--no-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "never runs code" in err[-1] and err[-1].startswith("mplug-fast train: error:"), err
    assert not marker.exists()


def test_progress_bar_on_long_inputs_only(files, capsys):
    image = str(files["image"])
    pipe = mplug_fast.pipeline("caption", files["pretrained"], beam_size=1, max_length=2, min_length=1)
    pipe.batch_size = 1
    pipe.caption([image, image, image])
    assert "3/3" in capsys.readouterr().err
    pipe.progress = True
    pipe.caption(image)
    assert "image" not in capsys.readouterr().err  # never for a single image
    argv = ["predict", "caption", image, image, "--checkpoint", str(files["run"]), "--batch-size", "1"]
    assert main([*argv, *FAST]) == 0
    assert "2/2" in capsys.readouterr().err
    assert main([*argv, *FAST, "--no-progress"]) == 0
    assert "2/2" not in capsys.readouterr().err
