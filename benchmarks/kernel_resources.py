"""Compile every Triton launch the kernels make at mPLUG's shapes for real NVIDIA targets, on a CPU machine.

    python benchmarks/kernel_resources.py    # the table -> .benchmarks/kernel-resources.{json,md}
    python benchmarks/kernel_resources.py --out benchmarks/results/kernel-resources   # the committed table
    python benchmarks/kernel_resources.py --targets 90 --only attn_fwd --out /tmp/r
    python benchmarks/kernel_resources.py --sweep /tmp/sweep.jsonl   # candidates for `tiles.TILES`
    python benchmarks/kernel_resources.py --probe dkdv --targets 90 --tiles 64,128,8,2 32,128,8,1
        # dropout cost per tile: SASS loop with / without dropout, per score a thread holds

No GPU is needed: each launcher (`mplug_fast.ops.triton.attention`, `decode`, `layer_norm`, `activation`) is
called with CPU tensors while the kernels' `.run` is replaced by a recorder, so the launch is exactly what the
launcher would send to a GPU (block sizes, num_warps, num_stages, constexpr flags, argument alignment). Each
recorded launch is then compiled with Triton's own binder for `GPUTarget("cuda", cc, 32)`; shared memory is
`compiled.metadata.shared`, registers and spills come from the bundled `ptxas -v` on the PTX (Triton fills
`n_regs` / `n_spills` only on a device), and the inner-loop length is the longest backward branch in the SASS
(`nvdisasm`). Compiled kernels land in Triton's cache, ptxas/SASS results in `<cache>/mplug_resources/`, so a
second run takes seconds.

A row fits when shared memory <= the target's per-block limit and ptxas reports no spill stores or loads.
`TRITON_INTERPRET` must not be set (the interpreter has no compiler). fp32 is recorded under
`torch.set_float32_matmul_precision("high")` (TF32 dots): under "highest" the launchers refuse fp32 CUDA
inputs (IEEE fp32 dots spill), so that configuration is never launched.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources.py compiles for GPU targets: unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from mplug_fast.ops.triton import activation, decode, layer_norm, tiles
from mplug_fast.ops.triton import attention as attn
from mplug_fast.ops.triton import attention_kernels as attn_k

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/kernel_resources.py` or import
from kernel_report import SHARED_LIMIT, Row, write  # noqa: E402

OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks"  # default output: untracked (.gitignore)
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_CACHE = (
    Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache")).parent / "mplug_resources"
)


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


# ---- recording ---------------------------------------------------------------------------------------------

KERNELS = [
    attn_k._attn_fwd_kernel,
    attn_k._attn_bwd_dq_kernel,
    attn_k._attn_bwd_dkdv_kernel,
    decode._splitk_fwd_kernel,
    decode._splitk_combine_kernel,
    layer_norm._ln_fwd_kernel,
    layer_norm._ln_bwd_kernel,
    activation._bias_act_fwd_kernel,
    activation._bias_act_bwd_kernel,
]


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace each kernel's `.run` by a recorder for the duration; yields the list of launches."""
    launches: list[Launch] = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, args, dict(kwargs), tuple(grid)))

        return run

    for k in KERNELS:
        k.run = recorder(k)
    try:
        yield launches
    finally:
        for k in KERNELS:
            del k.run  # back to the class method


# ---- compiling ---------------------------------------------------------------------------------------------


def _compile(launch: Launch, cc: int):
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    k = launch.kernel
    binder = create_function_from_signature(k.signature, k.params, backend)
    kwargs = dict(launch.kwargs)
    bound, spec, opts = binder(*launch.args, **kwargs, debug=False, instrumentation_mode="")
    kwargs.update(debug=False, instrumentation_mode="")
    options, sig, cst, attrs = k._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(k, sig, cst, attrs), target=target, options=options.__dict__)


