"""The Triton FlashAttention-2 backend (`mplug_fast.ops.triton.attention`) against `attention_ref`: outputs
and q/k/v gradients for Lq != Lk, ragged lengths (1, 7, 17, 33, 65, 70 with 64-wide blocks), key padding,
causal (Lq == Lk, Lq < Lk, Lq > Lk with empty rows), shared K/V rows (`kv_index`), rows without keys, strided
and non-contiguous inputs, head dims 16/32/64/80/128; dropout (forward and grads equal the reference given
the kernels' own keep-mask, that mask checked against the forward kernel with special inputs, keep-rate
statistics, reproducibility from torch.manual_seed); `torch.library.opcheck`; fp16 within an error budget;
the backend's reasons and automatic order; the tiny VQA model with MPLUG_FAST_ATTENTION=triton.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py), ~3 ms per tile
iteration: shapes stay small. bf16 runs on CUDA only (`-m gpu`): bf16 tl.dot is wrong in the interpreter.

| comparison                                  | dtype | atol / budget                                     |
|---------------------------------------------|-------|---------------------------------------------------|
| triton vs reference (out, dq, dk, dv)       | fp32  | atol 1e-5, rtol 1e-5 (measured max ~2e-6)          |
| triton dropout vs reference with its mask   | fp32  | atol 1e-5, rtol 1e-5                              |
| tiny VQA logits and grads, triton vs ref    | fp32  | 1e-4                                              |
| triton fp16 / bf16 vs reference fp32        | low   | 2 * |reference_lowp - reference_fp32| + 1e-3       |
"""

import contextlib
import importlib

import pytest
import torch

from mplug_fast.modeling.layers import clear_backend_caches
from mplug_fast.ops.attention import ATTENTION, BACKENDS, attention, select_backend
from mplug_fast.ops.reference import attention_ref
from tests.ops.test_attention import assert_close, inputs_of, make_inputs, oracle_attention, run_with_grads

attention_module = importlib.import_module("mplug_fast.ops.attention")
TRITON = BACKENDS["triton"]
_unavailable = TRITON.unavailable_reason()
pytestmark = [
    pytest.mark.skipif(_unavailable is not None, reason=f"triton backend: {_unavailable}"),
    # triton 3.6's interpreter turns loop bounds into 1-element arrays (numpy >= 2.4 makes this an error).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
BF16_ON_CPU = "bf16 tl.dot is wrong in the Triton interpreter (triton-lang/triton#11584); checked on CUDA"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)


def triton_attention(q, k, v, **kwargs):
    return attention(q, k, v, backend="triton", **kwargs)


def check_against_reference(q, k, v, tol=FP32_TOL, what="", **kwargs):
    """Output and q/k/v grads of the triton backend vs attention_ref; returns the max |diff| of each."""
    got = run_with_grads(triton_attention, q, k, v, **kwargs)
    ref = run_with_grads(attention_ref, q, k, v, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, **tol, what=f"triton {name} {what}")
    return got


# ---- fp32 against the reference ----------------------------------------------------------------------------

CASES = [  # B, H, Lq, Lk, Dh, mask kind
    (2, 2, 33, 65, 32, "none"),  # Lq != Lk, two key blocks, ragged tail
    (2, 1, 1, 65, 64, "none"),  # one query (decoding)
    (1, 2, 1, 1, 16, "none"),
    (2, 2, 70, 7, 16, "none"),  # two query blocks, Lq > Lk
    (2, 2, 7, 33, 16, "padding"),
    (2, 2, 65, 17, 32, "padding"),
    (2, 2, 33, 33, 64, "causal"),  # Lq == Lk
    (1, 2, 17, 65, 32, "causal"),  # Lq < Lk: the diagonal is shifted right
    (2, 1, 70, 65, 16, "causal"),  # Lq > Lk: the first 5 queries see no key
    (2, 2, 7, 33, 64, "causal+padding"),
    (2, 2, 65, 65, 16, "causal+padding"),
    (1, 2, 17, 33, 80, "padding"),  # head dim 80 on 128-wide tiles
    (1, 1, 65, 65, 128, "causal"),
]


