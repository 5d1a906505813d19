"""The tables of `kernel_resources.py`: one `Row` per compiled kernel and target, written as JSON and
Markdown, with the SASS-loop cost of dropout (each config with dropout against its twin without)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import triton

# Per-block shared memory limits (opt-in maximum, bytes): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Row:
    kernel: str
    case: str  # the shape and flags that produced the launch
    config: str  # constexprs that select the compiled variant (+ num_warps / num_stages)
    dtype: str
    target: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int  # bytes
    shared_limit: int
    sass_loop: int  # instructions in the longest loop body (0: no loop)
    compile_s: float

    @property
    def fits(self) -> bool:
        return self.shared <= self.shared_limit and self.spill_stores == 0 and self.spill_loads == 0


def write(rows: list[Row], out: Path, note: str = "") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = dict(
        triton=triton.__version__,
        shared_limit={f"sm_{k}": v for k, v in SHARED_LIMIT.items()},
        note=note,
        rows=[dict(asdict(r), fits=r.fits) for r in rows],
    )
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "# Triton kernels compiled for sm_80 / sm_90 (benchmarks/kernel_resources.py)",
        "",
        note,
        "",
        "| kernel | dtype | target | regs | spills (B) | smem (KiB) | SASS loop | fits | config | case |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.dtype} | {r.target} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
            f"{r.shared / 1024:.0f} | {r.sass_loop} | {'yes' if r.fits else '**no**'} | {r.config} | "
            f"{r.case} |"
        )
    lines += ["", *dropout_table(data["rows"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def dropout_pairs(rows: list[dict]) -> list[tuple]:
    """(kernel, target, dtype, config, SASS loop without dropout, with) for every config with dropout that has
    a twin without (same kernel, target, dtype, tiles and other flags); `rows` as in the JSON table."""
    loops = {(r["kernel"], r["target"], r["dtype"], r["config"]): r["sass_loop"] for r in rows}
    pairs = []
    for (kernel, target, dtype, config), loop in loops.items():
        words = config.split()
        flag = next((w for w in words if w in ("dropout", "has_dropout")), None)
        base = loops.get((kernel, target, dtype, " ".join(w for w in words if w != flag)))
        if flag and base:
            pairs.append((kernel, target, dtype, config, base, loop))
    return pairs


def dropout_table(rows: list[dict]) -> list[str]:
    """The markdown table of the SASS loop with / without dropout."""
    lines = [
        "## Dropout cost: SASS loop with / without dropout (same kernel, target, dtype, tiles and flags)",
        "",
        "| kernel | target | dtype | config (with dropout) | without | with | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for kernel, target, dtype, config, base, loop in dropout_pairs(rows):
        lines.append(f"| {kernel} | {target} | {dtype} | {config} | {base} | {loop} | {loop / base:.2f} |")
    return lines