_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+`?\(?(\.L_x_\d+)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/")


def _sass_loop(cubin: bytes) -> int:
    """Instructions in the longest loop: the largest backward branch (each SASS instruction is 16 bytes);
    for a kernel without a loop (one row per program), all its instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    labels: dict[str, int] = {}
    pending: list[str] = []
    branches: list[tuple[int, str]] = []
    for line in sass.splitlines():
        if m := _LABEL.match(line.strip()):
            pending.append(m.group(1))
            continue
        if m := _ADDR.search(line):
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending.clear()
            if b := _BRANCH.search(line):
                branches.append((addr, b.group(2)))
    loops = [(addr - labels[t]) // 16 + 1 for addr, t in branches if t in labels and labels[t] < addr]
    return max(loops, default=sum(1 for line in sass.splitlines() if _ADDR.search(line)))


def _ptxas(ptx: str, cc: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the PTX's kernel from ptxas -v."""
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [str(_BIN / "ptxas"), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.o")],
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return regs, int(spills.group(1)), int(spills.group(2))


def measure(launch: Launch, cc: int) -> dict:
    """Compile one launch for sm_<cc>: registers, spills, shared memory, SASS loop length, compile time."""
    t0 = time.perf_counter()
    compiled = _compile(launch, cc)
    compile_s = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    key = hashlib.sha256(f"{cc}\n{ptx}\nloop-or-all".encode()).hexdigest()[:32]
    cached = _CACHE / f"{key}.json"
    if cached.exists():
        result = json.loads(cached.read_text())
    else:
        regs, stores, loads = _ptxas(ptx, cc)
        result = dict(
            registers=regs,
            spill_stores=stores,
            spill_loads=loads,
            sass_loop=_sass_loop(compiled.asm["cubin"]),
        )
        _CACHE.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result))
    return dict(result, shared=compiled.metadata.shared, compile_s=round(compile_s, 2))


def describe(launch: Launch) -> tuple[str, str]:
    """(kernel name, config string) of a launch: the constexpr kwargs plus num_warps / num_stages."""
    name = launch.kernel.fn.__name__.strip("_").removesuffix("_kernel")
    skip = {"INTERPRETED_K"}
    parts = []
    for key, val in launch.kwargs.items():
        if key in skip:
            continue
        if isinstance(val, bool):
            if val:
                parts.append(key.lower())
        else:
            parts.append(f"{key}={val}")
    return name, " ".join(parts)


# ---- the shapes mPLUG launches -----------------------------------------------------------------------------


def _t(shape, dtype, requires_grad=False):
    return torch.zeros(shape, dtype=dtype, requires_grad=requires_grad)


@dataclass
class Case:
    name: str
    dtype: torch.dtype
    run: Callable[[], None]  # calls the launchers (under `recording`)


def _attention_case(name, dtype, B, H, Lq, Lk, Dh, *, mask=False, causal=False, dropout=0.0, kv_rows=None,
                    backward=True, splits=None) -> Case:  # fmt: skip
    def run():
        Bk = kv_rows or B
        q = _t((B, H, Lq, Dh), dtype)
        k = _t((Bk, H, Lk, Dh), dtype)
        v = _t((Bk, H, Lk, Dh), dtype)
        kpm = torch.ones((Bk, Lk), dtype=torch.bool) if mask else None
        kv_index = torch.arange(B) % Bk if kv_rows else None
        seed = torch.zeros(1, dtype=torch.int64) if dropout else None
        scale = Dh**-0.5
        if splits:
            decode._splitk_fwd(q, k, v, kpm, kv_index, causal, scale, dropout, seed, splits)
        else:
            attn._attn_fwd(q, k, v, kpm, kv_index, causal, scale, dropout, seed)
        if backward:
            out = torch.zeros_like(q)
            lse = torch.zeros((B, H, Lq), dtype=torch.float32)
            attn._attn_bwd(out, q, k, v, out, lse, kpm, kv_index, causal, scale, dropout, seed)

    return Case(name, dtype, run)


def attention_cases(dtypes) -> list[Case]:
    """mPLUG's attention launches (12 heads of 64): self-attention of ViT-B/16 (197 tokens) and ViT-L/14
    (257), text (35 tokens, padding, dropout; causal for the decoder), co-attention (35 text queries x 577
    image keys, batch 64: the main kernel; batch 1: split-K), connected attention (text + image, 612),
    decoding (5 beams sharing one image through kv_index, Lq = 1, split-K; and 20-token causal steps). Head
    dim 128 (80, 96, 128 share its tiles) for three of them, to check the other tile-table rows. Each dropout
    case has a twin without dropout (same tiles and flags) for the dropout cost table."""
    A = _attention_case
    md = dict(mask=True, dropout=0.1)
    cases = []
    for dtype in dtypes:
        dn = str(dtype).removeprefix("torch.")
        for Dh in (64, 128):
            H = 768 // Dh
            d = f"{dn} Dh={Dh}"
            cases += [
                A(f"vit-b16 {d}", dtype, 8, H, 197, 197, Dh),
                A(f"text-decoder {d} causal+mask+dropout", dtype, 8, H, 35, 35, Dh, causal=True, **md),
                A(f"text-decoder {d} causal+mask", dtype, 8, H, 35, 35, Dh, causal=True, mask=True),
                A(f"decode {d} kv_index+causal", dtype, 40, H, 20, 20, Dh, causal=True, kv_rows=8),
            ]
            if Dh != 64:
                continue
            cases += [
                A(f"vit-l14 {d}", dtype, 8, 16, 257, 257, Dh),
                A(f"vit-b16 {d} dropout", dtype, 8, H, 197, 197, Dh, dropout=0.1),
                A(f"text {d} mask+dropout", dtype, 8, H, 35, 35, Dh, **md),
                A(f"text {d} mask", dtype, 8, H, 35, 35, Dh, mask=True),
                A(f"co-attention {d} mask+dropout", dtype, 64, H, 35, 577, Dh, **md),
                A(f"connected {d} mask+dropout", dtype, 8, H, 612, 612, Dh, **md),
                A(f"connected {d} mask", dtype, 8, H, 612, 612, Dh, mask=True),
                A(f"co-attention batch 1 {d} mask splitk", dtype, 1, H, 35, 577, Dh, mask=True, splits=4),
                A(f"co-attention batch 1 {d} mask+dropout splitk", dtype, 1, H, 35, 577, Dh, **md, splits=4),
                A(f"decode {d} kv_index+mask splitk", dtype, 5, H, 1, 577, Dh, mask=True, kv_rows=1,
                  backward=False, splits=8),
            ]  # fmt: skip
    return cases


def fused_cases(dtypes) -> list[Case]:
    cases = []
    for dtype in dtypes:
        dn = str(dtype).removeprefix("torch.")
        for D in (768, 1024):
            for p in (0.0, 0.1):

                def ln(D=D, p=p, dtype=dtype):
                    x = _t((64, D), dtype)
                    w = torch.ones(D)
                    seed = torch.zeros(1, dtype=torch.int64)
                    y, mean, rstd = layer_norm._ln_fwd(x, x, w, w, seed, 1e-12, p)
                    layer_norm._ln_bwd(y, x, x, w, w, seed, mean, rstd, p)

                cases.append(Case(f"layer_norm {dn} D={D} p={p}", dtype, ln))

            def act(D=D, dtype=dtype):
                x = _t((64, 4 * D), dtype)
                b = torch.zeros(4 * D)
                for name in activation.ACTIVATIONS:
                    y = activation._bias_act_fwd(x, b, name)
                    activation._bias_act_bwd(y, x, b, name)

            cases.append(Case(f"bias_act {dn} D={4 * D}", dtype, act))
    return cases


# ---- driver ------------------------------------------------------------------------------------------------


def collect(cases: list[Case]) -> list[tuple[Case, Launch]]:
    """Unique launches (by kernel, constexprs and argument specialisation), each with its first case."""
    seen: dict[str, tuple[Case, Launch]] = {}
    for case in cases:
        with recording() as launches:
            case.run()
        for launch in launches:
            name, config = describe(launch)
            spec = tuple(
                (a.dtype, a.data_ptr() % 16 == 0)
                if isinstance(a, torch.Tensor)
                else (
                    type(a).__name__,
                    a % 16 == 0 if isinstance(a, int) and not isinstance(a, bool) else None,
                )
                for a in launch.args
            )
            key = f"{name}|{config}|{spec}"
            seen.setdefault(key, (case, launch))
    return list(seen.values())


def run(cases: list[Case], targets: list[int], only: str | None = None, log=print) -> list[Row]:
    """Record the launches as the launchers make them for each target (the tile table is per target), compile
    each unique one for that target, and return one Row per (launch, target)."""
    rows = []
    for cc in targets:
        os.environ["MPLUG_FAST_TRITON_ARCH"] = f"sm_{cc}"  # the launchers' tile table for CPU tensors
        try:
            launches = collect(cases)
        finally:
            os.environ.pop("MPLUG_FAST_TRITON_ARCH", None)
        for case, launch in launches:
            name, config = describe(launch)
            if only and only not in name:
                continue
            r = measure(launch, cc)
            row = Row(name, case.name, config, str(case.dtype).removeprefix("torch."), f"sm_{cc}",
                      shared_limit=SHARED_LIMIT[cc], **r)  # fmt: skip
            rows.append(row)
            log(
                f"{row.kernel:18s} {row.target} {row.dtype:8s} regs {row.registers:3d} "
                f"spill {row.spill_stores:6d} smem {row.shared // 1024:4d} KiB loop {row.sass_loop:5d} "
                f"{'ok ' if row.fits else 'BAD'} {row.compile_s:5.1f}s  {row.config}  [{row.case}]"
            )
    return rows


_T16 = {
    "fwd": (
        (128, 128, 8, 2),
        (128, 64, 8, 3),
        (128, 64, 8, 2),
        (64, 64, 4, 3),
        (64, 64, 4, 2),
        (64, 64, 8, 2),
        (128, 32, 8, 2),
        (64, 32, 4, 2),
    ),
    "dq": ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2)),
    "dkdv": ((64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2)),
}
_T32 = ((64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2))
SWEEP_TILES = {  # (kernel, operand bytes) -> candidates (BLOCK_M, BLOCK_N, num_warps, num_stages)
    **{(kind, 2): [tiles.Tile(*t) for t in cands] for kind, cands in _T16.items()},
    **{(kind, 4): [tiles.Tile(*t) for t in _T32] for kind in _T16},
}


def sweep(targets: list[int], block_ds=(64, 128), log=print, done=frozenset()) -> list[dict]:
    """Compile every SWEEP_TILES candidate per (target, kernel, BLOCK_D, operand bytes) with every flag on
    (mask, causal, dropout, kv_index: the most registers) and report its resources; `TILES` is chosen from
    this (the largest tile with no spills, shared memory inside the limit, and at most 255 registers)."""
    results = []
    saved = dict(tiles.TILES)
    try:
        for cc in targets:
            arch = f"sm_{cc}"
            os.environ["MPLUG_FAST_TRITON_ARCH"] = arch
            for block_d in block_ds:
                for dtype in (torch.float16, torch.float32):
                    nbytes = 4 if dtype == torch.float32 else 2
                    for kind in ("fwd", "dq", "dkdv"):
                        for tile in SWEEP_TILES[(kind, nbytes)]:
                            if (arch, kind, block_d, nbytes, tuple(asdict(tile).values())) in done:
                                continue
                            tiles.TILES[(arch, kind, block_d, nbytes)] = tile
                            flags = dict(mask=True, causal=True, dropout=0.1, kv_rows=2)
                            case = _attention_case("sweep", dtype, 4, 2, 256, 256, block_d, **flags)
                            with recording() as launches:
                                with torch.autograd.set_grad_enabled(False):
                                    case.run()
                            name = {"fwd": "attn_fwd", "dq": "attn_bwd_dq", "dkdv": "attn_bwd_dkdv"}[kind]
                            launch = next(la for la in launches if describe(la)[0] == name)
                            try:
                                r = measure(launch, cc)
                            except Exception as e:  # noqa: BLE001 - an uncompilable candidate is a result
                                r = dict(error=str(e).splitlines()[0][:120])
                            row = dict(target=arch, kernel=kind, block_d=block_d, bytes=nbytes,
                                       tile=list(asdict(tile).values()), **r)  # fmt: skip
                            row["fits"] = (
                                "error" not in r
                                and r["spill_stores"] == 0
                                and r["shared"] <= SHARED_LIMIT[cc]
                            )
                            results.append(row)
                            log(json.dumps(row))
                        tiles.TILES.update(saved)
    finally:
        tiles.TILES.clear()
        tiles.TILES.update(saved)
        os.environ.pop("MPLUG_FAST_TRITON_ARCH", None)
    return results


def probe(kind: str, cc: int, candidates: list[tiles.Tile], dtype=torch.float16, log=print) -> list[dict]:
    """Compile the `kind` kernel of ViT-B/16 self-attention (197 tokens, Dh 64) with each candidate tile, with
    and without dropout (and key padding mask, causal): SASS loop, and loop per score a thread holds
    (BLOCK_M * BLOCK_N / threads), to compare dropout costs across tiles."""
    arch = f"sm_{cc}"
    name = {"fwd": "attn_fwd", "dq": "attn_bwd_dq", "dkdv": "attn_bwd_dkdv"}[kind]
    saved = dict(tiles.TILES)
    os.environ["MPLUG_FAST_TRITON_ARCH"] = arch
    results = []
    try:
        for tile, flags, p in (
            (t, f, p) for t in candidates for f in ({}, {"mask": True}, {"mask": True, "causal": True})
            for p in (0.0, 0.1)
        ):  # fmt: skip
            tiles.TILES[(arch, kind, 64, 2 if dtype != torch.float32 else 4)] = tile
            case = _attention_case("probe", dtype, 8, 12, 197, 197, 64, dropout=p, **flags)
            with recording() as launches:
                case.run()
            r = measure(next(la for la in launches if describe(la)[0] == name), cc)
            per_thread = tile.block_m * tile.block_n / (32 * tile.num_warps)
            row = dict(target=arch, kernel=kind, tile=list(asdict(tile).values()), flags=sorted(flags),
                       dropout=p, **r, loop_per_score=round(r["sass_loop"] / per_thread, 2))  # fmt: skip
            results.append(row)
            log(json.dumps(row))
    finally:
        tiles.TILES.clear()
        tiles.TILES.update(saved)
        os.environ.pop("MPLUG_FAST_TRITON_ARCH", None)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    ap.add_argument("--only", help="only kernels whose name contains this")
    ap.add_argument("--no-fused", action="store_true", help="attention kernels only")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "kernel-resources")
    ap.add_argument("--note", default="")
    ap.add_argument("--sweep", type=Path, help="compile the candidate tiles instead; JSON lines to this file")
    ap.add_argument("--probe", choices=("fwd", "dq", "dkdv"), help="dropout cost of --tiles for this kernel")
    ap.add_argument("--tiles", nargs="+", default=[], help="BLOCK_M,BLOCK_N,num_warps,num_stages (--probe)")
    args = ap.parse_args(argv)
    torch.set_float32_matmul_precision("high")  # the only fp32 path the launchers take on CUDA
    if args.probe:
        candidates = [tiles.Tile(*map(int, t.split(","))) for t in args.tiles]
        for cc in args.targets:
            for dtype in args.dtypes:
                probe(args.probe, cc, candidates, getattr(torch, dtype))
        return 0
    if args.sweep:  # resumable: candidates already in the file are skipped
        old = (
            [json.loads(line) for line in args.sweep.read_text().splitlines()] if args.sweep.exists() else []
        )
        done = {(r["target"], r["kernel"], r["block_d"], r["bytes"], tuple(r["tile"])) for r in old}
        with args.sweep.open("a") as f:
            sweep(args.targets, log=lambda line: (print(line), f.write(line + "\n"), f.flush()), done=done)
        return 0
    dtypes = [getattr(torch, d) for d in args.dtypes]
    cases = attention_cases(dtypes) + ([] if args.no_fused else fused_cases(dtypes))
    rows = run(cases, args.targets, args.only)
    write(rows, args.out, args.note)
    bad = [r for r in rows if not r.fits]
    print(f"{len(rows)} compiled kernels, {len(bad)} do not fit -> {args.out}.{{json,md}}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
