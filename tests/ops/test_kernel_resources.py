"""The compile gate: every Triton launch the dispatcher can make at mPLUG's shapes compiles for sm_80 (A100)
and sm_90 (H100/H200) with shared memory inside the target's limit and no register spills.

No GPU is needed: `benchmarks/kernel_resources.py` records the launchers' real launches and compiles them with
Triton's own toolchain (ptxas -v for registers and spills). It runs in a subprocess because this test
session imports the kernels under the interpreter (`TRITON_INTERPRET=1`), which cannot compile. Compiled
kernels and ptxas results are cached (Triton's cache dir), so a warm run takes well under a minute.
`make test` compiles the bf16 launches (every kernel and tile-table row: about a third of the table, two to
three minutes cold on two cores); `make kernels` (``MPLUG_FAST_KERNEL_GATE=full``) compiles fp16, bf16 and
fp32 (5 to 8 minutes cold) against the whole committed table.

The gate also keeps `benchmarks/results/kernel-resources.json` honest: the committed table must list exactly
the launches the current launchers make, with the same resources (when the Triton version matches).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "benchmarks" / "results" / "kernel-resources.json"
# compiled dtypes: bf16 (every kernel and tile row) in `make test`; all three with MPLUG_FAST_KERNEL_GATE=full
DTYPES = (
    ["float16", "bfloat16", "float32"] if os.environ.get("MPLUG_FAST_KERNEL_GATE") == "full" else ["bfloat16"]
)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _key(row: dict) -> tuple:
    return (row["kernel"], row["config"], row["dtype"], row["target"], row["case"])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    if not PTXAS.exists():
        pytest.skip(f"triton's bundled ptxas is missing ({PTXAS})")
    out = tmp_path_factory.mktemp("kernel-resources") / "table"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MPLUG_FAST_TRITON_ARCH")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "kernel_resources.py"),
            "--out",
            str(out),
            "--dtypes",
            *DTYPES,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    if not out.with_suffix(".json").exists():
        pytest.fail(f"kernel_resources.py wrote no table (rc {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(out.with_suffix(".json").read_text())


def test_every_launch_fits_sm80_and_sm90_without_spills(compiled):
    bad = [r for r in compiled["rows"] if not r["fits"]]
    assert not bad, "launches that would fail or spill on a GPU:\n" + "\n".join(
        f"  {r['kernel']} {r['target']} {r['dtype']} [{r['config']}] ({r['case']}): {r['registers']} regs, "
        f"spills {r['spill_stores']}/{r['spill_loads']} B, shared {r['shared']} > {r['shared_limit']}?"
        for r in bad
    )
    targets = {r["target"] for r in compiled["rows"]}
    assert targets == {"sm_80", "sm_90"}, targets
    kernels = {r["kernel"] for r in compiled["rows"]}
    for name in (
        "attn_fwd",
        "attn_bwd_dq",
        "attn_bwd_dkdv",
        "splitk_fwd",
        "ln_fwd",
        "ln_bwd",
        "bias_act_fwd",
    ):
        assert name in kernels, f"{name} was never launched by the recorded cases"


# FlashAttention-2's cost: the SASS loop with dropout within 1.5x of the same loop without, for every kernel
# and target (docs/experiments.md, "Dropout cost in the Triton kernels").
DROPOUT_LOOP_BOUND = 1.5


def test_dropout_inner_loop_stays_within_the_bound(compiled):
    """Same kernel, target, dtype, tiles and flags with and without dropout (each dropout case has a twin
    without; LayerNorm: p = 0 vs 0.1): the SASS loop grows by at most DROPOUT_LOOP_BOUND."""
    loops = {(r["kernel"], r["target"], r["dtype"], r["config"]): r["sass_loop"] for r in compiled["rows"]}
    pairs = 0
    for (kernel, target, dtype, config), loop in loops.items():
        words = config.split()
        if "dropout" not in words and "has_dropout" not in words:
            continue
        base_config = " ".join(w for w in words if w not in ("dropout", "has_dropout"))
        base = loops.get((kernel, target, dtype, base_config))
        assert base is not None, f"{kernel} {target} {dtype} [{config}] has no twin without dropout"
        pairs += 1
        assert loop <= DROPOUT_LOOP_BOUND * base, (
            f"{kernel} {target} {dtype} [{config}]: loop {loop} vs {base} without dropout"
        )
    assert pairs >= 30, f"only {pairs} (dropout, no dropout) pairs of configs in the table"


def test_committed_table_is_current(compiled):
    committed = json.loads(TABLE.read_text())
    got = {_key(r): r for r in compiled["rows"]}
    want = {_key(r): r for r in committed["rows"] if r["dtype"] in DTYPES}
    assert got.keys() == want.keys(), (
        f"benchmarks/results/kernel-resources.json is stale: rerun benchmarks/kernel_resources.py --out "
        f"benchmarks/results/kernel-resources "
        f"(new: {sorted(got.keys() - want.keys())[:5]}, gone: {sorted(want.keys() - got.keys())[:5]})"
    )
    if committed["triton"] != compiled["triton"]:
        pytest.skip(f"table made with triton {committed['triton']}, running {compiled['triton']}")
    for key, row in got.items():
        for field in ("registers", "spill_stores", "shared"):
            assert row[field] == want[key][field], (
                f"{key}: {field} {row[field]} != committed {want[key][field]}"
            )
