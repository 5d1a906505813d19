"""Position-table resampling (official `resize_pos_embed` rule: bilinear, align_corners=False)."""

import pytest
import torch

from mplug_fast.modeling.vision import resize_pos_embed


@pytest.mark.parametrize("width", [768, 1024])
def test_same_grid_is_the_identity_and_the_class_row_is_kept(width: int) -> None:
    pos = torch.randn(24 * 24 + 1, width)
    assert resize_pos_embed(pos, 24) is pos
    for grid in (16, 32, (18, 30)):
        out = resize_pos_embed(pos, grid)
        gh, gw = (grid, grid) if isinstance(grid, int) else grid
        assert out.shape == (gh * gw + 1, width)
        assert torch.equal(out[0], pos[0])


def test_bilinear_values_and_row_major_layout() -> None:
    # grid 2x2 holding [[0, 1], [2, 3]] in row-major order -> 4x4, align_corners=False, no antialias
    pos = torch.tensor([[9.0], [0.0], [1.0], [2.0], [3.0]])
    out = resize_pos_embed(pos, 4)[1:, 0].reshape(4, 4)
    expected_row0 = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.allclose(out[0], expected_row0)
    assert torch.allclose(out[:, 0], 2 * expected_row0)  # rows step by 2 in the source grid
    assert torch.allclose(out[3], expected_row0 + 2)


def test_16_to_24_keeps_class_row_and_low_precision_is_computed_in_fp32() -> None:
    pos = torch.randn(16 * 16 + 1, 64)
    ref = resize_pos_embed(pos, 24)
    half = resize_pos_embed(pos.to(torch.bfloat16), 24)
    assert half.dtype == torch.bfloat16 and ref.shape == (577, 64)
    assert (half.float() - ref).abs().max() < 0.05


def test_non_square_stored_grid_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.randn(1 + 12, 8), 4)
    with pytest.raises(ValueError, match=r"\[N, W\]"):
        resize_pos_embed(torch.randn(1, 17, 8), 4)
