"""The Triton attention kernels' tile table and input limits (`mplug_fast.ops.triton.tiles`): a tile per
target, kernel, head dim and dtype within the target's shared memory, short query blocks for short queries,
the reasons given for unsupported inputs. Compiled resources: tests/ops/test_kernel_resources.py."""

import pytest
import torch

pytest.importorskip("triton")  # the mplug_fast.ops.triton package imports it

from mplug_fast.ops.triton import tiles  # noqa: E402


def test_short_queries_get_a_query_tile_that_fits():
    for Lq, want in ((1, 16), (16, 16), (25, 32), (32, 32), (35, 64)):
        for kind in ("fwd", "dq", "dkdv"):
            got = tiles.tile_for(kind, 64, torch.float16, "cpu", Lq).block_m
            assert got == min(want, tiles.TILES[("sm_90", kind, 64, 2)].block_m), (kind, Lq, got)
    assert tiles.tile_for("fwd", 64, torch.float16, "cpu", 577) == tiles.TILES[("sm_90", "fwd", 64, 2)]


def test_tile_table_covers_every_target_kernel_head_dim_and_dtype():
    for arch in ("sm_80", "sm_90"):
        for kind in ("fwd", "dq", "dkdv"):
            for block_d in (16, 32, 64, 128):
                for nbytes in (2, 4):
                    t = tiles.TILES[(arch, kind, block_d, nbytes)]
                    assert t.block_m >= 16 and t.block_n >= 16 and t.block_n % 16 == 0
                    assert tiles.SHARED[(arch, kind, block_d, nbytes)] <= tiles.SHARED_LIMIT[arch]


def test_unsupported_reasons_name_head_dim_and_dtype():
    assert tiles.attention_unsupported_reasons(dtype=torch.float16, head_dim=64, device="cpu") == []
    reasons = tiles.attention_unsupported_reasons(dtype=torch.float64, head_dim=72, device="cpu")
    assert len(reasons) == 2 and "head_dim=72" in reasons[0] and "float64" in reasons[1], reasons
