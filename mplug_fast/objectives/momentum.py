"""Momentum (EMA) encoders: p_m <- m * p_m + (1 - m) * p with one foreach call over all pairs.

The official `_momentum_update` loops over parameter pairs in Python (docs/fidelity.md §9); here the pairs are
gathered into two flat lists and updated by `torch._foreach_lerp_` (p_m + (1 - m) (p - p_m)), a
handful of fused multi-tensor kernels whatever the number of parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


def parameter_pairs(
    online: Mapping[str, nn.Module | None] | nn.Module, momentum: Mapping[str, nn.Module]
) -> tuple[list[Tensor], list[Tensor]]:
    """(online params, momentum params) of every momentum component, in matching order.

    `online` is the model (components read as attributes) or a name -> module mapping; `momentum` maps
    the same names to the EMA copies. Shapes must match pairwise.
    """
    src: list[Tensor] = []
    dst: list[Tensor] = []
    for name, module_m in momentum.items():
        module = online[name] if isinstance(online, Mapping) else getattr(online, name)
        if module is None:
            raise ValueError(f"momentum copy {name!r} has no online module")
        params, params_m = list(module.parameters()), list(module_m.parameters())
        if len(params) != len(params_m):
            raise ValueError(f"{name!r}: {len(params)} online vs {len(params_m)} momentum parameters")
        for p, p_m in zip(params, params_m, strict=True):
            if p.shape != p_m.shape:
                raise ValueError(f"{name!r}: online {list(p.shape)} vs momentum {list(p_m.shape)}")
        src += params
        dst += params_m
    return src, dst


@torch.no_grad()
def momentum_update(online: Iterable[Tensor], momentum: Iterable[Tensor], decay: float) -> None:
    """In place: momentum[i] = decay * momentum[i] + (1 - decay) * online[i] for every i (foreach ops)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"momentum decay must be in [0, 1], got {decay}")
    src, dst = [p.detach() for p in online], [p.detach() for p in momentum]
    if dst:
        torch._foreach_lerp_(dst, src, 1.0 - decay)


def check_frozen(momentum: Mapping[str, nn.Module]) -> None:
    """Momentum copies never get gradients (the optimizer must not see them)."""
    bad = [f"{n}.{k}" for n, m in momentum.items() for k, p in m.named_parameters() if p.requires_grad]
    if bad:
        raise ValueError(f"momentum parameters must have requires_grad=False, got it on {bad[:5]}...")
