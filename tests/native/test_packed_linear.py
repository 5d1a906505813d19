"""The native linear on packed panels (`mplug_fast::packed_linear`) against a float64 product; its fixed
summation order (a row's result does not depend on the other rows or the thread count); its checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.ops import packed_linear as pl


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double()).float()


@pytest.mark.parametrize(
    ("M", "N", "K"),
    [
        (1, 16, 13),
        (2, 32, 8),
        (3, 48, 24),
        (4, 16, 1),
        (5, 3072, 96),
        (7, 64, 768),
        (10, 160, 40),
        (64, 16, 3072),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_a_float64_product(M: int, N: int, K: int, bias: bool) -> None:
    """Every row-tile remainder (M mod 5), one to many panels, K from 1 up."""
    x, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    out = torch.ops.mplug_fast.packed_linear(x, pl.pack(w), b)
    assert out.shape == (M, N)
    torch.testing.assert_close(out, _reference(x, w, b), rtol=1e-5, atol=1e-5 * K**0.5)


def test_long_inputs_span_several_row_blocks() -> None:
    """Rows past the first L2-sized block (about 96 KB of x: 30 rows at K=768)."""
    x, w, b = torch.randn(203, 768), torch.randn(48, 768), torch.randn(48)
    out = torch.ops.mplug_fast.packed_linear(x, pl.pack(w), b)
    torch.testing.assert_close(out, _reference(x, w, b), rtol=1e-5, atol=1e-4)


def test_a_row_does_not_depend_on_the_other_rows_or_threads() -> None:
    """One summation order per output: the same bits at any row count (any row tile) and thread count."""
    x, w, b = torch.randn(12, 200), torch.randn(64, 200), torch.randn(64)
    packed = pl.pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([torch.ops.mplug_fast.packed_linear(x[i : i + 1], packed, b) for i in range(12)])
        torch.set_num_threads(2)
        together = torch.ops.mplug_fast.packed_linear(x, packed, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together)


def test_pack_and_unpack_are_exact_inverses() -> None:
    w = torch.randn(48, 9)
    packed = pl.pack(w)
    assert packed.shape == (3, 9, 16) and packed.is_contiguous()
    assert torch.equal(packed[1, 4], w[16:32, 4])  # panel 1, column k = 4: outputs 16 .. 31
    assert torch.equal(pl.unpack(packed), w)
    with pytest.raises(ValueError, match="multiple of 16"):
        pl.pack(torch.randn(20, 9))


def test_python_entry_point_and_its_fallback() -> None:
    """`packed_linear` keeps leading dims; with autograd it is F.linear on the unpacked weight, and the
    gradient reaches the panels."""
    x, w, b = torch.randn(2, 3, 40), torch.randn(32, 40), torch.randn(32)
    packed = pl.pack(w).requires_grad_()
    with torch.no_grad():
        assert pl.packed_rows(x, packed)
        torch.testing.assert_close(pl.packed_linear(x, packed, b), F.linear(x, w, b))
    assert not pl.packed_rows(x, packed)  # autograd on
    pl.packed_linear(x, packed, b).sum().backward()
    w_ref = w.clone().requires_grad_()
    F.linear(x, w_ref, b).sum().backward()
    torch.testing.assert_close(pl.unpack(packed.grad), w_ref.grad)


def test_meta_shape_and_input_errors() -> None:
    meta = torch.ops.mplug_fast.packed_linear(
        torch.empty(3, 8, device="meta"), torch.empty(2, 8, 16, device="meta"), None
    )
    assert meta.shape == (3, 32)
    with pytest.raises(RuntimeError, match="x has K=8, the weight K=9"):
        torch.ops.mplug_fast.packed_linear(torch.randn(3, 8), torch.randn(2, 9, 16), None)
    with pytest.raises(RuntimeError, match=r"packed \[N/16, K, 16\] expected"):
        torch.ops.mplug_fast.packed_linear(torch.randn(3, 8), torch.randn(32, 8), None)
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.mplug_fast.packed_linear(torch.randn(3, 8).double(), torch.randn(2, 8, 16).double(), None)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        torch.ops.mplug_fast.packed_linear(torch.randn(3, 8), torch.randn(2, 8, 16), torch.randn(31))
