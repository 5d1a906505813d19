"""The Triton kernels on a real GPU: correctness against the references, speed against SDPA, real resources.

    python benchmarks/triton_gpu_check.py --out benchmarks/results/gpu-triton.json [--quick]

Sections of the JSON (each is written even when another fails; errors are recorded, not raised):

* `correctness`: every kernel (main attention forward+backward, split-K forward, fused residual+dropout+
  LayerNorm, fused bias+activation) in fp16, bf16 and fp32 (TF32 dots: torch's "high" precision) at mPLUG's
  shapes, with and without mask / causal / kv_index / dropout; max |error| against the fp32 reference and
  the budget (2 x the low-precision reference's own error + atol; fp32/TF32 gets fp16's budget); dropout runs
  are compared against the reference given the kernels' own keep-mask.
* `speed`: forward and forward+backward TFLOP/s of Triton (table tiles; with dropout 0.1 too) against SDPA's
  flash and memory-efficient backends (`torch.nn.attention.sdpa_kernel`), fp16 and bf16, at ViT-B/16 and
  ViT-L/14 self-attention (577 tokens at 384 / 336 px), text, co-attention and connected attention.
* `autotune`: for two shapes, the table's time against `triton.autotune` over `tiles.autotune_candidates`
  (the best config found), to correct `tiles.TILES` with measured numbers.
* `resources`: registers, spills and shared memory that the driver reports for every compiled variant
  (to compare with `benchmarks/results/kernel-resources.json`, computed without a GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from mplug_fast.ops.reference import attention_ref
from mplug_fast.ops.triton import activation, attention, decode, layer_norm, tiles
from mplug_fast.ops.triton import attention_kernels as attn_k

OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks"  # default output: untracked (.gitignore)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _inputs(B, H, Lq, Lk, Dh, dtype, Bk=None, pad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Bk = Bk or B
    q = torch.randn(B, H, Lq, Dh, device="cuda", generator=g).to(dtype)
    k = torch.randn(Bk, H, Lk, Dh, device="cuda", generator=g).to(dtype)
    v = torch.randn(Bk, H, Lk, Dh, device="cuda", generator=g).to(dtype)
    mask = None
    if pad:
        lens = torch.randint(max(1, Lk // 2), Lk + 1, (Bk,), device="cuda", generator=g)
        mask = torch.arange(Lk, device="cuda")[None] < lens[:, None]
    return q, k, v, mask


def _grads(fn, q, k, v, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    dout = torch.randn_like(out.float(), generator=torch.Generator(device="cuda").manual_seed(1)).to(
        out.dtype
    )
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return [out.detach(), dq, dk, dv]


def _precision(precision: str):
    class _Ctx:
        def __enter__(self):
            self.before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)

        def __exit__(self, *exc):
            torch.set_float32_matmul_precision(self.before)

    return _Ctx()


def _budget_record(name, got, ref32, low, atol=1e-3):
    rec = {"case": name, "ok": True, "tensors": {}}
    for what, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref32, low):
        err = (a.float() - r.float()).abs().max().item()
        budget = 2 * (lo.float() - r.float()).abs().max().item() + atol
        rec["tensors"][what] = {"err": err, "budget": budget}
        rec["ok"] &= bool(err <= budget and math.isfinite(err))
    return rec


ATTN_CASES = {  # name: (B, Bk, H, Lq, Lk, Dh, pad, causal, kv_index, num_splits)
    "vit-b16 197": (2, None, 12, 197, 197, 64, False, False, False, None),
    "vit-l14 Dh128 257": (2, None, 8, 257, 257, 128, False, False, False, None),
    "text causal+pad 35": (4, None, 12, 35, 35, 64, True, True, False, None),
    "co-attention pad 35x577": (4, None, 12, 35, 577, 64, True, False, False, None),
    "connected pad Dh80 612": (2, None, 4, 612, 612, 80, True, False, False, None),
    "kv_index 20x577": (10, 2, 12, 20, 577, 64, True, False, True, None),
    "split-K decode 1x577": (5, 1, 12, 1, 577, 64, True, False, True, 8),
    "split-K co-attention 35x577": (1, None, 12, 35, 577, 64, True, False, False, 4),
}


def correctness(quick: bool) -> list[dict]:
    records = []
    for name, (B, Bk, H, Lq, Lk, Dh, pad, causal, use_kv, splits) in ATTN_CASES.items():
        for dtype in DTYPES:
            for p in (0.0, 0.1):
                label = f"attention {name} {str(dtype)[6:]} dropout={p}"
                try:
                    q, k, v, mask = _inputs(B, H, Lq, Lk, Dh, dtype, Bk=Bk, pad=pad)
                    kv = torch.arange(B, device="cuda") % Bk if use_kv else None
                    kw = dict(key_padding_mask=mask, causal=causal, kv_index=kv)
                    fn = functools.partial(decode.splitk_attention, num_splits=splits) if splits else None
                    fn = fn or attention.flash_attention
                    ref_kw = dict(kw)
                    if p:
                        torch.manual_seed(5)
                    with _precision("high"):
                        got = _grads(fn, q, k, v, dropout_p=p, **kw)
                    if p:
                        torch.manual_seed(5)
                        seed = attention.draw_dropout_seed("cuda")
                        keep = attention.dropout_keep_mask(seed, B, H, Lq, Lk, p)
                        ref_kw.update(dropout_p=1 - 1 / attention.dropout_scale(p), dropout_mask=keep)
                    ref32 = _grads(attention_ref, q.float(), k.float(), v.float(), **ref_kw)
                    lo = torch.float16 if dtype == torch.float32 else dtype
                    low = _grads(attention_ref, q.to(lo), k.to(lo), v.to(lo), upcast=False, **ref_kw)
                    records.append(_budget_record(label, got, ref32, low))
                except Exception as e:  # noqa: BLE001 - record and go on
                    records.append({"case": label, "ok": False, "error": repr(e)[:500]})
                print(json.dumps(records[-1])[:200], flush=True)
    for dtype in DTYPES:
        for p in (0.0, 0.1):
            label = f"residual_layer_norm D=768 {str(dtype)[6:]} dropout={p}"
            try:
                x = torch.randn(4096, 768, device="cuda").to(dtype).requires_grad_()
                r = torch.randn(4096, 768, device="cuda").to(dtype).requires_grad_()
                w = torch.randn(768, device="cuda").requires_grad_()
                b = torch.randn(768, device="cuda").requires_grad_()
                seed = torch.tensor([7], device="cuda")
                y = layer_norm.residual_layer_norm(x, r, w, b, 1e-12, p, seed)
                dy = torch.randn_like(y)
                dx, dr = torch.autograd.grad(y, (x, r), dy)
                rec = {"case": label}
                if p == 0.0:
                    ref = F.layer_norm((r + x).float(), (768,), w, b, 1e-12)
                    rec["err"] = (y.float() - ref).abs().max().item()
                    rec["ok"] = rec["err"] < (1e-2 if dtype != torch.float32 else 1e-4)
                else:  # same mask forward and backward: dx = dr * scale where kept, exactly 0 where dropped
                    kept = dx != 0
                    scale = attention.dropout_scale(p)
                    rec["keep_rate"] = kept.float().mean().item()
                    rec["dx_vs_dr"] = (dx[kept].float() - dr[kept].float() * scale).abs().max().item()
                    rec["ok"] = abs(rec["keep_rate"] - 1 / scale) < 0.01 and rec["dx_vs_dr"] < 5e-2
                records.append(rec)
            except Exception as e:  # noqa: BLE001
                records.append({"case": label, "ok": False, "error": repr(e)[:500]})
        for act in activation.ACTIVATIONS:
            label = f"bias_act {act} N=3072 {str(dtype)[6:]}"
            try:
                x = torch.randn(4096, 3072, device="cuda").to(dtype)
                bias = torch.randn(3072, device="cuda")
                y = activation.bias_act(x, bias, act)
                yy = x.float() + bias
                ref = {
                    "gelu": F.gelu(yy),
                    "gelu_tanh": F.gelu(yy, approximate="tanh"),
                    "quick_gelu": yy * torch.sigmoid(1.702 * yy),
                }[act]
                err = (y.float() - ref).abs().max().item()
                records.append(
                    {"case": label, "err": err, "ok": err < (5e-2 if dtype != torch.float32 else 1e-4)}
                )
            except Exception as e:  # noqa: BLE001
                records.append({"case": label, "ok": False, "error": repr(e)[:500]})
    return records


SPEED_CASES = {  # name: (B, H, Lq, Lk, Dh, pad, causal)
    "vit-b16 384px self 577": (32, 12, 577, 577, 64, False, False),
    "vit-l14 336px self 577": (32, 16, 577, 577, 64, False, False),
    "text self 35 pad": (128, 12, 35, 35, 64, True, False),
    "co-attention 35x577 pad": (128, 12, 35, 577, 64, True, False),
    "connected 612 pad": (32, 12, 612, 612, 64, True, False),
    "decoder causal 25": (160, 12, 25, 25, 64, True, True),
}


def _bench(fn, reps=20) -> float:
    """Median milliseconds over `reps` runs after warm-up (CUDA events)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=reps, return_mode="median")


