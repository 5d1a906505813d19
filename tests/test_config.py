"""MPlugConfig: presets, strict (de)serialisation, validation messages, dotted overrides, official configs.

Oracles: the numbers of docs/fidelity.md §1.1-§1.6 (ViT variants, layer splits, strides, token counts) and
the fusion rule of §1.4 (layer j is connected iff j != 0 and j % S == 0), written out here independently.
"""

import dataclasses
import json
import re

import pytest

from mplug_fast.config import (
    PRESETS,
    ConfigError,
    DecoderConfig,
    FusionConfig,
    MPlugConfig,
    TextConfig,
    VisionConfig,
    base,
    check_overrides,
    get_config,
    huge,
    large,
    micro,
    tiny,
)

A, C = "asymmetric", "connected"

# The official configs/config_bert.json (BERT-base + the mPLUG keys), docs/fidelity.md §1.6.
OFFICIAL_CONFIG_BERT = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30522,
    "encoder_width": 768,
    "add_cross_attention": False,
    "use_cache": False,
    "gradient_checkpointing": True,
    "text_encoder_layers": 6,
    "fusion_layers": 6,
    "text_decode_layers": 12,
    "stride_layer": 6,
}
# configs/config_bert_stride3.json differs in exactly two keys.
OFFICIAL_CONFIG_BERT_STRIDE3 = {**OFFICIAL_CONFIG_BERT, "gradient_checkpointing": False, "stride_layer": 3}


# ---- presets -----------------------------------------------------------------------------------------------


def test_every_preset_builds_and_get_config_finds_it():
    assert set(PRESETS) == {"micro", "tiny", "base", "large", "huge"}
    for name, factory in PRESETS.items():
        config = factory()
        assert isinstance(config, MPlugConfig)
        assert get_config(name) == config


def test_get_config_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'bse'.*base.*huge.*large.*micro.*tiny"):
        get_config("bse")


def test_get_config_applies_dotted_overrides():
    assert get_config("base", **{"fusion.stride": 6}).fusion.stride == 6


def test_base_preset_is_vit_b16_at_384_with_stride_3():
    config = base()
    v = config.vision
    assert (v.width, v.layers, v.heads, v.patch_size, v.image_size) == (768, 12, 12, 16, 384)
    assert v.grid_size == 24 and v.num_tokens == 577  # 24 * 24 + CLS
    assert (
        config.text.hidden_size == 768 and config.text.heads == 12 and config.text.intermediate_size == 3072
    )
    assert config.text.encoder_layers == 6
    assert (config.fusion.layers, config.fusion.stride) == (6, 3)
    assert config.decoder.layers == 12
    assert not config.has_adapter
    assert config.fusion.layer_types == (A, A, A, C, A, A)


def test_large_preset_is_vit_l14_at_336_with_adapter_and_stride_6():
    config = large()
    v = config.vision
    assert (v.width, v.layers, v.heads, v.patch_size, v.image_size) == (1024, 24, 16, 14, 336)
    assert v.num_tokens == 577  # 24 * 24 + CLS
    assert config.has_adapter  # 1024 -> 768
    assert config.text.encoder_layers == 6
    assert (config.fusion.layers, config.fusion.stride) == (6, 6)
    assert config.decoder.layers == 12
    assert config.fusion.layer_types == (A,) * 6


def test_huge_preset_is_large_with_24_text_layers():
    config = huge()
    assert config.text.encoder_layers == 24
    assert config.vision == large().vision
    assert config.fusion == large().fusion and config.decoder == large().decoder
    assert config.has_adapter


def test_tiny_preset_is_small_and_has_one_connected_layer():
    config = tiny()
    assert config.text.hidden_size == 256 and config.vision.width == 256 and not config.has_adapter
    assert config.vision.image_size == 64 and config.vision.num_tokens == 17  # 4 * 4 + CLS
    assert (
        config.text.encoder_layers
        == config.fusion.layers
        == config.decoder.layers
        == config.vision.layers
        == 4
    )
    assert config.fusion.layer_types == (A, A, A, C)


