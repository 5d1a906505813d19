"""Beam search with the KV cache against recomputation (official_spec §10, performance problem 1).

    python benchmarks/generation_speed.py --threads 1   # base preset, 384 px, batch 1 and 8, fp32, CPU
    python benchmarks/generation_speed.py --quick       # tiny preset, few repeats (smoke run)
    python benchmarks/generation_speed.py --threads 1 --native-only   # Python vs native step vs graph only
    python benchmarks/generation_speed.py --device cuda --native-only   # on a GPU

Cases (official inference settings, `mode="official"`):
    caption  memory = 577 image tokens,               beam 5, min_length 8, max_length 25
    vqa      memory = 577 image + 12 question tokens,  beam 5, min_length 1, max_length 10

Variants:
    cached      `beam_search(use_cache=True)`: self-attention KV cache, memory K/V projected once per image
                and shared by the beams (`memory_index`); the native beam step and cache reorder
                (kernels/, `mplug_fast._C`) when built
    packed      `cached` on the decoder with its layers' weights packed (`layout="packed"`, the default of
                `mplug_fast.pipeline` on AVX2 CPUs in fp32; `mplug_fast.inference.layout`)
    python_step `cached` with the Python twins of the native ops (`native=False`); the per-step time
                difference to `cached` is the native ops' gain (`ms_per_step` = median / max_length)
    graph       `cached` with `cuda_graph=True`: steps 1 .. T-1 replayed as CUDA graphs (recorded by the
                correctness run); on CPU the same static-buffer steps run eagerly (no graph there)
    no_cache    `beam_search(use_cache=False)`: the whole prefix re-run every step, memory K/V still shared
    official    the official loop (`TextGenerator._fast_translate_batch`): the whole prefix re-run every
                step with the memory tiled per beam and its K/V re-projected every step

The decoder has random weights (BERT init) and the memory is random: the work per step does not depend
on the weights, and random weights never emit [SEP], so every run goes to max_length (the worst case).
The vision / text encoders are not timed (identical for every variant). Results are checked first: the
variants must return the same ids (max score difference recorded). Timing: `time.perf_counter`, median,
p20, p80 (the correctness run is the warm-up, and records the graphs; `--threads 1` is steadier on a
shared machine); `speedups` holds time ratios variant / cached (below 1: faster than cached). The official
loop takes minutes at batch 8: its correctness run is timed too (it warms nothing that matters at that
length), plus `--official-repeats` more runs at batch 1 only; `no_cache` gets `--no-cache-repeats` at
batch 1 and one run at larger batches. Every sample of a batch runs to max_length (random weights), so
dropping finished samples from the batch is not exercised here (tests/test_generation.py checks it).
Writes .benchmarks/cpu-generation.json (untracked) or --out (e.g. benchmarks/results/cpu-generation.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import mplug_fast
from mplug_fast.generation import SEP_ID, beam_search
from mplug_fast.inference.layout import pack_decoder
from mplug_fast.modeling.decoder import TextDecoder
from mplug_fast.modeling.layers import init_bert_weights
from mplug_fast.ops import native

OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks"  # default output: untracked (.gitignore)


@torch.no_grad()
def official_beam_search(
    decoder, memory, memory_mask, start_ids, beam_size, max_length, min_length, alpha=0.6
):
    """The official loop (official_spec §5.6), out_size 1: no cache, memory tiled, full prefix each step."""
    K = beam_size
    B = memory.shape[0]
    src = memory.repeat_interleave(K, dim=0)  # copy: [B*K, M, D]
    att = memory_mask.repeat_interleave(K, dim=0)
    batch_offset = torch.arange(B)
    beam_offset = torch.arange(0, B * K, step=K)
    alive_seq = start_ids.repeat_interleave(K, dim=0)
    topk_log_probs = torch.tensor([0.0] + [float("-inf")] * (K - 1)).repeat(B)
    hypotheses = [[] for _ in range(B)]
    results = [None] * B
    for step in range(max_length):
        logits = decoder(alive_seq, None, src, att)[:, -1, :]
        V = logits.size(-1)
        log_probs = torch.log_softmax(logits, dim=-1)
        if step < min_length:
            log_probs[:, SEP_ID] = -1e20
        log_probs += topk_log_probs.view(-1).unsqueeze(1)
        lp = ((5.0 + (step + 1)) / 6.0) ** alpha
        topk_scores, topk_ids = (log_probs / lp).reshape(-1, K * V).topk(K, dim=-1)
        topk_log_probs = topk_scores * lp
        batch_index = topk_ids.div(V, rounding_mode="trunc") + beam_offset[: topk_ids.size(0)].unsqueeze(1)
        topk_ids = topk_ids.fmod(V)
        alive_seq = torch.cat([alive_seq.index_select(0, batch_index.view(-1)), topk_ids.view(-1, 1)], -1)
        is_finished = topk_ids.eq(SEP_ID)
        if step + 1 == max_length:
            is_finished.fill_(1)
        end_condition = is_finished[:, 0].eq(1)
        if is_finished.any():
            predictions = alive_seq.view(-1, K, alive_seq.size(-1))
            for i in range(is_finished.size(0)):
                b = int(batch_offset[i])
                if end_condition[i]:
                    is_finished[i].fill_(1)
                for j in is_finished[i].nonzero().view(-1):
                    hypotheses[b].append((topk_scores[i, j], predictions[i, j]))
                if end_condition[i]:
                    results[b] = sorted(hypotheses[b], key=lambda x: x[0], reverse=True)[0]
            non_finished = end_condition.eq(0).nonzero().view(-1)
            if len(non_finished) == 0:
                break
            topk_log_probs = topk_log_probs.index_select(0, non_finished)
            batch_index = batch_index.index_select(0, non_finished)
            batch_offset = batch_offset.index_select(0, non_finished)
            alive_seq = predictions.index_select(0, non_finished).view(-1, alive_seq.size(-1))
        src = src.index_select(0, batch_index.view(-1))
        att = att.index_select(0, batch_index.view(-1))
    return results


def copy_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth as a plain large copy reaches it: bytes read + written per second
    (GB/s, median of `repeats` copies of `mib` MiB, at the current thread count). The source is written
    first: pages never written all map the kernel's one zero page, whose reads hit the cache."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    return 2 * src.numel() * 4 / statistics.median(time_ms(lambda: dst.copy_(src), repeats)) / 1e6


def read_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Bytes read per second by a sum over `mib` MiB of written memory (GB/s, median of `repeats`): the rate
    at which a decoding step can stream its weights, at the current thread count."""
    src = torch.ones(mib * 2**20 // 4)
    src.sum()
    return src.numel() * 4 / statistics.median(time_ms(src.sum, repeats)) / 1e6


def gemm_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GEMM throughput of a large square matmul (GFLOP/s, median), at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / statistics.median(time_ms(lambda: a @ b, repeats)) / 1e6


def decode_step_cost(decoder, rows: int, memory_rows: int, memory_len: int, cache_len: float) -> dict:
    """What one cached decoding step must read and compute (fp32): every decoder weight once, except the
    cross-attention K/V projections (applied once per image) and the position / token-type tables (a row
    each); the tied word embeddings once (the LM head reads them all); the memory K/V of every layer (shared
    by the beams); the self-attention cache (`cache_len` positions, the mean over the steps).
    FLOPs: 2 x rows x the weights above (one GEMM row per weight per query row) + the attention matmuls."""
    skip = ("cross.kv_proj", "embeddings.position", "embeddings.token_type")
    weights = sum(p.numel() for n, p in decoder.named_parameters() if not any(k in n for k in skip))
    layers = len(decoder.layers)
    D = decoder.embeddings.word.weight.shape[1]
    memory_kv = layers * 2 * memory_rows * memory_len * D
    cache = layers * 2 * rows * cache_len * D
    attention_flops = layers * 4 * rows * (memory_len + cache_len) * D
    return {
        "bytes": 4 * (weights + memory_kv + cache),
        "weight_bytes": 4 * weights,
        "flops": 2 * rows * weights + attention_flops,
    }


def decode_step_record(
    decoder, run, name: str, B: int, c: dict, kw: dict, floor: dict, repeats: int, layout: str = "plain"
) -> dict:
    """The cached decode step (`run`, on the decoder in `layout`) against the floors: (time of max_length
    steps - time of the first step, which also projects the memory K/V) / (max_length - 1), vs the bytes it
    must read at the copy bandwidth (and at the read bandwidth, the stricter floor) and the FLOPs at the GEMM
    peak (`decode_step_cost`; the roofline floor is the larger of the copy-bandwidth and compute floors)."""
    first = dict(kw, max_length=1, min_length=min(kw["min_length"], 1))
    t_first = statistics.median(time_ms(lambda: run(True, kw=first), repeats + 1))
    t_all = statistics.median(time_ms(lambda: run(True), repeats))
    step_ms = (t_all - t_first) / (kw["max_length"] - 1)
    rows, (Bm, M, _) = B * kw["beam_size"], c["memory"].shape
    cost = decode_step_cost(decoder, rows, Bm, M, (1 + kw["max_length"]) / 2)
    bandwidth_ms = cost["bytes"] / (floor["copy_gbs"] * 1e9) * 1e3
    read_ms = cost["bytes"] / (floor["read_gbs"] * 1e9) * 1e3
    compute_ms = cost["flops"] / (floor["gemm_gflops"] * 1e9) * 1e3
    rec = {
        "name": f"{name}_b{B}_decode_step" if layout == "plain" else f"{name}_b{B}_{layout}_decode_step",
        "layout": layout,
        "rows": rows,
        "first_step_ms": t_first,
        "ms_per_step": step_ms,
        **cost,
        "floor_bandwidth_ms": bandwidth_ms,
        "floor_read_ms": read_ms,
        "floor_compute_ms": compute_ms,
        "vs_bandwidth_floor": step_ms / bandwidth_ms,
        "vs_read_floor": step_ms / read_ms,
        "vs_roofline_floor": step_ms / max(bandwidth_ms, compute_ms),
    }
    print(
        f"{rec['name']:29s} {step_ms:8.1f} ms/step ({rows} rows): floors bandwidth {bandwidth_ms:.1f} ms "
        f"({cost['bytes'] / 1e6:.0f} MB), compute {compute_ms:.1f} ms ({cost['flops'] / 1e9:.2f} GFLOP) -> "
        f"{rec['vs_bandwidth_floor']:.2f}x bandwidth, {rec['vs_roofline_floor']:.2f}x roofline",
        flush=True,
    )
    return rec


def environment() -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        env["git_commit"] = None
    return env


def time_ms(fn, repeats: int) -> list[float]:
    """Wall-clock ms of `repeats` calls (the caller has already run `fn` once: the correctness check)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def write_results(
    args: argparse.Namespace, records: list[dict], ratios: dict, floor: dict, steps: list[dict]
) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    preset = "tiny" if args.quick else "base"
    command = "python benchmarks/generation_speed.py " + " ".join(sys.argv[1:])
    result = {
        "env": environment(),
        "preset": preset,
        "command": command,
        "records": records,
        "speedups": ratios,
        "machine_floor": floor,
        "decode_steps": steps,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 repeats")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached path")
    parser.add_argument("--no-cache-repeats", type=int, default=2, help="timed runs of no_cache (batch 1)")
    parser.add_argument(
        "--official-repeats", type=int, default=1, help="official runs timed after the check run (batch 1)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=["caption", "vqa"], choices=["caption", "vqa"])
    parser.add_argument("--skip-official", action="store_true", help="do not time the official loop")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--native-only", action="store_true", help="only cached vs python_step")
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="only whole generation from pixels, ours vs the official loop",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="default: .benchmarks/")
    args = parser.parse_args()
    if args.out is None:
        name = "cpu-generation.json" if args.device == "cpu" else "gpu-generation.json"
        args.out = OUT_DIR / name
    if args.native_only:
        args.skip_official = True

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = mplug_fast.get_config("tiny" if args.quick else "base")
    repeats = 2 if args.quick else args.repeats
    Nv = config.vision.num_tokens  # 577 at 384 px
    D = config.text.hidden_size
    torch.manual_seed(0)
    decoder = TextDecoder(config)
    decoder.apply(init_bert_weights)
    decoder.eval().to(args.device)
    packed = pack_decoder(copy.deepcopy(decoder)) if args.device == "cpu" else None
    Lq = 12
    records, steps, ratios = [], [], {}
    floor = {
        "copy_gbs": copy_bandwidth_gbs(),
        "read_gbs": read_bandwidth_gbs(),
        "gemm_gflops": gemm_peak_gflops(),
    }
    print(
        f"copy bandwidth {floor['copy_gbs']:.1f} GB/s (read + write), read {floor['read_gbs']:.1f} GB/s, "
        f"fp32 GEMM {floor['gemm_gflops']:.1f} GFLOP/s"
    )
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        question_mask = torch.ones(B, Lq, dtype=torch.bool)
        question_mask[:, 9:] = False
        cases = {
            "caption": dict(
                memory=torch.randn(B, Nv, D, generator=g),
                memory_mask=torch.ones(B, Nv, dtype=torch.bool),
                beam_size=5,
                min_length=8,
                max_length=25,
            ),
            "vqa": dict(
                memory=torch.randn(B, Nv + Lq, D, generator=g),
                memory_mask=torch.cat([torch.ones(B, Nv, dtype=torch.bool), question_mask], dim=1),
                beam_size=5,
                min_length=1,
                max_length=10,
            ),
        }
        cases = {
            k: {n: t.to(args.device) if torch.is_tensor(t) else t for n, t in c.items()}
            for k, c in cases.items()
        }
        start = torch.full((B, 1), 101, device=args.device)
        for name in args.cases:
            c = cases[name]
            kw = dict(beam_size=c["beam_size"], min_length=c["min_length"], max_length=c["max_length"])

            def run(
                use_cache: bool,
                native: bool | None = None,
                graph: bool = False,
                c=c,
                kw=kw,
                start=start,
                dec=decoder,
            ):
                out = beam_search(
                    dec,
                    c["memory"],
                    c["memory_mask"],
                    start,
                    use_cache=use_cache,
                    native=native,
                    cuda_graph=graph,
                    **kw,
                )
                if args.device != "cpu":
                    torch.cuda.synchronize()
                return out

            def run_official(c=c, kw=kw, start=start):
                return official_beam_search(decoder, c["memory"], c["memory_mask"], start, **kw)

            cached, python_step, graph = run(True), run(True, native=False), run(True, graph=True)
            same = all(
                torch.equal(cached.ids, x.ids) and torch.equal(cached.scores, x.scores)
                for x in (python_step, graph)
            )
            err = 0.0
            variants = {"cached": (lambda: run(True), repeats)}
            variants["python_step"] = (lambda: run(True, native=False), repeats)
            variants["graph"] = (lambda: run(True, graph=True), repeats)
            if packed is not None:  # the same search up to rounding: its ids and score difference recorded
                packed_out = run(True, dec=packed)
                packed_same = torch.equal(cached.ids, packed_out.ids)
                packed_err = float((cached.scores - packed_out.scores).abs().max())
                variants["packed"] = (lambda: run(True, dec=packed), repeats)
            if not args.native_only:
                uncached = run(False)
                err = float((cached.scores - uncached.scores).abs().max())
                same = same and torch.equal(cached.ids, uncached.ids)
                variants["no_cache"] = (lambda: run(False), args.no_cache_repeats if B == 1 else 1)
            first_times = {}
            if not args.skip_official:
                t0 = time.perf_counter()
                official = run_official()
                first_times["official"] = [(time.perf_counter() - t0) * 1e3]
                for b in range(B):
                    n = int(cached.lengths[b, 0])
                    same = same and cached.ids[b, 0, :n].tolist() == official[b][1].tolist()
                    err = max(err, abs(float(cached.scores[b, 0]) - float(official[b][0])))
                variants["official"] = (run_official, args.official_repeats if B == 1 else 0)
            shape = {"batch": B, "memory": list(c["memory"].shape), **kw}
            for variant, (fn, n_runs) in variants.items():
                times = first_times.get(variant, []) + time_ms(fn, n_runs)
                v_same, v_err = (packed_same, packed_err) if variant == "packed" else (same, err)
                rec = {
                    "name": f"{name}_b{B}_{variant}",
                    "case": name,
                    "batch": B,
                    "variant": variant,
                    "shape": shape,
                    "dtype": "float32",
                    "device": args.device,
                    "native": variant in ("cached", "graph") and native.load_error() is None,
                    "ms_median": statistics.median(times),
                    "ms_per_step": statistics.median(times) / kw["max_length"],
                    "ms_p20": quantile(times, 0.2),
                    "ms_p80": quantile(times, 0.8),
                    "times_ms": times,
                    "same_ids_as_cached": v_same,
                    "max_abs_err": v_err,
                }
                records.append(rec)
                print(
                    f"{rec['name']:22s} median {rec['ms_median']:10.1f} ms  (p20 {rec['ms_p20']:.1f}, "
                    f"p80 {rec['ms_p80']:.1f}, n={len(times)})  same ids {v_same}  max score err {v_err:.2e}",
                    flush=True,
                )
            steps.append(decode_step_record(decoder, run, name, B, c, kw, floor, repeats))
            if packed is not None:
                packed_step = functools.partial(run, dec=packed)
                step = decode_step_record(decoder, packed_step, name, B, c, kw, floor, repeats, "packed")
                steps.append(step)
            by = {r["variant"]: r["ms_median"] for r in records if r["case"] == name and r["batch"] == B}
            for variant in ("python_step", "graph", "packed", "no_cache", "official"):
                if variant in by:
                    key = f"{name} batch {B}: {variant} / cached"
                    ratios[key] = by[variant] / by["cached"]
                    print(f"{key:36s} {ratios[key]:6.2f}x", flush=True)
            write_results(
                args, records, ratios, floor, steps
            )  # after every case: a long run interrupted keeps its results
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
