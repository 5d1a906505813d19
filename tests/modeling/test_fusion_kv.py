"""One wide GEMM for the image K/V of a run of asymmetric layers == one GEMM per layer (values, grads)."""

import pytest
import torch

from mplug_fast.config import get_config
from mplug_fast.modeling.fusion import SkipConnectedFusion


@pytest.mark.parametrize(
    "stride, runs",
    [
        (1, {0: (0,)}),
        (2, {0: (0, 1), 3: (3,), 5: (5,)}),
        (3, {0: (0, 1, 2), 4: (4, 5)}),
        (6, {0: tuple(range(6))}),
    ],
)
def test_runs_follow_the_connected_layers(stride: int, runs: dict) -> None:
    config = get_config("tiny", **{"fusion.stride": stride, "fusion.layers": 6})
    assert SkipConnectedFusion(config).asymmetric_runs == runs


def per_layer_forward(fusion: SkipConnectedFusion, v, t, t_mask):
    """The fusion stack with every asymmetric layer projecting its own image K/V (one GEMM per layer)."""
    for layer in fusion.layers:
        v, t = layer(v, t, None, t_mask)  # asymmetric layers: image_kv=None -> cross.kv_proj(v)
    return v, t


@pytest.mark.parametrize("stride", [2, 3, 6])
def test_fused_image_kv_equals_per_layer_projection(stride: int) -> None:
    config = get_config("tiny", **{"fusion.stride": stride, "fusion.layers": 6})
    fusion = SkipConnectedFusion(config).eval()
    for p in fusion.parameters():  # non-trivial weights and biases
        torch.nn.init.normal_(p, std=0.1)
    v = torch.randn(2, 17, 256, requires_grad=True)
    t = torch.randn(2, 5, 256, requires_grad=True)
    t_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    results = []
    for run in (fusion, lambda v, t, t_mask: per_layer_forward(fusion, v, t, t_mask)):
        fusion.zero_grad()
        v.grad = t.grad = None
        v_out, t_out = run(v, t, t_mask)
        (v_out.square().mean() + t_out.sin().sum()).backward()
        grads = {n: p.grad.clone() for n, p in fusion.named_parameters()}
        results.append((v_out.detach(), t_out.detach(), v.grad.clone(), t.grad.clone(), grads))
    (va, ta, gva, gta, ga), (vb, tb, gvb, gtb, gb) = results
    for a, b in ((va, vb), (ta, tb), (gva, gvb), (gta, gtb)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (a - b).abs().max()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=1e-5), name


def test_fused_image_kv_views_equal_each_layers_projection() -> None:
    """`project_image_kv` of a run gives each layer exactly its own `cross.project_kv(v)`."""
    config = get_config("tiny", **{"fusion.stride": 6, "fusion.layers": 6})
    fusion = SkipConnectedFusion(config).eval()
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.1)
    v = torch.randn(2, 17, 256)
    run = fusion.asymmetric_runs[0]
    with torch.no_grad():
        fused = fusion.project_image_kv(v, run)
        for j in run:
            k_ref, v_ref = fusion.layers[j].cross.project_kv(v)
            assert torch.allclose(fused[j][0], k_ref, atol=1e-6) and torch.allclose(
                fused[j][1], v_ref, atol=1e-6
            )
