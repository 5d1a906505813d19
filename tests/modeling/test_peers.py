"""Peer oracles: our text encoder, decoder and ViT against transformers' `BertModel`, `BertLMHeadModel`
and `CLIPVisionModel` given the same weights (loaded through `mplug_fast.checkpoint.init`).

Everything in fp32, eval mode, small random configs, weights drawn from N(0, 0.2) for every tensor
(biases included; LayerNorm weights from N(1, 0.2)) so that a wrong mapping or a wrong formula shows.
transformers is a test-only dependency. Run with `-s` to see the measured max differences.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from mplug_fast.checkpoint.init import (
    init_from_public_weights,
    load_bert_weights,
    load_clip_visual,
    vision_config_from_clip,
)
from mplug_fast.checkpoint.io import CheckpointError
from mplug_fast.config import DecoderConfig, FusionConfig, MPlugConfig, TextConfig, VisionConfig
from mplug_fast.modeling import MPlug, MPlugForCaption, MPlugForPretraining
from mplug_fast.modeling.vision import VisionTransformer, resize_pos_embed

transformers = pytest.importorskip("transformers")

# fp32 peers (same formulas, another op order). Hidden states: max |ours - ref| <= ATOL. Logits: the
# bound scales with max |logits| (ATOL * max(1, scale)): the peaky attention of these weights amplifies
# fp32 rounding, up to 9e-6 was measured at logit scale 4.6 with other inputs (print the numbers with -s).
ATOL = 1e-5
D, HEADS, INTERMEDIATE, VOCAB, MAX_POS = 64, 4, 128, 99, 32


# --------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def _randomize(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Every parameter ~ N(0, std), LayerNorm weights ~ N(1, std) so that the states keep unit scale and
    the attention is far from uniform (a q/k swap must show); tied parameters are drawn once. Eval mode."""
    for p in module.parameters():
        p.normal_(0.0, std)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.normal_(1.0, std)
    return module.eval()


def _bert_config(layers: int, **kwargs) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        attn_implementation="eager",
        **kwargs,
    )


def _config(text_layers: int = 1, fusion_layers: int = 1, decoder_layers: int = 1) -> MPlugConfig:
    return MPlugConfig(
        vision=VisionConfig(width=D, layers=1, heads=HEADS, patch_size=8, image_size=16),
        text=TextConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            encoder_layers=text_layers,
        ),
        fusion=FusionConfig(layers=fusion_layers, stride=3),
        decoder=DecoderConfig(layers=decoder_layers),
    )


class _TextEncoderOnly(MPlug):
    """A model with a text encoder and nothing else BERT-like (the loader skips absent components)."""

    task = "text_encoder_only"
    components = ("text_encoder",)


def _max_diff(a: Tensor, b: Tensor, valid: Tensor | None = None) -> float:
    diff = (a - b).abs()
    return (diff[valid.bool()] if valid is not None else diff).max().item()


def _check_close(
    what: str, ours: Tensor, ref: Tensor, valid: Tensor | None = None, *, relative: bool = False
) -> None:
    """Assert the peer bound on the valid positions (bool/0-1 [B, L]); print the measured numbers."""
    diff = _max_diff(ours, ref, valid)
    scale = (ref[valid.bool()] if valid is not None else ref).abs().max().item()
    tol = ATOL * max(1.0, scale) if relative else ATOL
    print(f"\n{what}: max |diff| = {diff:.2e}, max |ref| = {scale:.2f}, bound {tol:.1e}")
    assert diff <= tol, f"{what}: max |diff| {diff:.2e} > {tol:.1e} (max |ref| {scale:.2f})"


def _qkv(sd: dict[str, Tensor], prefix: str, param: str = "weight") -> Tensor:
    """HF BERT q, k, v of one attention block, concatenated as our fused `qkv` (written out by hand)."""
    return torch.cat([sd[f"{prefix}.{n}.{param}"] for n in ("query", "key", "value")])


# --------------------------------------------------------------------------------------------- BERT
def test_text_encoder_equals_hf_bert_model() -> None:
    hf = _randomize(transformers.BertModel(_bert_config(3)))
    model = _TextEncoderOnly(_config(text_layers=3))
    model.init_weights()
    report = load_bert_weights(model, hf.state_dict())
    model.eval()
    assert report.missing == [] and report.unexpected == []
    assert "pooler.dense.weight" in report.ignored

    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    _check_close("text encoder vs BertModel", ours, ref, mask)


