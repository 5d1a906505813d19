"""Momentum (EMA) copies (`MomentumCopies`) and their update p_m <- m * p_m + (1 - m) * p (`momentum_update`).

Whoever trains with momentum distillation owns the copies: the pretraining and retrieval models keep theirs
as ``model.momentum`` (where the official checkpoints store the ``_m`` weights), the VQA objective its own.
The update is one `torch._foreach_lerp_` over all pairs (p_m + (1 - m) (p - p_m)), where the official
`_momentum_update` loops over them in Python (docs/fidelity.md §9).
"""

from __future__ import annotations

import copy
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


class MomentumCopies(nn.ModuleDict):
    """Frozen EMA copies of the components ``names`` of ``online`` (a module read by attribute), keyed by
    name, so their state-dict keys are ``<name>.*`` under wherever the holder puts them.

    Args:
        online: the module whose components are copied.
        names: the components (attributes of ``online``) to copy; each must exist.
    """

    def __init__(self, online: nn.Module, names: Iterable[str]):
        missing = [n for n in names if getattr(online, n, None) is None]
        if missing:
            raise ValueError(f"no component {missing} to copy for momentum distillation")
        super().__init__({n: copy.deepcopy(getattr(online, n)) for n in names})
        self.requires_grad_(False)

    @torch.no_grad()
    def reset(self, online: Mapping[str, nn.Module] | nn.Module) -> None:
        """Every copy set to the online weights (after loading weights into the online model)."""
        src, dst = parameter_pairs(online, self)
        if dst:
            torch._foreach_copy_(dst, src)