def test_micro_preset_is_the_demo_model_with_both_layer_types():
    """The model the demo and the CPU smoke configs train (it replaced a block of 15 overrides on tiny)."""
    config = micro()
    v, t = config.vision, config.text
    assert (v.width, v.layers, v.heads, v.patch_size, v.image_size, v.num_tokens) == (64, 1, 2, 4, 32, 65)
    assert (t.hidden_size, t.heads, t.intermediate_size, t.encoder_layers) == (64, 2, 256, 1)
    assert (v.attention_dropout, t.hidden_dropout, t.attention_dropout) == (0.0, 0.0, 0.0)
    assert config.fusion.layer_types == (A, C) and config.decoder.layers == 1 and config.embed_dim == 32
    assert config == tiny().replace(
        **{
            "vision.width": 64,
            "vision.layers": 1,
            "vision.heads": 2,
            "vision.patch_size": 4,
            "vision.image_size": 32,
            "vision.attention_dropout": 0.0,
            "text.hidden_size": 64,
            "text.heads": 2,
            "text.intermediate_size": 256,
            "text.encoder_layers": 1,
            "text.hidden_dropout": 0.0,
            "text.attention_dropout": 0.0,
            "fusion.layers": 2,
            "fusion.stride": 1,
            "decoder.layers": 1,
            "embed_dim": 32,
        }
    )


@pytest.mark.parametrize(
    "patch, image_size, tokens",
    [
        (16, 224, 197),
        (16, 256, 257),
        (16, 384, 577),
        (16, 480, 901),
        (14, 224, 257),
        (14, 336, 577),
        (14, 448, 1025),
    ],
)
def test_vision_token_counts_match_the_spec(patch, image_size, tokens):
    assert VisionConfig(patch_size=patch, image_size=image_size).num_tokens == tokens


# ---- fusion layer types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stride, expected",
    [
        (1, (A, C, C, C, C, C)),
        (2, (A, A, C, A, C, A)),
        (3, (A, A, A, C, A, A)),
        (4, (A, A, A, A, C, A)),
        (5, (A, A, A, A, A, C)),
        (6, (A, A, A, A, A, A)),
        (7, (A, A, A, A, A, A)),
    ],
)
def test_fusion_layer_types_follow_the_released_rule(stride, expected):
    fusion = FusionConfig(layers=6, stride=stride)
    assert fusion.layer_types == expected
    # The rule itself, written out independently: connected iff j != 0 and j % S == 0.
    assert fusion.layer_types == tuple(C if (j != 0 and j % stride == 0) else A for j in range(6))
    assert [fusion.is_connected(j) for j in range(6)] == [t == C for t in expected]


# ---- JSON / YAML round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip_text_and_path(name, tmp_path):
    config = PRESETS[name]()
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    assert MPlugConfig.from_json(text) == config
    path = tmp_path / "config.json"
    assert config.to_json(path) == text
    assert MPlugConfig.from_json(path) == config  # Path
    assert MPlugConfig.from_json(str(path)) == config  # str path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip_text_and_path(name, tmp_path):
    pytest.importorskip("yaml")
    config = PRESETS[name]()
    text = config.to_yaml()
    assert MPlugConfig.from_yaml(text) == config
    path = tmp_path / "config.yaml"
    assert config.to_yaml(path) == text
    assert MPlugConfig.from_yaml(path) == config
    assert MPlugConfig.from_yaml(str(path)) == config


def test_round_trip_keeps_non_default_values():
    config = base().replace(
        **{
            "attention_backend": "sdpa",
            "fusion.stride": 2,
            "text.layer_norm_eps": 1e-6,
            "vision.image_size": 256,
            "embed_dim": 128,
        }
    )
    assert MPlugConfig.from_json(config.to_json()) == config
    pytest.importorskip("yaml")
    assert MPlugConfig.from_yaml(config.to_yaml()) == config


def test_from_dict_accepts_partial_sections_with_defaults():
    config = MPlugConfig.from_dict({"fusion": {"stride": 6}})
    assert config == dataclasses.replace(MPlugConfig(), fusion=FusionConfig(stride=6))


def test_from_dict_accepts_ints_for_float_fields():
    config = MPlugConfig.from_dict({"vision": {"mlp_ratio": 4}})
    assert config.vision.mlp_ratio == 4.0 and isinstance(config.vision.mlp_ratio, float)


@pytest.mark.parametrize("loader", ["from_json", "from_yaml"])
def test_missing_config_file_is_a_file_not_found_error(loader, tmp_path):
    """A str naming a missing .json/.yaml file is not parsed as config text."""
    with pytest.raises(FileNotFoundError, match="missing"):
        getattr(MPlugConfig, loader)(str(tmp_path / f"missing.{loader[5:]}"))
    with pytest.raises(FileNotFoundError, match="missing"):
        getattr(MPlugConfig, loader)(tmp_path / f"missing.{loader[5:]}")


