"""`PackedLinear` / `PackedEmbedding` are nn.Linear / nn.Embedding in another storage layout: the same
outputs, gradients and state dict; the swap both ways is exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mplug_fast.modeling.packed_embedding import PackedEmbedding
from mplug_fast.modeling.packed_linear import PackedLinear, pack_linears, unpack_linears


def test_state_dict_outputs_and_gradients_are_nn_linears() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 32)
    packed = PackedLinear.from_linear(linear)
    assert packed.weight.shape == (2, 24, 16)
    plain_sd, packed_sd = linear.state_dict(), packed.state_dict()
    assert list(plain_sd) == list(packed_sd) == ["weight", "bias"]
    assert all(torch.equal(plain_sd[k], packed_sd[k]) for k in plain_sd)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():  # the native op (when built) or F.linear: equal up to rounding
        torch.testing.assert_close(packed(x), linear(x))
    packed(x).square().sum().backward()  # autograd: F.linear on the unpacked weight
    linear(x).square().sum().backward()
    torch.testing.assert_close(packed.state_dict(keep_vars=True)["weight"], linear.weight)
    torch.testing.assert_close(packed.bias.grad, linear.bias.grad)
    torch.testing.assert_close(packed.weight.grad.transpose(1, 2).reshape(32, 24), linear.weight.grad)


def test_loads_nn_linear_state_dicts_and_converts_back_exactly() -> None:
    source = nn.Linear(8, 16)
    packed = PackedLinear(8, 16)
    packed.load_state_dict(source.state_dict())
    back = packed.to_linear()
    assert torch.equal(back.weight, source.weight) and torch.equal(back.bias, source.bias)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        packed.load_state_dict(nn.Linear(8, 32).state_dict())
    with pytest.raises(ValueError, match="multiple of 16"):
        PackedLinear(8, 20)


def test_pack_and_unpack_linears_swap_in_place() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 10)))
    before = copy.deepcopy(model.state_dict())
    assert pack_linears(model) == 2  # 10 outputs are not panels: that layer stays nn.Linear
    assert [type(m).__name__ for m in (model[0], model[2][0], model[2][1])] == [
        "PackedLinear",
        "PackedLinear",
        "Linear",
    ]
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert unpack_linears(model) == 2 and type(model[0]) is nn.Linear
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_a_frozen_weight_stays_frozen() -> None:
    linear = nn.Linear(4, 16)
    linear.weight.requires_grad_(False)
    packed = PackedLinear.from_linear(linear)
    assert not packed.weight.requires_grad and packed.bias.requires_grad
    assert not packed.to_linear().weight.requires_grad
    x = torch.randn(2, 4)
    torch.testing.assert_close(F.linear(x, packed.to_linear().weight, packed.bias), linear(x))


def test_packed_embedding_is_nn_embeddings_table() -> None:
    """Lookups, state dict and gradients as nn.Embedding (a vocabulary that is not a multiple of 16)."""
    torch.manual_seed(0)
    embedding = nn.Embedding(37, 8, padding_idx=0)
    packed = PackedEmbedding.from_embedding(embedding)
    assert packed.weight.shape == (3, 8, 16) and torch.equal(packed.weight[2, :, 5:], torch.zeros(8, 11))
    ids = torch.tensor([[0, 5, 36], [16, 17, 31]])
    with torch.no_grad():
        assert torch.equal(packed(ids), embedding(ids))
    packed(ids).sum().backward()
    embedding(ids).sum().backward()
    assert torch.equal(packed.table(), embedding.weight)
    grad = packed.weight.grad.transpose(1, 2).reshape(48, 8)[:37]
    assert torch.equal(grad, embedding.weight.grad) and not grad[0].any()  # the padding row: no gradient
    sd = packed.state_dict()
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], embedding.weight)
    fresh = PackedEmbedding(37, 8, padding_idx=0)
    fresh.load_state_dict(embedding.state_dict())
    assert torch.equal(fresh.to_embedding().weight, embedding.weight)
