"""Attention: the reference oracle vs an independent float64 computation, each backend vs the reference
(outputs and q/k/v gradients), masks (padding, bottom-right causal, all-masked rows), shared K/V rows
(`kv_index`), dropout, low precision within an error budget, and the dispatch rules.

Tolerances (STYLE.md, "Tests and oracles"):

| comparison                          | dtype | atol   | rtol   |
|-------------------------------------|-------|--------|--------|
| reference vs float64 oracle         | fp32  | 1e-5   | 1e-5   |
| backend vs reference (out, grads)   | fp32  | 1e-5   | 1e-5   |
| backend in bf16 vs reference fp32   | bf16  | 2 * |reference_bf16 - reference_fp32| + 1e-3 |
"""

import importlib
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mplug_fast.ops.attention import (
    ATTENTION,
    BACKENDS,
    attention,
    attention_key,
    available_backends,
    select_backend,
)
from mplug_fast.ops.reference import attention_ref
from mplug_fast.ops.registry import Inputs

attention_module = importlib.import_module("mplug_fast.ops.attention")

FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
BACKENDS_UNDER_TEST = ["sdpa"]  # every non-reference backend that runs on the CPU


# ---- helpers -----------------------------------------------------------------------------------------------


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str
) -> None:
    """torch.testing-style closeness, with max/mean |diff| in the failure message."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the tested tensor"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = diff > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{diff.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
        f"max |diff| {diff.max().item():.3e}, mean |diff| {diff.mean().item():.3e}"
    )


def oracle_attention(q, k, v, key_padding_mask=None, causal=False, kv_index=None):
    """softmax(q k^T / sqrt(Dh) + additive mask) v in float64, written from the definition; rows whose keys
    are all masked are 0 by definition (mplug_fast.ops.reference docstring)."""
    q, k, v = q.double(), k.double(), v.double()
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[kv_index]
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    additive = torch.zeros(B, 1, Lq, Lk, dtype=torch.float64)
    if key_padding_mask is not None:
        additive = additive.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    if causal:
        for i in range(Lq):  # bottom-right aligned: query i sees keys j <= i + Lk - Lq
            for j in range(Lk):
                if j > i + Lk - Lq:
                    additive[:, :, i, j] = -math.inf
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh) + additive  # [B, H, Lq, Lk]
    empty = torch.isinf(scores).all(dim=-1, keepdim=True)  # [B, H, Lq, 1]
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v


def make_inputs(B, H, Lq, Lk, Dh, *, Bk=None, padding=False, dtype=torch.float32, seed=0):
    """Random q [B, H, Lq, Dh], k/v [Bk, H, Lk, Dh] and a key-padding mask [Bk, Lk] (row r keeps a random
    prefix; some rows may be fully padded) or None."""
    g = torch.Generator().manual_seed(seed)
    Bk = B if Bk is None else Bk
    q = torch.randn(B, H, Lq, Dh, generator=g).to(dtype)
    k = torch.randn(Bk, H, Lk, Dh, generator=g).to(dtype)
    v = torch.randn(Bk, H, Lk, Dh, generator=g).to(dtype)
    mask = None
    if padding:
        lengths = torch.randint(0, Lk + 1, (Bk,), generator=g)
        lengths[0] = max(Lk - 2, 1)  # at least one row with real tokens and (when Lk > 2) some padding
        mask = torch.arange(Lk)[None, :] < lengths[:, None]  # [Bk, Lk]
    return q, k, v, mask


def run_with_grads(fn, q, k, v, grad_out_seed=1, **kwargs):
    """fn(q, k, v, **kwargs) and the q/k/v gradients of <out, g> for a fixed random g."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(
        out.device, out.dtype
    )
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    return out.detach(), dq, dk, dv


