"""The connected fusion layer without [v; t] (`ConnectedAttentionLayer.split`) equals the concatenating path.

Values and gradients (inputs and every parameter) of `split=True` vs `split=False` on the same weights, with
text padding, image padding or none, in eval and in train mode (dropout 0); and a whole fusion stack with a
connected layer. The timing of both paths: benchmarks/connected_layer.py.
"""

from __future__ import annotations

import pytest
import torch

import mplug_fast
from mplug_fast.modeling.fusion import ConnectedAttentionLayer, SkipConnectedFusion
from mplug_fast.modeling.layers import init_bert_weights

TOL = 1e-5


def config() -> mplug_fast.MPlugConfig:
    return mplug_fast.get_config(
        "tiny",
        **{
            "text.hidden_size": 64,
            "text.heads": 2,
            "text.intermediate_size": 128,
            "text.hidden_dropout": 0.0,
            "text.attention_dropout": 0.0,
            "fusion.layers": 2,
            "fusion.stride": 1,
        },
    )


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    module.apply(init_bert_weights)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def forward_backward(module, split: bool, v, t, t_mask, v_mask):
    """((out_v, out_t), {name: grad}) including the input grads under 'input.v' / 'input.t'."""
    for m in module.modules():
        if isinstance(m, ConnectedAttentionLayer):
            m.split = split
    module.zero_grad(set_to_none=True)
    v, t = v.detach().requires_grad_(), t.detach().requires_grad_()
    out_v, out_t = (
        module(v, t, v_mask, t_mask)
        if isinstance(module, ConnectedAttentionLayer)
        else module(v, t, t_mask, v_mask)
    )
    # weights on the outputs so that every element matters differently
    w_v = torch.linspace(-1, 1, out_v.numel()).view_as(out_v)
    w_t = torch.linspace(1, -1, out_t.numel()).view_as(out_t)
    ((out_v * w_v).sum() + (out_t * w_t).square().sum()).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads["input.v"], grads["input.t"] = v.grad, t.grad
    return (out_v.detach(), out_t.detach()), grads


def assert_same(got, ref):
    (outs, grads), (ref_outs, ref_grads) = got, ref
    for name, a, b in zip(("image", "text"), outs, ref_outs, strict=True):
        err = (a - b).abs().max().item()
        assert err <= TOL, f"{name} states differ by {err:.3e}"
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        err = (grads[name] - ref_grads[name]).abs().max().item()
        assert err <= TOL, f"grad of {name} differs by {err:.3e}"


def make_inputs(padding: str, B: int = 3, Nv: int = 7, Lt: int = 5, D: int = 64):
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(B, Nv, D, generator=g), torch.randn(B, Lt, D, generator=g)
    t_mask = v_mask = None
    if padding in ("text", "both"):
        t_mask = torch.ones(B, Lt, dtype=torch.bool)
        t_mask[1, 2:] = False
    if padding in ("image", "both"):
        v_mask = torch.ones(B, Nv, dtype=torch.bool)
        v_mask[2, 4:] = False
    return v, t, t_mask, v_mask


@pytest.mark.parametrize("padding", ["none", "text", "image", "both"])
@pytest.mark.parametrize("train", [False, True])
def test_split_connected_layer_equals_concat(padding, train):
    layer = perturbed(ConnectedAttentionLayer(config())).train(train)
    assert layer.split is False, "the concatenating path is the default (the split one does not pay)"
    v, t, t_mask, v_mask = make_inputs(padding)
    ref = forward_backward(layer, False, v, t, t_mask, v_mask)
    assert_same(forward_backward(layer, True, v, t, t_mask, v_mask), ref)


def test_split_path_changes_nothing_in_a_fusion_stack():
    """Asymmetric layer then connected layer: the image state update (v + y_v) and text states agree."""
    fusion = perturbed(SkipConnectedFusion(config())).train()
    assert isinstance(fusion.layers[1], ConnectedAttentionLayer)
    v, t, t_mask, _ = make_inputs("text")
    ref = forward_backward(fusion, False, v, t, t_mask, None)
    assert_same(forward_backward(fusion, True, v, t, t_mask, None), ref)
