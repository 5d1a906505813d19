"""Tile sizes of the attention kernels per target and head dim, and what the kernels can run.

    attention_unsupported_reasons(*, dtype, head_dim, device, has_mask=False, causal=False, dropout=0.0,
                                  needs_grad=True) -> list[str]
    tile_for(kernel, block_d, dtype, device, Lq) -> Tile

The table `TILES` holds one (BLOCK_M, BLOCK_N, num_warps, num_stages) per (target, kernel, BLOCK_D, operand
bytes), for the forward (`fwd`; the split-K forward takes its num_stages), the dQ kernel (`dq`) and the dK/dV
kernel (`dkdv`: BLOCK_M = query rows per loop step, BLOCK_N = key rows per program), chosen from the compile
gate's candidate sweep (`python benchmarks/kernel_resources.py --sweep FILE`: every candidate compiled for
the target with mask, causal, dropout and kv_index all on, the most registers): the first candidate in a
preference list (large tiles first; 8 warps for 128-row tiles) that compiles with no register spills, shared
memory inside the limit and a few registers of margin (at most 248 of 255; where no candidate has that
margin, the one with the fewest registers: sm_80's dK/dV). The full gate
(`benchmarks/results/kernel-resources.md`) then checks every launch the launchers make at mPLUG's shapes.
`SHARED` is the shared memory the sweep measured per entry: a device whose per-block limit is lower
(sm_86/sm_89: 99 KiB) is refused up front instead of failing at launch. `tile_for` cuts BLOCK_M to the next
power of two >= Lq (16 or 32) for short queries, whatever the batch, so text-to-image co-attention (Lq 25-40)
does not compute a 64- or 128-row tile for 25 rows. `autotune_candidates` lists a few tiles around each
entry for `triton.autotune` when a GPU is present (`MPLUG_FAST_TRITON_AUTOTUNE=1`).

Targets: "sm_90" (H100/H200, compute capability 9.x) and "sm_80" (A100 and every other 8.x device, whose
limits are the same or lower). Compute capability < 8.0 is not supported (bf16 dots need sm_80). The CPU
interpreter uses the sm_90 tiles (fewer, larger tiles are faster there).

fp32 inputs run with TF32 dots (4-byte operands: smaller tiles) when torch allows TF32 for fp32 matmuls
(`torch.set_float32_matmul_precision("high")`); under torch's default ("highest") Triton's IEEE fp32 dot is
plain FMA with heavy register spills, so fp32 CUDA inputs are refused (SDPA takes them).
"""

import os
from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "TILES",
    "Tile",
    "arch_of",
    "attention_unsupported_reasons",
    "autotune_candidates",
    "block_size",
    "shared_limit",
    "tile_for",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Per-block shared memory (opt-in maximum) where torch does not report it.
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}
# MPLUG_FAST_TRITON_ARCH=sm_80 makes the interpreter (and CPU recordings) use that target's tiles.
_ARCH_ENV = "MPLUG_FAST_TRITON_ARCH"


@dataclass(frozen=True)
class Tile:
    block_m: int  # query rows per program (fwd, dq) or per loop step (dkdv)
    block_n: int  # key rows per loop step (fwd, dq) or per program (dkdv)
    num_warps: int
    num_stages: int


# (target, kernel, BLOCK_D, operand bytes) -> (Tile, the largest shared memory in bytes the compile gate
# measured for it, every flag combination on). Operand bytes 2: fp16/bf16; 4: fp32 with TF32 dots.
_MEASURED: dict[tuple[str, str, int, int], tuple[Tile, int]] = {
    ("sm_90", "fwd", 64, 2): (Tile(128, 64, 8, 3), 73728),
    ("sm_90", "dq", 64, 2): (Tile(128, 64, 8, 3), 90112),
    ("sm_90", "dkdv", 64, 2): (Tile(64, 128, 8, 2), 74240),
    ("sm_90", "fwd", 128, 2): (Tile(128, 64, 8, 3), 139264),
    ("sm_90", "dq", 128, 2): (Tile(128, 64, 8, 3), 172032),
    ("sm_90", "dkdv", 128, 2): (Tile(32, 64, 8, 2), 67840),
    ("sm_90", "fwd", 64, 4): (Tile(64, 32, 8, 2), 50176),
    ("sm_90", "dq", 64, 4): (Tile(64, 32, 8, 2), 65536),
    ("sm_90", "dkdv", 64, 4): (Tile(64, 32, 8, 2), 66048),
    ("sm_90", "fwd", 128, 4): (Tile(64, 32, 8, 2), 99328),
    ("sm_90", "dq", 128, 4): (Tile(64, 32, 8, 2), 131072),
    ("sm_90", "dkdv", 128, 4): (Tile(64, 32, 8, 2), 131584),
    ("sm_80", "fwd", 64, 2): (Tile(128, 64, 8, 3), 65536),
    ("sm_80", "dq", 64, 2): (Tile(128, 64, 8, 3), 81920),
    ("sm_80", "dkdv", 64, 2): (Tile(32, 64, 8, 2), 28928),
    ("sm_80", "fwd", 128, 2): (Tile(128, 32, 8, 2), 57344),
    ("sm_80", "dq", 128, 2): (Tile(64, 64, 8, 2), 73728),
    ("sm_80", "dkdv", 128, 2): (Tile(32, 64, 8, 2), 53504),
    ("sm_80", "fwd", 64, 4): (Tile(64, 32, 8, 2), 40960),
    ("sm_80", "dq", 64, 4): (Tile(64, 32, 8, 2), 57344),
    ("sm_80", "dkdv", 64, 4): (Tile(64, 32, 8, 2), 66048),
    ("sm_80", "fwd", 128, 4): (Tile(32, 64, 4, 2), 90112),  # (64, 32, 4, 2) spills with dropout
    ("sm_80", "dq", 128, 4): (Tile(64, 32, 8, 2), 114688),
    ("sm_80", "dkdv", 128, 4): (Tile(32, 32, 4, 2), 82176),
}
# BLOCK_D 16 and 32 reuse the BLOCK_D = 64 entries (smaller head dims need fewer registers and less memory).
_TABLE = {
    (arch, kernel, block_d, nbytes): _MEASURED[(arch, kernel, max(block_d, 64), nbytes)]
    for arch in ("sm_90", "sm_80")
    for nbytes in (2, 4)
    for block_d in (16, 32, 64, 128)
    for kernel in ("fwd", "dq", "dkdv")
}
TILES: dict[tuple[str, str, int, int], Tile] = {key: tile for key, (tile, _) in _TABLE.items()}
SHARED: dict[tuple[str, str, int, int], int] = {key: shared for key, (_, shared) in _TABLE.items()}


