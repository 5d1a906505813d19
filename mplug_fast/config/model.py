"""Model configuration: frozen dataclasses, named presets, JSON/YAML round trip.

The official code spreads the configuration over a BERT json (`config_bert.json`,
`config_bert_stride3.json`) and a task yaml (`image_res`, the CLIP variant). Here one
`MPlugConfig` holds everything the modules need; `MPlugConfig.from_official` builds one
from those two sources. Presets:

    micro  D=64, one layer per stack (2 fusion, S = 1), 32 px in 4 px patches: the demo and CPU smoke runs
    tiny   D=256, 4 layers per stack, 64 px images: what CPU tests and CI train
    base   CLIP ViT-B/16 @ 384, 6 text, 6 fusion (S = 3), 12 decoder layers  (mPLUG-Base)
    large  CLIP ViT-L/14 @ 336 + 1024->768 adapter, S = 6                    (mPLUG-Large)
    huge   CLIP ViT-L/14 @ 336, 24 text layers                               (mPLUG-Huge, never released)

Derive variants with `dataclasses.replace` or `MPlugConfig.replace(**{"vision.image_size": 256})`. Plain
data (YAML, JSON, dotted overrides) goes through the one coercion engine, `mplug_fast.config.coerce`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mplug_fast.config.coerce import (
    ConfigError,
    coerce,
    field_annotation,
    from_mapping,
    load_yaml,
    set_dotted,
    to_mapping,
)

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("reference", "sdpa", "triton", "flash_attn", "xformers")


def _check_fields(config: Any, owner: str, positive: str = "", probability: str = "") -> None:
    """ValueError naming `owner.field` unless each field in `positive` (space-separated names) is > 0 and
    each one in `probability` is in [0, 1)."""
    prefix = owner + "." if owner else ""
    for name in positive.split():
        if (value := getattr(config, name)) <= 0:
            raise ValueError(f"{prefix}{name} must be > 0, got {value}")
    for name in probability.split():
        if not 0.0 <= (value := getattr(config, name)) < 1.0:
            raise ValueError(f"{prefix}{name} must be in [0, 1), got {value}")


# TextConfig fields named otherwise in an official config_bert*.json (the other fields keep their names)
_BERT_KEYS = {
    "heads": "num_attention_heads",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "encoder_layers": "text_encoder_layers",
}


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """CLIP ViT (pre-LN, QuickGELU, class token, all tokens out, no projection)."""

    width: int = 768  # W: 768 for ViT-B, 1024 for ViT-L (official: inferred from the CLIP weights)
    layers: int = 12  # transformer blocks
    heads: int = 12  # CLIP convention: width / 64
    patch_size: int = 16  # 16 for ViT-B/16, 14 for ViT-L/14
    image_size: int = 384  # R: input resolution (official: image_res); Nv = (R / P)^2 + 1
    mlp_ratio: float = 4.0  # hidden width of the MLP = mlp_ratio * width
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.1  # official mPLUG: nn.MultiheadAttention(dropout=0.1); stock CLIP: 0

    def __post_init__(self) -> None:
        _check_fields(
            self, "vision", "width layers heads patch_size image_size mlp_ratio", "attention_dropout"
        )
        if self.width % self.heads:
            raise ValueError(f"vision.width {self.width} is not divisible by vision.heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size {self.image_size} is not divisible by vision.patch_size "
                f"{self.patch_size}; use a multiple of {self.patch_size} "
                f"(e.g. {self.image_size // self.patch_size * self.patch_size})"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Nv: patch tokens + the class token."""
        return self.grid_size**2 + 1


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """BERT dimensions shared by the text encoder, the fusion layers and the decoder."""

    vocab_size: int = 30522
    hidden_size: int = 768  # D
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1  # official: hidden_dropout_prob
    attention_dropout: float = 0.1  # official: attention_probs_dropout_prob
    pad_token_id: int = 0
    encoder_layers: int = 6  # official: text_encoder_layers

    def __post_init__(self) -> None:
        positive = "vocab_size hidden_size heads intermediate_size max_position_embeddings type_vocab_size"
        _check_fields(self, "text", positive + " encoder_layers", "hidden_dropout attention_dropout")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"text.hidden_size {self.hidden_size} is not divisible by text.heads {self.heads}"
            )


