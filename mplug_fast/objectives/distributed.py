"""All-gather helpers for the objectives: identity when torch.distributed is not initialised.

ITC keys and ITM hard negatives are taken over the *global* batch (every rank's samples), so a run on W
ranks with B samples each computes the same losses as one process with the W * B batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def all_gather(x: Tensor) -> Tensor:
    """x: [B, ...] on every rank (same shape) -> [W * B, ...] in rank order, without gradient."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends each rank the sum over ranks of the gradient of its slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rank, ctx.batch = world()[0], x.shape[0]
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """x: [B, ...] -> [W * B, ...]; gradients flow back to the rank that owns each slice.

    With DDP's gradient averaging, the parameter gradients then equal those of one process holding the
    global batch (each rank's loss is its local mean, DDP divides the sum by W).
    """
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_padded(x: Tensor, length: int, fill: float | int | bool, with_grad: bool) -> Tensor:
    """Gather [B, L, ...] tensors whose L may differ per rank: pad dim 1 to the global `length` first."""
    if x.shape[1] < length:
        pad_shape = (x.shape[0], length - x.shape[1], *x.shape[2:])
        x = torch.cat([x, x.new_full(pad_shape, fill)], dim=1)
    return all_gather_with_grad(x) if with_grad else all_gather(x)


def global_max(value: int) -> int:
    """The maximum of an int over ranks."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _device() -> torch.device:
    """The device collectives run on: CUDA for NCCL, CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
