"""The split-K short-query forward (`mplug_fast.ops.triton.decode`) against `attention_ref`: outputs and q/k/v
gradients (the backward is the main kernel's, from the combined LSE) for Lq = 1 with beams sharing K/V rows
(`kv_index`), odd Lq and Lk (ragged last tile and last split), key padding (including a split whose keys are
all padding, and a batch row without keys), bottom-right causal with empty rows, 1 to "too many" splits;
dropout equal to the main kernel's for one seed; the custom op (`opcheck`, torch.compile); the heuristic and
the Triton backend's choice between the kernels.

| comparison                                  | dtype | atol / rtol                  |
|---------------------------------------------|-------|------------------------------|
| split-K vs reference (out, dq, dk, dv)      | fp32  | 1e-5 / 1e-5 (measured ~1e-6) |
| split-K vs main kernel, dropout, same seed  | fp32  | 1e-5 / 1e-5                  |
| bf16 / fp16 on CUDA vs reference fp32       | low   | 2 * |ref_lowp - ref_fp32| + 1e-3 |
"""

import importlib

import pytest
import torch

from mplug_fast.ops.attention import BACKENDS, attention
from mplug_fast.ops.reference import attention_ref
from tests.ops.test_attention import assert_close, make_inputs, run_with_grads
from tests.ops.test_triton_attention import cuda_budget_check

attention_module = importlib.import_module("mplug_fast.ops.attention")
_unavailable = BACKENDS["triton"].unavailable_reason()
pytestmark = [
    pytest.mark.skipif(_unavailable is not None, reason=f"triton backend: {_unavailable}"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]
if _unavailable is None:
    decode = importlib.import_module("mplug_fast.ops.triton.decode")
    kernels = importlib.import_module("mplug_fast.ops.triton.attention")

FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)


def splitk(num_splits):
    def fn(q, k, v, **kwargs):
        return decode.splitk_attention(q, k, v, num_splits=num_splits, **kwargs)

    return fn


CASES = [  # B, Bk, H, Lq, Lk, Dh, mask kind, kv_index, num_splits
    (5, 2, 1, 1, 300, 64, "padding", [0, 0, 0, 1, 1], 3),  # decoding: beams share K/V rows
    (3, 2, 2, 1, 257, 32, "none", [1, 0, 1], 5),  # ragged last split (1 key)
    (2, 2, 2, 17, 261, 32, "causal+padding", None, 3),
    (1, 1, 2, 40, 577, 16, "padding", None, 4),  # the co-attention shape (one image)
    (2, 2, 1, 64, 300, 16, "causal", None, 2),  # Lq = 64: the largest query block
    (2, 2, 1, 40, 30, 16, "causal", None, 3),  # Lq > Lk: 10 rows without keys; splits capped at 1 tile
    (2, 2, 1, 7, 300, 80, "none", None, 100),  # more splits than key tiles; head dim 80
    (2, 2, 1, 3, 130, 16, "padding", None, 1),  # one split: the combine passes it through
]


@pytest.mark.parametrize(
    "B, Bk, H, Lq, Lk, Dh, mask_kind, kv_index, num_splits",
    CASES,
    ids=[f"{c[3]}x{c[4]}-{c[6]}-s{c[8]}{'-kv' if c[7] else ''}" for c in CASES],
)
def test_splitk_matches_reference_fp32(B, Bk, H, Lq, Lk, Dh, mask_kind, kv_index, num_splits):
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dh, Bk=Bk, padding="padding" in mask_kind, seed=Lq + Lk)
    if mask is not None and Lk > 200:
        mask[0, :130] = False  # the first split(s) of K/V row 0 see only padding
    index = None if kv_index is None else torch.tensor(kv_index)
    kwargs = dict(key_padding_mask=mask, causal="causal" in mask_kind, kv_index=index)
    got = run_with_grads(splitk(num_splits), q, k, v, **kwargs)
    ref = run_with_grads(attention_ref, q, k, v, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"split-K {name} Lq={Lq} Lk={Lk} {mask_kind} splits={num_splits}")


def test_rows_and_batch_rows_without_keys_give_zero_and_finite_lse():
    q, k, v, _ = make_inputs(2, 2, 5, 300, 16)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1] = False  # batch row 1: no key at all
    out, lse = decode.flash_attn_splitk_fwd(q, k, v, mask, None, False, 0.25, 0.0, None, 3)
    main_out, main_lse = kernels.flash_attn_fwd(q, k, v, mask, None, False, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all(), "empty rows: LSE +inf, as the main kernel"
    assert_close(lse[0], main_lse[0], **FP32_TOL, what="LSE vs main kernel")
    assert_close(out, main_out, **FP32_TOL, what="out vs main kernel")


def test_dropout_drops_the_same_entries_as_the_main_kernel():
    """One seed, two forwards (main, split-K): same outputs and grads, equal to the reference with the
    kernels' keep-mask."""
    q, k, v, mask = make_inputs(3, 1, 9, 260, 16, Bk=2, padding=True)
    index = torch.tensor([1, 0, 1])
    kwargs = dict(key_padding_mask=mask, causal=True, kv_index=index, dropout_p=0.25)
    torch.manual_seed(5)
    got = run_with_grads(splitk(3), q, k, v, **kwargs)
    torch.manual_seed(5)
    main = run_with_grads(kernels.flash_attention, q, k, v, **kwargs)
    torch.manual_seed(5)
    keep = kernels.dropout_keep_mask(kernels.draw_dropout_seed("cpu"), 3, 1, 9, 260, 0.25)
    ref = run_with_grads(attention_ref, q, k, v, dropout_mask=keep, **kwargs)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), got, main, ref):
        assert_close(a, b, **FP32_TOL, what=f"split-K vs main kernel, dropout, {name}")
        assert_close(a, r, **FP32_TOL, what=f"split-K vs reference with the kernels' mask, {name}")


