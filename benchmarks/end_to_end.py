"""End-to-end throughput: training steps and generation, fp32 vs bf16 autocast, eager vs torch.compile.

    python benchmarks/end_to_end.py                       # CPU default: tiny preset at 224 px, batch 2
    python benchmarks/end_to_end.py --quick               # tiny cut to 1 layer/stack, 64 px (< 1 minute)
    python benchmarks/end_to_end.py --device cuda         # GPU default: base preset at 384 px, batch 32

Workloads (random weights, random token ids of fixed length, random images; the work does not depend on
the values):
    train_vqa        VQAObjective (distillation on, as the default): forward + backward + AdamW step; batch B
                     questions of 12 tokens, 2 answers of 6 tokens each
    train_pretrain   PretrainObjective (ITC + ITM + MLM + PrefixLM, momentum distillation): forward + backward
                     + AdamW step + momentum EMA; B captions of 30 tokens
    gen_caption      caption_generate: beam 5, min 8, max 25 (official settings)
    gen_vqa          vqa_generate: beam 5, max 10 over [image; 12 question tokens]

Random weights never emit [SEP], so every beam runs to max_length: generation numbers are the worst case.

Variants per workload: dtype fp32 / bf16 (torch.autocast; weights and optimizer stay fp32) x mode eager /
compile (`torch.compile` of the objective for training; the first call's time is reported as compile_s).
Generation under torch.compile is skipped with its reason: the beam search loop grows the KV cache every
step (a new shape per step) and prunes finished samples. On CPU compile is off by default (`--compile on`
runs it): compiling takes minutes there and the point of this table on CPU is a reproducible smoke run.
Every record says `status: ok` or `status: skipped` with a `reason`.

FLOPs per step: `torch.utils.flop_counter.FlopCounterMode` over one eager fp32 step of a copy of the model
with the `sdpa` attention backend (FlopCounterMode has formulas for matmuls and SDPA, not for custom Triton
kernels), forward + backward (the AdamW update is elementwise and not counted). Achieved TFLOP/s = FLOPs /
median time; MFU = achieved / the GPU's dense bf16 peak from `PEAK_BF16_TFLOPS` (matched by GPU name;
unknown GPU or CPU -> MFU omitted). Timing: `common.time_ms` (CUDA events on GPU, perf_counter on CPU),
median of `--repeats` runs after `--warmup` runs.

The CPU default (tiny preset = D 256, 4 layers per stack, at 224 px = 197 image tokens, batch 2, 3 timed
runs, one thread) takes a few minutes. One thread by default on CPU: the numbers are per core and stay
reproducible on a shared machine (with more threads than free cores, OpenMP barriers make steps 10-50x
slower); `--threads 0` uses torch's default, `--threads N` sets N.
Output: JSON (machine info from common.py + records) and a Markdown table (stdout and next to the JSON
as .md). Default output: .benchmarks/<cpu|gpu>-end-to-end.json (untracked; `--out benchmarks/results/...`
for numbers meant to be committed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OUT_DIR,
    machine_info,
    markdown_table,
    summarize,
    synchronize,
    time_ms,
    write_json,
)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the CUDA device name; first match
# wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),  # A10 / A10G
    ("L4", 121.0),
)

WORKLOADS = ("train_vqa", "train_pretrain", "gen_caption", "gen_vqa")
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUESTION_LEN, ANSWER_LEN, ANSWERS_PER_QUESTION, CAPTION_LEN = 12, 6, 2, 30
# --quick: the tiny preset cut to one layer per stack and a 2048-word vocabulary (a smoke run: the numbers
# are not comparable with anything)
QUICK_OVERRIDES = {
    "vision.layers": 1,
    "text.encoder_layers": 1,
    "fusion.layers": 1,
    "decoder.layers": 1,
    "text.vocab_size": 2048,
}
CLS, SEP, FIRST_WORD_ID = 101, 102, 1000  # bert-base-uncased ids; random words are drawn above 1000


def peak_for_name(gpu_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU by its CUDA name ("NVIDIA H100 80GB HBM3"), None if unknown."""
    name = gpu_name.upper()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, None when unknown or not CUDA (then MFU is omitted)."""
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


@dataclass
class Setup:
    """What one run measures (defaults depend on the device and --quick)."""

    preset: str
    image_size: int
    batch: int
    repeats: int
    warmup: int
    compile: bool
    backend: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    queue_size: int = 65536


def default_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    overrides: dict[str, Any] = {}
    queue_size = 65536
    if args.quick:
        preset, image_size, batch, repeats, warmup = "tiny", 64, 2, 1, 0
        overrides, queue_size = dict(QUICK_OVERRIDES), 1024
    elif device.type == "cuda":
        preset, image_size, batch, repeats, warmup = "base", 384, 32, 10, 3
    else:
        preset, image_size, batch, repeats, warmup = "tiny", 224, 2, 3, 1
    compile_on = {"on": True, "off": False, "auto": device.type == "cuda"}[args.compile]
    return Setup(
        preset=args.preset or preset,
        image_size=args.image_size or image_size,
        batch=args.batch or batch,
        repeats=args.repeats or repeats,
        warmup=warmup if args.warmup is None else args.warmup,
        compile=compile_on,
        backend=args.backend,
        overrides=overrides,
        queue_size=queue_size,
    )


# ------------------------------------------------------------------------------------------------ inputs
def _ids(rows: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, length] "[CLS] w ... w [SEP]" with random word ids."""
    ids = torch.randint(FIRST_WORD_ID, vocab, (rows, length), generator=gen)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids


