"""The run configuration of ``mplug-fast pretrain`` and every training run: YAML + ``--set`` overrides.

A run config is a tree of dataclasses (``RunConfig``): ``model``, ``data``, ``objective``, ``optim``,
``schedule``, ``precision``, ``distributed``, ``checkpoint``, ``logging``, ``eval`` plus a few top-level
fields. YAML files give any subset of the fields; ``--set a.b=value`` overrides one field, its value parsed
as YAML (``--set optim.lr=1e-4``, ``--set data.synthetic.image_size=32``,
``--set model.overrides={fusion.stride: 6}``) and checked against the field's type. Unknown keys and wrong
types are errors naming the field and the valid choices. ``model.overrides``, ``objective.options``,
``data.official``, ``eval.options`` and ``eval.official`` are free-form mappings (passed on to
``MPlugConfig.replace``, ``build_objective``, the official readers and the task's evaluate), so keys below
them are not checked here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class ModelSection:
    """Which model: a preset of ``mplug_fast.config`` with dotted overrides, and the task it is built for."""

    preset: str = "tiny"  # tiny | base | large | huge
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"vision.image_size": 32}
    task: str = "pretrain"  # the task model of build_model (pretrain, vqa, caption, retrieval, grounding)
    init_from: str | None = None  # a save_pretrained directory or an official checkpoint file (.pth)
    init_strict: bool = True  # official checkpoint: every tensor must map (False: log missing / unused)


@dataclass
class SyntheticSection:
    """The built-in synthetic world (``mplug_fast.data.synthetic``)."""

    image_size: int = 64  # rendered side in pixels (and the model's input resolution unless resized)
    num_scenes: int = 20000  # training scenes 0 .. num_scenes - 1
    eval_scenes: int = 500  # held-out scenes num_scenes .. num_scenes + eval_scenes - 1
    min_objects: int = 1
    max_objects: int = 4
    seed: int = 0
    object_scale: float = 1.0  # object sides x this (SyntheticWorld): > 1 = larger objects at low resolution
    vqa_types: list[str] | None = None  # restrict the VQA question types (None: all)
    pair_types: list[str] | None = None  # restrict the VE / NLVR statement types (None: all)
    ve_labels: list[str] | None = None  # VE label names used (None: contradiction, neutral, entailment)


@dataclass
class DataSection:
    """Where the training samples come from and how they are batched."""

    source: Literal["synthetic", "official"] = "synthetic"
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    official: dict[str, Any] = field(default_factory=dict)  # kwargs of mplug_fast.data.official readers
    batch_size: int = 16  # per process and micro-step; global = batch_size * world_size * accum_steps
    num_workers: int = 0
    shuffle: bool = True
    max_length: int | None = None  # text length cap of the collator (None: the task's official default)


@dataclass
class ObjectiveSection:
    """The objective: ``mplug_fast.objectives.build_objective(name, model, tokenizer, **options)``."""

    name: str | None = None  # None: the model task
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSection:
    """AdamW with two learning rates (official ``create_two_optimizer``, spec §9)."""

    lr: float = 1e-4  # everything but the visual encoder (official lr1)
    lr_visual: float | None = None  # the visual encoder (official lr2); None = lr
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    accum_steps: int = 1  # micro-steps per optimizer step
    implementation: Literal["auto", "fused", "foreach", "for"] = "auto"  # auto: fused where supported


@dataclass
class ScheduleSection:
    """Per-step linear warm-up from ``warmup_start`` x lr (or from ``warmup_lr``), then cosine to ``min_lr``
    at ``max_steps`` (or at the end of ``epochs`` passes over the training data)."""

    max_steps: int | None = 1000  # optimizer steps of the run; null: derived from epochs
    epochs: float | None = None  # passes over the data (official `epochs`); used when max_steps is null
    warmup_steps: int = 0
    warmup_start: float = 0.0  # first warm-up lr as a fraction of each group's lr
    warmup_lr: float | None = None  # first warm-up lr, the same for every group (official warmup_lr)
    min_lr: float = 0.0  # absolute floor of the cosine (capped at each group's lr)


@dataclass
class PrecisionSection:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast; fp16 adds a GradScaler
    grad_checkpointing: bool = False  # recompute the transformer layers in the backward pass
    compile: bool = False  # torch.compile the objective
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for checks)


@dataclass
class DistributedSection:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # used when WORLD_SIZE > 1 (torchrun); fsdp = FSDP2 fully_shard
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False


@dataclass
class CheckpointSection:
    every_steps: int = 0  # 0: only at the end (and on Ctrl-C / a non-finite stop)
    keep_last: int = 3


@dataclass
class LoggingSection:
    every_steps: int = 10  # metrics line (JSONL, TensorBoard) every N optimizer steps
    progress: bool = True  # tqdm progress bar (rank 0)
    tensorboard: bool = True  # when the tensorboard package is installed
    plots: bool = True  # loss-curve PNGs at each checkpoint and at the end


@dataclass
class EvalSection:
    """Defaults of the evaluation after ``mplug-fast finetune`` and of ``mplug-fast evaluate`` (their
    ``--eval-batch-size`` / ``--eval-option`` / ``--eval-data`` flags override them)."""

    batch_size: int | None = None  # None: the CLI default (32)
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the task's evaluate
    official: dict[str, Any] = field(default_factory=dict)  # data.official overrides for the evaluation set


@dataclass
class RunConfig:
    """One training run."""

    output_dir: str = "runs/default"
    seed: int = 42
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    max_nonfinite: int = 10  # stop after this many consecutive non-finite losses
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


class ConfigError(ValueError):
    """A run config with an unknown key, a wrong type or an invalid value."""


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone do not catch."""
    checks = [
        (cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}"),
        (cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}"),
        (cfg.optim.lr >= 0, f"optim.lr must be >= 0, got {cfg.optim.lr}"),
        (cfg.optim.accum_steps >= 1, f"optim.accum_steps must be >= 1, got {cfg.optim.accum_steps}"),
        (len(cfg.optim.betas) == 2, f"optim.betas must have two values, got {cfg.optim.betas}"),
        (
            cfg.schedule.max_steps is not None or cfg.schedule.epochs is not None,
            "schedule.max_steps is null and schedule.epochs is not set; give one of them",
        ),
        (
            cfg.schedule.max_steps is None or cfg.schedule.max_steps >= 1,
            f"schedule.max_steps must be >= 1, got {cfg.schedule.max_steps}",
        ),
        (
            cfg.schedule.epochs is None or cfg.schedule.epochs > 0,
            f"schedule.epochs must be > 0, got {cfg.schedule.epochs}",
        ),
        (
            0 <= cfg.schedule.warmup_steps <= (cfg.schedule.max_steps or cfg.schedule.warmup_steps),
            f"schedule.warmup_steps must be in [0, max_steps={cfg.schedule.max_steps}], "
            f"got {cfg.schedule.warmup_steps}",
        ),
        (
            cfg.schedule.warmup_lr is None or cfg.schedule.warmup_lr >= 0,
            f"schedule.warmup_lr must be >= 0, got {cfg.schedule.warmup_lr}",
        ),
        (
            cfg.eval.batch_size is None or cfg.eval.batch_size >= 1,
            f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}",
        ),
        (cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0"),
        (cfg.logging.every_steps >= 1, f"logging.every_steps must be >= 1, got {cfg.logging.every_steps}"),
        (cfg.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {cfg.max_nonfinite}"),
        (
            cfg.data.synthetic.image_size >= 8,
            f"data.synthetic.image_size must be >= 8, got {cfg.data.synthetic.image_size}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ---- typed construction from plain data ----------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """``value`` checked against ``annotation`` (and converted losslessly: int -> float, dict -> section)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, name)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{name} may not be null (expected {_type_name(annotation)})")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, option, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {errors}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation) or (Any,)
        return [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {annotation!r}")  # a bug in this module


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """``cls(**data)`` with every field checked; nested mappings build nested sections."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    where = prefix or "the run config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {names}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict[str, Any] | None) -> RunConfig:
    """A ``RunConfig`` from plain data (missing fields keep their defaults)."""
    return _build(RunConfig, data or {})


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. optim.lr=1e-4)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _fix_yaml_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node):
        return float(node)
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` (plain nested dicts) with each ``a.b=value`` applied; unknown sections/keys are errors."""
    data = _fix_yaml_floats(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        cls: Any = RunConfig
        node = data
        for depth, part in enumerate(path):
            dotted = ".".join(path[: depth + 1])
            if cls is None:  # inside a free-form mapping: anything goes
                if depth == len(path) - 1:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                continue
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                where = ".".join(path[:depth]) or "the run config"
                raise ConfigError(
                    f"unknown key {dotted!r} in --set {text!r}; valid keys of {where}: {sorted(names)}"
                )
            annotation = typing.get_type_hints(cls)[part]
            if depth == len(path) - 1:
                node[part] = value
                break
            if dataclasses.is_dataclass(annotation):
                cls = annotation
            elif typing.get_origin(annotation) is dict or (
                typing.get_origin(annotation) in (typing.Union, types.UnionType)
                and any(typing.get_origin(a) is dict for a in typing.get_args(annotation))
            ):
                cls = None
            else:
                raise ConfigError(
                    f"{'.'.join(path[: depth + 1])!r} is a value, not a section (in --set {text!r})"
                )
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file (None: all defaults) with ``--set`` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"run config {str(path)!r} must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return from_dict(apply_overrides(data, list(overrides or [])))
