"""The report of `fusion_speed.py`: Markdown tables (per scope, with the ratios to the references) and the
plot (grouped bars of GFLOP and fwd+bwd time per style and shape, and the stride sweep)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/fusion_speed.py` or import

from common import (  # noqa: E402
    markdown_table,
)


def tables(result: dict[str, Any]) -> str:
    """The Markdown report: per-scope tables and a ratio summary."""
    m = result["machine"]
    recs = result["records"]
    batch = result["settings"]["batch"]
    head = (
        f"{m['device']} ({m.get('gpu', {}).get('name') or m['cpu']}), {m['dtype']}, attention backend "
        f"{m['backend']}, batch {batch}, {m['torch_threads']} thread(s), torch {m['torch']}. "
        f"Latency: median ms per batch ({result['clock']}). GFLOP per sample "
        f"(analytic; 'count' = FlopCounterMode / analytic). Act. = activations saved for backward (MiB)."
    )
    if "wall_s" in result:
        took = f"{result['wall_s'] / 60:.1f} min wall" + (
            f", {result['cpu_s'] / 60:.1f} min CPU" if "cpu_s" in result else ""
        )
        head += f" Run: {took}" + (f", `{result['command']}`." if "command" in result else ".")
    parts = [head]
    headers = ["shape (Nv, Lt)", "style", "GFLOP fwd", "GFLOP fwd+bwd", "count", "fwd ms", "fwd+bwd ms"]
    headers += ["act. MiB", "xFLOP vs S3", "xfwd vs S3", "xfwd+bwd vs S3"]
    cuda = any("peak_train_mib" in r for r in recs)
    if cuda:
        headers.insert(8, "peak MiB fwd+bwd")
    for scope, title in (
        ("fusion", "Fusion module alone"),
        ("e2e", "End to end (ViT + text + fusion + decoder)"),
    ):
        rows = []
        for r in (r for r in recs if r["scope"] == scope):
            vs = r.get("vs_skip-S3", {})
            agree = f"{1 + r['flop_rel_err']:.4f}" + ("" if r["flops_ok"] else " MISMATCH")
            row = [
                f"{r['shape']} ({r['Nv']}, {r['Lt']})",
                r["style"],
                r["gflop_fwd"],
                r["gflop_train"],
                agree,
                r["fwd_ms"]["median"] if "fwd_ms" in r else None,
                r["train_ms"]["median"] if "train_ms" in r else None,
                r.get("saved_activation_mib"),
                vs.get("gflop_fwd"),
                vs.get("fwd_ms"),
                vs.get("train_ms"),
            ]
            if cuda:
                row.insert(8, r.get("peak_train_mib"))
            rows.append(row)
        if rows:
            parts += [f"### {title}", markdown_table(headers, rows)]
    rows = []
    for r in recs:
        if r["style"] not in ("connected", "coattn"):
            continue
        s3, s6 = r.get("vs_skip-S3", {}), r.get("vs_skip-S6", {})
        rows.append(
            [
                r["scope"],
                f"{r['shape']} ({r['Nv']}, {r['Lt']})",
                r["style"],
                s3.get("gflop_fwd"),
                s6.get("gflop_fwd"),
            ]
            + [s3.get("fwd_ms"), s3.get("train_ms"), s6.get("fwd_ms"), s6.get("train_ms")]
        )
    if rows:
        parts += [
            "### How much slower than skip-connected (ratio > 1: the baseline costs more)",
            markdown_table(
                [
                    "scope",
                    "shape",
                    "style",
                    "FLOPs / S3",
                    "FLOPs / S6",
                    "fwd / S3",
                    "fwd+bwd / S3",
                    "fwd / S6",
                    "fwd+bwd / S6",
                ],
                rows,
            ),
        ]
    return "\n\n".join(parts) + "\n"


def plot(result: dict[str, Any], path: Path, styles: list[str]) -> Path | None:
    """Grouped bars (GFLOP and fwd+bwd ms per style and shape, both scopes; `styles`: the bars, in order) and
    the stride sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    recs = result["records"]
    fig, axes = plt.subplots(3, 2, figsize=(12, 12))
    for row, scope in enumerate(("fusion", "e2e")):
        shapes = list(dict.fromkeys(r["shape"] for r in recs if r["scope"] == scope))
        for col, (key, label) in enumerate(
            (("gflop_fwd", "GFLOP / sample (fwd)"), ("train_ms", "fwd+bwd ms / batch"))
        ):
            ax = axes[row, col]
            width = 0.8 / len(styles)
            for k, style in enumerate(styles):
                ys = []
                for shape in shapes:
                    r = next(
                        (r for r in recs if (r["scope"], r["shape"], r["style"]) == (scope, shape, style)),
                        None,
                    )
                    value = (
                        None
                        if r is None
                        else (r[key]["median"] if key == "train_ms" and key in r else r.get(key))
                    )
                    ys.append(float("nan") if value is None or isinstance(value, dict) else value)
                ax.bar([x + k * width for x in range(len(shapes))], ys, width, label=style)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
            ax.set_title(f"{'fusion module' if scope == 'fusion' else 'end to end'}: {label}")
            ax.legend(fontsize=8)
    for col, (key, label) in enumerate(
        (("gflop_fwd", "GFLOP / sample (fwd)"), ("train_ms", "fwd+bwd ms / batch"))
    ):
        ax = axes[2, col]
        for shape in dict.fromkeys(r["shape"] for r in recs if r["scope"] == "fusion"):
            pts = sorted(
                (r["stride"], r[key]["median"] if key == "train_ms" else r[key])
                for r in recs
                if r["scope"] == "fusion"
                and r["shape"] == shape
                and r["fusion"] == "skip"
                and (key != "train_ms" or key in r)
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=shape)
        ax.set_xlabel("stride S (skip-connected fusion)")
        ax.set_xticks([1, 2, 3, 6])
        ax.set_title(f"stride sweep: {label}")
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"fusion_speed: {m.get('gpu', {}).get('name') or m['cpu']}, {m['dtype']}, "
        f"batch {result['settings']['batch']}, {result['clock']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