def inputs_of(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0) -> Inputs:
    """The static properties the registry decides on, for these tensors."""
    return Inputs(*attention_key(q, k, v, key_padding_mask, causal, dropout_p))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No MPLUG_FAST_ATTENTION from the outside."""
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)


MASK_KINDS = ["none", "padding", "causal", "causal+padding"]
LENGTHS = [1, 7, 17, 33]


# ---- the reference against its definition ------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("Lq, Lk", [(7, 7), (1, 17), (17, 7), (33, 17)])
def test_reference_matches_the_definition(Lq, Lk, mask_kind):
    q, k, v, mask = make_inputs(3, 2, Lq, Lk, 16, padding="padding" in mask_kind)
    causal = "causal" in mask_kind
    out = attention_ref(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.dtype == torch.float32
    assert_close(out, oracle_attention(q, k, v, mask, causal), **FP32_TOL, what="attention_ref vs float64")


def test_reference_custom_scale_and_kv_index():
    q, k, v, mask = make_inputs(5, 2, 7, 9, 8, Bk=2, padding=True)
    kv_index = torch.tensor([0, 1, 1, 0, 1])
    out = attention_ref(q, k, v, key_padding_mask=mask, kv_index=kv_index, scale=0.3)
    # scale s == the default scale for head dim (1 / s)^2: rescale q to reuse the oracle.
    expected = oracle_attention(q * 0.3 * math.sqrt(8), k, v, mask, kv_index=kv_index)
    assert_close(out, expected, **FP32_TOL, what="attention_ref(scale=0.3, kv_index)")


def test_reference_low_precision_keeps_the_dtype():
    q, k, v, mask = make_inputs(2, 2, 7, 7, 16, padding=True, dtype=torch.bfloat16)
    for upcast in (True, False):
        out = attention_ref(q, k, v, key_padding_mask=mask, upcast=upcast)
        assert out.dtype == torch.bfloat16
        assert_close(out, oracle_attention(q, k, v, mask), atol=3e-2, rtol=3e-2, what=f"bf16 upcast={upcast}")


# ---- every backend against the reference -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("Lq, Lk", list(itertools.product(LENGTHS, LENGTHS)))
def test_backend_matches_reference_fp32(backend, Lq, Lk, mask_kind):
    q, k, v, mask = make_inputs(2, 3, Lq, Lk, 16, padding="padding" in mask_kind, seed=Lq * 100 + Lk)
    causal = "causal" in mask_kind
    got = run_with_grads(attention, q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    ref = run_with_grads(attention_ref, q, k, v, key_padding_mask=mask, causal=causal)
    impl = BACKENDS[backend]
    tol = {"atol": impl.ATOL[torch.float32], "rtol": impl.RTOL[torch.float32]}  # the backend's own budget
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, **tol, what=f"{backend} {name} Lq={Lq} Lk={Lk} {mask_kind}")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("mask_kind", ["padding", "causal+padding"])
def test_kv_index_shares_kv_rows(backend, mask_kind):
    """B=5 query rows read Bk=2 K/V rows: equal to attention over gathered K/V (grads accumulate)."""
    q, k, v, mask = make_inputs(5, 2, 7, 17, 16, Bk=2, padding=True)
    causal = mask_kind == "causal+padding"
    kv_index = torch.tensor([0, 1, 1, 0, 1])

    def gathered(q, k, v):
        return attention_ref(q, k[kv_index], v[kv_index], key_padding_mask=mask[kv_index], causal=causal)

    got = run_with_grads(
        attention, q, k, v, key_padding_mask=mask, causal=causal, kv_index=kv_index, backend=backend
    )
    ref = run_with_grads(gathered, q, k, v)
    assert got[2].shape == (2, 2, 17, 16)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"{backend} kv_index {name}")
    assert_close(got[0], oracle_attention(q, k, v, mask, causal, kv_index), **FP32_TOL, what="vs float64")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("case", ["padded_row", "causal_Lq_gt_Lk"])
def test_rows_without_keys_are_zero_and_finite(backend, case):
    """All-masked rows give exactly 0 and no NaN, in forward and in every gradient."""
    if case == "padded_row":
        q, k, v, _ = make_inputs(3, 2, 7, 9, 16)
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[1] = False  # batch row 1 has no key at all
        mask[2, 4:] = False
        causal, empty_rows = False, (slice(1, 2), slice(None), slice(None))
    else:
        q, k, v, _ = make_inputs(2, 2, 17, 7, 16)
        mask, causal = None, True
        empty_rows = (slice(None), slice(None), slice(0, 10))  # queries 0..9 see no key (j <= i - 10)
    out, dq, dk, dv = run_with_grads(
        attention, q, k, v, key_padding_mask=mask, causal=causal, backend=backend
    )
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{backend} {case}: non-finite {name}"
    assert torch.equal(out[empty_rows], torch.zeros_like(out[empty_rows])), f"{backend}: empty rows are not 0"
    assert torch.equal(dq[empty_rows], torch.zeros_like(dq[empty_rows])), (
        f"{backend}: empty rows get a q grad"
    )
    if case == "padded_row":
        assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
        assert (out[0].abs() > 0).any()  # the other rows are real attention
    ref = run_with_grads(attention_ref, q, k, v, key_padding_mask=mask, causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        assert_close(a, b, **FP32_TOL, what=f"{backend} {case} {name}")


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("Lq, Lk", [(1, 33), (17, 17), (33, 7)])
def test_backend_bf16_within_twice_the_reference_bf16_error(backend, Lq, Lk, mask_kind):
    """|fast_bf16 - ref_fp32| <= 2 * |ref_bf16(upcast=False) - ref_fp32| + 1e-3 (max over elements)."""
    q, k, v, mask = make_inputs(2, 3, Lq, Lk, 32, padding="padding" in mask_kind, dtype=torch.bfloat16)
    causal = "causal" in mask_kind
    got = run_with_grads(attention, q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    ref32 = run_with_grads(
        attention_ref, q.float(), k.float(), v.float(), key_padding_mask=mask, causal=causal
    )
    low = run_with_grads(attention_ref, q, k, v, key_padding_mask=mask, causal=causal, upcast=False)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref32, low):
        assert a.dtype == torch.bfloat16, f"{name} dtype {a.dtype}"
        err = (a.float() - r).abs().max().item()
        budget = 2 * (lo.float() - r).abs().max().item() + 1e-3
        assert err <= budget, (
            f"{backend} bf16 {name} Lq={Lq} Lk={Lk} {mask_kind}: max |diff| {err:.3e} > budget {budget:.3e} "
            f"(mean |diff| {(a.float() - r).abs().mean().item():.3e})"
        )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3),
    share_kv=st.booleans(),
    H=st.integers(1, 3),
    Lq=st.integers(1, 40),
    Lk=st.integers(1, 40),
    Dh=st.sampled_from([8, 16, 32, 64]),
    causal=st.booleans(),
    padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_matches_reference_random_shapes(B, share_kv, H, Lq, Lk, Dh, causal, padding, seed):
    Bk = 1 if share_kv else B
    kv_index = torch.zeros(B, dtype=torch.long) if share_kv else None
    q, k, v, mask = make_inputs(B, H, Lq, Lk, Dh, Bk=Bk, padding=padding, seed=seed)
    kwargs = dict(key_padding_mask=mask, causal=causal, kv_index=kv_index)
    got = run_with_grads(attention, q, k, v, backend="sdpa", **kwargs)
    ref = run_with_grads(attention_ref, q, k, v, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(
            a,
            b,
            **FP32_TOL,
            what=f"sdpa {name} B={B} Bk={Bk} H={H} Lq={Lq} Lk={Lk} Dh={Dh} causal={causal} padding={padding}",
        )


# ---- dropout -----------------------------------------------------------------------------------------------


def test_reference_dropout_keeps_half_the_probabilities_scaled():
    """v = identity makes the output the (dropped) probability matrix: every entry is 0 or probs / (1 - p),
    and the keep rate is 0.5 within 5 binomial standard deviations."""
    p = 0.5
    q, k, _, _ = make_inputs(4, 4, 64, 64, 64)
    v = torch.eye(64).expand(4, 4, 64, 64)
    probs = attention_ref(q, k, v)
    torch.manual_seed(123)
    dropped = attention_ref(q, k, v, dropout_p=p)
    torch.manual_seed(123)
    again = attention_ref(q, k, v, dropout_p=p)
    assert torch.equal(dropped, again), "dropout is not reproducible under torch.manual_seed"
    assert not torch.allclose(dropped, probs), "dropout_p=0.5 did not change the output"
    kept = dropped != 0
    assert torch.allclose(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    n = kept.numel()
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), (
        f"keep rate {rate:.4f} over {n} probabilities"
    )


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
def test_dropout_through_dispatch_changes_the_output_reproducibly(backend):
    q, k, v, mask = make_inputs(2, 2, 17, 17, 16, padding=True)
    plain = attention(q, k, v, key_padding_mask=mask, backend=backend)
    torch.manual_seed(7)
    a = attention(q, k, v, key_padding_mask=mask, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    b = attention(q, k, v, key_padding_mask=mask, dropout_p=0.5, backend=backend)
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)
    assert torch.isfinite(a).all()


# ---- dispatch ----------------------------------------------------------------------------------------------


def test_available_backends_reports_reference_and_sdpa_usable():
    available = available_backends()
    assert isinstance(available, dict)
    assert available["reference"] is None and available["sdpa"] is None
    assert set(available) == set(BACKENDS)
    assert set(ATTENTION.priority("cpu", torch.float32, False)) == set(BACKENDS)
    assert set(ATTENTION.priority("cuda", torch.float16, True)) == set(BACKENDS)


def test_explicit_reference_backend_is_used(monkeypatch):
    calls = []
    original = BACKENDS["reference"].run

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(BACKENDS["reference"], "run", staticmethod(spy))
    q, k, v, mask = make_inputs(2, 2, 7, 7, 16, padding=True)
    out = attention(q, k, v, key_padding_mask=mask, backend="reference")
    assert len(calls) == 1 and calls[0]["key_padding_mask"] is mask
    assert torch.equal(out, attention_ref(q, k, v, key_padding_mask=mask))
    assert select_backend(q, k, v, backend="reference") == "reference"
    assert select_backend(q, k, v, backend="sdpa") == "sdpa"


def test_automatic_selection_takes_the_first_usable_backend_in_priority_order():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 8)
    chosen = select_backend(q, k, v)
    usable = [
        n for n in ATTENTION.priority("cpu", q.dtype, False) if not BACKENDS[n].reasons(inputs_of(q, k, v))
    ]
    assert chosen == usable[0]


def test_unknown_backend_lists_the_valid_ones():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*'reference'.*'sdpa'"):
        attention(q, k, v, backend="flash")


def test_env_var_selects_the_backend(monkeypatch):
    q, k, v, _ = make_inputs(1, 1, 4, 4, 8)
    monkeypatch.setenv(attention_module.ENV_VAR, "reference")
    assert ATTENTION.env_choice() == "reference"
    assert select_backend(q, k, v) == "reference"
    assert select_backend(q, k, v, backend="sdpa") == "sdpa"  # the argument wins over the environment
    assert select_backend(q, k, v, config_backend="sdpa") == "reference"  # the environment wins over config
    monkeypatch.setenv(attention_module.ENV_VAR, "sdpa")
    assert select_backend(q, k, v) == "sdpa"  # read at resolution time (modules keep what they resolved)
    monkeypatch.delenv(attention_module.ENV_VAR)
    assert select_backend(q, k, v, config_backend="reference") == "reference"  # config over priority


def test_invalid_env_var_is_an_error(monkeypatch):
    q, k, v, _ = make_inputs(1, 1, 4, 4, 8)
    monkeypatch.setenv(attention_module.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=r"MPLUG_FAST_ATTENTION='cudnn'.*reference.*sdpa"):
        attention(q, k, v)
    assert select_backend(q, k, v, backend="sdpa") == "sdpa"  # an explicit backend does not read it


def test_no_backend_fits_lists_every_backends_reasons(monkeypatch):
    q, k, v, _ = make_inputs(1, 1, 4, 4, 8)
    monkeypatch.setattr(ATTENTION, "priority_fn", lambda device, dtype, grad: ("triton",))
    monkeypatch.setattr(BACKENDS["triton"], "unavailable_reason", classmethod(lambda cls: "not here"))
    with pytest.raises(NotImplementedError) as error:
        attention(q, k, v)
    message = str(error.value)
    assert message.startswith("No attention backend can run these inputs:")
    assert "`triton` cannot run them: not here" in message
    assert "Pass backend=, or set MPLUG_FAST_ATTENTION, to one of" in message


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    class Picky(attention_module.AttentionBackend):
        NAME = "picky"

        @classmethod
        def not_supported_reasons(cls, inputs):
            return [f"head_dim={inputs.dim} (supported: 64)"]

    monkeypatch.setitem(BACKENDS, "picky", Picky)
    q, k, v, _ = make_inputs(1, 1, 4, 4, 8)
    with pytest.raises(RuntimeError, match=r"'picky' cannot run these inputs: head_dim=8 \(supported: 64\)"):
        attention(q, k, v, backend="picky")


# ---- input validation --------------------------------------------------------------------------------------


def _valid():
    q, k, v, _ = make_inputs(2, 2, 5, 7, 8)
    return q, k, v


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda q, k, v: (q[0], k[0], v[0], {}), ValueError, r"4-D \[B, H, L, Dh\]"),
        (lambda q, k, v: (q, k[:, :1], v[:, :1], {}), ValueError, r"disagree on heads or head dim"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4], {}), ValueError, r"disagree on heads or head dim"),
        (lambda q, k, v: (q, k, v[:, :, :3], {}), ValueError, r"k and v must have the same shape"),
        (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 7)}), TypeError, r"must be bool"),
        (
            lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)}),
            ValueError,
            r"key_padding_mask must be \[Bk, Lk\] = \[2, 7\], got \[2, 5\]",
        ),
        (
            lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 1, 7, dtype=torch.bool)}),
            ValueError,
            r"key_padding_mask must be \[Bk, Lk\]",
        ),
        (lambda q, k, v: (q, k[:1], v[:1], {}), ValueError, r"q has 2 rows but k/v have 1; pass kv_index"),
        (
            lambda q, k, v: (q, k[:1], v[:1], {"kv_index": torch.zeros(3, dtype=torch.long)}),
            ValueError,
            r"kv_index must be an integer tensor of shape \[2\]",
        ),
        (
            lambda q, k, v: (q, k[:1], v[:1], {"kv_index": torch.zeros(2, 1, dtype=torch.long)}),
            ValueError,
            r"kv_index must be an integer tensor of shape \[2\]",
        ),
        (
            lambda q, k, v: (q, k[:1], v[:1], {"kv_index": torch.zeros(2)}),
            ValueError,
            r"kv_index must be an integer tensor",
        ),
    ],
    ids=[
        "3d",
        "heads",
        "head_dim",
        "kv_shape",
        "mask_dtype",
        "mask_len",
        "mask_rank",
        "B_ne_Bk",
        "kv_index_len",
        "kv_index_rank",
        "kv_index_dtype",
    ],
)
@pytest.mark.parametrize("backend", [None, "reference", "sdpa"])
def test_input_validation(mutate, error, pattern, backend):
    q, k, v, kwargs = mutate(*_valid())
    with pytest.raises(error, match=pattern):
        attention(q, k, v, backend=backend, **kwargs)
