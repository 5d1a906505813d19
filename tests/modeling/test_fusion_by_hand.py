"""The skip-connected fusion against a float64 hand computation of fidelity §1.4 / §3.3 (tiny preset, fp32
eval mode, weights redrawn at std 0.08 so that a wrong mask, order or residual shows): the layer kinds per
stride, asymmetric layers leaving the image states unchanged, the spec's pseudocode step by step.

| comparison                                | atol  |
|-------------------------------------------|-------|
| fusion (fp32) vs float64 hand computation | 1e-5 x max(1, max |ref|) |
| fusion (float64) vs hand computation      | 1e-10 |
"""

from __future__ import annotations

import pytest
import torch

from mplug_fast.modeling.fusion import (
    AsymmetricCoAttentionLayer,
    ConnectedAttentionLayer,
    SkipConnectedFusion,
)
from tests.modeling.model_oracle import (
    NV_TINY,
    assert_close,
    bert_layer_by_hand,
    fusion_by_hand,
    randomize,
    tiny_config,
)

A, C = "asymmetric", "connected"

# ---- fusion semantics (tiny, fp32, eval) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fusion_inputs():
    """Image states [2, 17, 256], text states [2, 7, 256] and a text mask (row 1 has 3 padding tokens)."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, NV_TINY, 256, generator=g)
    t = torch.randn(2, 7, 256, generator=g)
    t_mask = torch.ones(2, 7, dtype=torch.bool)
    t_mask[1, 4:] = False
    return v, t, t_mask


def build_fusion(layers: int, stride: int) -> SkipConnectedFusion:
    config = tiny_config(**{"fusion.layers": layers, "fusion.stride": stride})
    return randomize(SkipConnectedFusion(config), seed=layers * 10 + stride)


@pytest.mark.parametrize(
    "layers, stride, expected",
    [(4, 3, (A, A, A, C)), (6, 3, (A, A, A, C, A, A)), (6, 6, (A,) * 6), (6, 2, (A, A, C, A, C, A))],
)
def test_fusion_layer_kinds(layers, stride, expected):
    fusion = build_fusion(layers, stride)
    kinds = tuple(C if isinstance(layer, ConnectedAttentionLayer) else A for layer in fusion.layers)
    assert kinds == expected == fusion.config.layer_types
    for layer in fusion.layers:
        if isinstance(layer, ConnectedAttentionLayer):
            assert layer.cross is None and layer.norm_cross is None  # owns no cross-attention
        else:
            assert isinstance(layer, AsymmetricCoAttentionLayer) and layer.cross is not None


@torch.no_grad()
def test_fusion_stride_6_returns_the_image_states_bitwise(fusion_inputs):
    v, t, t_mask = fusion_inputs
    fusion = build_fusion(6, 6)
    v_out, t_out = fusion(v, t, t_mask)
    assert torch.equal(v_out, v)
    assert not torch.allclose(t_out, t)


@torch.no_grad()
def test_asymmetric_layer_reads_but_never_writes_the_image(fusion_inputs):
    v, t, t_mask = fusion_inputs
    layer = build_fusion(6, 6).layers[0]
    v_out, t_out = layer(v, t, None, t_mask)
    assert torch.equal(v_out, v)
    v_other = v + torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    v_out2, t_out2 = layer(v_other, t, None, t_mask)
    assert torch.equal(v_out2, v_other)
    assert (t_out2 - t_out).abs().max() > 1e-2, "the text output does not depend on the image"
    assert_close(t_out, bert_layer_by_hand(layer, t.double(), t_mask, v.double(), None), 1e-5, "asym layer")


@torch.no_grad()
def test_fusion_stride_3_reproduced_by_hand_step_by_step(fusion_inputs):
    """tiny (4 layers, S=3): layers 0..2 asymmetric on t, layer 3 over cat([v, t]) with the joint mask;
    v_out == v_in + y[:, :Nv] and t_out == y[:, Nv:]."""
    v, t, t_mask = fusion_inputs
    fusion = build_fusion(4, 3)
    v_out, t_out = fusion(v, t, t_mask)

    Nv = v.shape[1]
    v64, t64 = v.double(), t.double()
    ones = torch.ones(v.shape[:2], dtype=torch.bool)
    for j in range(3):
        t64 = bert_layer_by_hand(fusion.layers[j], t64, t_mask, memory=v64, memory_mask=ones)
    y = bert_layer_by_hand(fusion.layers[3], torch.cat([v64, t64], 1), torch.cat([ones, t_mask], 1))
    assert_close(v_out, v64 + y[:, :Nv], 1e-5, "v_out vs v_in + y[:, :Nv]")
    assert_close(t_out, y[:, Nv:], 1e-5, "t_out vs y[:, Nv:]")
    # The extra residual is really there: v_out differs from the plain post-LN output y[:, :Nv].
    assert (v_out.double() - y[:, :Nv]).abs().max() > 0.5
    # ... and the module's own connected layer agrees with the same split.
    v_mid, t_mid = v, t
    for layer in fusion.layers[:3]:
        v_mid, t_mid = layer(v_mid, t_mid, None, t_mask)
    assert torch.equal(v_mid, v)
    v_last, t_last = fusion.layers[3](v_mid, t_mid, None, t_mask)
    assert torch.equal(v_last, v_out) and torch.equal(t_last, t_out)


@pytest.mark.parametrize("layers, stride", [(6, 3), (6, 2), (6, 1), (4, 3)])
@torch.no_grad()
def test_fusion_matches_the_spec_pseudocode(fusion_inputs, layers, stride):
    """The module in float64 equals the float64 hand computation to rounding (the formula is exact); in fp32
    the bound scales with the output magnitude: every connected layer adds to v (|v| grows to ~14 with S=1)
    and the peaky attention of these weights amplifies fp32 rounding (measured max |diff| 4e-5 for S=1, on
    an Intel Xeon 4.2e-5 on text states of magnitude 3.6, hence 3e-5 x the magnitude)."""
    v, t, t_mask = fusion_inputs
    fusion = build_fusion(layers, stride)
    v_ref, t_ref = fusion_by_hand(fusion, stride, v, t, t_mask)
    v_out, t_out = fusion(v, t, t_mask)
    assert_close(v_out, v_ref, 3e-5 * max(1.0, v_ref.abs().max().item()), f"fp32 image states S={stride}")
    assert_close(t_out, t_ref, 3e-5 * max(1.0, t_ref.abs().max().item()), f"fp32 text states S={stride}")
    v64, t64 = fusion.double()(v.double(), t.double(), t_mask)
    assert_close(v64, v_ref, 1e-10, f"float64 image states S={stride}")
    assert_close(t64, t_ref, 1e-10, f"float64 text states S={stride}")