@pytest.mark.parametrize(
    "B, H, Lq, Lk, Dh, mask_kind", CASES, ids=[f"{c[2]}x{c[3]}-d{c[4]}-{c[5]}" for c in CASES]
)
def test_triton_matches_reference_fp32(B, H, Lq, Lk, Dh, mask_kind):
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dh, padding="padding" in mask_kind, seed=Lq * 100 + Lk)
    causal = "causal" in mask_kind
    out, *_ = check_against_reference(
        q, k, v, key_padding_mask=mask, causal=causal, what=f"Lq={Lq} Lk={Lk} Dh={Dh} {mask_kind}"
    )
    assert_close(out, oracle_attention(q, k, v, mask, causal).float(), **FP32_TOL, what="triton vs float64")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("mask_kind", ["padding", "causal+padding"])
def test_kv_index_reads_shared_rows_and_accumulates_their_grads(mask_kind, index_dtype):
    """B=3 query rows read Bk=2 K/V rows: equal to attention over gathered K/V; dk/dv summed per K/V row."""
    q, k, v, mask = make_inputs(3, 2, 7, 33, 16, Bk=2, padding=True)
    causal = mask_kind == "causal+padding"
    kv_index = torch.tensor([1, 0, 1], dtype=index_dtype)

    def gathered(q, k, v):
        idx = kv_index.long()
        return attention_ref(q, k[idx], v[idx], key_padding_mask=mask[idx], causal=causal)

    got = run_with_grads(triton_attention, q, k, v, key_padding_mask=mask, causal=causal, kv_index=kv_index)
    ref = run_with_grads(gathered, q, k, v)
    assert got[2].shape == k.shape and got[3].shape == v.shape
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"triton kv_index {mask_kind} {name}")


@pytest.mark.parametrize("case", ["padded_row", "causal_Lq_gt_Lk"])
def test_rows_without_keys_are_zero_with_zero_finite_grads(case):
    if case == "padded_row":
        q, k, v, _ = make_inputs(3, 2, 7, 9, 16)
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[1] = False  # batch row 1 has no key at all
        mask[2, 4:] = False
        causal, empty = False, (slice(1, 2), slice(None), slice(None))
    else:
        q, k, v, _ = make_inputs(2, 2, 17, 7, 16)
        mask, causal = None, True
        empty = (slice(None), slice(None), slice(0, 10))  # queries 0..9 see no key (j <= i - 10)
    out, dq, dk, dv = check_against_reference(q, k, v, key_padding_mask=mask, causal=causal, what=case)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{case}: non-finite {name}"
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "rows without keys are not exactly 0"
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty])), "rows without keys get a q grad"
    if case == "padded_row":
        assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))


def test_strided_inputs_and_custom_scale():
    """q/k/v as views of a packed [B, L, 3, H, Dh] projection (the model's layout), v with a strided last dim
    (copied by the launcher), and a non-default scale."""
    B, L, H, Dh = 2, 33, 2, 32
    qkv = torch.randn(B, L, 3, H, Dh, generator=torch.Generator().manual_seed(5))
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, L, Dh] views, last-dim stride 1
    v = torch.randn(B, H, Dh, L).transpose(-2, -1)  # [B, H, L, Dh], last-dim stride L
    assert not q.is_contiguous() and v.stride(-1) != 1
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 20:] = False
    check_against_reference(q, k, v, key_padding_mask=mask, scale=0.3, what="strided, scale=0.3")


