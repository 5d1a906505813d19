"""`PackedLinear`: a linear layer whose weight is stored as panels, for CPU decoding.

The same layer as `nn.Linear(in_features, out_features)` with its weight held as panels [N/16, K, 16]
(`mplug_fast.ops.packed_linear.pack`), the layout the native `packed_linear` op streams fastest. It is a
storage layout, not another model:

* `state_dict()` holds `weight` [N, K] and `bias` [N] exactly as `nn.Linear` (checkpoints, `save_pretrained`
  and the official key map see no difference), and `load_state_dict` takes nn.Linear's tensors;
* without autograd on fp32 CPU tensors it runs the native op; anywhere else (autograd, another dtype or
  device, no `_C`) `F.linear` on the unpacked weight, with gradients reaching the panels;
* `pack_linears(module)` swaps a module's `nn.Linear` layers for it (those with N a multiple of 16), and
  `unpack_linears(module)` swaps them back; both are exact (a permutation of the same floats).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mplug_fast.ops.packed_linear import PANEL, pack, packed_linear, unpack


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight as panels: weight [out/16, in, 16], bias [out] or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if out_features % PANEL:
            raise ValueError(f"PackedLinear: out_features must be a multiple of {PANEL}, got {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // PANEL, in_features, PANEL))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """The packed twin of `linear` (same device, dtype and values; `requires_grad` kept)."""
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, linear.bias is not None).to(w.device, w.dtype)
        with torch.no_grad():
            out.weight = nn.Parameter(pack(w.detach()), requires_grad=w.requires_grad)
            if linear.bias is not None:
                out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return out.train(linear.training)

    def to_linear(self) -> nn.Linear:
        """The `nn.Linear` with the same weight and bias."""
        w = self.weight
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, w.device, w.dtype)
        with torch.no_grad():
            out.weight = nn.Parameter(unpack(w.detach()), requires_grad=w.requires_grad)
            if self.bias is not None:
                out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return out.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out]."""
        return packed_linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # nn.Linear's entries: the weight unpacked to [out, in] (new; autograd-linked with keep_vars).
        weight = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "weight"] = unpack(weight)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        pack_loaded(state_dict, prefix + "weight", (self.out_features, self.in_features), pack)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, panel={PANEL}"


def pack_loaded(
    state_dict: dict, key: str, plain: tuple[int, int], to_panels: Callable[[Tensor], Tensor]
) -> None:
    """Before a packed module loads `state_dict`: its entry `key`, when in the plain layout `plain`
    (nn.Linear's [out, in], nn.Embedding's [V, D]), becomes `to_panels(entry)`, in place; other shapes are
    left for the usual size-mismatch error. (`load_state_dict` hands the modules its own copy of the
    dict.)"""
    weight = state_dict.get(key)
    if isinstance(weight, Tensor) and tuple(weight.shape) == plain:
        state_dict[key] = to_panels(weight)


def pack_linears(module: nn.Module) -> int:
    """Replace every `nn.Linear` under `module` (itself excluded) whose out_features is a multiple of 16
    with its `PackedLinear`, in place; returns how many were replaced."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Linear and child.out_features % PANEL == 0:
                parent._modules[name] = PackedLinear.from_linear(child)
                count += 1
    return count


def unpack_linears(module: nn.Module) -> int:
    """Replace every `PackedLinear` under `module` with its `nn.Linear`, in place; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is PackedLinear:
                parent._modules[name] = child.to_linear()
                count += 1
    return count