# ---- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"visoin": {}}, r"unknown key 'visoin'; valid keys of the config: \[.*'vision'"),
        ({"vision": {"widht": 768}}, r"unknown key 'vision\.widht'; valid keys of vision: \[.*'width'"),
        ({"fusion": {"strid": 3, "layrs": 2}}, r"unknown keys \['fusion\.strid', 'fusion\.layrs'\].*stride"),
        ({"vision": {"width": "768"}}, r"vision\.width must be an integer, got str '768'"),
        ({"vision": {"width": 768.0}}, r"vision\.width must be an integer, got float 768\.0"),
        ({"fusion": {"stride": True}}, r"fusion\.stride must be an integer, got bool True"),
        ({"text": {"layer_norm_eps": "small"}}, r"text\.layer_norm_eps must be a number, got str 'small'"),
        ({"text": {"layer_norm_eps": [1e-12]}}, r"text\.layer_norm_eps must be a number, got list"),
        ({"decoder": {"layers": None}}, r"decoder\.layers may not be null"),
        ({"embed_dim": 1.5}, r"embed_dim must be an integer"),
        ({"attention_backend": 3}, r"attention_backend must be a string, got int 3"),
        ({"vision": 5}, r"vision must be a mapping, got int 5"),
        (
            {"vision": {"image_size": 380}},
            r"vision\.image_size 380 is not divisible by vision\.patch_size 16",
        ),
        ({"fusion": {"stride": 0}}, r"fusion\.stride must be > 0, got 0"),
        ({"fusion": {"layers": -1}}, r"fusion\.layers must be > 0"),
        ({"vision": {"width": 770}}, r"vision\.width 770 is not divisible by vision\.heads 12"),
        ({"text": {"hidden_size": 770}}, r"text\.hidden_size 770 is not divisible by text\.heads 12"),
        ({"text": {"hidden_dropout": 1.0}}, r"text\.hidden_dropout must be in \[0, 1\)"),
        ({"attention_backend": "flash"}, r"attention_backend 'flash' is unknown.*sdpa"),
    ],
)
def test_bad_values_raise_naming_the_field(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MPlugConfig.from_dict(data)
    # A ConfigError is a ValueError (and a TypeError, as the wrong-type errors were before).
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, TypeError)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("vision:\n  image_sise: 32\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: unknown key 'vision\.image_sise'"):
        MPlugConfig.from_yaml(path)
    path = tmp_path / "model.json"
    path.write_text('{"fusion": {"stride": "3"}}')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: fusion\.stride must be an integer"):
        MPlugConfig.from_json(path)
    path.write_text('{"fusion": {"stride": 0}}')  # value checks of __post_init__ name the file too
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: fusion\.stride must be > 0"):
        MPlugConfig.from_json(path)


def test_yaml_number_strings_are_floats():
    """YAML 1.1 reads 1e-6 (no dot) as a string; float fields accept it."""
    config = MPlugConfig.from_yaml("text:\n  layer_norm_eps: 1e-6\n")
    assert config.text.layer_norm_eps == 1e-6


def test_from_dict_rejects_non_mappings():
    with pytest.raises(ConfigError, match="the config must be a mapping"):
        MPlugConfig.from_dict([("vision", {})])


def test_constructors_validate_too():
    with pytest.raises(ValueError, match="vision.image_size"):
        VisionConfig(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="fusion.stride"):
        FusionConfig(stride=0)
    with pytest.raises(ValueError, match="text.hidden_size"):
        TextConfig(hidden_size=100, heads=12)
    with pytest.raises(ValueError, match="embed_dim"):
        MPlugConfig(decoder=DecoderConfig(layers=12), embed_dim=0)
    with pytest.raises(ValueError, match="attention_backend"):
        MPlugConfig(attention_backend="nope")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        base().fusion.stride = 6  # type: ignore[misc]


# ---- dotted overrides --------------------------------------------------------------------------------------


def test_replace_with_dotted_names():
    config = base().replace(**{"fusion.stride": 6})
    assert config.fusion.stride == 6
    assert config.fusion.layer_types == (A,) * 6
    assert dataclasses.replace(config, fusion=base().fusion) == base()  # nothing else changed
    both = base().replace(**{"vision.image_size": 256, "embed_dim": 128})
    assert both.vision.image_size == 256 and both.vision.num_tokens == 257 and both.embed_dim == 128