def test_opcheck_fwd_op():
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes) of the custom op."""
    ops = pytest.importorskip("mplug_fast.ops.triton.attention")
    q, k, v, mask = make_inputs(2, 1, 7, 9, 16, padding=True)
    args = (
        q.requires_grad_(),
        k.requires_grad_(),
        v.requires_grad_(),
        mask,
        torch.tensor([1, 0]),
        True,
        0.25,
    )
    torch.library.opcheck(torch.ops.mplug_fast.flash_attn_fwd.default, args)
    assert ops.flash_attn_fwd(*args)[1].shape == (2, 1, 7)  # LSE [B, H, Lq]


@pytest.mark.parametrize(
    "compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # inductor: ~20 s of cold compile on the CI CPU
def test_torch_compile_fullgraph_forward_and_backward(compile_backend):
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend(compile_backend)

    def loss(q, k, v, mask):
        return attention(q * 2, k, v, key_padding_mask=mask, causal=True, backend="triton").square().sum()

    q, k, v, mask = make_inputs(2, 2, 7, 9, 16, padding=True)
    got = run_with_grads(torch.compile(loss, fullgraph=True, backend=counter), q, k, v, mask=mask)
    ref = run_with_grads(lambda q, k, v, mask: attention_ref(q * 2, k, v, key_padding_mask=mask, causal=True)
                         .square().sum(), q, k, v, mask=mask)  # fmt: skip
    assert counter.frame_count == 1, f"{counter.frame_count} frames: the op breaks the graph"
    for name, a, b in zip(("loss", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, atol=1e-4, rtol=1e-5, what=f"compiled ({compile_backend}) {name}")


def test_fp16_forward_and_grads_within_twice_the_reference_fp16_error():
    """|triton_fp16 - ref_fp32| <= 2 * |ref_fp16(upcast=False) - ref_fp32| + 1e-3 (max over elements)."""
    q, k, v, mask = make_inputs(2, 2, 33, 17, 32, padding=True, dtype=torch.float16)
    got = run_with_grads(triton_attention, q, k, v, key_padding_mask=mask, causal=True)
    ref32 = run_with_grads(attention_ref, q.float(), k.float(), v.float(), key_padding_mask=mask, causal=True)
    low = run_with_grads(attention_ref, q, k, v, key_padding_mask=mask, causal=True, upcast=False)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref32, low):
        assert a.dtype == torch.float16, f"{name} dtype {a.dtype}"
        err = (a.float() - r).abs().max().item()
        budget = 2 * (lo.float() - r).abs().max().item() + 1e-3
        assert err <= budget, f"triton fp16 {name}: max |diff| {err:.3e} > budget {budget:.3e}"


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch.set_float32_matmul_precision for a block (the kernels read it at launch)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def cuda_budget_check(fn, q, k, v, dtype, what, **kwargs):
    """fn on CUDA vs the fp32 reference: max |diff| <= 2 x the error of the reference run in the low
    precision + atol. fp32 runs with TF32 dots (the only fp32 path the kernels take on CUDA), whose 10-bit
    mantissa is fp16's: its budget is the fp16 reference's error."""
    with float32_matmul_precision("high"):
        got = run_with_grads(fn, q, k, v, **kwargs)
    ref32 = run_with_grads(attention_ref, q.float(), k.float(), v.float(), **kwargs)
    lo_dtype = torch.float16 if dtype == torch.float32 else dtype
    low = run_with_grads(
        attention_ref, q.to(lo_dtype), k.to(lo_dtype), v.to(lo_dtype), upcast=False, **kwargs
    )
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref32, low):
        assert a.dtype == dtype
        err = (a.float() - r).abs().max().item()
        budget = 2 * (lo.float() - r).abs().max().item() + 1e-3
        assert err <= budget, f"{what} {dtype} {name}: max |diff| {err:.3e} > budget {budget:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=BF16_ON_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, H, Lq, Lk, Dh, mask_kind", [CASES[0], CASES[5], CASES[8], CASES[10], CASES[11]])
def test_cuda_within_twice_the_reference_error(B, H, Lq, Lk, Dh, mask_kind, dtype):
    """On CUDA (compiled kernels): every dtype (fp32 through TF32), against the fp32 reference."""
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dh, padding="padding" in mask_kind, dtype=dtype)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    mask = None if mask is None else mask.cuda()
    cuda_budget_check(
        triton_attention,
        q,
        k,
        v,
        dtype,
        f"triton {mask_kind}",
        key_padding_mask=mask,
        causal="causal" in mask_kind,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_refuses_ieee_fp32_and_says_why():
    """Under torch's default fp32 matmul precision the kernels would need IEEE fp32 dots (FMA, spills): the
    support function names it and the launcher refuses instead of launching."""
    q = torch.randn(1, 2, 16, 64, device="cuda")
    with float32_matmul_precision("highest"):
        reasons = _kernels().attention_unsupported_reasons(dtype=torch.float32, head_dim=64, device=q.device)
        assert any("float32" in r for r in reasons), reasons
        with pytest.raises(NotImplementedError, match="float32"):
            triton_attention(q, q, q)
    with float32_matmul_precision("high"):
        assert (
            _kernels().attention_unsupported_reasons(dtype=torch.float32, head_dim=64, device=q.device) == []
        )


# ---- dropout ----------------------------------------------------------------------------------------------


def _kernels():
    return importlib.import_module("mplug_fast.ops.triton.attention")


def run_dropout_against_reference(q, k, v, dropout_p, torch_seed=123, **kwargs):
    """Triton with dropout (seed drawn after torch.manual_seed(torch_seed)) vs attention_ref given the
    kernels' own keep-mask for that seed: out and q/k/v grads, max |diff| of each."""
    torch.manual_seed(torch_seed)
    got = run_with_grads(triton_attention, q, k, v, dropout_p=dropout_p, **kwargs)
    torch.manual_seed(torch_seed)
    seed = _kernels().draw_dropout_seed(q.device)  # the same draw as inside flash_attention
    keep = _kernels().dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p)
    p_eff = 1 - 1 / _kernels().dropout_scale(dropout_p)  # the kernels round p to a multiple of 1/256
    ref = run_with_grads(attention_ref, q, k, v, dropout_p=p_eff, dropout_mask=keep, **kwargs)
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"triton dropout {name}")
        errors[name] = (a - b).abs().max().item()
    return got, keep, errors


