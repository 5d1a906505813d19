"""The `flash_attn` and `xformers` backends (`mplug_fast.ops.external`).

On this CPU machine: their unavailable reasons (package missing, no CUDA, flash-attn too old), the reasons
they refuse inputs, selection (an explicit request is a clear error, automatic mode skips them), that
importing `mplug_fast.ops` imports neither package, and the glue code (layouts, unpadding to varlen, bias
alignment, kv_index gathering, rows without keys) run against stand-in modules written from the libraries'
documented semantics (so the glue, not the libraries, is what these check). On CUDA (`-m gpu`): the real
libraries against the reference, outputs and gradients, within twice the reference's own low-precision error.
"""

import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mplug_fast.ops.attention import ATTENTION, BACKENDS, attention, available_backends, select_backend
from mplug_fast.ops.reference import attention_ref
from tests.ops.test_attention import assert_close, inputs_of, make_inputs, run_with_grads

attention_module = importlib.import_module("mplug_fast.ops.attention")
external = importlib.import_module("mplug_fast.ops.external")
FLASH, XFORMERS = BACKENDS["flash_attn"], BACKENDS["xformers"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)


def _pretend_installed(monkeypatch, installed: bool, version: str | None = None):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("flash_attn", "xformers"):
            return object() if installed else None
        return real_find_spec(name, *args, **kwargs)

    def metadata_version(name):
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(external.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(external.importlib.metadata, "version", metadata_version)


# ---- availability and selection ----------------------------------------------------------------------------


def test_unavailable_reasons(monkeypatch):
    _pretend_installed(monkeypatch, installed=False)
    assert FLASH.unavailable_reason() == "package not installed (pip install flash-attn; needs CUDA)"
    assert XFORMERS.unavailable_reason() == "package not installed (pip install xformers; needs CUDA)"
    assert available_backends()["flash_attn"].startswith("package not installed")

    _pretend_installed(monkeypatch, installed=True, version="2.6.3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert FLASH.unavailable_reason().startswith("needs a CUDA device (flash-attn kernels are CUDA only")
    assert XFORMERS.unavailable_reason().startswith("needs a CUDA device (xformers kernels are CUDA only")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert FLASH.unavailable_reason() is None and XFORMERS.unavailable_reason() is None

    _pretend_installed(monkeypatch, installed=True, version="2.0.9")
    assert "flash-attn 2.0.9 < 2.1 aligns causal masks at the top left" in FLASH.unavailable_reason()


def test_not_supported_reasons():
    q, k, v, mask = make_inputs(1, 1, 4, 4, 12, padding=True)
    reasons = FLASH.not_supported_reasons(inputs_of(q, k, v, mask, causal=True))
    assert reasons == [
        "needs CUDA tensors, got cpu",
        "dtype torch.float32 (flash-attn supports fp16, bf16)",
        "head_dim=12 (flash-attn: a multiple of 8, at most 256)",
        "causal with key padding (varlen aligns the diagonal to each row's unpadded key count, not to the "
        "padded positions)",
    ]
    assert FLASH.not_supported_reasons(inputs_of(q, k, v, mask))[-1] != reasons[-1], (
        "padding alone is supported"
    )
    assert XFORMERS.not_supported_reasons(inputs_of(q.double(), k.double(), v.double())) == [
        "needs CUDA tensors, got cpu",
        "dtype torch.float64 (xformers: fp32, fp16, bf16)",
    ]


def test_explicit_request_of_an_unavailable_backend_is_a_clear_error(monkeypatch):
    _pretend_installed(monkeypatch, installed=False)
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16)
    with pytest.raises(RuntimeError, match=r"'flash_attn' cannot run these inputs: package not installed "
                       r"\(pip install flash-attn; needs CUDA\); needs CUDA tensors, got cpu"):  # fmt: skip
        attention(q, k, v, backend="flash_attn")
    monkeypatch.setenv(attention_module.ENV_VAR, "xformers")
    with pytest.raises(RuntimeError, match=r"'xformers' cannot run these inputs: package not installed"):
        attention(q, k, v)


def test_automatic_mode_skips_them(monkeypatch):
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16)
    order = ("flash_attn", "xformers", "sdpa", "reference", "triton")
    monkeypatch.setattr(ATTENTION, "priority_fn", lambda device, dtype, grad: order)
    assert select_backend(q, k, v) == "sdpa"
    # and picks one as soon as it can run the inputs
    monkeypatch.setattr(FLASH, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(FLASH, "not_supported_reasons", classmethod(lambda cls, inputs: []))
    assert select_backend(q, k, v) == "flash_attn"


def test_automatic_order():
    assert ATTENTION.priority("cuda", torch.float16, False)[:3] == ("triton", "flash_attn", "xformers")
    assert ATTENTION.priority("cpu", torch.float32, True)[-1] == "triton"
    assert {"flash_attn", "xformers"} <= set(available_backends())


def test_importing_the_ops_imports_neither_package(tmp_path):
    """Stand-in packages that raise when imported: listing the backends must not import them."""
    for name in ("flash_attn", "xformers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise RuntimeError('{name} was imported')\n")
    code = (
        "import sys, mplug_fast.ops as ops\n"
        "reasons = ops.available_backends()\n"
        "assert 'flash_attn' not in sys.modules and 'xformers' not in sys.modules\n"
        "print(reasons['flash_attn']); print(reasons['xformers'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("needs a CUDA device (flash-attn") and lines[1].startswith(
        "needs a CUDA device"
    )


# ---- the glue, against stand-ins ---------------------------------------------------------------------------


def _to_bhld(t):
    return t.transpose(-3, -2)  # [..., L, H, Dh] <-> [..., H, L, Dh]


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """`flash_attn` from its documentation: `[B, L, H, Dh]`, causal aligned bottom right, rows without keys 0;
    varlen takes packed `[total, H, Dh]` sequences delimited by int32 `cu_seqlens`."""
    calls = []
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append("flash_attn_func")
        return _to_bhld(
            attention_ref(_to_bhld(q), _to_bhld(k), _to_bhld(v), causal=causal, scale=softmax_scale)
        )

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):  # fmt: skip
        calls.append("flash_attn_varlen_func")
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert q.shape[0] == cu_seqlens_q[-1] and k.shape[0] == v.shape[0] == cu_seqlens_k[-1]
        outs = []
        for b in range(len(cu_seqlens_q) - 1):
            qb = q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]
            kb, vb = (t[cu_seqlens_k[b] : cu_seqlens_k[b + 1]] for t in (k, v))
            assert qb.shape[0] <= max_seqlen_q and kb.shape[0] <= max_seqlen_k
            if kb.shape[0] == 0:
                outs.append(torch.zeros_like(qb))
                continue
            out = attention_ref(_to_bhld(qb)[None], _to_bhld(kb)[None], _to_bhld(vb)[None], causal=causal,
                                scale=softmax_scale)  # fmt: skip
            outs.append(_to_bhld(out[0]))
        return torch.cat(outs)

    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


@pytest.fixture
def fake_xformers(monkeypatch):
    """`xformers.ops.memory_efficient_attention` from its documentation: `[B, L, H, Dh]`, an additive tensor
    bias `[B, H, Lq, Lk]` whose row stride is a multiple of 8."""
    calls = []
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        calls.append(attn_bias)
        q, k, v = (_to_bhld(t).float() for t in (query, key, value))
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_bias is not None:
            assert attn_bias.stride(-2) % 8 == 0, "xformers needs an aligned bias"
            scores = scores + attn_bias.float()
        return _to_bhld(torch.softmax(scores, dim=-1) @ v).to(query.dtype)

    ops.memory_efficient_attention = memory_efficient_attention
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


GLUE_CASES = [  # B, Bk, Lq, Lk, padding, causal, kv_index
    (2, 2, 5, 9, False, False, None),
    (2, 2, 9, 5, False, True, None),  # Lq > Lk: the first rows see no key
    (3, 3, 5, 11, True, False, None),  # batch rows 1 and 2 may be fully padded (random lengths)
    (4, 2, 1, 11, True, False, [1, 0, 0, 1]),  # decoding with beams sharing K/V rows
]


def _glue_inputs(B, Bk, Lq, Lk, padding, causal, kv_index):
    q, k, v, mask = make_inputs(B, 2, Lq, Lk, 16, Bk=Bk, padding=padding, seed=B + Lq + Lk)
    if padding:
        mask[-1] = False  # a K/V row with no key at all
    index = None if kv_index is None else torch.tensor(kv_index)
    return q, k, v, dict(key_padding_mask=mask, causal=causal, kv_index=index)


@pytest.mark.parametrize("B, Bk, Lq, Lk, padding, causal, kv_index", GLUE_CASES)
def test_flash_attn_glue_against_a_stand_in(fake_flash_attn, B, Bk, Lq, Lk, padding, causal, kv_index):
    q, k, v, kwargs = _glue_inputs(B, Bk, Lq, Lk, padding, causal, kv_index)

    def run(q, k, v, **kw):
        return FLASH.run(q, k, v, dropout_p=0.0, scale=None, **kw)

    got = run_with_grads(run, q, k, v, **kwargs)
    ref = run_with_grads(attention_ref, q, k, v, **kwargs)
    assert fake_flash_attn[0] == ("flash_attn_varlen_func" if padding else "flash_attn_func")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"flash_attn glue {name}")