@dataclass(frozen=True, kw_only=True)
class FusionConfig:
    """The skip-connected fusion: asymmetric co-attention layers with a connected layer every S."""

    layers: int = 6  # official: fusion_layers (executed slots num_hidden_layers - fusion_layers ..)
    stride: int = 3  # S: layer j is connected iff j != 0 and j % S == 0 (official: stride_layer)

    def __post_init__(self) -> None:
        _check_fields(self, "fusion", "layers stride")

    def is_connected(self, j: int) -> bool:
        """The released rule (`FusionLayer.forward`): connected attention iff j != 0 and j % S == 0."""
        return j != 0 and j % self.stride == 0

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple("connected" if self.is_connected(j) else "asymmetric" for j in range(self.layers))


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    layers: int = 12  # official: text_decode_layers


@dataclass(frozen=True, kw_only=True)
class MPlugConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256  # ITC projection width (official: embed_dim)
    adapter_dropout: float = 0.1  # dropout after visn_fc + visn_layer_norm (only when vision.width != D)
    attention_backend: str | None = None  # None = automatic; see mplug_fast.ops.attention

    def __post_init__(self) -> None:
        _check_fields(self, "", "embed_dim", "adapter_dropout")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend {self.attention_backend!r} is unknown; "
                f"choose one of {ATTENTION_BACKENDS} or None"
            )

    @property
    def has_adapter(self) -> bool:
        """The large models map the ViT width to the BERT width with Linear + LayerNorm + Dropout."""
        return self.vision.width != self.text.hidden_size

    # ----------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "") -> MPlugConfig:
        """Strict inverse of `to_dict`: unknown keys and wrong types are `ConfigError`s naming the dotted
        field (and ``where``, the source file, when given)."""
        return from_mapping(cls, data, where=where)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> MPlugConfig:
        if _looks_like_path(path_or_text):
            return cls.from_dict(json.loads(Path(path_or_text).read_text()), where=str(path_or_text))
        return cls.from_dict(json.loads(str(path_or_text)))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> MPlugConfig:
        if _looks_like_path(path_or_text):
            return cls.from_dict(load_yaml(Path(path_or_text).read_text()) or {}, where=str(path_or_text))
        return cls.from_dict(load_yaml(str(path_or_text)) or {})

    def replace(self, *, where: str = "", **overrides: Any) -> MPlugConfig:
        """Copy with overrides; dotted names reach into sections: `replace(**{"fusion.stride": 6})`; a
        mapping given for a section merges into it (`replace(fusion={"stride": 6})`)."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            path = dotted.split(".")
            if isinstance(value, Mapping) and dataclasses.is_dataclass(field_annotation(MPlugConfig, path)):
                section = data
                for part in path:
                    section = section[part]
                value = {**section, **value}  # a section override merges into the section
            set_dotted(MPlugConfig, data, path, value, where=where)
        return MPlugConfig.from_dict(data, where=where)

    # ----------------------------------------------------------------------------------- official configs
    @classmethod
    def from_official(
        cls,
        bert_config: Mapping[str, Any] | str | Path,
        *,
        image_res: int,
        vision_width: int = 768,
        vision_layers: int | None = None,
        vision_heads: int | None = None,
        patch_size: int | None = None,
        stride: int | None = None,
    ) -> MPlugConfig:
        """Build from an official `config_bert*.json` (dict or path) plus the task yaml values.

        The CLIP variant follows the official scripts: width 768 -> ViT-B/16 (12 layers, patch 16),
        width 1024 -> ViT-L/14 (24 layers, patch 14); heads = width / 64 as in CLIP.
        """
        bert = load_bert_config(bert_config)
        known_vits = {768: (12, 16), 1024: (24, 14)}
        if vision_layers is None or patch_size is None:
            if vision_width not in known_vits:
                raise ValueError(
                    f"vision_width {vision_width} is not a released CLIP ViT "
                    "(768: ViT-B/16, 1024: ViT-L/14); "
                    "pass vision_layers and patch_size explicitly"
                )
            default_layers, default_patch = known_vits[vision_width]
            vision_layers = default_layers if vision_layers is None else vision_layers
            patch_size = default_patch if patch_size is None else patch_size
        vision = VisionConfig(
            width=vision_width,
            layers=vision_layers,
            heads=vision_heads or vision_width // 64,
            patch_size=patch_size,
            image_size=image_res,
        )
        # a key missing from the json keeps TextConfig's default (BERT-base's value)
        keys = {f.name: _BERT_KEYS.get(f.name, f.name) for f in dataclasses.fields(TextConfig)}
        text = TextConfig(**{ours: bert[theirs] for ours, theirs in keys.items() if theirs in bert})
        if bert.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {bert['hidden_act']!r} is not supported (mPLUG uses erf 'gelu')")
        fusion = FusionConfig(
            layers=bert.get("fusion_layers", 6),
            stride=stride if stride is not None else bert.get("stride_layer", 3),
        )
        decoder = DecoderConfig(layers=bert.get("text_decode_layers", 12))
        return cls(vision=vision, text=text, fusion=fusion, decoder=decoder)


def check_overrides(overrides: Any, *, name: str = "overrides", where: str = "") -> None:
    """ConfigError unless every key of ``overrides`` (dotted ``{"vision.image_size": 32}`` or nested
    ``{"fusion": {"stride": 6}}``) names an `MPlugConfig` field and its value has the field's type.

    Checks names and types only: values are validated when the overrides meet a preset (`get_config`)."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where + ': ' if where else ''}{name} must be a mapping, got {overrides!r}")
    for key, value in overrides.items():
        path = str(key).split(".")
        try:
            annotation = field_annotation(MPlugConfig, path)
        except ConfigError as e:
            raise ConfigError(f"{where + ': ' if where else ''}{name}: {e}") from None
        if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
            check_overrides({f"{key}.{k}": v for k, v in value.items()}, name=name, where=where)
        else:
            coerce(annotation, value, name=f"{name}.{key}", where=where)