def arch_of(device: torch.device | str) -> str:
    """The tile-table target of a device: "sm_90" for compute capability >= 9, else "sm_80" (the interpreter
    uses "sm_90" unless MPLUG_FAST_TRITON_ARCH says otherwise)."""
    device = torch.device(device)
    if device.type != "cuda":
        return os.environ.get(_ARCH_ENV, "sm_90")
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


def shared_limit(device: torch.device | str) -> int:
    """Per-block shared memory (bytes) a kernel may use on `device` (opt-in maximum)."""
    device = torch.device(device)
    if device.type != "cuda":
        return SHARED_LIMIT[arch_of(device)]
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if limit:
        return int(limit)
    major, minor = props.major, props.minor
    return SHARED_LIMIT["sm_90"] if major >= 9 else 166912 if (major, minor) == (8, 0) else 101376


def _operand_bytes(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def block_size(n: int) -> int:
    """A tile side for n rows or columns (a head dim, short queries): the next power of two >= n, at least 16
    (the smallest `tl.dot` tile)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _short(block_m: int, Lq: int | None) -> int:
    """A query tile that fits short queries: `block_size(Lq)`, at most block_m."""
    return block_m if Lq is None else min(block_m, block_size(Lq))


def tile_for(
    kernel: str, block_d: int, dtype: torch.dtype, device: torch.device | str, Lq: int | None = None
) -> Tile:
    """The table's tile for `kernel` ("fwd", "dq", "dkdv"), with BLOCK_M cut to fit `Lq` short queries."""
    t = TILES[(arch_of(device), kernel, block_d, _operand_bytes(dtype))]
    return Tile(_short(t.block_m, Lq), t.block_n, t.num_warps, t.num_stages)


def autotune_candidates(kernel: str, block_d: int, dtype: torch.dtype, device) -> list[Tile]:
    """A few tiles around the table's entry for `triton.autotune` on a GPU (the table's first)."""
    base = TILES[(arch_of(device), kernel, block_d, _operand_bytes(dtype))]
    out = [base]
    for bm, bn in ((base.block_m, base.block_n // 2), (base.block_m // 2, base.block_n), (64, 64)):
        for warps in (4, 8):
            t = Tile(max(16, bm), max(16, bn), warps, base.num_stages)
            if t not in out:
                out.append(t)
    return out[:6]


def attention_unsupported_reasons(
    *,
    dtype: torch.dtype,
    head_dim: int,
    device: torch.device | str,
    has_mask: bool = False,
    causal: bool = False,
    dropout: float = 0.0,
    needs_grad: bool = True,
) -> list[str]:
    """Why the Triton attention kernels cannot run these inputs (empty: they can).

    Knows the supported head dims and dtypes, that fp32 needs TF32 to be allowed on CUDA, the compute
    capability, and whether the tiles the launcher would use fit the device's per-block shared memory
    (forward, plus the two backward kernels when `needs_grad`). `has_mask`, `causal` and `dropout` change no
    answer today (the table covers every flag combination); they are part of the question so that callers
    need not change when one does.
    """
    del has_mask, causal, dropout
    device = torch.device(device)
    reasons = []
    if head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head_dim={head_dim} (supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} (supported: float32, float16, bfloat16)")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            reasons.append(f"compute capability {major}.{minor} < 8.0 (the kernels target sm_80 and sm_90)")
        if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
            reasons.append(
                "float32 under torch.get_float32_matmul_precision() == 'highest': IEEE fp32 dots spill "
                "registers; set the precision to 'high' (TF32) or use SDPA"
            )
        if not reasons:
            limit = shared_limit(device)
            arch = arch_of(device)
            kernels = ("fwd", "dq", "dkdv") if needs_grad else ("fwd",)
            for kernel in kernels:
                need = SHARED.get((arch, kernel, block_size(head_dim), _operand_bytes(dtype)), 0)
                if need > limit:
                    reasons.append(
                        f"{kernel} tile needs {need // 1024} KiB of shared memory, {device} allows "
                        f"{limit // 1024} KiB"
                    )
    return reasons