DROPOUT_CASES = [  # B, H, Lq, Lk, Dh, mask kind, kv_index
    (2, 2, 33, 70, 32, "causal+padding", None),  # two key blocks, ragged, Lq < Lk
    (2, 1, 70, 17, 16, "padding", None),  # two query blocks
    (3, 2, 7, 33, 16, "padding", [1, 0, 1]),  # shared K/V rows: the mask is keyed by the query row
    (1, 2, 1, 65, 64, "none", None),  # one query
]


@pytest.mark.parametrize(
    "B, H, Lq, Lk, Dh, mask_kind, kv_index",
    DROPOUT_CASES,
    ids=[f"{c[2]}x{c[3]}-{c[5]}-{'kv' if c[6] else 'nokv'}" for c in DROPOUT_CASES],
)
def test_dropout_forward_and_grads_equal_the_reference_with_the_kernels_mask(
    B, H, Lq, Lk, Dh, mask_kind, kv_index
):
    Bk = B if kv_index is None else max(kv_index) + 1
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dh, Bk=Bk, padding="padding" in mask_kind, seed=Lq + Lk)
    index = None if kv_index is None else torch.tensor(kv_index)
    _, keep, _ = run_dropout_against_reference(
        q, k, v, 0.3, key_padding_mask=mask, causal="causal" in mask_kind, kv_index=index
    )
    assert 0.5 < keep.float().mean().item() < 0.9, "keep rate far from 0.7"


def test_dropout_keep_mask_is_the_mask_the_forward_kernel_applies():
    """Special inputs make the forward output the dropped probabilities themselves: q = 0 (uniform
    probabilities 1/Lk), v = identity (Lk = Dh), so out[b, h, i, j] = keep[b, h, i, j] / ((1 - p) Lk)."""
    B, H, Lq, Lk, p = 2, 3, 70, 32, 0.4
    q = torch.zeros(B, H, Lq, Lk)
    k = torch.randn(B, H, Lk, Lk)
    v = torch.eye(Lk).expand(B, H, Lk, Lk).contiguous()
    torch.manual_seed(7)
    out = triton_attention(q, k, v, dropout_p=p)
    torch.manual_seed(7)
    keep = _kernels().dropout_keep_mask(_kernels().draw_dropout_seed("cpu"), B, H, Lq, Lk, p)
    assert torch.equal(out > 0, keep), f"{int(((out > 0) != keep).sum())} entries differ"
    assert_close(
        out[keep],
        torch.full_like(out[keep], _kernels().dropout_scale(p) / Lk),
        atol=1e-6,
        rtol=1e-6,
        what="scale",
    )


