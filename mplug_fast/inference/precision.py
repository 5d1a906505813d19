"""The inference precision chosen from the machine, and the opt-in int8 decoder for CPU serving.

`dtype="auto"` (the default of `mplug_fast.pipeline` and `mplug-fast predict`) is decided once, when the
model is loaded:

    cpu   bfloat16 where the CPU computes bf16 natively (AVX-512 BF16 or AMX tiles), float32 elsewhere:
          on an AVX2-only CPU bf16 matmuls are emulated and run slower than fp32
    cuda  the checkpoint's dtype (unchanged)

`MPLUG_FAST_CPU_DTYPE=float32|bfloat16` forces the CPU choice (the test suite sets float32, so that its
results do not depend on the machine). `mplug-fast info` prints what this machine gets.

`quantize_decoder(model)`: int8 dynamic quantisation (`torch.ao.quantization.quantize_dynamic`, int8 weights,
activations quantised per call) of the text decoder's linear layers and its LM head, for CPU serving. It is
never applied by default: it changes the logits (docs/experiments.md measures how often the generated tokens
change).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.inference.layout import unpack_decoder
from mplug_fast.modeling.heads import LMHead
from mplug_fast.modeling.layers import set_fused_backend

CPU_DTYPE_ENV = "MPLUG_FAST_CPU_DTYPE"
_CPU_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cpu_native_bf16() -> str | None:
    """The CPU feature that computes bf16 natively ("AMX" or "AVX-512 BF16"), or None."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


def auto_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype `dtype="auto"` loads a model in on `device` (None: keep the checkpoint's); see the module
    docstring. Raises ValueError for an unknown `MPLUG_FAST_CPU_DTYPE`."""
    if torch.device(device).type != "cpu":
        return None
    forced = os.environ.get(CPU_DTYPE_ENV)
    if forced:
        if forced not in _CPU_DTYPES:
            raise ValueError(f"{CPU_DTYPE_ENV}={forced!r} is not one of {', '.join(_CPU_DTYPES)}")
        return _CPU_DTYPES[forced]
    return torch.bfloat16 if cpu_native_bf16() is not None else torch.float32


def describe_cpu_precision() -> str:
    """One line for `mplug-fast info`: the CPU's vector capability and what `dtype="auto"` picks on it."""
    feature = cpu_native_bf16()
    native = f"native bf16 ({feature})" if feature else "no native bf16"
    forced = os.environ.get(CPU_DTYPE_ENV)
    chosen = str(auto_dtype("cpu")).removeprefix("torch.")
    why = f"forced by {CPU_DTYPE_ENV}" if forced else "auto"
    return f"{torch.backends.cpu.get_cpu_capability()}, {native} -> inference dtype on cpu: {chosen} ({why})"


class QuantizedLMHead(nn.Module):
    """`LMHead` with its vocabulary projection (the tied word embeddings) as an int8 dynamic linear layer.

    The float `dense` / `norm` are quantised by `quantize_dynamic` like the rest; `forward` ignores the
    word-embedding matrix it is passed (the int8 copy is taken at construction)."""

    def __init__(self, head: LMHead, word_embeddings: Tensor):
        super().__init__()
        self.dense, self.norm = head.dense, head.norm
        vocab = nn.Linear(word_embeddings.shape[1], word_embeddings.shape[0])
        with torch.no_grad():
            vocab.weight.copy_(word_embeddings)
            vocab.bias.copy_(head.bias)
        self.vocab = vocab

    def forward(self, h: Tensor, word_embeddings: Tensor | None = None) -> Tensor:
        """h: [..., D] -> logits [..., V]."""
        return self.vocab(self.norm(F.gelu(self.dense(h))))


def quantize_decoder(model: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of `model.decoder` (its linear layers and LM head), in place; returns
    `model`. CPU and float32 only (ValueError otherwise); the model is for inference only afterwards."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no text decoder to quantise")
    param = next(decoder.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(
            f"int8 decoder quantisation runs on CPU float32 models; this decoder is {param.dtype} on "
            f"{param.device.type}"
        )
    unpack_decoder(decoder)  # quantize_dynamic swaps nn.Linear layers only
    decoder.head = QuantizedLMHead(decoder.head, decoder.embeddings.word.weight.detach())
    set_fused_backend(decoder, "reference")  # the fused epilogues read float weights
    with warnings.catch_warnings():  # torch marks the eager quantisation API as deprecated
        warnings.simplefilter("ignore")
        model.decoder = torch.ao.quantization.quantize_dynamic(decoder.eval(), {nn.Linear}, dtype=torch.qint8)
    return model.eval()
