"""The text decoder's weight layout for inference, chosen from the machine.

`layout="auto"` (the default of `mplug_fast.pipeline` and `mplug-fast predict`) is decided once, when the
model is loaded:

    packed  the decoder layers' linear weights stored as panels (`PackedLinear`), which the native
            `packed_linear` op streams faster than nn.Linear's layout during decoding: chosen on a CPU
            float32 model where `small_linear` runs (AVX2 CPUs) and the native ops are built
    plain   nn.Linear's layout everywhere else (GPU, bf16, int8, no `_C`)

The layout changes the logits by rounding only (another summation order); `state_dict()` is unchanged, so a
packed model saves and loads the same checkpoints. `layout="packed"` forces it on a CPU float32 model
(ValueError elsewhere), `"plain"` turns it off. The LM head's weight, the decoder's word-embedding table,
is packed with it (`PackedEmbedding`: the lookup reads a token's vector across its panel).
"""

from __future__ import annotations

import torch
from torch import nn

from mplug_fast.modeling.decoder import TextDecoder
from mplug_fast.modeling.layers import set_fused_backend
from mplug_fast.modeling.packed_embedding import PackedEmbedding
from mplug_fast.modeling.packed_linear import pack_linears, unpack_linears
from mplug_fast.ops import small_linear
from mplug_fast.ops.native import native_op

LAYOUTS = ("auto", "packed", "plain")


def packed_available() -> str | None:
    """Why the packed layout is not chosen on this CPU (None: it is); see the module docstring."""
    if native_op("packed_linear", "cpu") is None:
        return "the native ops are not built"
    if not small_linear.enabled():
        return f"the decoding kernels are off here ({torch.backends.cpu.get_cpu_capability()} CPU)"
    return None


def resolve_layout(layout: str, model: nn.Module) -> str:
    """ "packed" or "plain" for `model` where it is now (the device and dtype of its decoder; "plain" when
    it has none); ValueError for an unknown layout, or "packed" on a model without a decoder or off CPU
    float32."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "packed" and not isinstance(model, TextDecoder) and getattr(model, "decoder", None) is None:
        return "plain"
    param = next(_decoder(model).parameters())
    cpu_fp32 = param.device.type == "cpu" and param.dtype == torch.float32
    if layout == "packed" and not cpu_fp32:
        raise ValueError(
            f"the packed decoder layout runs on CPU float32 models; this decoder is {param.dtype} on "
            f"{param.device.type}"
        )
    if layout == "auto":
        return "packed" if cpu_fp32 and packed_available() is None else "plain"
    return layout


def _decoder(model: nn.Module) -> nn.Module:
    if isinstance(model, TextDecoder):
        return model
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no text decoder")
    return decoder


def pack_decoder(model: nn.Module) -> nn.Module:
    """The decoder layers' linear layers of `model` (a model with a `decoder`, or a `TextDecoder`) as
    `PackedLinear`, and its word embeddings (the LM head's tied weight) as `PackedEmbedding`, in place;
    returns `model`. The layers keep the plain (`reference`) epilogues: the fused ones read nn.Linear's
    weight."""
    decoder = _decoder(model)
    set_fused_backend(decoder.layers, "reference")
    pack_linears(decoder.layers)
    word = decoder.embeddings.word
    if type(word) is nn.Embedding:
        decoder.embeddings.word = PackedEmbedding.from_embedding(word)
    return model


def unpack_decoder(model: nn.Module) -> nn.Module:
    """Undo `pack_decoder` (nn.Linear layers again, the same values), in place; returns `model`."""
    decoder = _decoder(model)
    unpack_linears(decoder)
    if type(decoder.embeddings.word) is PackedEmbedding:
        decoder.embeddings.word = decoder.embeddings.word.to_embedding()
    return model


def describe_cpu_layout() -> str:
    """One line for `mplug-fast info`: the decoder layout `layout="auto"` picks for CPU float32 models."""
    why = packed_available()
    return "packed panels" if why is None else f"plain ({why})"