def make_batch(workload: str, setup: Setup, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Fixed-shape random inputs of `workload` on `device` (seeded)."""
    gen = torch.Generator().manual_seed(0)
    B, R = setup.batch, setup.image_size
    batch: dict[str, torch.Tensor] = {"images": torch.randn(B, 3, R, R, generator=gen)}
    if workload == "train_pretrain":
        batch["text_ids"] = _ids(B, CAPTION_LEN, vocab, gen)
        batch["text_mask"] = torch.ones(B, CAPTION_LEN, dtype=torch.bool)
        batch["image_ids"] = torch.arange(B)
    if workload in ("train_vqa", "gen_vqa"):
        batch["question_ids"] = _ids(B, QUESTION_LEN, vocab, gen)
        batch["question_mask"] = torch.ones(B, QUESTION_LEN, dtype=torch.bool)
    if workload == "train_vqa":
        N = B * ANSWERS_PER_QUESTION
        batch["answer_ids"] = _ids(N, ANSWER_LEN, vocab, gen)
        batch["answer_mask"] = torch.ones(N, ANSWER_LEN, dtype=torch.bool)
        batch["answer_index"] = torch.arange(B).repeat_interleave(ANSWERS_PER_QUESTION)
        batch["answer_weights"] = torch.full((N,), 1.0 / ANSWERS_PER_QUESTION)
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ steps
def build_step(
    workload: str, setup: Setup, device: torch.device, dtype: torch.dtype, compiled: bool, backend: str | None
) -> tuple[Callable[[], Any], int]:
    """(a zero-argument callable running one step of `workload`, number of samples it processes)."""
    from mplug_fast.config import get_config
    from mplug_fast.tasks import build_model

    torch.manual_seed(0)
    config = get_config(setup.preset, **{"vision.image_size": setup.image_size, **setup.overrides})
    if backend is not None:
        config = config.replace(attention_backend=backend)
    task = {"train_vqa": "vqa", "train_pretrain": "pretrain", "gen_caption": "caption", "gen_vqa": "vqa"}
    model = build_model(config, task[workload]).to(device)
    batch = make_batch(workload, setup, config.text.vocab_size, device)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    if workload.startswith("train"):
        return _train_step(workload, model, batch, setup, autocast, compiled), setup.batch
    return _generate_step(workload, model, batch, autocast), setup.batch


def _train_step(workload, model, batch, setup, autocast, compiled) -> Callable[[], Any]:
    from mplug_fast.data import Tokenizer
    from mplug_fast.tasks import build_objective
    from mplug_fast.train.optim import build_optimizer

    options = {}
    if workload == "train_pretrain":
        options["queue_size"] = max(setup.queue_size // setup.batch * setup.batch, setup.batch)
    objective = build_objective(
        "pretrain" if workload == "train_pretrain" else "vqa", model, Tokenizer(), **options
    ).train()
    optimizer = build_optimizer(objective, lr=1e-5)
    forward = torch.compile(objective) if compiled else objective

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = forward(batch)["loss"]
        loss.backward()
        optimizer.step()
        objective.after_optimizer_step()
        return loss

    return step


def _generate_step(workload, model, batch, autocast) -> Callable[[], Any]:
    from mplug_fast.inference.generate import caption_generate, vqa_generate

    model.eval()

    def step():
        with torch.no_grad(), autocast:
            if workload == "gen_caption":
                return caption_generate(model, batch["images"], beam_size=5, min_length=8, max_length=25)
            return vqa_generate(
                model, batch["images"], batch["question_ids"], batch["question_mask"], beam_size=5
            )

    return step


def count_flops(workload: str, setup: Setup, device: torch.device) -> int:
    """FLOPs of one eager fp32 step (forward + backward for training) with the sdpa attention backend."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = build_step(workload, setup, device, torch.float32, compiled=False, backend="sdpa")
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ run
def skip_reason(workload: str, dtype: str, mode: str, setup: Setup, device: torch.device) -> str | None:
    if mode == "compile" and workload.startswith("gen"):
        return (
            "beam search grows the KV cache every step and prunes finished samples (new shapes per step): "
            "torch.compile would recompile per step; generation is measured eager only"
        )
    if mode == "compile" and not setup.compile:
        return f"torch.compile off on {device.type} by default (compiling takes minutes); pass --compile on"
    return None


def run_variant(
    workload: str, dtype_name: str, mode: str, setup: Setup, device: torch.device
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "workload": workload,
        "kind": "train" if workload.startswith("train") else "generate",
        "dtype": dtype_name,
        "mode": mode,
        "batch": setup.batch,
        "unit": "samples/s" if workload.startswith("train") else "images/s",
    }
    reason = skip_reason(workload, dtype_name, mode, setup, device)
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}
    try:
        step, samples = build_step(
            workload, setup, device, DTYPE_NAMES[dtype_name], mode == "compile", setup.backend
        )
        t0 = time.perf_counter()
        step()  # first call: compiles (compile mode), allocates
        synchronize(device)
        first_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cpu_times: list[float] = []
        times = time_ms(step, device, repeats=setup.repeats, warmup=setup.warmup, cpu_times=cpu_times)
    except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, the others still run
        return {**record, "status": "skipped", "reason": f"{type(exc).__name__}: {str(exc)[:400]}"}
    summary = summarize(times)
    record.update(
        status="ok",
        time_ms=summary,
        throughput=samples / (summary["median"] / 1e3),
        first_call_s=first_s,
    )
    if cpu_times:  # process CPU time: the work done, whatever share of a shared machine the run got
        record["cpu_time_ms"] = summarize(cpu_times)
    if mode == "compile":
        record["compile_s"] = first_s
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def add_flops(records: list[dict[str, Any]], flops: dict[str, int | None], peak: float | None) -> None:
    for r in records:
        f = flops.get(r["workload"])
        r["flops_per_step"] = f
        if r["status"] != "ok" or not f:
            continue
        r["tflops"] = f / (r["time_ms"]["median"] / 1e3) / 1e12
        if peak is not None:
            r["mfu"] = r["tflops"] / peak


