"""What the skip-connections save: skip-connected vs all-connected vs co-attention fusion (paper Fig. 1).

    python benchmarks/fusion_speed.py                   # CPU: fp32, batch 1 (~10 min on 2 busy cores)
    python benchmarks/fusion_speed.py --device cuda     # GPU: bf16, batch 32, every shape end to end
    python benchmarks/fusion_speed.py --quick           # fusion at 2 shapes, end to end with 2-layer stacks

Styles at equal width (768) and depth (6 fusion layers), see `fusion_baselines.py`:
    skip-S3     the released mPLUG-Base fusion (layer 3 connected, the rest asymmetric co-attention)
    skip-S6     the released mPLUG-Large fusion (no connected layer)
    connected   all-connected: one stream over [image; text] at every layer
    coattn      two-stream co-attention: both streams self-attend and cross-attend to each other every layer
    skip-S1, skip-S2   the rest of the stride sweep S in {1, 2, 3, 6} (fusion module only)

Shapes (image tokens Nv, text tokens Lt; the decoder reads [v'; t'] with La = 10 answer tokens):
    pretrain        ViT-B/16 @ 256:  Nv = 257, Lt = 30
    finetune_base   ViT-B/16 @ 384:  Nv = 577, Lt = 40
    large           ViT-L/14 @ 336 + 1024->768 adapter: Nv = 577, Lt = 40 (fusion module = finetune_base's)
    highres         ViT-L/14 @ 504 (ModelScope's default): Nv = 1297, Lt = 40

Two scopes: `fusion` (the fusion module alone, on random image / text states that need gradients, as in
training) and `e2e` (ViT + adapter + text encoder + fusion + decoder with its LM head). Per configuration:
    FLOPs      analytic (closed form, `fusion_baselines.fusion_flops` / `end_to_end_flops`) and counted by
               `torch.utils.flop_counter.FlopCounterMode` on the same modules built on the `meta` device
               (exact at any shape, no compute; backward = 2 x forward, no recomputation); they must agree
               within 2 % (flagged in the table, exit status 1 otherwise)
    latency    forward (no_grad, eval) and forward+backward (train mode, dropout 0 in both), median of
               `--repeats` after warm-up, ms per batch; CUDA events on GPU; on CPU both perf_counter (wall)
               and process CPU time are recorded, and the CPU time is reported by default (`--clock`), run
               on one thread (`--threads`): on a shared machine the wall clock measures the share of the
               cores the run got, the CPU time the work it did
    memory     saved activations: bytes autograd keeps for backward (measured with saved_tensors_hooks,
               parameters excluded; any device); on CUDA also the peak of max_memory_allocated above the
               baseline for forward and forward+backward
    ratios     each style against skip-S3 and skip-S6 at the same shape and scope
Writes JSON (machine info, settings, records), a Markdown table (stdout and <out>.md) and a PNG (<out>.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/fusion_speed.py` or import

from common import (  # noqa: E402
    OUT_DIR,
    cuda_peak_bytes,
    machine_info,
    parse_dtype,
    saved_activation_bytes,
    summarize,
    time_ms,
    write_json,
)
from fusion_baselines import EndToEnd, build_fusion, end_to_end_flops, fusion_flops  # noqa: E402
from fusion_report import plot, tables  # noqa: E402

from mplug_fast.config import MPlugConfig, get_config  # noqa: E402
from mplug_fast.modeling.layers import init_bert_weights  # noqa: E402

ANSWER_TOKENS = 10  # La: decoder tokens (a VQA answer / caption chunk) over the fused memory
FLOP_TOLERANCE = 0.02
SHAPES: dict[str, dict[str, Any]] = {
    "pretrain": {"preset": "base", "image_size": 256, "text_tokens": 30},
    "finetune_base": {"preset": "base", "image_size": 384, "text_tokens": 40},
    "large": {"preset": "large", "image_size": 336, "text_tokens": 40},
    "highres": {"preset": "large", "image_size": 504, "text_tokens": 40},
    # --smoke only: tiny widths, same code paths
    "smoke": {"preset": "base", "image_size": 48, "text_tokens": 6},
}
STYLES: dict[str, tuple[str, int]] = {  # name -> (fusion style, stride)
    "skip-S1": ("skip", 1),
    "skip-S2": ("skip", 2),
    "skip-S3": ("skip", 3),
    "skip-S6": ("skip", 6),
    "connected": ("connected", 3),
    "coattn": ("coattn", 3),
}
E2E_STYLES = ("skip-S3", "skip-S6", "connected", "coattn")
REFERENCES = ("skip-S3", "skip-S6")
NO_DROPOUT = {
    "vision.attention_dropout": 0.0,
    "text.hidden_dropout": 0.0,
    "text.attention_dropout": 0.0,
    "adapter_dropout": 0.0,
}
QUICK_LAYERS = {"vision.layers": 2, "text.encoder_layers": 2, "decoder.layers": 2}
SMOKE_DIMS = {
    "vision.width": 64,
    "vision.heads": 2,
    "vision.layers": 1,
    "text.hidden_size": 64,
    "text.heads": 2,
    "text.intermediate_size": 256,
    "text.vocab_size": 512,
    "text.encoder_layers": 1,
    "decoder.layers": 1,
}


@dataclasses.dataclass
class Settings:
    """What one run measures (defaults depend on the device and on --quick / --smoke)."""

    batch: int
    repeats: int
    e2e_repeats: int
    warmup: int
    fusion_shapes: tuple[str, ...]
    e2e_shapes: tuple[str, ...]  # shapes whose end-to-end latency is measured (FLOPs: every shape)
    flop_shapes: tuple[str, ...]  # shapes whose end-to-end FLOPs are reported
    overrides: dict[str, Any]


def default_settings(device: torch.device, quick: bool, smoke: bool) -> Settings:
    if smoke:
        return Settings(1, 1, 1, 1, ("smoke",), ("smoke",), ("smoke",), {**NO_DROPOUT, **SMOKE_DIMS})
    if quick:  # full-width fusion at the ViT-B shapes (257, 577 image tokens); end to end with 2-layer
        # encoders and decoder at the pretraining shape
        base = ("pretrain", "finetune_base")
        return Settings(1, 2, 1, 1, base, ("pretrain",), base, {**NO_DROPOUT, **QUICK_LAYERS})
    every = ("pretrain", "finetune_base", "large", "highres")
    fusion = ("pretrain", "finetune_base", "highres")  # large's fusion module has finetune_base's shape
    if device.type == "cuda":
        return Settings(32, 20, 10, 5, fusion, every, every, dict(NO_DROPOUT))
    # CPU (~6 min of CPU time, one thread): batch 1, fusion 1 warm-up + 2 timed runs; end-to-end latency
    # (1 + 1 runs) only at the ViT-B shapes: ViT-L steps cost 0.4-1 TFLOP each (their FLOPs are still counted)
    return Settings(1, 2, 1, 1, fusion, ("pretrain", "finetune_base"), every, dict(NO_DROPOUT))


def shape_config(shape: str, style: str, settings: Settings, backend: str | None) -> MPlugConfig:
    """The preset of `shape` at its resolution with the style's stride, dropout off, --quick/--smoke sizes."""
    spec = SHAPES[shape]
    overrides = {
        "vision.image_size": spec["image_size"],
        "fusion.stride": STYLES[style][1],
        "attention_backend": backend,
        **settings.overrides,
    }
    return get_config(spec["preset"], **overrides)