@pytest.mark.parametrize(
    "dotted, pattern",
    [
        ("fusion.strid", r"unknown key 'fusion\.strid'; valid keys of fusion: \['layers', 'stride'\]"),
        ("fusio.stride", r"unknown key 'fusio'; valid keys of the config"),
        ("strde", r"unknown key 'strde'"),
        ("embed_dim.x", r"'embed_dim' is a value, not a section"),
        ("fusion.stride.x", r"'fusion\.stride' is a value, not a section"),
    ],
)
def test_replace_bad_dotted_names_raise(dotted, pattern):
    with pytest.raises(ConfigError, match=pattern):
        base().replace(**{dotted: 6})


def test_replace_values_are_type_checked_and_validated():
    with pytest.raises(ConfigError, match=r"fusion\.stride must be an integer, got str '6'"):
        base().replace(**{"fusion.stride": "6"})
    with pytest.raises(ConfigError, match=r"fusion\.stride must be > 0"):
        base().replace(**{"fusion.stride": 0})
    with pytest.raises(ConfigError, match=r"vision\.image_size 380"):
        base().replace(**{"vision.image_size": 380})


def test_replace_merges_a_section_mapping():
    config = base().replace(fusion={"stride": 6})
    assert config.fusion == FusionConfig(layers=6, stride=6)
    with pytest.raises(ConfigError, match=r"unknown key 'fusion\.strde'"):
        base().replace(fusion={"strde": 6})


def test_check_overrides_checks_names_and_types_only():
    check_overrides({"vision.image_size": 32, "fusion": {"stride": 6}, "vision.patch_size": 14})
    with pytest.raises(ConfigError, match=r"^x\.yaml: model\.overrides: unknown key 'vision\.image_sise'"):
        check_overrides({"vision.image_sise": 32}, name="model.overrides", where="x.yaml")
    with pytest.raises(ConfigError, match=r"model\.overrides\.fusion\.stride must be an integer"):
        check_overrides({"fusion": {"stride": "6"}}, name="model.overrides")
    with pytest.raises(ConfigError, match=r"model\.overrides: 'embed_dim' is a value"):
        check_overrides({"embed_dim.x": 1}, name="model.overrides")


# ---- official configs --------------------------------------------------------------------------------------


def test_from_official_config_bert_at_336_is_large():
    config = MPlugConfig.from_official(OFFICIAL_CONFIG_BERT, image_res=336, vision_width=1024)
    assert config == large()
    assert config.fusion.layer_types == (A,) * 6


def test_from_official_stride3_at_384_is_base():
    config = MPlugConfig.from_official(OFFICIAL_CONFIG_BERT_STRIDE3, image_res=384, vision_width=768)
    assert config == base()
    assert config.fusion.layer_types == (A, A, A, C, A, A)


def test_from_official_pretraining_resolutions():
    b = MPlugConfig.from_official(OFFICIAL_CONFIG_BERT_STRIDE3, image_res=256)  # pretrain_mplug_base.yaml
    assert b == base().replace(**{"vision.image_size": 256}) and b.vision.num_tokens == 257
    lg = MPlugConfig.from_official(OFFICIAL_CONFIG_BERT, image_res=224, vision_width=1024)
    assert lg == large().replace(**{"vision.image_size": 224}) and lg.vision.num_tokens == 257


def test_from_official_stride_argument_overrides_the_json():
    config = MPlugConfig.from_official(OFFICIAL_CONFIG_BERT, image_res=384, stride=3)
    assert config.fusion.stride == 3


def test_from_official_reads_a_path(tmp_path):
    path = tmp_path / "config_bert_stride3.json"
    path.write_text(json.dumps(OFFICIAL_CONFIG_BERT_STRIDE3, indent=2))
    assert MPlugConfig.from_official(path, image_res=384) == base()
    assert MPlugConfig.from_official(str(path), image_res=384) == base()


def test_from_official_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "config_bert.json"
    with pytest.raises(FileNotFoundError, match=r"config_bert\.json does not exist"):
        MPlugConfig.from_official(missing, image_res=384)


def test_from_official_invalid_json_is_a_clear_error(tmp_path):
    path = tmp_path / "config_bert.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        MPlugConfig.from_official(path, image_res=384)


def test_from_official_rejects_unknown_vit_width_and_other_activations():
    with pytest.raises(ValueError, match="vision_width 512"):
        MPlugConfig.from_official(OFFICIAL_CONFIG_BERT, image_res=384, vision_width=512)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        MPlugConfig.from_official({**OFFICIAL_CONFIG_BERT, "hidden_act": "relu"}, image_res=384)
    with pytest.raises(ValueError, match=r"vision\.image_size 380"):
        MPlugConfig.from_official(OFFICIAL_CONFIG_BERT, image_res=380)
