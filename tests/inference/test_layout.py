"""The decoder's weight layout: packed where the machine runs it, the same checkpoints and (up to rounding)
the same outputs as plain, clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import mplug_fast
from mplug_fast.checkpoint import save_pretrained
from mplug_fast.cli import main
from mplug_fast.inference import layout
from mplug_fast.inference.layout import pack_decoder, resolve_layout, unpack_decoder
from mplug_fast.inference.precision import quantize_decoder
from mplug_fast.modeling.packed_embedding import PackedEmbedding
from mplug_fast.modeling.packed_linear import PackedLinear


def _packed_layers(model) -> int:
    return sum(type(m) is PackedLinear for m in model.decoder.modules())


def test_auto_follows_the_machine_and_the_model(models, monkeypatch) -> None:
    caption = models["caption"]
    monkeypatch.setattr(layout, "packed_available", lambda: None)
    assert resolve_layout("auto", caption) == "packed"
    assert resolve_layout("auto", copy.deepcopy(caption).to(torch.bfloat16)) == "plain"
    assert resolve_layout("auto", models["retrieval"]) == "plain"  # no decoder
    monkeypatch.setattr(layout, "packed_available", lambda: "the native ops are not built")
    assert resolve_layout("auto", caption) == "plain"
    assert "plain (the native ops are not built)" == layout.describe_cpu_layout()
    assert resolve_layout("packed", caption) == "packed"  # forced: runs, through F.linear if need be
    with pytest.raises(ValueError, match="CPU float32 models; this decoder is torch.bfloat16 on cpu"):
        resolve_layout("packed", copy.deepcopy(caption).to(torch.bfloat16))
    with pytest.raises(ValueError, match="MPlugForRetrieval has no text decoder"):
        resolve_layout("packed", models["retrieval"])
    with pytest.raises(ValueError, match="layout must be one of auto, packed, plain, got 'panels'"):
        resolve_layout("panels", caption)


def test_packed_model_keeps_its_checkpoint_and_logits(models, tmp_path) -> None:
    plain = models["caption"]
    packed = pack_decoder(copy.deepcopy(plain))
    assert _packed_layers(packed) == 7 * len(plain.decoder.layers)  # 6 per step, and the memory K/V
    assert type(packed.decoder.embeddings.word) is PackedEmbedding  # the LM head's tied weight
    sd, packed_sd = plain.state_dict(), packed.state_dict()
    assert list(sd) == list(packed_sd) and all(torch.equal(sd[k], packed_sd[k]) for k in sd)
    save_pretrained(packed, tmp_path / "packed")  # loads as a plain model with the same weights
    loaded = mplug_fast.pipeline("caption", tmp_path / "packed", layout="plain").model
    assert _packed_layers(loaded) == 0
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    ids = torch.randint(1000, 2000, (3, 7))
    memory = torch.randn(3, 11, plain.config.text.hidden_size)
    with torch.no_grad():
        want, got = plain.decoder(ids, memory=memory), packed.decoder(ids, memory=memory)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (
        _packed_layers(unpack_decoder(packed)) == 0 and type(packed.decoder.embeddings.word) is nn.Embedding
    )
    assert all(torch.equal(packed.state_dict()[k], sd[k]) for k in sd)


def test_pipeline_and_cli_take_the_layout(models, tmp_path, capsys) -> None:
    save_pretrained(models["caption"], tmp_path / "caption")
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    options = dict(beam_size=2, max_length=4, min_length=1)
    packed = mplug_fast.pipeline("caption", tmp_path / "caption", layout="packed", **options)
    plain = mplug_fast.pipeline("caption", tmp_path / "caption", layout="plain", **options)
    assert _packed_layers(packed.model) > 0 and _packed_layers(plain.model) == 0
    assert packed.caption(image) == plain.caption(image)  # peaked test decoder: rounding flips no token
    int8 = mplug_fast.pipeline("caption", tmp_path / "caption", quantize="int8", **options)
    assert _packed_layers(int8.model) == 0
    with pytest.raises(ValueError, match="exclude each other"):
        mplug_fast.pipeline("caption", tmp_path / "caption", quantize="int8", layout="packed")
    with pytest.raises(ValueError, match="layout must be one of"):
        mplug_fast.pipeline("caption", tmp_path / "caption", layout="panels")
    with pytest.raises(SystemExit):
        main(["predict", "caption", "x.png", "--checkpoint", str(tmp_path / "caption"), "--layout", "panels"])
    assert "invalid choice: 'panels'" in capsys.readouterr().err


def test_quantizing_a_packed_decoder_unpacks_it_first(models) -> None:
    packed = pack_decoder(copy.deepcopy(models["caption"]))
    q8 = quantize_decoder(packed)
    assert _packed_layers(q8) == 0 and type(q8.decoder.embeddings.word) is nn.Embedding
    assert any("quantized" in type(m).__module__ for m in q8.decoder.modules())
