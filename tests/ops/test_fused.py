"""Fused epilogues (`mplug_fast.ops.fused`): the Triton kernels against their reference twins.

`residual_layer_norm` (LayerNorm(residual + dropout(x))) and `bias_gelu` / `bias_quick_gelu`: outputs and
every gradient vs `residual_layer_norm_ref` / `bias_gelu_ref` / `bias_quick_gelu_ref` in fp32 (odd widths,
1..37 rows, batched and non-contiguous inputs); dropout (p = 0, p = 1, keep rate, 1/(1-p) scaling, the
backward's mask equal to the forward's, same seed -> same output); fp16/bf16 within an error budget;
`torch.library.opcheck` on the four custom ops; one `torch.compile(fullgraph=True)`; the backend order and
its errors.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py).

| comparison                                  | dtype     | tolerance / budget                           |
|---------------------------------------------|-----------|----------------------------------------------|
| triton vs reference (out and grads)         | fp32      | atol 1e-5, rtol 1e-5 (measured max ~8e-6)    |
| triton vs reference fp32 (outputs)          | fp16/bf16 | max err <= 2 * max |ref_lowp - ref_fp32| + 1e-3 |
| triton vs reference fp32 (LN grads)         | fp16/bf16 | 4 eps(dtype) * max |reference|               |
| CUDA, compiled kernels (`-m gpu`)           | fp32/bf16 | 1e-5 / 1e-2 x max(1, max |reference|)         |

Under the interpreter a bf16 output must equal the fp32 reference rounded to nearest even on > 99% of
elements: the interpreter's own fp32 -> bf16 cast truncates, the kernels round in `cast_rtne` (layer_norm.py).
"""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.ops import fused
from mplug_fast.ops.reference import bias_gelu_ref, bias_quick_gelu_ref, residual_layer_norm_ref

_unavailable = fused.triton_unavailable_reason(torch.device("cpu"))
needs_triton = pytest.mark.skipif(_unavailable is not None, reason=f"triton backend: {_unavailable}")
pytestmark = [
    # triton 3.6's interpreter turns loop bounds into 1-element arrays (numpy >= 2.4 makes this an error).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
LOWP_ATOL = 1e-3
EPS = 1e-5


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(fused.ENV_VAR, raising=False)


def assert_close(actual, expected, *, atol, rtol, what):
    """torch.testing-style closeness, with max/mean |diff| in the failure message; returns max |diff|."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the tested tensor"
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{diff.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
        f"max |diff| {diff.max().item():.3e}, mean |diff| {diff.mean().item():.3e}"
    )
    return diff.max().item() if diff.numel() else 0.0


def grads(fn, inputs, *args, **kwargs):
    """(out, *grads of inputs) for a fixed random upstream gradient."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs, *args, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return (out, *torch.autograd.grad(out, inputs, dout))


def ln_inputs(shape, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g)
    residual = 2.0 * torch.randn(*shape, D, generator=g) + 0.5  # a non-zero mean, as in a residual stream
    weight = 1.0 + 0.5 * torch.randn(D, generator=g)
    bias = 0.1 * torch.randn(D, generator=g)
    return [t.to(dtype) for t in (x, residual, weight, bias)]


def triton_rln(x, residual, weight, bias, eps=EPS, **kwargs):
    return fused.residual_layer_norm(x, residual, weight, bias, eps, backend="triton", **kwargs)


ACTS = {  # name -> (triton call, reference twin)
    "gelu": (lambda x, b: fused.bias_gelu(x, b, backend="triton"), bias_gelu_ref),
    "gelu_tanh": (
        lambda x, b: fused.bias_gelu(x, b, "tanh", backend="triton"),
        lambda x, b, **kw: bias_gelu_ref(x, b, "tanh", **kw),
    ),
    "quick_gelu": (lambda x, b: fused.bias_quick_gelu(x, b, backend="triton"), bias_quick_gelu_ref),
}


# ---- fp32 against the reference ----------------------------------------------------------------------------

LN_CASES = [((1,), 8), ((37,), 100), ((2, 3), 64), ((5,), 768), ((3,), 1), ((17,), 33)]


@needs_triton
@pytest.mark.parametrize("shape, D", LN_CASES, ids=[f"{'x'.join(map(str, s))}-D{d}" for s, d in LN_CASES])
def test_residual_layer_norm_matches_reference_fp32(shape, D):
    inputs = ln_inputs(shape, D, seed=D)
    got = grads(triton_rln, inputs)
    ref = grads(residual_layer_norm_ref, inputs, EPS)
    for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"residual_layer_norm {name} {shape} D={D}")