def _fwd_bwd(fn, q, k, v, p, dout) -> None:
    torch.autograd.grad(fn(q, k, v, p), (q, k, v), dout)


def speed(quick: bool) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    records = []
    for name, (B, H, Lq, Lk, Dh, pad, causal) in SPEED_CASES.items():
        for dtype in (torch.bfloat16, torch.float16):
            q, k, v, mask = _inputs(B, H, Lq, Lk, Dh, dtype, pad=pad)
            flops_fwd = 4 * B * H * Lq * Lk * Dh * (0.5 if causal else 1.0)
            sdpa_mask = None if mask is None else mask[:, None, None, :]

            def sdpa(backend, q, k, v, dropout_p, sdpa_mask=sdpa_mask, causal=causal):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        attn_mask=sdpa_mask,
                        dropout_p=dropout_p,
                        is_causal=causal and sdpa_mask is None,
                    )

            def triton(q, k, v, p, mask=mask, causal=causal):
                return attention.flash_attention(q, k, v, key_padding_mask=mask, causal=causal, dropout_p=p)

            impls = {
                "triton": triton,
                "sdpa-flash": functools.partial(sdpa, SDPBackend.FLASH_ATTENTION),
                "sdpa-efficient": functools.partial(sdpa, SDPBackend.EFFICIENT_ATTENTION),
            }
            for impl, fn in impls.items():
                for p in (0.0, 0.1):
                    rec = {"case": name, "dtype": str(dtype)[6:], "impl": impl, "dropout": p}
                    try:
                        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                        ms_f = _bench(functools.partial(fn, q, k, v, p))
                        out = fn(qg, kg, vg, p)
                        ms_fb = _bench(functools.partial(_fwd_bwd, fn, qg, kg, vg, p, torch.randn_like(out)))
                        rec.update(
                            fwd_ms=ms_f, fwd_tflops=flops_fwd / ms_f / 1e9,
                            fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3.5 * flops_fwd / ms_fb / 1e9,
                        )  # fmt: skip
                    except Exception as e:  # noqa: BLE001 - e.g. flash SDPA refuses a mask
                        rec["error"] = repr(e)[:300]
                    records.append(rec)
                    print(json.dumps(rec)[:200], flush=True)
    return records


