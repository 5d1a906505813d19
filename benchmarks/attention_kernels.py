"""Every available attention backend against the reference at mPLUG's attention shapes.

    python benchmarks/attention_kernels.py                  # base shapes, GPU if present
    python benchmarks/attention_kernels.py --quick          # small batch, few repeats (CPU smoke run)

Cases (base model, 384 px: Nv = 577 image tokens, 12 heads of 64):
    vit_self      ViT self-attention            Lq = Lk = 577
    asym_cross    asymmetric co-attention       Lq = 40 text queries x Lk = 577 image keys
    connected     connected attention           Lq = Lk = 617 ([image; text]), text padding
    decode_beams  decoder cross-attention step  Lq = 1, 5 beams share one image's K/V (kv_index)
    decoder_self  causal decoder self-attention Lq = Lk = 25, padding

Triton kernel variants (whenever `triton` runs; or name them in --backends), for the short-query cases
(asym_cross, decode_beams: Lq <= 64, Lk >= 256) only:
    triton-main   the main FlashAttention-2 kernel, whatever the dispatcher would choose
    triton-splitk the split-K (flash-decoding) forward with the dispatcher's split count (at least 2)
(`triton` itself is the dispatcher: split-K when `num_splits_for` says the main grid leaves SMs idle; the
record's `num_splits` says which ran). Run with --batch 1 too: the small-batch regime split-K is for.

Each (case, backend) is checked against the fp32 reference first (max abs error recorded), then timed
(CUDA events on GPU, perf_counter on CPU; median, p20, p80 after warm-up), forward and forward+backward.
FLOPs: 4 * B * H * Lq * Lk * Dh forward (QK^T and PV), x 3.5 for forward+backward (the backward counted
as 2.5 forwards, FlashAttention's convention), x 0.5 if causal.
Writes JSON records (one per case x backend x pass) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mplug_fast.ops.attention import BACKENDS, attention, available_backends
from mplug_fast.ops.reference import attention_ref

H, DH = 12, 64
OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks"  # default output: untracked (.gitignore)
TRITON_VARIANTS = ("triton-main", "triton-splitk")


def _triton_variant(name: str):
    """The callable behind a Triton variant name (imports the kernels: call only where triton runs)."""
    from mplug_fast.ops.triton.attention import flash_attention
    from mplug_fast.ops.triton.decode import num_splits_for, splitk_attention

    if name == "triton-main":
        return flash_attention

    def splitk(q, k, v, **kw):
        B, _, Lq, _ = q.shape
        return splitk_attention(
            q, k, v, num_splits=max(2, num_splits_for(B, H, Lq, k.shape[2], q.device)), **kw
        )

    return splitk


def _num_splits(name: str, c: dict, device: torch.device) -> int | None:
    """Key splits of the Triton forward that `name` runs for case `c` (None: not a Triton run)."""
    if not name.startswith("triton"):
        return None
    from mplug_fast.ops.triton.decode import num_splits_for

    n = num_splits_for(c["B"], H, c["Lq"], c["Lk"], device)
    return {"triton": n, "triton-main": 1, "triton-splitk": max(2, n)}[name]


def _short_query(c: dict) -> bool:
    return c["Lq"] <= 64 and c["Lk"] >= 256


def cases(batch: int) -> dict[str, dict]:
    text_mask = torch.ones(batch, 617, dtype=torch.bool)
    text_mask[: batch // 2, 600:] = False  # half the batch has 23 text tokens instead of 40
    dec_mask = torch.ones(batch, 25, dtype=torch.bool)
    dec_mask[0, 20:] = False
    return {
        "vit_self": dict(B=batch, Bk=batch, Lq=577, Lk=577),
        "asym_cross": dict(B=batch, Bk=batch, Lq=40, Lk=577),
        "connected": dict(B=batch, Bk=batch, Lq=617, Lk=617, mask=text_mask),
        "decode_beams": dict(
            B=batch * 5, Bk=batch, Lq=1, Lk=617, kv_index=torch.arange(batch).repeat_interleave(5)
        ),
        "decoder_self": dict(
            B=batch * 5, Bk=batch * 5, Lq=25, Lk=25, causal=True, mask=dec_mask.repeat_interleave(5, dim=0)
        ),
    }


def flops(c: dict, backward: bool) -> float:
    f = 4.0 * c["B"] * H * c["Lq"] * c["Lk"] * DH * (0.5 if c.get("causal") else 1.0)
    return f * (3.5 if backward else 1.0)


def time_ms(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        env["git_commit"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="batch 1, 3 repeats: a CPU smoke run")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every available one)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: .benchmarks/<device>-attention.json, untracked)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch, repeats, warmup = (1, 3, 1) if args.quick else (args.batch, 20, 5)
    availability = available_backends()
    names = (
        args.backends.split(",") if args.backends else [n for n, why in availability.items() if why is None]
    )
    skipped = {n: why for n, why in availability.items() if why is not None}
    if device.type == "cpu" and not args.backends and "triton" in names:
        names.remove("triton")
        skipped["triton"] = "on the CPU Triton runs in its interpreter (a correctness tool); pass --backends"
    for name, why in skipped.items():
        print(f"skipped backend {name}: {why}", file=sys.stderr)
    if "triton" in names:
        names += [n for n in TRITON_VARIANTS if n not in names]

    records = []
    for case, c in cases(batch).items():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(c["B"], H, c["Lq"], DH, generator=g).to(device, dtype)
        k = torch.randn(c["Bk"], H, c["Lk"], DH, generator=g).to(device, dtype)
        v = torch.randn(c["Bk"], H, c["Lk"], DH, generator=g).to(device, dtype)
        kw = dict(
            key_padding_mask=None if c.get("mask") is None else c["mask"].to(device),
            causal=c.get("causal", False),
            kv_index=None if c.get("kv_index") is None else c["kv_index"].to(device),
        )
        ref = attention_ref(q.float(), k.float(), v.float(), **kw)
        for name in names:
            if name not in BACKENDS and name not in TRITON_VARIANTS:
                known = sorted(BACKENDS) + list(TRITON_VARIANTS)
                print(f"unknown backend {name}; known: {known}", file=sys.stderr)
                return 2
            if name in TRITON_VARIANTS and not _short_query(c):
                continue

            def call(q, k, v, name=name, kw=kw):
                if name in TRITON_VARIANTS:
                    return _triton_variant(name)(q, k, v, **kw)
                return attention(q, k, v, backend=name, **kw)

            try:
                out = call(q, k, v)
            except (RuntimeError, ValueError) as exc:
                print(f"{case}/{name}: cannot run ({str(exc).splitlines()[0]})", file=sys.stderr)
                continue
            err = (out.float() - ref).abs().max().item()
            for backward in (False, True):
                qg, kg, vg = (x.detach().requires_grad_(backward) for x in (q, k, v))
                grad = torch.randn_like(out)

                def run(qg=qg, kg=kg, vg=vg, grad=grad, backward=backward, call=call):
                    o = call(qg, kg, vg)
                    if backward:
                        o.backward(grad)

                times = time_ms(run, device, repeats, warmup)
                median = statistics.median(times)
                quantiles = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
                records.append(
                    {
                        "name": case,
                        "pass": "fwd+bwd" if backward else "fwd",
                        "backend": name,
                        "shape": {k2: c[k2] for k2 in ("B", "Bk", "Lq", "Lk")} | {"H": H, "Dh": DH},
                        "dtype": str(dtype).removeprefix("torch."),
                        "ms_median": median,
                        "ms_p20": quantiles[0],
                        "ms_p80": quantiles[-1],
                        "tflops": flops(c, backward) / median / 1e9,
                        "max_abs_err": err,
                        "num_splits": _num_splits(name, c, device),
                    }
                )
    result = {"env": environment(device), "skipped_backends": skipped, "records": records}
    out = Path(args.out or OUT_DIR / f"{device.type}-attention.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"| case | pass | backend | ms (median) | TFLOP/s | max abs err vs fp32 ref |  ({dtype}, {device})")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['name']} | {r['pass']} | {r['backend']} | {r['ms_median']:.3f} | {r['tflops']:.2f} | "
            f"{r['max_abs_err']:.1e} |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