def test_decoder_equals_hf_bert_lm_head_model() -> None:
    hf = _randomize(transformers.BertLMHeadModel(_bert_config(2, is_decoder=True, add_cross_attention=True)))
    model = MPlugForCaption(_config(decoder_layers=2))
    model.init_weights()
    report = load_bert_weights(model, hf.state_dict(), include_cross_attention=True)
    model.eval()
    assert report.missing == [] and report.unexpected == []
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= set(report.ignored)

    B, L, M = 3, 6, 7
    ids = torch.randint(1, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0  # right padding: causal attention hides it from the real tokens anyway
    mask[2, :2] = 0  # left padding: the real tokens must skip it (query 0 of this row sees no key)
    memory = torch.randn(B, M, D)
    memory_mask = torch.ones(B, M, dtype=torch.long)
    memory_mask[0, 5:] = 0
    memory_mask[2, 3:] = 0
    with torch.no_grad():
        ours = model.decode(ids, mask, memory, memory_mask)
        ref = hf(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
        ).logits
    _check_close("decoder logits vs BertLMHeadModel", ours, ref, mask, relative=True)


def test_bert_split_into_text_fusion_decoder() -> None:
    """12-layer BERT -> 6 text + 6 fusion layers (BERT 6..11), 12 decoder layers (BERT 0..11) + MLM heads."""
    hf = _randomize(transformers.BertForPreTraining(_bert_config(12)))
    sd = hf.state_dict()
    model = MPlugForPretraining(_config(text_layers=6, fusion_layers=6, decoder_layers=12))
    model.init_weights()
    cross_before = {
        k: v.clone() for k, v in model.state_dict().items() if ".cross." in k or "norm_cross" in k
    }
    report = load_bert_weights(model, sd)
    after = model.state_dict()

    for i, layer in enumerate(model.text_encoder.layers):
        assert torch.equal(layer.attn.qkv.weight, _qkv(sd, f"bert.encoder.layer.{i}.attention.self"))
    for j, layer in enumerate(model.fusion.layers):
        bert = f"bert.encoder.layer.{6 + j}"
        assert torch.equal(layer.attn.qkv.weight, _qkv(sd, f"{bert}.attention.self"))
        assert torch.equal(layer.mlp.fc2.bias, sd[f"{bert}.output.dense.bias"])
        assert torch.equal(layer.norm_mlp.weight, sd[f"{bert}.output.LayerNorm.weight"])
    assert [layer.cross is None for layer in model.fusion.layers] == [False] * 3 + [True] + [False] * 2
    for i, layer in enumerate(model.decoder.layers):
        assert torch.equal(layer.attn.qkv.bias, _qkv(sd, f"bert.encoder.layer.{i}.attention.self", "bias"))
    word = sd["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(model.text_encoder.embeddings.word.weight, word)
    assert torch.equal(model.decoder.embeddings.word.weight, word)
    for head in (model.decoder.head, model.mlm_head):
        assert torch.equal(head.dense.weight, sd["cls.predictions.transform.dense.weight"])
        assert torch.equal(head.norm.bias, sd["cls.predictions.transform.LayerNorm.bias"])
        assert torch.equal(head.bias, sd["cls.predictions.bias"])
    # cross-attention stays as initialised, and that is exactly what the report lists as missing
    assert all(torch.equal(after[k], v) for k, v in cross_before.items())
    assert sorted(report.missing) == sorted(k for k in cross_before if not k.startswith("momentum."))
    assert report.unexpected == []
    assert {"bert.pooler.dense.weight", "cls.seq_relationship.weight"} <= set(report.ignored)
    # the momentum copies follow the online weights
    for name in ("text_encoder", "fusion", "decoder"):
        online, momentum = getattr(model, name).state_dict(), model.momentum[name].state_dict()
        assert all(torch.equal(online[k], momentum[k]) for k in online)


def test_bert_legacy_gamma_beta_names_load() -> None:
    hf = _randomize(transformers.BertModel(_bert_config(2)))
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in hf.state_dict().items()
    }
    model = _TextEncoderOnly(_config(text_layers=2))
    model.init_weights()
    report = load_bert_weights(model, legacy)
    assert report.unexpected == []
    assert torch.equal(
        model.text_encoder.layers[1].norm_attn.weight,
        legacy["encoder.layer.1.attention.output.LayerNorm.gamma"],
    )


def test_bert_too_few_layers() -> None:
    hf = transformers.BertModel(_bert_config(4))
    model = MPlugForPretraining(_config(text_layers=3, fusion_layers=2, decoder_layers=2))
    with pytest.raises(CheckpointError, match="has 4 layers but the model needs 5"):
        load_bert_weights(model, hf.state_dict())


def test_bert_cross_attention_of_a_decoder_checkpoint_is_ignored_by_default(caplog) -> None:
    hf = transformers.BertLMHeadModel(_bert_config(1, is_decoder=True, add_cross_attention=True))
    model = MPlugForCaption(_config(decoder_layers=1))
    model.init_weights()
    with caplog.at_level(logging.WARNING):
        report = load_bert_weights(model, hf.state_dict())
    assert "include_cross_attention=True" in caplog.text
    assert "bert.encoder.layer.0.crossattention.self.query.weight" in report.ignored
    assert all(".cross." in k or "norm_cross" in k for k in report.missing) and report.missing


def test_bert_strict_errors_name_the_key() -> None:
    sd = transformers.BertModel(_bert_config(2)).state_dict()
    model = _TextEncoderOnly(_config(text_layers=2))
    model.init_weights()
    unknown = dict(sd, **{"encoder.layer.0.attention.self.rotary.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected[\s\S]*attention\.self\.rotary\.weight"):
        load_bert_weights(model, unknown)
    report = load_bert_weights(model, unknown, strict=False)
    assert report.unexpected == ["encoder.layer.0.attention.self.rotary.weight"]

    wrong = dict(sd, **{"encoder.layer.1.intermediate.dense.weight": torch.zeros(INTERMEDIATE + 1, D)})
    with pytest.raises(
        CheckpointError,
        match=r"text_encoder\.layers\.1\.mlp\.fc1\.weight \[128, 64\] <- "
        r"encoder\.layer\.1\.intermediate\.dense\.weight \[129, 64\]",
    ):
        load_bert_weights(model, wrong)
    with pytest.raises(CheckpointError, match="not a Hugging Face BERT"):
        load_bert_weights(model, {"foo.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------- CLIP
VISION_HF = dict(
    hidden_size=D,
    intermediate_size=4 * D,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
)


def _hf_vision() -> nn.Module:
    config = transformers.CLIPVisionConfig(**VISION_HF)
    config._attn_implementation = "eager"
    return _randomize(transformers.CLIPVisionModel(config), std=0.1)


def _hf_vision_state(hf: nn.Module) -> dict[str, Tensor]:
    """The tower's keys, unprefixed (transformers 5 flattens CLIPVisionModel; 4.x had `vision_model.`)."""
    return {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}


def _to_openai(hf_sd: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """HF CLIP vision keys -> the OpenAI `clip.load` layout, written out by hand (independent of keymap.py),
    plus a fake text tower, `visual.proj` and the JIT metadata that must all be ignored."""
    g = torch.Generator().manual_seed(3)
    sd = {
        "visual.conv1.weight": hf_sd["embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf_sd["embeddings.class_embedding"],
        "visual.positional_embedding": hf_sd["embeddings.position_embedding.weight"],
        "visual.proj": torch.randn(D, 16, generator=g),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            sd[f"visual.{ours}.{p}"] = hf_sd[f"{theirs}.{p}"]
    for i in range(layers):
        hf, oa = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            sd[oa + f"attn.in_proj_{p}"] = torch.cat([hf_sd[hf + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            for ours, theirs in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                sd[oa + f"{ours}.{p}"] = hf_sd[hf + f"{theirs}.{p}"]
    text = {  # a width-16 CLIP text tower with one block
        "positional_embedding": (8, 16),
        "token_embedding.weight": (50, 16),
        "transformer.resblocks.0.attn.in_proj_weight": (48, 16),
        "transformer.resblocks.0.mlp.c_fc.weight": (64, 16),
        "ln_final.weight": (16,),
        "text_projection": (16, 16),
        "logit_scale": (),
    }
    sd.update({k: torch.randn(shape, generator=g) for k, shape in text.items()})
    sd.update({"input_resolution": torch.tensor(32), "context_length": torch.tensor(8)})
    return sd


def _ours(image_size: int = 32) -> VisionTransformer:
    vision = VisionTransformer(
        VisionConfig(
            width=D, layers=2, heads=HEADS, patch_size=8, image_size=image_size, attention_dropout=0.0
        )
    )
    vision.init_weights()
    return vision


@pytest.mark.parametrize("layout", ["hf_vision", "hf_clip_model", "openai", "openai_visual"])
def test_vision_equals_hf_clip_vision_model(layout: str) -> None:
    hf = _hf_vision()
    hf_sd = _hf_vision_state(hf)
    if layout == "hf_vision":
        sd = hf_sd
    elif layout == "hf_clip_model":
        sd = {f"vision_model.{k}": v for k, v in hf_sd.items()}
        sd.update(
            {
                "text_model.embeddings.token_embedding.weight": torch.zeros(5, 8),
                "visual_projection.weight": torch.zeros(8, D),
                "text_projection.weight": torch.zeros(8, 8),
                "logit_scale": torch.tensor(2.0),
                "vision_model.embeddings.position_ids": torch.arange(17)[None],
            }
        )
    else:
        sd = _to_openai(hf_sd, VISION_HF["num_hidden_layers"])
        if layout == "openai_visual":
            sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    vision = _ours()
    report = load_clip_visual(vision, sd)
    vision.eval()
    assert report.missing == [] and report.unexpected == []
    if layout == "openai":
        assert {"visual.proj", "logit_scale", "transformer.resblocks.0.attn.in_proj_weight"} <= set(
            report.ignored
        )

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = vision(images)
        out = hf(pixel_values=images)
        ref = getattr(hf, "vision_model", hf).post_layernorm(out.last_hidden_state)  # HF: ln_post only pooled
    assert ours.shape == (2, 17, D)
    _check_close(f"ViT vs CLIPVisionModel ({layout})", ours, ref)


def test_vision_position_table_resized_to_the_model_grid(caplog) -> None:
    sd = _to_openai(_hf_vision_state(_hf_vision()), 2)
    stored = sd["visual.positional_embedding"]  # [17, D]: 4x4 grid
    vision = _ours(image_size=48)  # 6x6 grid
    with caplog.at_level(logging.INFO, logger="mplug_fast.checkpoint.init"):
        load_clip_visual(vision, sd)
    assert "from a 4x4 to a 6x6 grid" in caplog.text
    assert vision.pos_embed.shape == (37, D)
    assert torch.equal(vision.pos_embed[0], stored[0])  # the class row is kept
    torch.testing.assert_close(vision.pos_embed.detach(), resize_pos_embed(stored, 6))
    assert vision(torch.randn(1, 3, 48, 48)).shape == (1, 37, D)


def test_vision_config_from_clip() -> None:
    sd = _to_openai(_hf_vision_state(_hf_vision()), 2)
    config = vision_config_from_clip(sd)
    assert (config.width, config.layers, config.heads, config.patch_size, config.image_size) == (
        D,
        2,
        1,
        8,
        32,
    )
    assert config.mlp_ratio == 4.0
    assert vision_config_from_clip(_hf_vision_state(_hf_vision()), image_size=48).grid_size == 6


def test_vision_loads_into_a_meta_module() -> None:
    sd = _hf_vision_state(_hf_vision())
    with torch.device("meta"):
        vision = VisionTransformer(VisionConfig(width=D, layers=2, heads=HEADS, patch_size=8, image_size=32))
    load_clip_visual(vision, sd)
    assert not any(p.is_meta for p in vision.parameters())
    assert torch.equal(vision.cls_token, sd["embeddings.class_embedding"])


def test_vision_strict_errors_name_the_key() -> None:
    sd = _to_openai(_hf_vision_state(_hf_vision()), 2)
    with pytest.raises(CheckpointError, match=r"unexpected[\s\S]*visual\.foo"):
        load_clip_visual(_ours(), dict(sd, **{"visual.foo": torch.zeros(2)}))
    with pytest.raises(
        CheckpointError, match=r"patch_embed\.weight \[64, 3, 8, 8\] <- visual\.conv1\.weight \[64, 3, 4, 4\]"
    ):
        load_clip_visual(_ours(), dict(sd, **{"visual.conv1.weight": torch.zeros(D, 3, 4, 4)}))
    partial = {k: v for k, v in sd.items() if k != "visual.ln_post.weight"}
    with pytest.raises(CheckpointError, match=r"missing[\s\S]*norm_post\.weight"):
        load_clip_visual(_ours(), partial)
    assert load_clip_visual(_ours(), partial, strict=False).missing == ["norm_post.weight"]
    with pytest.raises(CheckpointError, match="not a CLIP state dict"):
        load_clip_visual(_ours(), {"foo.weight": torch.zeros(1)})


def test_init_from_public_weights_fills_the_momentum_copies() -> None:
    clip = _to_openai(_hf_vision_state(_hf_vision()), 2)
    bert = _randomize(transformers.BertForMaskedLM(_bert_config(2))).state_dict()
    config = _config(text_layers=1, fusion_layers=1, decoder_layers=2)
    config = config.replace(**{"vision.image_size": 32, "vision.layers": 2})
    model = MPlugForPretraining(config)
    model.init_weights()
    report = init_from_public_weights(model, clip, bert)
    assert report.unexpected == [] and all(".cross." in k or "norm_cross" in k for k in report.missing)
    assert torch.equal(model.momentum["vision"].cls_token, clip["visual.class_embedding"])
    assert torch.equal(
        model.momentum["text_encoder"].embeddings.word.weight, bert["bert.embeddings.word_embeddings.weight"]
    )
