"""`benchmarks/end_to_end.py --quick` runs and writes a complete record for every variant (values are not
asserted beyond consistency: speed is shown by the benchmark, not by tests)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_end_to_end", ROOT / "benchmarks" / "end_to_end.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def e2e():
    return _load()


def test_quick_run_every_variant_ran_or_says_why(e2e, tmp_path, capsys) -> None:
    out = tmp_path / "e2e.json"
    assert e2e.main(["--quick", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"machine", "setup", "shapes", "records", "peak_bf16_tflops", "wall_s"} <= set(result)
    assert {"cpu", "torch", "device", "torch_threads"} <= set(result["machine"])
    assert result["setup"]["quick"] and result["setup"]["preset"] == "tiny"
    assert result["peak_bf16_tflops"] is None  # CPU: no MFU
    records = result["records"]
    variants = {(r["workload"], r["dtype"], r["mode"]) for r in records}
    assert variants == {(w, "fp32", m) for w in e2e.WORKLOADS for m in ("eager", "compile")}
    for r in records:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"], r
            continue
        t = r["time_ms"]
        assert 0 < t["min"] <= t["median"] and t["n"] >= 1
        assert r["throughput"] == pytest.approx(r["batch"] / (t["median"] / 1e3))
        assert r["flops_per_step"] > 0 and r["tflops"] > 0 and "mfu" not in r
        assert r["unit"] == ("samples/s" if r["kind"] == "train" else "images/s")
    ok = {(r["workload"], r["mode"]) for r in records if r["status"] == "ok"}
    assert {(w, "eager") for w in e2e.WORKLOADS} <= ok  # every workload ran eagerly
    compiled = [r for r in records if r["mode"] == "compile"]
    assert all(r["status"] == "skipped" and "compile" in r["reason"] for r in compiled)  # CPU default: off
    train = {r["workload"]: r["flops_per_step"] for r in records if r["kind"] == "train"}
    assert train["train_pretrain"] > train["train_vqa"]  # ITC + ITM + MLM + PrefixLM + momentum > VQA
    md = out.with_suffix(".md").read_text()
    assert "| train_vqa | fp32 | eager | 2 |" in md and "skipped: " in md
    assert "| gen_caption | fp32 | eager |" in capsys.readouterr().out


def test_peak_table_matches_specific_names_first(e2e) -> None:
    assert e2e.peak_for_name("NVIDIA H200") == 989.0
    assert e2e.peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert e2e.peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert e2e.peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert e2e.peak_for_name("NVIDIA A10G") == 125.0
    assert e2e.peak_for_name("NVIDIA L40S") == 362.0
    assert e2e.peak_for_name("NVIDIA L4") == 121.0
    assert e2e.peak_for_name("Tesla T4") is None


def test_mfu_is_flops_over_time_and_peak(e2e) -> None:
    records = [
        {"workload": "w", "status": "ok", "time_ms": {"median": 500.0}},
        {"workload": "w", "status": "skipped", "reason": "x"},
    ]
    e2e.add_flops(records, {"w": 10**12}, peak=4.0)
    assert records[0]["tflops"] == pytest.approx(2.0) and records[0]["mfu"] == pytest.approx(0.5)
    assert "tflops" not in records[1] and records[1]["flops_per_step"] == 10**12