# ------------------------------------------------------------------------------------------- workloads
class Workload:
    """A model and its inputs for one (scope, shape, style): `forward()`, `train_step()`, FLOP formulas."""

    def __init__(self, scope: str, config: MPlugConfig, style: str, lt: int, batch: int, device, dtype):
        self.scope, self.config, self.style, self.lt, self.batch = scope, config, style, lt, batch
        kind = STYLES[style][0]
        with torch.device(device):
            self.model = build_fusion(kind, config) if scope == "fusion" else EndToEnd(config, kind)
        if torch.device(device).type != "meta":
            with torch.no_grad():
                self.model.apply(init_bert_weights)
                if scope == "e2e":
                    self.model.vision.init_weights()
        self.model.to(dtype)
        self.inputs, self.grads = self._inputs(batch, device, dtype)

    def _inputs(self, B: int, device, dtype) -> tuple[list[Tensor], list[Tensor]]:
        g = torch.Generator().manual_seed(0)
        D, nv = self.config.text.hidden_size, self.config.vision.num_tokens
        meta = torch.device(device).type == "meta"

        def randn(*shape: int) -> Tensor:
            x = torch.empty(shape) if meta else torch.randn(shape, generator=g)
            return x.to(device=device, dtype=dtype)

        if self.scope == "fusion":
            v, t = randn(B, nv, D).requires_grad_(True), randn(B, self.lt, D).requires_grad_(True)
            return [v, t], [randn(B, nv, D), randn(B, self.lt, D)]
        R, V = self.config.vision.image_size, self.config.text.vocab_size
        images = randn(B, 3, R, R)
        ids = torch.randint(1, V, (B, self.lt), generator=g).to(device)
        answer = torch.randint(1, V, (B, ANSWER_TOKENS), generator=g).to(device)
        return [images, ids, answer], [randn(B, ANSWER_TOKENS, V)]

    def forward(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(*self.inputs)

    def train_step(self) -> None:
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        for x in self.inputs:
            x.grad = None
        out = self.model(*self.inputs)
        torch.autograd.backward(list(out) if isinstance(out, tuple) else [out], self.grads)


def analytic_flops(scope: str, config: MPlugConfig, style: str, lt: int) -> dict[str, int]:
    """Per-sample forward / train FLOPs (and, end to end, per component) from the closed forms."""
    kind, stride = STYLES[style]
    if scope == "e2e":
        return end_to_end_flops(config, kind, lt, ANSWER_TOKENS)
    D, F = config.text.hidden_size, config.text.intermediate_size
    f = fusion_flops(kind, config.vision.num_tokens, lt, D, F, config.fusion.layers, stride)
    return {"forward": f, "train": 3 * f}  # the inputs need gradients: backward = 2 x forward


def counted_flops(scope: str, config: MPlugConfig, style: str, lt: int) -> tuple[dict[str, int], str]:
    """Per-sample forward and forward+backward FLOPs counted by FlopCounterMode on the meta device.

    The configured attention backend is tried first; a backend that cannot run on meta tensors (Triton)
    is replaced by `reference` for the count (attention FLOPs do not depend on the kernel)."""
    backends = [config.attention_backend] + (["reference"] if config.attention_backend != "reference" else [])
    error: Exception | None = None
    for backend in backends:
        try:
            w = Workload(
                scope,
                dataclasses.replace(config, attention_backend=backend),
                style,
                lt,
                1,
                "meta",
                torch.float32,
            )
            with FlopCounterMode(display=False) as counter:
                out = w.model(*w.inputs)
                fwd = counter.get_total_flops()  # read between the forward and the backward
                torch.autograd.backward(list(out) if isinstance(out, tuple) else [out], w.grads)
            return {"forward": fwd, "train": counter.get_total_flops()}, backend or "auto"
        except Exception as exc:  # noqa: BLE001 - any kernel that cannot trace meta tensors falls back
            error = exc
    raise RuntimeError(f"FLOP counting failed for {scope}/{style}: {error}")


def measure(w: Workload, device: torch.device, repeats: int, warmup: int, clock: str) -> dict[str, Any]:
    """Latency (ms per batch) of forward and forward+backward, saved activations, CUDA peaks.

    `fwd_ms` / `train_ms` hold the reported clock (`clock`: 'wall' = CUDA events / perf_counter, 'cpu' =
    process CPU time); on CPU both clocks are also kept as `*_wall_ms` and `*_cpu_ms`."""
    result: dict[str, Any] = {}
    params = list(w.model.parameters())
    with saved_activation_bytes(params) as saved:  # also the first warm-up step
        w.train_step()
    result["saved_activation_mib"] = saved[0] / 2**20
    if device.type == "cuda":
        result["peak_fwd_mib"] = cuda_peak_bytes(w.forward, device) / 2**20
        result["peak_train_mib"] = cuda_peak_bytes(w.train_step, device) / 2**20
    for key, fn, n_warm in (("fwd", w.forward, warmup), ("train", w.train_step, max(warmup - 1, 0))):
        cpu: list[float] = []
        wall = summarize(time_ms(fn, device, repeats, n_warm, cpu_times=cpu))
        result[f"{key}_wall_ms"] = wall
        if cpu:
            result[f"{key}_cpu_ms"] = summarize(cpu)
        result[f"{key}_ms"] = result[f"{key}_cpu_ms"] if clock == "cpu" and cpu else wall
    return result


# ------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype, device)
    s = default_settings(device, args.quick, args.smoke)
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if clock not in ("wall", "cpu") or (clock == "cpu" and device.type != "cpu"):
        raise ValueError(f"--clock must be 'wall' (any device) or 'cpu' (CPU only), got {clock!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)  # a shared machine: no OpenMP barrier stalls; the CPU clock stays exact
    for name in ("batch", "repeats", "warmup"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.repeats is not None:
        s.e2e_repeats = args.repeats
    if args.fusion_shapes:
        s.fusion_shapes = tuple(args.fusion_shapes.split(","))
    if args.e2e_shapes is not None:
        s.e2e_shapes = tuple(x for x in args.e2e_shapes.split(",") if x)
        s.flop_shapes = tuple(dict.fromkeys(s.flop_shapes + s.e2e_shapes))
    for shape in s.fusion_shapes + s.e2e_shapes:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    if s.batch < 1 or s.repeats < 1 or s.warmup < 0:
        raise ValueError(
            f"need batch >= 1, repeats >= 1, warmup >= 0; got {s.batch}, {s.repeats}, {s.warmup}"
        )

    plan = [("fusion", shape, style) for shape in s.fusion_shapes for style in STYLES]
    plan += [("e2e", shape, style) for shape in s.flop_shapes for style in E2E_STYLES]
    records, t_start, cpu_start = [], time.perf_counter(), time.process_time()
    for i, (scope, shape, style) in enumerate(plan, 1):
        config = shape_config(shape, style, s, args.backend)
        lt = SHAPES[shape]["text_tokens"]
        rec: dict[str, Any] = {
            "scope": scope,
            "shape": shape,
            "style": style,
            "fusion": STYLES[style][0],
            "stride": STYLES[style][1] if STYLES[style][0] == "skip" else None,
            "Nv": config.vision.num_tokens,
            "Lt": lt,
            "La": ANSWER_TOKENS if scope == "e2e" else None,
            "D": config.text.hidden_size,
            "fusion_layers": config.fusion.layers,
            "batch": s.batch,
        }
        timed = scope == "fusion" or shape in s.e2e_shapes
        analytic = analytic_flops(scope, config, style, lt)
        counted, count_backend = counted_flops(scope, config, style, lt)
        rec["gflop_fwd"] = analytic["forward"] / 1e9
        rec["gflop_train"] = analytic["train"] / 1e9
        rec["gflop_fwd_counted"] = counted["forward"] / 1e9
        rec["gflop_train_counted"] = counted["train"] / 1e9
        rec["flop_count_backend"] = count_backend
        if scope == "e2e":
            rec["gflop_components"] = {k: analytic[k] / 1e9 for k in ("vision", "text", "fusion", "decoder")}
        rec["flop_rel_err"] = max(abs(counted[k] - analytic[k]) / analytic[k] for k in ("forward", "train"))
        rec["flops_ok"] = rec["flop_rel_err"] <= FLOP_TOLERANCE
        if timed:
            w = Workload(scope, config, style, lt, s.batch, device, dtype)
            repeats = s.repeats if scope == "fusion" else s.e2e_repeats
            rec.update(measure(w, device, repeats, s.warmup, clock))
            del w
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            rec["skipped"] = "latency not measured on this device by default (pass --e2e-shapes)"
        records.append(rec)
        took = f"{rec['train_ms']['median']:.0f} ms fwd+bwd" if "train_ms" in rec else "FLOPs only"
        print(
            f"[{i}/{len(plan)} {time.perf_counter() - t_start:6.0f}s] {scope:6s} {shape:13s} {style:9s} "
            f"{rec['gflop_fwd']:8.2f} GFLOP/sample, {took}",
            file=sys.stderr,
            flush=True,
        )
    add_ratios(records)
    return {
        "benchmark": "fusion_speed",
        "machine": machine_info(device, dtype, args.backend),
        "clock": {
            "wall": "CUDA events" if device.type == "cuda" else "time.perf_counter",
            "cpu": "time.process_time (CPU time of this process, all its threads)",
        }[clock],
        "settings": dataclasses.asdict(s)
        | {"answer_tokens": ANSWER_TOKENS, "flop_tolerance": FLOP_TOLERANCE},
        "memory_method": (
            "saved_activation_mib: bytes of tensors autograd saves for backward (saved_tensors_hooks, "
            "parameters excluded)"
            + (
                "; peak_*_mib: torch.cuda.max_memory_allocated above the baseline"
                if device.type == "cuda"
                else ""
            )
        ),
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - cpu_start,
        "records": records,
    }


def add_ratios(records: list[dict[str, Any]]) -> None:
    """rec["vs_<reference>"] = {gflop_*, fwd_ms, train_ms, saved_activation}: style / reference, same scope
    and shape."""
    index = {(r["scope"], r["shape"], r["style"]): r for r in records}
    for r in records:
        for ref_name in REFERENCES:
            ref = index.get((r["scope"], r["shape"], ref_name))
            if ref is None:
                continue
            ratio = {
                "gflop_fwd": r["gflop_fwd"] / ref["gflop_fwd"],
                "gflop_train": r["gflop_train"] / ref["gflop_train"],
            }
            for key in ("fwd_ms", "train_ms"):
                if key in r and key in ref:
                    ratio[key] = r[key]["median"] / ref[key]["median"]
            if "saved_activation_mib" in r and "saved_activation_mib" in ref:
                ratio["saved_activation"] = r["saved_activation_mib"] / ref["saved_activation_mib"]
            r[f"vs_{ref_name}"] = ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 else)"
    )
    parser.add_argument("--backend", default=None, help="attention backend (default: automatic)")
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 32 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first")
    parser.add_argument("--fusion-shapes", default=None, help=f"comma-separated, from {list(SHAPES)[:4]}")
    parser.add_argument("--e2e-shapes", default=None, help="shapes whose end-to-end latency is measured")
    parser.add_argument(
        "--clock",
        default=None,
        help="reported latency: wall (default on CUDA) | cpu (default on CPU: process time)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fusion at 2 shapes (pretrain, finetune_base), end to end at pretrain with 2-layer encoders / "
        "decoder, 2 repeats",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny widths, one repeat (the test suite's run)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default .benchmarks/<device>-fusion.json, untracked)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--render", default=None, help="a JSON of an earlier run: rewrite its .md and .png only"
    )
    args = parser.parse_args(argv)

    if args.render:  # re-draw the table and the plot of an earlier run
        result = json.loads(Path(args.render).read_text())
        args.out = args.out or args.render
    else:
        threads = torch.get_num_threads()
        try:
            result = run(args)
        finally:
            torch.set_num_threads(threads)  # `run` may change it (callers such as the tests keep theirs)
        result["command"] = "python benchmarks/fusion_speed.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
    default = OUT_DIR / f"{torch.device(args.device).type}-fusion{'-quick' if args.quick else ''}.json"
    out = Path(args.out or default)
    write_json(out, result)
    text = tables(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    png = (
        None
        if args.no_plot
        else plot(result, out.with_suffix(".png"), [s for s in STYLES if s in E2E_STYLES])
    )
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))
    bad = [f"{r['scope']}/{r['shape']}/{r['style']}" for r in result["records"] if not r["flops_ok"]]
    if bad:
        print(
            f"counted and analytic FLOPs disagree by more than {FLOP_TOLERANCE:.0%}: {bad}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