@pytest.mark.parametrize("B, Bk, Lq, Lk, padding, causal, kv_index", GLUE_CASES)
def test_xformers_glue_against_a_stand_in(fake_xformers, B, Bk, Lq, Lk, padding, causal, kv_index):
    q, k, v, kwargs = _glue_inputs(B, Bk, Lq, Lk, padding, causal, kv_index)

    def run(q, k, v, **kw):
        return XFORMERS.run(q, k, v, dropout_p=0.0, scale=None, **kw)

    got = run_with_grads(run, q, k, v, **kwargs)
    ref = run_with_grads(attention_ref, q, k, v, **kwargs)
    assert (fake_xformers[0] is None) == (not padding and not causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"xformers glue {name}")


# ---- the real libraries, on CUDA ---------------------------------------------------------------------------

GPU_CASES = [  # B, Bk, Lq, Lk, Dh, padding, causal, kv_index
    (2, 2, 33, 65, 64, True, False, None),
    (2, 2, 65, 65, 64, False, True, None),
    (2, 2, 70, 33, 32, False, True, None),  # Lq > Lk: rows without keys
    (5, 2, 1, 617, 64, True, False, [0, 0, 1, 1, 1]),  # decoding, beams sharing K/V
    (2, 2, 40, 577, 64, True, False, None),  # co-attention
]