@needs_triton
def test_residual_layer_norm_non_contiguous_inputs_and_bert_eps():
    """x a transposed view, residual a strided slice (copied or read with row strides), BERT's eps 1e-12."""
    x = torch.randn(64, 9).t()  # [9, 64], last-dim stride 9
    residual = torch.randn(9, 128)[:, ::2]  # [9, 64], last-dim stride 2
    weight, bias = torch.randn(64), torch.randn(64)
    assert x.stride(-1) != 1 and residual.stride(-1) != 1
    got = grads(triton_rln, [x, residual, weight, bias], 1e-12)
    ref = grads(residual_layer_norm_ref, [x, residual, weight, bias], 1e-12)
    for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"non-contiguous {name}")


ACT_CASES = [((1,), 8), ((37,), 100), ((2, 7), 64), ((3,), 768), ((40,), 130)]  # 130: two column blocks


@needs_triton
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape, N", ACT_CASES, ids=[f"{'x'.join(map(str, s))}-N{n}" for s, n in ACT_CASES])
def test_bias_activation_matches_reference_fp32(act, shape, N):
    g = torch.Generator().manual_seed(N)
    x, bias = 3.0 * torch.randn(*shape, N, generator=g), torch.randn(N, generator=g)
    fast, ref_fn = ACTS[act]
    got = grads(fast, [x, bias])
    ref = grads(ref_fn, [x, bias])
    for name, a, b in zip(("out", "dx", "dbias"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"{act} {name} {shape} N={N}")


@needs_triton
def test_empty_inputs():
    x, residual, weight, bias = ln_inputs((0,), 16)
    out, dx, dr, dw, db = grads(triton_rln, [x, residual, weight, bias])
    assert out.shape == (0, 16) and dx.shape == dr.shape == (0, 16)
    assert torch.equal(dw, torch.zeros(16)) and torch.equal(db, torch.zeros(16))
    out, dx, db = grads(ACTS["gelu"][0], [torch.randn(0, 8), torch.randn(8)])
    assert out.shape == dx.shape == (0, 8) and torch.equal(db, torch.zeros(8))


# ---- dropout -----------------------------------------------------------------------------------------------


@needs_triton
def test_dropout_p0_or_eval_is_no_dropout():
    inputs = ln_inputs((5,), 64)
    plain = triton_rln(*inputs)
    assert torch.equal(triton_rln(*inputs, dropout_p=0.0, training=True), plain)
    assert torch.equal(triton_rln(*inputs, dropout_p=0.5, training=False), plain)


def _recover_keep_mask(x, residual, weight, bias, out, mean, rstd, scale):
    """The forward's keep mask, read back from its output: h = (out - bias) / weight / rstd + mean is
    residual + x * scale where kept and residual where dropped (|x| >= 0.5 keeps the two far apart)."""
    h = (out.double() - bias.double()) / weight.double() / rstd.double()[:, None] + mean.double()[:, None]
    dropped_x = h - residual.double()
    keep = (dropped_x - x.double() * scale).abs() < (dropped_x.abs())
    assert torch.allclose(dropped_x, torch.where(keep, x.double() * scale, 0.0), atol=1e-4), (
        "the output is not LayerNorm(residual + mask * x / (1 - p)) for any 0/1 mask"
    )
    return keep


@needs_triton
def test_dropout_keep_rate_scaling_and_backward_mask():
    """p = 0.5: keep rate ~0.5, kept entries scaled by 2, and every gradient equal to the reference's through
    the forward's own mask (recovered from the output), so dx is exactly 0 where dropped."""
    p, rows, D = 0.5, 29, 512
    g = torch.Generator().manual_seed(3)
    sign = torch.where(torch.rand(rows, D, generator=g) < 0.5, -1.0, 1.0)
    x = sign * (0.5 + torch.rand(rows, D, generator=g))  # |x| >= 0.5: kept and dropped are easy to tell apart
    residual = torch.randn(rows, D, generator=g)
    weight, bias = 1.0 + 0.1 * torch.rand(D, generator=g), 0.1 * torch.randn(D, generator=g)
    seed = torch.tensor([1234], dtype=torch.int64)
    out, mean, rstd = torch.ops.mplug_fast.residual_layer_norm_fwd(x, residual, weight, bias, seed, EPS, p)
    keep = _recover_keep_mask(x, residual, weight, bias, out, mean, rstd, 1.0 / (1.0 - p))

    # Bernoulli(0.5) over 14848 entries: std 0.004, the bound is ~5 std (and the seed is fixed: no flakes).
    rate = keep.float().mean().item()
    assert abs(rate - (1.0 - p)) < 0.02, f"keep rate {rate:.4f}, expected {1 - p}"
    assert 0.4 < keep.float().mean(1).min().item() and keep.float().mean(1).max().item() < 0.6, "a row is off"

    def with_seed(x, residual, weight, bias):
        return torch.ops.mplug_fast.residual_layer_norm_fwd(x, residual, weight, bias, seed, EPS, p)[0]

    def with_mask(x, residual, weight, bias):
        return F.layer_norm(residual + x * keep / (1.0 - p), (D,), weight, bias, EPS)

    got = grads(with_seed, [x, residual, weight, bias])
    ref = grads(with_mask, [x, residual, weight, bias])
    for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias"), got, ref):
        assert_close(a, b, **FP32_TOL, what=f"dropout p={p} {name}")
    dx = got[1]
    assert torch.equal(dx[~keep], torch.zeros_like(dx[~keep])), "dx is not exactly 0 where x was dropped"
    assert torch.allclose(dx[keep], 2.0 * got[2][keep], rtol=1e-6, atol=0), (
        "dx != dresidual / (1 - p) where kept"
    )


@needs_triton
def test_dropout_same_seed_same_result():
    inputs = ln_inputs((7,), 64)
    torch.manual_seed(11)
    a = triton_rln(*inputs, dropout_p=0.3, training=True)
    torch.manual_seed(11)
    b = triton_rln(*inputs, dropout_p=0.3, training=True)
    c = triton_rln(*inputs, dropout_p=0.3, training=True)  # the generator moved on: another mask
    assert torch.equal(a, b), "same torch seed, different dropout"
    assert not torch.equal(a, c), "the dropout mask does not change between calls"


@needs_triton
def test_dropout_p1_drops_everything():
    inputs = ln_inputs((5,), 64)
    out, dx, dr, dw, db = grads(triton_rln, inputs, dropout_p=1.0, training=True)
    ref = grads(lambda x, r, w, b: residual_layer_norm_ref(0.0 * x, r, w, b, EPS), inputs)
    assert_close(out, ref[0], **FP32_TOL, what="p=1 out")
    assert torch.equal(dx, torch.zeros_like(dx)), "p=1: x gets a gradient"
    assert_close(dr, ref[2], **FP32_TOL, what="p=1 dresidual")


# ---- low precision -----------------------------------------------------------------------------------------


def _check_budget(fast, ref32, ref_lowp, what):
    """max |fast - ref32| <= 2 max |ref_lowp - ref32| + atol (flash-attn's budget); returns both maxima."""
    assert fast.dtype == ref_lowp.dtype, f"{what}: dtype {fast.dtype}, expected {ref_lowp.dtype}"
    err = (fast.double() - ref32.double()).abs().max().item()
    err_lowp = (ref_lowp.double() - ref32.double()).abs().max().item()
    assert err <= 2.0 * err_lowp + LOWP_ATOL, f"{what}: max err {err:.3e} > 2 x {err_lowp:.3e} + {LOWP_ATOL}"
    return err, err_lowp


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_budget(dtype):
    x, residual, weight, bias = ln_inputs((13,), 100, dtype=dtype)
    ref32 = residual_layer_norm_ref(*(t.float() for t in (x, residual, weight, bias)), EPS)
    ref_lowp = residual_layer_norm_ref(x, residual, weight, bias, EPS, upcast=False)
    out = triton_rln(x, residual, weight, bias)
    _check_budget(out, ref32, ref_lowp, f"residual_layer_norm {dtype}")
    # One rounding of the fp32 result, to nearest even (under the interpreter by `cast_rtne`: its own fp32 ->
    # bf16 cast truncates): all but a few elements equal the rounded fp32 reference.
    same = (out == ref32.to(dtype)).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of the {dtype} outputs are the rounded fp32 reference"
    # Mixed: an fp32 residual stream plus a low-precision sublayer output gives fp32 (eager promotion).
    mixed = triton_rln(x, residual.float(), weight.float(), bias.float())
    assert mixed.dtype == torch.float32
    mixed_ref = residual_layer_norm_ref(x, residual.float(), weight.float(), bias.float(), EPS)
    assert_close(mixed, mixed_ref, **FP32_TOL, what="mixed-dtype residual_layer_norm")
    g = torch.Generator().manual_seed(5)
    xa, ba = (3.0 * torch.randn(13, 100, generator=g)).to(dtype), torch.randn(100, generator=g).to(dtype)
    for act, (fast, ref_fn) in ACTS.items():
        ref32 = ref_fn(xa.float(), ba.float())
        _check_budget(fast(xa, ba), ref32, ref_fn(xa, ba, upcast=False), f"{act} {dtype}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads_close_to_fp32(dtype):
    """Gradients in low precision (computed in fp32 inside, rounded once) against the fp32 reference:
    within a few units of the dtype's rounding of the largest gradient."""
    inputs = ln_inputs((13,), 100, dtype=dtype)
    got = grads(triton_rln, inputs)
    ref = grads(residual_layer_norm_ref, [t.float() for t in inputs], EPS)
    ulp = torch.finfo(dtype).eps
    for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias"), got, ref):
        tol = 4 * ulp * b.abs().max().item()
        assert (a.float() - b).abs().max().item() <= tol, f"{dtype} {name}: max err over {tol:.2e}"


def _cuda_tol(dtype, expected):
    """Relative to the tensor's largest value (the weight/bias grads sum 308 rows): fp32 1e-5, bf16 1%."""
    scale = max(1.0, expected.abs().max().item())
    return (
        {"atol": 1e-5 * scale, "rtol": 1e-5}
        if dtype == torch.float32
        else {"atol": 1e-2 * scale, "rtol": 1e-2}
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_kernels(dtype):
    """On CUDA (compiled kernels, run with TRITON_INTERPRET=0): BERT-base widths, outputs and grads vs the
    fp32 reference (bf16: within 1% of each tensor's largest value), the automatic choice, the keep rate."""
    reason = fused.triton_unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"triton backend on CUDA: {reason}")
    inputs = [t.cuda() for t in ln_inputs((4, 77), 768, dtype=dtype)]
    assert fused.select_backend(inputs[0]) == "triton"
    got = grads(triton_rln, inputs)
    ref = grads(residual_layer_norm_ref, [t.float() for t in inputs], EPS)
    for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias"), got, ref):
        assert_close(a.float(), b, **_cuda_tol(dtype, b), what=f"cuda {dtype} residual_layer_norm {name}")
    x, bias = (
        (3.0 * torch.randn(4, 77, 3072, device="cuda")).to(dtype),
        torch.randn(3072, device="cuda").to(dtype),
    )
    for act, (fast, ref_fn) in ACTS.items():
        got, ref = grads(fast, [x, bias]), grads(ref_fn, [x.float(), bias.float()])
        for name, a, b in zip(("out", "dx", "dbias"), got, ref):
            assert_close(a.float(), b, **_cuda_tol(dtype, b), what=f"cuda {dtype} {act} {name}")
    _, dx, dr, *_ = grads(triton_rln, inputs, dropout_p=0.5, training=True)
    dropped = (dx == 0).float().mean().item()
    assert abs(dropped - 0.5) < 0.01, f"dropout zeroed {dropped:.3f} of dx, expected 0.5"


# ---- torch.library and torch.compile -----------------------------------------------------------------------


@needs_triton
def test_opcheck_custom_ops():
    """One small case per op (the dropout path, with its optional seed tensor; ~1 s per opcheck)."""
    x, residual, weight, bias = ln_inputs((3,), 16)
    seed, p = torch.tensor([5], dtype=torch.int64), 0.25
    args = (x.requires_grad_(), residual.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    torch.library.opcheck(torch.ops.mplug_fast.residual_layer_norm_fwd, (*args, seed, EPS, p))
    out, mean, rstd = torch.ops.mplug_fast.residual_layer_norm_fwd(*(t.detach() for t in args), seed, EPS, p)
    saved = (x.detach(), residual.detach(), weight.detach(), bias.detach(), seed, mean, rstd, p)
    torch.library.opcheck(torch.ops.mplug_fast.residual_layer_norm_bwd, (torch.randn_like(out), *saved))
    xa, ba = torch.randn(3, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.mplug_fast.bias_act_fwd, (xa, ba, "quick_gelu"))
    torch.library.opcheck(
        torch.ops.mplug_fast.bias_act_bwd, (torch.randn(3, 16), xa.detach(), ba.detach(), "gelu")
    )


@needs_triton
def test_compile_fullgraph_matches_eager():
    """MLP and post-LN residual epilogues (with and without dropout) under torch.compile(fullgraph=True)."""
    D = 64
    inputs = ln_inputs((2, 5), D)
    b_fc = torch.randn(D)

    def block(x, residual, weight, bias, b_fc, dropout_p):
        h = fused.bias_gelu(x, b_fc, backend="triton") + fused.bias_quick_gelu(x, b_fc, backend="triton")
        return fused.residual_layer_norm(h, residual, weight, bias, EPS, dropout_p=dropout_p, training=True,
                                         backend="triton")  # fmt: skip

    compiled = torch.compile(block, fullgraph=True)
    got = grads(compiled, [*inputs, b_fc], 0.0)
    ref = grads(block, [*inputs, b_fc], 0.0)
    for name, a, b in zip(("out", "dx", "dresidual", "dweight", "dbias", "db_fc"), got, ref):
        assert_close(a, b, atol=1e-6, rtol=1e-6, what=f"compiled {name}")
    # With dropout, the seed comes from the compiled graph's RNG: check the mask's effect, not its values.
    x = 1.0 + torch.rand(2, 5, D)
    _, dx, *_ = grads(compiled, [x, *inputs[1:], b_fc], 0.5)
    dropped = (dx == 0).float().mean().item()
    assert 0.3 < dropped < 0.7, f"compiled dropout zeroed {dropped:.2f} of dx, expected ~0.5"


# ---- backend choice ----------------------------------------------------------------------------------------


def test_default_on_cpu_is_reference_and_explicit_beats_env(monkeypatch):
    x, residual, weight, bias = ln_inputs((3,), 8)
    assert fused.select_backend(x) == "reference"
    monkeypatch.setenv(fused.ENV_VAR, "reference")
    assert fused.select_backend(x) == "reference"
    if _unavailable is None:
        assert fused.select_backend(x, backend="triton") == "triton"
        monkeypatch.setenv(fused.ENV_VAR, "triton")
        assert fused.select_backend(x) == "triton"
        assert fused.select_backend(x, backend="reference") == "reference"
    out = fused.residual_layer_norm(x, residual, weight, bias, EPS, backend="reference")
    assert torch.equal(out, F.layer_norm(residual + x, (8,), weight, bias, EPS))
    assert torch.equal(fused.bias_gelu(x, bias, backend="reference"), F.gelu(x + bias))


def test_bad_names_and_unrunnable_triton_are_clear_errors(monkeypatch):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"unknown fused epilogue backend 'cuda'.*'reference', 'triton'"):
        fused.select_backend(x, backend="cuda")
    monkeypatch.setenv(fused.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MPLUG_FAST_FUSED='fast'"):
        fused.select_backend(x)
    monkeypatch.delenv(fused.ENV_VAR)
    with pytest.raises(ValueError, match="approximate"):
        fused.bias_gelu(x, torch.zeros(8), "erf")
    with pytest.raises(ValueError, match="dropout_p"):
        fused.residual_layer_norm(x, x, torch.ones(8), torch.zeros(8), EPS, dropout_p=1.5, training=True)
    # as if TRITON_INTERPRET were unset
    monkeypatch.setattr(fused, "triton_kernels_status", lambda *modules: "compiled")
    with pytest.raises(RuntimeError, match="need a CUDA device or the Triton interpreter"):
        fused.bias_quick_gelu(x, torch.zeros(8), backend="triton")
    if _unavailable is None:
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match="dtype torch.float64"):
            fused.bias_gelu(x.double(), torch.zeros(8, dtype=torch.float64), backend="triton")


def test_import_and_reference_path_without_triton():
    """`import mplug_fast.ops.fused` does not import the kernel modules (only the first triton use does); with
    `import triton` failing, the module imports, the reference path runs and asking for triton says why."""
    code = (
        "import sys; import mplug_fast.ops.fused\n"
        "print('KERNELS IMPORTED:', 'mplug_fast.ops.triton.layer_norm' in sys.modules)\n"
        "sys.modules['triton'] = None\n"
        "import torch\n"
        "from mplug_fast.ops import fused\n"
        "x = torch.randn(2, 8)\n"
        "fused.bias_gelu(x, torch.zeros(8))\n"
        "fused.residual_layer_norm(x, x, torch.ones(8), torch.zeros(8), 1e-5)\n"
        "try:\n"
        "    fused.bias_gelu(x, torch.zeros(8), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KERNELS IMPORTED: False" in result.stdout, result.stdout
    assert "ERROR: fused epilogue backend 'triton' cannot run these inputs" in result.stdout, result.stdout
    assert "package not installed (pip install triton)" in result.stdout, result.stdout


def test_reference_twins_follow_eager_semantics():
    """The twins equal the eager module code they replace (fp32) and keep the promoted dtype."""
    x, residual, weight, bias = ln_inputs((4,), 16)
    assert torch.equal(residual_layer_norm_ref(x, residual, weight, bias, EPS),
                       F.layer_norm(residual + x, (16,), weight, bias, EPS))  # fmt: skip
    out = residual_layer_norm_ref(x.bfloat16(), residual, weight, bias, EPS)
    assert out.dtype == torch.float32
    assert torch.allclose(bias_quick_gelu_ref(x, bias), (x + bias) * torch.sigmoid(1.702 * (x + bias)))
    assert math.isclose(bias_gelu_ref(torch.zeros(1), torch.ones(1)).item(), F.gelu(torch.ones(1)).item())