def load_bert_config(bert_config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """An official `config_bert*.json` as a dict (accepts a dict or a path)."""
    if isinstance(bert_config, Mapping):
        return dict(bert_config)
    path = Path(bert_config)
    if not path.is_file():
        raise FileNotFoundError(f"BERT config {path} does not exist (expected an official config_bert*.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"BERT config {path} is not valid JSON: {exc}") from exc


def _looks_like_path(value: str | Path) -> bool:
    """A Path, or a one-line string naming a .json / .yaml / .yml file (missing: FileNotFoundError)."""
    if isinstance(value, Path):
        return True
    return "\n" not in value and value.strip().lower().endswith((".json", ".yaml", ".yml"))


# --------------------------------------------------------------------------------------------- presets
def micro() -> MPlugConfig:
    """The demo's model, far below `tiny`: D=64, 2 heads, one layer per stack except two fusion layers with
    S=1 (layer 0 asymmetric co-attention, layer 1 connected attention), 32 px images in 4 px patches
    (Nv = 65), no dropout. It trains from scratch in minutes on a CPU (`make demo`, the
    ``*_tiny_synthetic`` runs, the CPU tests)."""
    return MPlugConfig(
        vision=VisionConfig(width=64, layers=1, heads=2, patch_size=4, image_size=32, attention_dropout=0.0),
        text=TextConfig(
            hidden_size=64,
            heads=2,
            intermediate_size=256,
            encoder_layers=1,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
        fusion=FusionConfig(layers=2, stride=1),
        decoder=DecoderConfig(layers=1),
        embed_dim=32,
    )


def tiny() -> MPlugConfig:
    """D=256, 4 heads, 4 layers per stack (fusion S=3: one connected layer), 64 px, patch 16 (17 tokens)."""
    return MPlugConfig(
        vision=VisionConfig(width=256, layers=4, heads=4, patch_size=16, image_size=64),
        text=TextConfig(hidden_size=256, heads=4, intermediate_size=1024, encoder_layers=4),
        fusion=FusionConfig(layers=4, stride=3),
        decoder=DecoderConfig(layers=4),
    )


def base() -> MPlugConfig:
    """mPLUG-Base: CLIP ViT-B/16 @ 384 (577 tokens), BERT-base split 6 text + 6 fusion (S=3), 12 decoder."""
    return MPlugConfig(
        vision=VisionConfig(width=768, layers=12, heads=12, patch_size=16, image_size=384),
        fusion=FusionConfig(layers=6, stride=3),
    )


def large() -> MPlugConfig:
    """mPLUG-Large: CLIP ViT-L/14 @ 336 (577 tokens) + 1024->768 adapter, S=6 (no connected layer)."""
    return MPlugConfig(
        vision=VisionConfig(width=1024, layers=24, heads=16, patch_size=14, image_size=336),
        fusion=FusionConfig(layers=6, stride=6),
    )


def huge() -> MPlugConfig:
    """mPLUG-Huge as the official README describes it (ViT-L/14, 24 text layers). Its weights were never
    released, so everything else follows the large model."""
    return dataclasses.replace(large(), text=TextConfig(encoder_layers=24))


PRESETS = {"micro": micro, "tiny": tiny, "base": base, "large": large, "huge": huge}


def get_config(name: str, **overrides: Any) -> MPlugConfig:
    """A preset by name, with optional dotted overrides (`get_config("base", **{"fusion.stride": 6})`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
