"""Mixed precision (bf16 / fp16 autocast, fp32), the GradScaler, gradient clipping and checkpointing switch.

``Precision`` bundles what the loop needs:

    with precision.autocast():  loss = ...     bf16/fp16 autocast on the run's device (fp32: no-op)
    precision.backward(loss)                   loss (scaled for fp16) .backward()
    norm = precision.clip(optimizer, params, max_norm)   unscales (fp16), clips, returns the total norm
    precision.step(optimizer)                  optimizer.step (through the scaler for fp16: skipped on inf);
                                               returns whether the parameters moved

Gradient checkpointing: the modeling has no flag for it, so ``enable_gradient_checkpointing`` wraps the
``forward`` of every transformer layer (the elements of ``nn.ModuleList``s named ``blocks`` / ``layers``) in
``torch.utils.checkpoint`` from the outside, without changing parameter names: the wrapper is an instance
attribute. It recomputes only when gradients are enabled (the momentum encoders and decoding run as usual).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_LIST_NAMES = ("blocks", "layers")


class Precision:
    """Autocast + loss scaling for ``dtype`` in {"fp32", "bf16", "fp16"} on ``device``."""

    def __init__(self, dtype: str = "fp32", device: torch.device | str = "cpu"):
        if dtype not in DTYPES:
            raise ValueError(f"precision {dtype!r} is unknown; use one of {list(DTYPES)}")
        self.name, self.dtype = dtype, DTYPES[dtype]
        self.device_type = torch.device(device).type
        # fp16 on the CPU works (CPU autocast + GradScaler("cpu")) but is slow: it is there for tests
        self.scaler = torch.amp.GradScaler(self.device_type) if dtype == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip(
        self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], max_norm: float | None
    ) -> Tensor:
        """Unscales the gradients (fp16), clips their global norm to ``max_norm`` (None: no clipping) and
        returns the global norm before clipping (inf/nan when a gradient is not finite)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        grads = [p for p in params if p.grad is not None]
        if max_norm is None:
            if not grads:
                return torch.zeros(())
            return torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in grads])
            )
        return torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()``; fp16: through the scaler, which skips the step when a gradient is not finite
        and halves the scale. Returns whether the parameters were updated."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # update() lowers the scale exactly when it skipped

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Recompute every transformer layer of ``module`` in the backward pass; returns the number of layers
    wrapped. Layers under a ``momentum`` module (the frozen momentum copies) are left alone."""
    count = 0
    for name, child in module.named_modules():
        parts = name.split(".")
        if not isinstance(child, nn.ModuleList) or parts[-1] not in LAYER_LIST_NAMES or "momentum" in parts:
            continue
        for layer in child:
            if "forward" not in layer.__dict__:
                layer.forward = functools.partial(_checkpointed, layer.forward)
                count += 1
    return count
