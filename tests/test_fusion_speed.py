"""benchmarks/fusion_speed.py and its baselines: the FLOP formulas, the baseline modules' wiring, and a
--smoke run of the whole script (JSON schema, counted = analytic FLOPs, every style ran). Speeds are not
asserted: they are what the benchmark reports."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mplug_fast.config import get_config
from mplug_fast.modeling.fusion import ConnectedAttentionLayer, SkipConnectedFusion

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def baselines():
    return _load("fusion_baselines")


def _tiny(**overrides):
    return get_config(
        "tiny", **{"text.hidden_dropout": 0.0, "text.attention_dropout": 0.0, "fusion.layers": 4, **overrides}
    )


def test_flop_formulas_match_the_hand_computed_table(baselines) -> None:
    """paper_and_peers.md §1.4 (computed by hand there): D = 768, FFN 3072, 6 layers, Nv = 577, Lt = 40."""
    D, F = 768, 3072
    assert baselines.asymmetric_layer_flops(577, 40, D, F) / 1e9 == pytest.approx(2.10, abs=0.005)
    assert baselines.connected_layer_flops(577, 40, D, F) / 1e9 == pytest.approx(9.90, abs=0.005)
    assert baselines.coattention_layer_flops(577, 40, D, F) / 1e9 == pytest.approx(12.8, abs=0.05)
    stacks = {s: baselines.fusion_flops(s, 577, 40, D, F, 6, 3) / 1e9 for s in baselines.STYLES}
    assert stacks == pytest.approx({"skip": 20.4, "connected": 59.4, "coattn": 76.9}, abs=0.05)
    assert baselines.fusion_flops("skip", 577, 40, D, F, 6, 6) / 1e9 == pytest.approx(12.6, abs=0.05)
    with pytest.raises(ValueError, match="unknown fusion style"):
        baselines.fusion_flops("bogus", 577, 40, D, F, 6, 3)


@pytest.mark.parametrize("style", ["skip", "connected", "coattn"])
def test_counted_flops_match_the_formula_with_padding_masks(baselines, style) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    config = _tiny(attention_backend="reference")
    model = baselines.build_fusion(style, config)
    v, t = torch.randn(2, 9, 256), torch.randn(2, 5, 256)
    t_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with FlopCounterMode(display=False) as counter:
        model(v, t, t_mask)
    expected = baselines.fusion_flops(style, 9, 5, 256, 1024, 4, config.fusion.stride)
    assert counter.get_total_flops() == 2 * expected


def test_all_connected_layer_is_the_skip_fusions_connected_layer_without_the_image_residual(
    baselines,
) -> None:
    config = _tiny(**{"fusion.layers": 1})
    oracle = ConnectedAttentionLayer(config).eval()
    model = baselines.AllConnectedFusion(config).eval()
    model.layers[0].load_state_dict(oracle.state_dict())
    v, t = torch.randn(2, 9, 256), torch.randn(2, 5, 256)
    t_mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    v_ref, t_ref = oracle(v, t, None, t_mask)
    v_out, t_out = model(v, t, t_mask)
    torch.testing.assert_close(t_out, t_ref)
    torch.testing.assert_close(v + v_out, v_ref)


def test_each_style_mixes_the_modalities_it_should(baselines) -> None:
    """Co-attention and all-connected update both streams from the other; skip with S = 6 (no connected
    layer) leaves the image untouched and updates the text from it."""
    v, t = torch.randn(1, 9, 256), torch.randn(1, 5, 256)
    v2, t2 = v.clone(), t.clone()
    v2[0, 3] += 1.0
    t2[0, 1] += 1.0
    for style, stride, image_reads_text in (("coattn", 3, True), ("connected", 3, True), ("skip", 6, False)):
        model = baselines.build_fusion(style, _tiny(**{"fusion.stride": stride})).eval()
        with torch.no_grad():
            v_a, t_a = model(v, t)
            _, t_b = model(v2, t)  # image changed: the text must see it
            v_c, _ = model(v, t2)  # text changed: the image sees it only if it attends to the text
        assert not torch.allclose(t_a, t_b), style
        assert torch.allclose(v_a, v_c) != image_reads_text, style
    assert isinstance(baselines.build_fusion("skip", _tiny()), SkipConnectedFusion)


def test_saved_activation_bytes_counts_each_storage_once_and_skips_parameters() -> None:
    common = _load("common")
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(4, 8, requires_grad=True)
    with common.saved_activation_bytes([w]) as saved:
        y = x @ w  # saves x (for w's grad) and w (excluded)
        z = (y * y).sum()  # saves y (twice: one storage)
    z.backward()
    assert saved[0] == x.nbytes + y.nbytes
    s = common.summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["n"]) == (2.0, 1.0, 3)


@pytest.mark.long
def test_smoke_run_writes_json_table_and_plot(tmp_path, capsys) -> None:
    out = tmp_path / "fusion.json"
    assert _load("fusion_speed").main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    machine = result["machine"]
    for key in ("cpu", "torch", "triton", "dtype", "backend", "device", "date"):
        assert key in machine, key
    assert machine["dtype"] == "float32"
    records = result["records"]
    styles = {scope: {r["style"] for r in records if r["scope"] == scope} for scope in ("fusion", "e2e")}
    assert styles["fusion"] == {"skip-S1", "skip-S2", "skip-S3", "skip-S6", "connected", "coattn"}
    assert styles["e2e"] == {"skip-S3", "skip-S6", "connected", "coattn"}
    for r in records:
        assert r["flops_ok"] and r["flop_rel_err"] <= 0.02, r
        assert r["gflop_train"] > r["gflop_fwd"] > 0
        for key in ("fwd_ms", "train_ms"):
            assert r[key]["median"] > 0 and r[key]["n"] == 1
        assert r["saved_activation_mib"] > 0
        assert r["vs_skip-S3"]["gflop_fwd"] == pytest.approx(r["gflop_fwd"] / _find(records, r, "skip-S3"))
    e2e = [r for r in records if r["scope"] == "e2e"]
    assert all(set(r["gflop_components"]) == {"vision", "text", "fusion", "decoder"} for r in e2e)
    ranked = sorted((r for r in records if r["scope"] == "fusion"), key=lambda r: r["gflop_fwd"])
    assert [r["style"] for r in ranked][-1] == "coattn"  # the most expensive style at any shape
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert out.with_suffix(".md").read_text() in capsys.readouterr().out
    assert "| smoke (10, 6) | coattn |" in out.with_suffix(".md").read_text()


def _find(records, r, style):
    return next(
        x["gflop_fwd"]
        for x in records
        if (x["scope"], x["shape"], x["style"]) == (r["scope"], r["shape"], style)
    )


def test_bad_arguments_are_errors_naming_the_problem() -> None:
    fusion_speed = _load("fusion_speed")
    with pytest.raises(ValueError, match="unknown shape"):
        fusion_speed.main(["--smoke", "--fusion-shapes", "nope", "--no-plot", "--out", "/dev/null"])
    with pytest.raises(ValueError, match="unknown dtype"):
        fusion_speed.main(["--smoke", "--dtype", "float8", "--no-plot", "--out", "/dev/null"])
