"""pytest-benchmark cases (marked `benchmark`: left out of `make test`, run by `make bench`).

Each case first checks its result against an oracle (a benchmark of a wrong answer is worth nothing), then
times it with the `benchmark` fixture:

    attention        each usable backend at a small shape ([2, 4, 128, 64], key padding) vs attention_ref
    fused epilogue   residual_layer_norm (auto backend: triton on CUDA, reference on CPU) vs torch LayerNorm
    VQA train step   `benchmarks/end_to_end.py --quick`'s VQA step (forward + backward + AdamW), loss finite
    caption beam     `--quick`'s caption beam search (beam 5, min 8, max 25): ids [B, 1, 9..26] from [CLS]

    make bench                                   # or:
    python -m pytest -q -m benchmark tests/benchmarks
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.ops import available_backends
from mplug_fast.ops.attention import attention
from mplug_fast.ops.fused import residual_layer_norm
from mplug_fast.ops.reference import attention_ref

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _end_to_end():
    spec = importlib.util.spec_from_file_location("bench_end_to_end", ROOT / "benchmarks" / "end_to_end.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def _sync(result):
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return result


def _backends() -> list[str]:
    usable = [name for name, reason in available_backends().items() if reason is None]
    # On CPU the Triton kernels only run under the interpreter (a correctness tool, not a speed).
    return [b for b in usable if DEVICE.type == "cuda" or b != "triton"]


@pytest.mark.parametrize("backend", _backends())
def test_bench_attention(benchmark, backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, generator=gen).to(DEVICE) for _ in range(3))
    mask = torch.ones(2, 128, dtype=torch.bool, device=DEVICE)
    mask[1, 100:] = False
    expected = attention_ref(q, k, v, key_padding_mask=mask)
    got = attention(q, k, v, key_padding_mask=mask, backend=backend)
    torch.testing.assert_close(got, expected, atol=2e-3 if DEVICE.type == "cuda" else 1e-5, rtol=1e-3)
    benchmark(lambda: _sync(attention(q, k, v, key_padding_mask=mask, backend=backend)))


def test_bench_fused_residual_layer_norm(benchmark) -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(8, 128, 256, generator=gen).to(DEVICE) for _ in range(2))
    weight, bias = (torch.randn(256, generator=gen).to(DEVICE) for _ in range(2))
    expected = F.layer_norm(x + residual, (256,), weight, bias, 1e-12)
    torch.testing.assert_close(residual_layer_norm(x, residual, weight, bias, 1e-12), expected)
    benchmark(lambda: _sync(residual_layer_norm(x, residual, weight, bias, 1e-12)))


def _quick_step(workload: str):
    e2e = _end_to_end()
    setup = e2e.default_setup(e2e.parse_args(["--quick"]), DEVICE)
    step, _ = e2e.build_step(workload, setup, DEVICE, torch.float32, compiled=False, backend=None)
    return step, setup


def test_bench_tiny_vqa_train_step(benchmark) -> None:
    step, _ = _quick_step("train_vqa")
    losses = [float(step().detach()) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    benchmark.pedantic(lambda: _sync(step()), rounds=3, iterations=1, warmup_rounds=0)


def test_bench_tiny_caption_beam_search(benchmark) -> None:
    step, setup = _quick_step("gen_caption")
    out = step()
    assert out.ids.shape[0] == setup.batch and out.ids.shape[1] == 1
    assert 1 + 8 <= out.ids.shape[2] <= 1 + 25  # [CLS] + between min_length and max_length tokens
    assert (out.ids[:, :, 0] == 101).all()  # every caption starts with [CLS]
    benchmark.pedantic(lambda: _sync(step()), rounds=3, iterations=1, warmup_rounds=0)
