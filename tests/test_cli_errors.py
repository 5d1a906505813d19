"""`mplug-fast` error policy, in-process through `mplug_fast.cli.main`: an expected error (bad input, a bad
file, a bad option) is one line on stderr naming the problem (and the file) with exit code 2; anything else
is a traceback plus a line saying it is a bug, exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mplug_fast
from mplug_fast.checkpoint.io import CONFIG_NAME
from mplug_fast.cli import main
from mplug_fast.tasks import from_pretrained
from tests.test_trust import CONFIG, make_checkpoints

PREDICT = ["predict", "caption"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("cli_errors"))


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Runs `argv`; asserts exit code 2 and one stderr line holding every needle; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mplug-fast "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without usable CUDA")
def test_cuda_device_without_cuda(files, capsys):
    fails(capsys, [*PREDICT, str(files["image"]), "--config", "micro", "--device", "cuda"], "cannot use CUDA")
    argv = ["evaluate", "--task", "caption", "--checkpoint", str(files["run"]), "--device", "cuda:0"]
    fails(capsys, argv, "mplug-fast evaluate: error: device 'cuda:0'", "cannot use CUDA")
    fails(capsys, [*PREDICT, str(files["image"]), "--config", "micro", "--device", "gpu"], "unknown device")


def test_corrupt_checkpoint_files(files, tmp_path, capsys):
    good = files["official"].read_bytes()
    bad = {
        "text.pth": b"hello, I am not a checkpoint\n",
        "random.pth": bytes(
            torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
        ),
        "truncated.pth": good[: len(good) // 2],
        "empty.pth": b"",
    }
    image = str(files["image"])
    for name, data in bad.items():
        path = tmp_path / name
        path.write_bytes(data)
        err = fails(capsys, [*PREDICT, image, "--checkpoint", str(path)], str(path))
        assert "allow_pickle" not in err and "weights_only" not in err
    fails(
        capsys, ["evaluate", "--task", "caption", "--checkpoint", str(tmp_path / "truncated.pth")], "corrupt"
    )
    step = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    step.parent.mkdir(parents=True)
    step.write_bytes(good[:1000])
    argv = ["train", "--config", CONFIG, "--output-dir", str(tmp_path / "run"), "--resume", "--no-eval"]
    assert main([*argv, "--set", "data.synthetic.num_scenes=8"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err.strip().splitlines()[-1]


def test_wrong_shape_in_fused_qkv(files, tmp_path, capsys):
    state = torch.load(files["official"], weights_only=True)
    key = next(k for k in state["model"] if k.endswith("attention.self.key.weight"))  # one of q/k/v
    right = list(state["model"][key].shape)
    state["model"][key] = torch.zeros(right[0], right[1] // 2)
    torch.save(state, tmp_path / "bad_qkv.pth")
    err = fails(
        capsys,
        [*PREDICT, str(files["image"]), "--checkpoint", str(tmp_path / "bad_qkv.pth")],
        key,
        f"[{right[0]}, {right[1] // 2}]",
        str(right),
    )
    assert "torch.cat" not in err and "Sizes of tensors" not in err


def test_bad_config_json_in_a_model_folder(files, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((files["pretrained"] / "model.safetensors").read_bytes())
    foreign = (
        ("{not json", "not valid JSON"),
        (json.dumps({"architectures": ["BertModel"]}), "not a save_pretrained config"),
        (json.dumps({"task": "caption", "config": {"hidden": 3}}), "unknown key 'hidden'"),
    )
    for text, needle in foreign:
        (folder / CONFIG_NAME).write_text(text)
        fails(
            capsys,
            [*PREDICT, str(files["image"]), "--checkpoint", str(folder)],
            str(folder / CONFIG_NAME),
            needle,
        )


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("model:\n  preset: [unclosed\n", ("not valid YAML",)),
        ("model:\n  preset: nosuch\n  task: caption\n", ("model.preset", "nosuch")),
        ("device: gpu0\nmodel:\n  task: caption\n", ("device", "gpu0")),
    ],
)
def test_bad_run_config(tmp_path, capsys, text, needles):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    fails(capsys, ["train", "--config", str(path), "--print-config"], str(path), *needles)


def test_bad_images(files, tmp_path, capsys, monkeypatch):
    not_image = tmp_path / "photo.png"
    not_image.write_text("not an image")
    fails(capsys, [*PREDICT, str(not_image), "--config", "micro"], str(not_image), "cannot read image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # a.png (40x56) is over twice the limit: refused
    fails(
        capsys,
        [*PREDICT, str(files["image"]), "--config", "micro"],
        str(files["image"]),
        "decompression-bomb",
    )


def test_unexpected_error_is_reported_as_a_bug(files, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr("mplug_fast.cli.predict.pipeline", broken)
    assert main([*PREDICT, str(files["image"]), "--config", "micro"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'internal'" in err
    assert err.strip().splitlines()[-1].startswith("mplug-fast predict caption: this is a bug in mplug_fast")


def test_dtype_names(files, capsys):
    pipe = mplug_fast.pipeline("caption", files["pretrained"], dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    fails(
        capsys,
        [*PREDICT, str(files["image"]), "--config", "micro", "--dtype", "int8"],
        "unknown dtype 'int8'",
    )


def test_config_json_naming_an_unknown_task_names_the_file(files, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    meta = json.loads((files["pretrained"] / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**meta, "task": "nosuch"}))
    (folder / "model.safetensors").write_bytes((files["pretrained"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: unknown task 'nosuch'; available: "):
        from_pretrained(folder)


def test_a_closed_stdout_is_not_reported_as_a_bug():
    """`mplug-fast info | head -1`: the reader closes the pipe first; exit code 141 and nothing on stderr."""
    code = "import sys; from mplug_fast.cli import main; sys.exit(main(['info']))"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the child (still importing torch) has written anything
    err = child.stderr.read().decode()
    assert child.wait(timeout=300) == 141, err
    assert err == ""
