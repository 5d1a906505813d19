"""The benchmark scripts run end to end (values are not asserted: speed is shown by benchmarks, not tests)."""

import importlib.util
import json
from pathlib import Path

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