def table(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        if r["status"] == "ok":
            rows.append(
                [
                    r["workload"],
                    r["dtype"],
                    r["mode"],
                    r["batch"],
                    r["time_ms"]["median"],
                    r["throughput"],
                    r["unit"],
                    r.get("flops_per_step") and r["flops_per_step"] / 1e9,
                    r.get("tflops"),
                    r.get("mfu") and f"{100 * r['mfu']:.1f} %",
                    r.get("compile_s"),
                ]
            )
        else:
            rows.append(
                [r["workload"], r["dtype"], r["mode"], r["batch"], None, None, "skipped: " + r["reason"]]
            )
            rows[-1] += [None] * 4
    headers = ["workload", "dtype", "mode", "batch", "median ms", "throughput", "unit", "GFLOP/step"]
    return markdown_table([*headers, "TFLOP/s", "MFU", "compile s"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, base on CUDA)")
    p.add_argument(
        "--image-size", type=int, default=None, help="image resolution (default 224 CPU, 384 CUDA)"
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default 2 CPU, 32 CUDA)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA only")
    p.add_argument("--backend", default=None, help="attention backend (default: automatic)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (CPU default 1; 0 = torch's default)"
    )
    p.add_argument("--no-flops", action="store_true", help="skip the FlopCounterMode step")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny preset cut to 1 layer per stack, 64 px, 1 timed run (smoke)",
    )
    p.add_argument("--out", default=None, help="JSON path (default .benchmarks/<dev>-end-to-end.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.batch is not None and args.batch < 2:
        raise SystemExit("--batch must be >= 2 (ITM hard negatives need another sample in the batch)")
    setup = default_setup(args, device)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    t_start = time.perf_counter()
    records = []
    for workload in args.workloads:
        for dtype_name in dtypes:
            for mode in ("eager", "compile"):
                records.append(run_variant(workload, dtype_name, mode, setup, device))
                r = records[-1]
                note = f"{r['throughput']:.3g} {r['unit']}" if r["status"] == "ok" else "skipped"
                print(f"  {workload:15s} {dtype_name} {mode:8s} {note}", file=sys.stderr, flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    flops: dict[str, int | None] = {}
    for workload in args.workloads:
        flops[workload] = None if args.no_flops else count_flops(workload, setup, device)
    peak = peak_bf16_tflops(device)
    add_flops(records, flops, peak)
    result = {
        "benchmark": "end_to_end",
        "machine": machine_info(device, torch.float32, setup.backend),
        "setup": {**asdict(setup), "dtypes": dtypes, "quick": args.quick},
        "shapes": {
            "question_len": QUESTION_LEN,
            "answer_len": ANSWER_LEN,
            "answers_per_question": ANSWERS_PER_QUESTION,
            "caption_len": CAPTION_LEN,
            "caption_beam": {"beam": 5, "min_length": 8, "max_length": 25},
            "vqa_beam": {"beam": 5, "min_length": 1, "max_length": 10},
        },
        "peak_bf16_tflops": peak,
        "records": records,
        "wall_s": time.perf_counter() - t_start,
    }
    out = Path(args.out or OUT_DIR / f"{device.type}-end-to-end.json")
    if device.type not in ("cpu", "cuda"):
        out = out.with_name(out.name.replace(device.type, "other"))
    write_json(out, result)
    md = table(records)
    command = "python benchmarks/end_to_end.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"End-to-end throughput: preset {setup.preset}, {setup.image_size} px, batch {setup.batch}, "
        f"{result['machine'].get('gpu', {}).get('name') or result['machine']['cpu']} "
        f"({result['wall_s']:.0f} s)\n\n`{command.strip()}`\n\n"
    )
    out.with_suffix(".md").write_text(header + md + "\n")
    print(header + md)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