GPU_BACKENDS = [
    ("flash_attn", torch.float16),
    ("flash_attn", torch.bfloat16),
    ("xformers", torch.bfloat16),
    ("xformers", torch.float32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attn and xformers kernels are CUDA only")
@pytest.mark.parametrize("backend, dtype", GPU_BACKENDS)
@pytest.mark.parametrize("B, Bk, Lq, Lk, Dh, padding, causal, kv_index", GPU_CASES)
def test_cuda_external_backend_within_twice_the_reference_error(backend, dtype, B, Bk, Lq, Lk, Dh, padding,
                                                                causal, kv_index):  # fmt: skip
    reason = BACKENDS[backend].unavailable_reason()
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    q, k, v, mask = make_inputs(B, 2, Lq, Lk, Dh, Bk=Bk, padding=padding, dtype=dtype)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    kwargs = dict(
        key_padding_mask=None if mask is None else mask.cuda(),
        causal=causal,
        kv_index=None if kv_index is None else torch.tensor(kv_index, device="cuda"),
    )

    def run(q, k, v, **kw):
        return attention(q, k, v, backend=backend, **kw)

    got = run_with_grads(run, q, k, v, **kwargs)
    ref32 = run_with_grads(attention_ref, q.float(), k.float(), v.float(), **kwargs)
    low = run_with_grads(attention_ref, q, k, v, upcast=False, **kwargs)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref32, low):
        assert a.dtype == dtype
        err = (a.float() - r).abs().max().item()
        budget = 2 * (lo.float() - r).abs().max().item() + (1e-3 if dtype != torch.float32 else 1e-4)
        assert err <= budget, f"{backend} {dtype} {name}: max |diff| {err:.3e} > budget {budget:.3e}"
