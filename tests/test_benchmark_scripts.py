"""The benchmark scripts run end to end (values are not asserted: speed is shown by benchmarks, not tests)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_kernels_quick_run_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "attention.json"
    assert _load("attention_kernels").main(["--quick", "--backends", "sdpa", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["name"] for r in result["records"]} == {
        "vit_self",
        "asym_cross",
        "connected",
        "decode_beams",
        "decoder_self",
    }
    assert all(r["max_abs_err"] < 1e-4 for r in result["records"])
    assert "| vit_self | fwd | sdpa |" in capsys.readouterr().out


def _run(script: str, *args: str) -> None:
    """Runs `python benchmarks/<script>.py ...` as a user does and checks that it succeeded."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]


def test_stage_speed_quick_outputs_agree(tmp_path) -> None:
    out = tmp_path / "stages.json"
    _run("stage_speed", "--quick", "--repeats", "1", "--out", str(out))
    records = json.loads(out.read_text())["records"]
    assert len(records) == 6
    assert all(r["max_rel_diff"] < 1e-4 for r in records), records  # both sides compute the same thing


def test_generation_end_to_end_quick_same_ids(tmp_path) -> None:
    out = tmp_path / "e2e.json"
    _run("generation_end_to_end", "--quick", "--batch-sizes", "1", "--repeats", "1", "--out", str(out))
    records = json.loads(out.read_text())["records"]
    assert {r["case"] for r in records} == {"caption", "vqa"} and all(r["same_ids"] for r in records)
    assert all(r["layout"] in ("packed", "plain") for r in records)


def test_generation_speed_times_both_layouts_against_the_floor(tmp_path) -> None:
    """The decode step of the plain and the packed decoder, each with its floors; every variant's ids."""
    out = tmp_path / "steps.json"
    args = ["--quick", "--native-only", "--threads", "1", "--batch-sizes", "1", "--cases", "vqa"]
    _run("generation_speed", *args, "--out", str(out))
    result = json.loads(out.read_text())
    records = result["records"]
    assert [r["variant"] for r in records] == ["cached", "python_step", "graph", "packed"]
    assert all(r["same_ids_as_cached"] for r in records)
    steps = {s["name"]: s for s in result["decode_steps"]}
    assert set(steps) == {"vqa_b1_decode_step", "vqa_b1_packed_decode_step"}
    assert steps["vqa_b1_packed_decode_step"]["layout"] == "packed"
    assert all(s["floor_bandwidth_ms"] > 0 and s["vs_bandwidth_floor"] > 0 for s in steps.values())


def test_int8_decoder_quick_reports_agreement(tmp_path) -> None:
    out = tmp_path / "int8.json"
    _run("int8_decoder", "--preset", "tiny", "--quick", "--out", str(out))
    records = json.loads(out.read_text())["records"]
    assert [r["variant"] for r in records] == ["fp32", "int8"]
    assert 0.0 <= records[1]["token_agreement"] <= 1.0


def test_stage_speed_keeps_tied_weights_tied() -> None:
    """The official model's LM head is its word embedding: the scaled state dict keeps such tensors shared
    (else the official training step would skip summing that weight's two gradients)."""
    word, bias = torch.ones(6, 4), torch.ones(6)
    sd = {"embeddings.word": word, "head.decoder.weight": word, "head.bias": bias, "other": torch.ones(3, 4)}
    scaled = _load("stage_speed").scaled_state_dict(sd)
    assert scaled["head.decoder.weight"] is scaled["embeddings.word"]
    assert scaled["other"] is not scaled["embeddings.word"]
    assert torch.equal(scaled["embeddings.word"], word * 0.1) and scaled["head.bias"] is bias  # 1-D kept


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="no AVX2 on this CPU")
def test_weight_stream_builds_and_its_kernels_agree_with_float64(tmp_path) -> None:
    """benchmarks/weight_stream.cpp (the layouts behind the decode step's floors): it compiles, and its
    own check of every kernel against a float64 product passes (it exits 1 otherwise)."""
    binary = tmp_path / "weight_stream"
    flags = ["-O2", "-mavx2", "-mfma", "-fopenmp"]
    subprocess.run(
        ["g++", *flags, str(ROOT / "benchmarks" / "weight_stream.cpp"), "-o", str(binary)], check=True
    )
    run = subprocess.run(
        [str(binary), "--quick"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["rows"]) for r in rows} == {
        (k, m) for k in ("rows_3x4", "packed_dot", "packed_outer") for m in (5, 10)
    }
