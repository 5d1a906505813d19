"""The connected fusion layer with and without materialising [v; t] (issue 3, item 3).

    python benchmarks/connected_layer.py --threads 1   # base widths (D 768, 12 heads), CPU, fp32
    python benchmarks/connected_layer.py --quick       # tiny widths, few repeats (smoke run)

Variants of `mplug_fast.modeling.fusion.ConnectedAttentionLayer` (same weights):
    concat   (default) cat the hidden states [v; t] [B, Nv+Lt, D] once, run the plain post-LN layer on it
    split    project q/k/v per side, join only the per-head q/k/v for the one attention call, run the
             out-projection, the residual LayerNorms and the MLP per side (no [v; t] hidden states)

Cases: base image tokens (Nv = 577 at 384 px, 257 at 256 px) with a VQA question (Lt = 12) or a caption
(Lt = 30, padded), batch 2; forward (no grad) and forward + backward (sum of squares; dropout 0).
The variants are checked first (max |diff| of the outputs and of the input grads). Timing:
`time.perf_counter`, median, p20, p80 of `--repeats` runs after `--warmup` runs, the two variants
alternating run by run (a shared machine's load hits both alike); attention backend `sdpa` (the automatic
CPU choice). Writes benchmarks/results/cpu-connected-layer.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import mplug_fast
from mplug_fast.modeling.fusion import ConnectedAttentionLayer
from mplug_fast.modeling.layers import init_bert_weights

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu-connected-layer.json"


def make_layer(preset: str) -> ConnectedAttentionLayer:
    config = mplug_fast.get_config(preset, **{"text.hidden_dropout": 0.0, "text.attention_dropout": 0.0})
    config = config.replace(attention_backend="sdpa")
    layer = ConnectedAttentionLayer(config)
    layer.apply(init_bert_weights)
    return layer


def inputs(B: int, Nv: int, Lt: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, Nv, D, generator=g)
    t = torch.randn(B, Lt, D, generator=g)
    t_mask = torch.ones(B, Lt, dtype=torch.bool)
    t_mask[-1, Lt * 2 // 3 :] = False  # one padded text
    return v, t, t_mask


def run(layer: ConnectedAttentionLayer, split: bool, v, t, t_mask, backward: bool):
    layer.split = split
    if not backward:
        with torch.no_grad():
            return layer(v, t, None, t_mask)
    v, t = v.detach().requires_grad_(), t.detach().requires_grad_()
    out_v, out_t = layer(v, t, None, t_mask)
    (out_v.square().sum() + out_t.square().sum()).backward()
    return out_v.detach(), out_t.detach(), v.grad, t.grad


def timed(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median / p20 / p80 milliseconds of each function, the functions alternating run by run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    stats = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        stats[name] = {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * q[0], "p80_ms": 1e3 * q[3]}
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "tiny" if args.quick else "base"
    repeats, warmup = (2, 1) if args.quick else (args.repeats, args.warmup)
    cases = [(17, 6)] if args.quick else [(577, 12), (577, 30), (257, 12), (257, 30)]
    load_before = os.getloadavg()
    torch.manual_seed(0)
    layer = make_layer(preset).train()  # dropout 0: train mode only keeps autograd's saved tensors
    D = layer.attn.qkv.in_features
    records = []
    for Nv, Lt in cases:
        v, t, t_mask = inputs(args.batch, Nv, Lt, D)
        for backward in (False, True):
            ref = run(layer, False, v, t, t_mask, backward)
            got = run(layer, True, v, t, t_mask, backward)
            err = max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True))
            row = {"Nv": Nv, "Lt": Lt, "B": args.batch, "pass": "fwd+bwd" if backward else "fwd"}
            row["max_abs_err"] = err
            row.update(
                timed(
                    {
                        "concat": functools.partial(run, layer, False, v, t, t_mask, backward),
                        "split": functools.partial(run, layer, True, v, t, t_mask, backward),
                    },
                    warmup,
                    repeats,
                )
            )
            row["split_over_concat"] = row["split"]["median_ms"] / row["concat"]["median_ms"]
            records.append(row)
            print(
                f"| Nv {Nv:4d} | Lt {Lt:3d} | {row['pass']:7s} | concat {row['concat']['median_ms']:8.2f} ms "
                f"| split {row['split']['median_ms']:8.2f} ms | split/concat {row['split_over_concat']:.3f} "
                f"| max err {err:.1e} |"
            )
    result = {
        "benchmark": "connected_layer",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "preset": preset,
        "device": "cpu",
        "dtype": "float32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "repeats": repeats,
        "warmup": warmup,
        "attention_backend": "sdpa",
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "records": records,
        "default": "concat",
        "split_over_concat_median_range": [
            min(r["split_over_concat"] for r in records),
            max(r["split_over_concat"] for r in records),
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