def autotune(quick: bool) -> list[dict]:
    records = []
    for name in ("vit-b16 384px self 577", "co-attention 35x577 pad"):
        B, H, Lq, Lk, Dh, pad, causal = SPEED_CASES[name]
        q, k, v, mask = _inputs(B, H, Lq, Lk, Dh, torch.bfloat16, pad=pad)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def fwd_bwd(qg=qg, kg=kg, vg=vg, mask=mask, causal=causal):
            o = attention.flash_attention(qg, kg, vg, key_padding_mask=mask, causal=causal)
            torch.autograd.grad(o, (qg, kg, vg), torch.ones_like(o))

        rec = {"case": name}
        try:
            rec["table_ms"] = _bench(fwd_bwd)
            attention._AUTOTUNE = True
            fwd_bwd()  # tunes
            rec["autotuned_ms"] = _bench(fwd_bwd)
            rec["best"] = {f"{key[1]}": str(tuner.best_config) for key, tuner in attention._AUTOTUNED.items()}
        except Exception as e:  # noqa: BLE001
            rec["error"] = repr(e)[:500]
        finally:
            attention._AUTOTUNE = False
            attention._AUTOTUNED.clear()
        records.append(rec)
        print(json.dumps(rec)[:300], flush=True)
    return records


def resources() -> list[dict]:
    records = []
    kernels = [attn_k._attn_fwd_kernel, attn_k._attn_bwd_dq_kernel, attn_k._attn_bwd_dkdv_kernel,
               decode._splitk_fwd_kernel, layer_norm._ln_fwd_kernel, layer_norm._ln_bwd_kernel]  # fmt: skip
    for kern in kernels:
        for dev_caches in getattr(kern, "device_caches", {}).values():
            for compiled in dev_caches[0].values():
                try:
                    compiled._init_handles()
                    records.append({
                        "kernel": kern.fn.__name__, "n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
                        "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
                        "num_stages": compiled.metadata.num_stages,
                        "constants": {str(k): str(v) for k, v in compiled.src.constants.items()}
                        if hasattr(compiled, "src") else None,
                    })  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    records.append({"kernel": kern.fn.__name__, "error": repr(e)[:200]})
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR / "gpu-triton.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=["correctness", "speed", "autotune"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("triton_gpu_check.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    result = {
        "device": props.name, "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
        "arch_tiles": tiles.arch_of("cuda"), "shared_limit": tiles.shared_limit("cuda"),
    }  # fmt: skip
    for section, fn in (("correctness", correctness), ("speed", speed), ("autotune", autotune)):
        if section in args.skip:
            continue
        t0 = time.time()
        try:
            result[section] = fn(args.quick)
        except Exception:  # noqa: BLE001 - keep the other sections
            result[section] = {"error": traceback.format_exc()[-2000:]}
        result[f"{section}_s"] = round(time.time() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["resources"] = resources()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    bad = [r["case"] for r in result.get("correctness", []) if isinstance(r, dict) and not r.get("ok", True)]
    print(f"correctness: {len(bad)} failing: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
