"""The dropout bits of the Triton kernels (`mplug_fast.ops.triton.dropout`): `philox` gives the bits of
Triton's own Philox-4x32-10, and the attention keep-mask is the one the module docstring defines (counter and
byte of each score), checked against a NumPy re-derivation. The kernels' agreement with that mask (forward,
backward, split-K, LayerNorm) is tested in test_triton_attention.py, test_triton_decode.py and test_fused.py.
Runs under the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py)."""

import importlib

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
dropout = importlib.import_module("mplug_fast.ops.triton.dropout")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar")


@triton.jit
def _philox_both(SEED, C, OUT_OURS, OUT_TRITON, N: tl.constexpr):
    seed = tl.load(SEED)
    offs = tl.arange(0, N)
    c0, c1, c2, c3 = (tl.load(C + k * N + offs) for k in range(4))
    ours = dropout.philox(seed, c0, c1, c2, c3)
    ref = tl.random.philox(seed, c0, c1, c2, c3)
    for k in tl.static_range(4):
        tl.store(OUT_OURS + k * N + offs, ours[k].to(tl.int32, bitcast=True))
        tl.store(OUT_TRITON + k * N + offs, ref[k].to(tl.int32, bitcast=True))


def test_philox_gives_the_bits_of_tritons_philox():
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(-(2**31), 2**31, (4, 64), dtype=torch.int32, generator=g)
    for seed in (0, 12345, -(2**62) + 7):
        ours, ref = torch.empty_like(counters), torch.empty_like(counters)
        _philox_both[(1,)](torch.tensor([seed]), counters, ours, ref, N=64)
        assert torch.equal(ours, ref), f"seed {seed}: {int((ours != ref).sum())} words differ"


def _philox_np(seed: int, c: list[np.ndarray]) -> list[np.ndarray]:
    """Philox-4x32-10 in NumPy (Salmon et al. 2011), uint64 arithmetic on uint32 values."""
    m = np.uint64(0xFFFFFFFF)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    c0, c1, c2, c3 = (x.astype(np.uint64) & m for x in c)
    for _ in range(10):
        p0, p2 = c2 * np.uint64(0xCD9E8D57), c0 * np.uint64(0xD2511F53)
        c0, c1, c2, c3 = (p0 >> np.uint64(32)) ^ c1 ^ k0, p0 & m, (p2 >> np.uint64(32)) ^ c3 ^ k1, p2 & m
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m, (k1 + np.uint64(0xBB67AE85)) & m
    return [c0, c1, c2, c3]


def test_attention_keep_mask_follows_the_documented_counter_and_byte():
    B, H, Lq, Lk, p, seed = 2, 1, 40, 70, 0.3, 987654321
    attention = importlib.import_module("mplug_fast.ops.triton.attention")
    keep = attention.dropout_keep_mask(torch.tensor([seed]), B, H, Lq, Lk, p).reshape(B * H, Lq, Lk).numpy()
    s, m, n = np.meshgrid(np.arange(B * H), np.arange(Lq), np.arange(Lk), indexing="ij")
    counter = [(n // 32) * 32 + ((n // 2) % 4) * 8 + m % 8, m // 16, s, np.zeros_like(s)]
    words = _philox_np(seed, counter)
    word = np.choose(2 * ((m // 8) % 2) + (n // 8) % 2, words)
    byte = (word >> (8 * (2 * ((n // 16) % 2) + n % 2)).astype(np.uint64)) & np.uint64(255)
    expected = byte >= dropout.dropout_threshold(p)
    assert np.array_equal(keep, expected), f"{int((keep != expected).sum())} of {keep.size} decisions differ"