def test_opcheck_splitk_op():
    q, k, v, mask = make_inputs(3, 1, 5, 140, 16, Bk=2, padding=True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, torch.tensor([1, 0, 1]), True,
            0.25, 0.0, None, 2)  # fmt: skip
    torch.library.opcheck(torch.ops.mplug_fast.flash_attn_splitk_fwd.default, args)


def test_invalid_num_splits():
    q, k, v, _ = make_inputs(1, 1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"num_splits must be >= 1, got 0"):
        decode.splitk_attention(q, k, v, num_splits=0)


# ---- heuristic and dispatch --------------------------------------------------------------------------------


def test_heuristic_splits_only_short_queries_over_long_keys_on_an_idle_gpu(monkeypatch):
    monkeypatch.setattr(decode, "_sm_count", lambda device: 132)
    assert decode.num_splits_for(1, 12, 1, 617, "cpu") == 5  # decoding, one image: 12 programs, 10 key tiles
    assert decode.num_splits_for(5, 12, 1, 617, "cpu") == 5  # 60 programs -> ceil(264 / 60) = 5
    assert decode.num_splits_for(8, 12, 40, 577, "cpu") == 3  # co-attention, batch 8: 96 programs
    assert decode.num_splits_for(40, 12, 1, 617, "cpu") == 1  # 480 programs already fill 132 SMs
    assert decode.num_splits_for(1, 12, 65, 617, "cpu") == 1  # Lq > 64: the main kernel
    assert decode.num_splits_for(1, 12, 1, 255, "cpu") == 1  # Lk < 256: too short to share out
    monkeypatch.setattr(decode, "_sm_count", lambda device: 16)
    assert decode.num_splits_for(1, 12, 1, 617, "cpu") == 3  # ceil(32 / 12) = 3


@pytest.mark.parametrize("Lq, Lk, expect_splitk", [(1, 300, True), (40, 300, True), (65, 300, False),
                                                   (1, 200, False)])  # fmt: skip
def test_triton_backend_picks_the_kernel_by_shape(monkeypatch, Lq, Lk, expect_splitk):
    calls = []
    real_splitk, real_main = decode.splitk_attention, kernels.flash_attention
    monkeypatch.setattr(
        decode, "splitk_attention", lambda *a, **kw: calls.append("splitk") or real_splitk(*a, **kw)
    )
    monkeypatch.setattr(
        kernels, "flash_attention", lambda *a, **kw: calls.append("main") or real_main(*a, **kw)
    )
    q, k, v, mask = make_inputs(2, 1, Lq, Lk, 16, padding=True)
    out = attention(q, k, v, key_padding_mask=mask, backend="triton")
    assert calls == ["splitk" if expect_splitk else "main"]
    assert_close(out, attention_ref(q, k, v, key_padding_mask=mask), **FP32_TOL, what="dispatched output")


def test_torch_compile_fullgraph_through_the_splitk_path():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def loss(q, k, v, index):
        return attention(q, k, v, kv_index=index, backend="triton").square().sum()

    q, k, v, _ = make_inputs(3, 1, 1, 300, 16, Bk=2)
    index = torch.tensor([0, 1, 1])
    got = run_with_grads(torch.compile(loss, fullgraph=True, backend=counter), q, k, v, index=index)
    ref = run_with_grads(
        lambda q, k, v, index: attention_ref(q, k, v, kv_index=index).square().sum(), q, k, v, index=index
    )
    assert counter.frame_count == 1, f"{counter.frame_count} frames: the split-K path breaks the graph"
    for name, a, b in zip(("loss", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, atol=1e-4, rtol=1e-5, what=f"compiled split-K {name}")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="bf16 tl.dot is wrong in the Triton interpreter (triton-lang/triton#11584); checked on CUDA",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", [CASES[0], CASES[2], CASES[3], CASES[5]], ids=["decode", "causal", "coattn", "empty"]
)
def test_cuda_splitk_within_twice_the_reference_error(case, dtype):
    B, Bk, H, Lq, Lk, Dh, mask_kind, kv_index, num_splits = case
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dh, Bk=Bk, padding="padding" in mask_kind, dtype=dtype)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    kwargs = dict(
        key_padding_mask=None if mask is None else mask.cuda(),
        causal="causal" in mask_kind,
        kv_index=None if kv_index is None else torch.tensor(kv_index, device="cuda"),
    )
    cuda_budget_check(splitk(num_splits), q, k, v, dtype, f"split-K {mask_kind}", **kwargs)