def test_dropout_keep_rate_and_independence():
    """Keep rate within 5 sigma of 1 - p over 2^16 draws, for several p; different seeds and different
    (batch, head) slices give different masks; one seed always gives the same mask."""
    ops = _kernels()
    B, H, Lq, Lk = 2, 4, 64, 128
    n = B * H * Lq * Lk
    seed = torch.tensor([12345])
    for p in (0.1, 0.5, 0.9):
        keep = ops.dropout_keep_mask(seed, B, H, Lq, Lk, p)
        rate = keep.float().mean().item()
        kept = 1 / ops.dropout_scale(p)  # 1 - p, with p rounded to a multiple of 1/256
        assert abs(kept - (1 - p)) <= 0.5 / 256
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(rate - kept) < 5 * sigma, (
            f"p={p}: keep rate {rate:.4f}, expected {kept} +- {5 * sigma:.4f}"
        )
    keep = ops.dropout_keep_mask(seed, B, H, Lq, Lk, 0.5)
    assert torch.equal(keep, ops.dropout_keep_mask(seed, B, H, Lq, Lk, 0.5))
    other = ops.dropout_keep_mask(torch.tensor([12346]), B, H, Lq, Lk, 0.5)
    agree = (keep == other).float().mean().item()
    assert 0.48 < agree < 0.52, f"masks of neighbouring seeds agree on {agree:.3f} of the entries"
    flat = keep.reshape(B * H, Lq * Lk).float()
    same = (flat[:, None] == flat[None]).float().mean(-1)  # [BH, BH]
    off_diag = same[~torch.eye(B * H, dtype=torch.bool)]
    assert off_diag.min() > 0.46 and off_diag.max() < 0.54, "(batch, head) slices are correlated"


def test_dropout_is_reproducible_from_torch_manual_seed_and_varies_without_it():
    q, k, v, mask = make_inputs(2, 2, 7, 33, 16, padding=True)
    torch.manual_seed(1)
    a = triton_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2)
    torch.manual_seed(1)
    b = triton_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2)
    c = triton_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2)
    assert torch.equal(a, b), "same torch seed, different dropout"
    assert not torch.equal(a, c), "the next call drew the same dropout mask"
    assert torch.equal(triton_attention(q, k, v, key_padding_mask=mask, dropout_p=0.0), triton_attention(
        q, k, v, key_padding_mask=mask))  # fmt: skip


def test_dropout_argument_errors():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        _kernels().flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"dropout_p > 0 needs seed"):
        _kernels().flash_attn_fwd(q, k, v, None, None, False, 0.25, 0.5, None)


def test_opcheck_fwd_op_with_dropout():
    q, k, v, mask = make_inputs(2, 1, 7, 9, 16, padding=True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, None, True, 0.25, 0.3,
            torch.tensor([99]))  # fmt: skip
    torch.library.opcheck(torch.ops.mplug_fast.flash_attn_fwd.default, args)


def test_torch_compile_fullgraph_with_dropout():
    """The seed draw and the op trace into one graph; forward and backward run (values: the tests above)."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def loss(q, k, v):
        return attention(q, k, v, causal=True, dropout_p=0.2, backend="triton").square().sum()

    q, k, v, _ = make_inputs(2, 2, 7, 9, 16)
    got = run_with_grads(torch.compile(loss, fullgraph=True, backend=counter), q, k, v)
    assert counter.frame_count == 1, f"{counter.frame_count} frames: dropout breaks the graph"
    assert all(torch.isfinite(t).all() for t in got)


# ---- dispatch ----------------------------------------------------------------------------------------------


def test_reasons_and_automatic_order():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16)
    assert TRITON.not_supported_reasons(inputs_of(q, k, v)) == []
    chosen = select_backend(q, k, v)  # short_query on AVX2 CPUs (fp32 inference, no mask), else sdpa
    assert chosen in ("sdpa", "short_query"), "the interpreter must never be chosen automatically on CPU"
    assert ATTENTION.priority("cpu", torch.float32, False)[-1] == "triton"
    assert ATTENTION.priority("cuda", torch.float32, False)[0] == "triton"
    assert TRITON.not_supported_reasons(inputs_of(q, k, v, dropout_p=0.1)) == [], "dropout is supported"
    q8, k8, v8, _ = make_inputs(1, 1, 4, 4, 8)
    with pytest.raises(RuntimeError, match=r"head_dim=8 \(supported: 16, 32, 64, 80, 96, 128\)"):
        attention(q8, k8, v8, backend="triton")
    bf = [t.bfloat16() for t in (q, k, v)]
    with pytest.raises(RuntimeError, match=r"bf16 on CPU.*triton-lang/triton#11584"):
        attention(*bf, backend="triton")
    with pytest.raises(RuntimeError, match=r"dtype torch.float64 \(supported: float32, float16, bfloat16\)"):
        attention(q.double(), k.double(), v.double(), backend="triton")


def test_env_var_selects_triton(monkeypatch):
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16)
    monkeypatch.setenv(attention_module.ENV_VAR, "triton")
    assert select_backend(q, k, v) == "triton"


# ---- the model ---------------------------------------------------------------------------------------------


@pytest.mark.long
def test_tiny_vqa_with_triton_equals_the_reference_backend(monkeypatch):
    """Tiny VQA (32 px images, padded questions, 3 answers sharing 2 questions' memory via kv_index): logits
    and parameter grads with MPLUG_FAST_ATTENTION=triton vs =reference."""
    import mplug_fast

    torch.manual_seed(0)
    model = mplug_fast.build_model(mplug_fast.get_config("tiny", **{"vision.image_size": 32}), "vqa").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than init_weights, so that attention is far from uniform
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    vocab = model.config.text.vocab_size
    images = torch.randn(2, 3, 32, 32, generator=g)
    question = torch.randint(1000, vocab, (2, 6), generator=g)
    question_mask = torch.ones(2, 6, dtype=torch.long)
    question_mask[1, 4:] = 0
    answers = torch.randint(1000, vocab, (3, 5), generator=g)
    answer_index = torch.tensor([0, 1, 1])

    def run(backend: str):
        monkeypatch.setenv(attention_module.ENV_VAR, backend)
        clear_backend_caches(model)  # the modules keep the backend they resolved
        model.zero_grad(set_to_none=True)
        logits = model(images, question, question_mask, answers, None, answer_index)
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    logits, grads = run("triton")
    assert {
        name for m in model.modules() if hasattr(m, "backends") for name in m.backends.names.values()
    } == {"triton"}
    ref_logits, ref_grads = run("reference")
    assert_close(logits, ref_logits, atol=1e-4, rtol=0, what="tiny VQA logits")
    assert grads.keys() == ref_grads.keys()
    worst = max(((grads[n] - ref_grads[n]).abs().max().item(), n) for n in grads)
    assert worst[0] <= 1e-4, f"tiny VQA grads: max |diff| {worst[0]:.3e} in {worst[1]}"


# ---- launch safety ---------------------------------------------------------------------------------------


def test_kv_index_out_of_range_is_a_clear_error_on_the_host():
    q, k, v, _ = make_inputs(3, 2, 5, 7, 16, Bk=2)
    for bad in ([0, 1, 2], [-1, 0, 1]):
        with pytest.raises(ValueError, match="kv_index values must be in"):
            triton_attention(q, k, v, kv_index=torch.tensor(bad))


def test_grid_is_one_dimensional_so_the_batch_is_not_limited_to_65535(monkeypatch):
    """B * H programs go on grid axis 0 (limit 2^31 - 1), not on axis 1 or 2 (limit 65535)."""
    ops = _kernels()
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(ops, "_attn_fwd_kernel", Recorder())
    B, H, L = 70000, 2, 3
    q = torch.zeros(B, H, L, 16)
    ops._attn_fwd(q, q, q, None, None, False, 0.25)
    assert grids == [(B * H,)], grids
