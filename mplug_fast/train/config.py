"""The run configuration of ``mplug-fast train`` and every training run: YAML + ``--set`` overrides.

A run config is a tree of dataclasses (``RunConfig``): ``model``, ``data``, ``objective``, ``optim``,
``schedule``, ``precision``, ``distributed``, ``checkpoint``, ``logging``, ``eval`` plus a few top-level
fields. A YAML file gives any subset of the fields and maps 1:1 onto them; ``--set a.b=value`` overrides one
field, its value parsed as YAML (``--set optim.lr=1e-4``, ``--set data.synthetic.image_size=32``,
``--set model.overrides={fusion.stride: 6}``). Both go through the one coercion engine
(`mplug_fast.config.coerce`): unknown keys and wrong types are `ConfigError`s naming the dotted field, the
valid choices and the file (or the ``--set``). ``model.overrides`` is checked against the `MPlugConfig`
fields. ``objective.options``, ``data.official``, ``eval.options`` and ``eval.official`` are mappings
passed on to the objective, the official readers and the task's evaluate, which check their keys.

``load_config`` takes a path or the name of a config shipped in ``mplug_fast/configs``
(``vqa_tiny_synthetic``, ``demo/vqa``); `shipped_configs` lists them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mplug_fast.config import PRESETS, check_overrides
from mplug_fast.config.coerce import ConfigError, apply_overrides, from_mapping, load_yaml, to_mapping
from mplug_fast.io import atomic_write_text
from mplug_fast.tasks.sources import SyntheticSection

DEVICES = ("auto", "cpu", "cuda", "mps")  # device names before an optional ":N"
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"  # the shipped run configs (package data)


@dataclass
class ModelSection:
    """Which model: a preset of ``mplug_fast.config`` with dotted overrides, and the task it is built for."""

    preset: str = "tiny"  # a preset of mplug_fast.config.PRESETS: micro | tiny | base | large | huge
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"vision.image_size": 32}
    task: str = "pretrain"  # the task model of build_model (pretrain, vqa, caption, retrieval, grounding)
    init_from: str | None = None  # a save_pretrained directory or an official checkpoint file (.pth)
    init_strict: bool = True  # official checkpoint: every tensor must map (False: log missing / unused)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset {self.preset!r} is unknown; available: {sorted(PRESETS)}")
        check_overrides(self.overrides, name="model.overrides")


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
    """AdamW with two learning rates (official ``create_two_optimizer``, docs/fidelity.md §9)."""

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
    """Defaults of the evaluation after ``mplug-fast train`` and of ``mplug-fast evaluate`` (their
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
    overwrite: bool = False  # a new run may replace another run's files in output_dir (else an error)
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
        return to_mapping(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text


def _ranges(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """(key, whether its value is in range, the range) of every run-config value with a valid range."""
    o, s, d = cfg.optim, cfg.schedule, cfg.data

    def at_least(low, value):  # null is in range too
        return value is None or value >= low

    return [
        ("data.batch_size", d.batch_size >= 1, ">= 1"),
        ("data.num_workers", d.num_workers >= 0, ">= 0"),
        ("data.max_length", at_least(1, d.max_length), ">= 1 or null"),
        ("data.synthetic.image_size", d.synthetic.image_size >= 8, ">= 8"),
        ("data.synthetic.num_scenes", d.synthetic.num_scenes >= 1, ">= 1"),
        ("data.synthetic.eval_scenes", d.synthetic.eval_scenes >= 0, ">= 0"),
        ("optim.lr", o.lr >= 0, ">= 0"),
        ("optim.lr_visual", at_least(0, o.lr_visual), ">= 0 or null"),
        ("optim.weight_decay", o.weight_decay >= 0, ">= 0"),
        ("optim.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two values in [0, 1)"),
        ("optim.eps", o.eps > 0, "> 0"),
        ("optim.grad_clip", o.grad_clip is None or o.grad_clip > 0, "> 0 or null (no clipping)"),
        ("optim.accum_steps", o.accum_steps >= 1, ">= 1"),
        ("schedule.max_steps", at_least(1, s.max_steps), ">= 1 or null (from epochs)"),
        ("schedule.epochs", s.epochs is None or s.epochs > 0, "> 0 or null"),
        ("schedule.warmup_steps", s.warmup_steps >= 0, ">= 0 (clipped to the run's steps)"),
        ("schedule.warmup_start", 0 <= s.warmup_start <= 1, "[0, 1]"),
        ("schedule.warmup_lr", at_least(0, s.warmup_lr), ">= 0 or null"),
        ("schedule.min_lr", s.min_lr >= 0, ">= 0"),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps >= 0, ">= 0"),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last >= 1, ">= 1"),
        ("logging.every_steps", cfg.logging.every_steps >= 1, ">= 1"),
        ("eval.batch_size", at_least(1, cfg.eval.batch_size), ">= 1 or null"),
        ("max_nonfinite", cfg.max_nonfinite >= 1, ">= 1"),
        ("device", cfg.device.partition(":")[0] in DEVICES, "auto, cpu, cuda, cuda:N or mps"),
    ]


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone do not catch: one `ConfigError` naming the key, the value and the
    valid range (`from_mapping` adds the file)."""
    for key, ok, valid in _ranges(cfg):
        if not ok:
            value = functools.reduce(getattr, key.split("."), cfg)
            raise ConfigError(f"{key}={value!r} is out of range: must be {valid}")
    if cfg.schedule.max_steps is None and cfg.schedule.epochs is None:
        raise ConfigError("schedule.max_steps is null and schedule.epochs is not set; give one of them")


# ---- loading -------------------------------------------------------------------------------------------


def from_dict(data: dict[str, Any] | None, *, where: str = "") -> RunConfig:
    """A ``RunConfig`` from plain data (missing fields keep their defaults); errors name ``where``."""
    return from_mapping(RunConfig, data, where=where)


def shipped_configs() -> list[str]:
    """Names of the run configs shipped in ``mplug_fast/configs`` (``vqa_tiny_synthetic``, ``demo/vqa``)."""
    return sorted(p.relative_to(CONFIG_ROOT).with_suffix("").as_posix() for p in CONFIG_ROOT.rglob("*.yaml"))


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A run config file: ``path_or_name`` when it is a file, else the shipped config of that name (``.yaml``
    and a leading ``configs/`` optional). FileNotFoundError listing the shipped names when neither exists."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removesuffix(".yml")
    for prefix in ("mplug_fast/configs/", "configs/"):
        name = name.removeprefix(prefix)
    shipped = CONFIG_ROOT / f"{name}.yaml"
    if shipped.is_file() and not name.startswith(("/", "../")):
        return shipped
    raise FileNotFoundError(
        f"run config {str(path_or_name)!r} is neither a file nor a shipped config name; "
        f"shipped configs: {', '.join(shipped_configs())}"
    )


def read_config_file(path_or_name: str | Path) -> tuple[dict[str, Any], Path]:
    """(the YAML mapping, its path) of a run config file or shipped config name."""
    path = resolve_config_path(path_or_name)
    try:
        loaded = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"run config {str(path)!r} must be a YAML mapping, got {type(loaded).__name__}")
    return loaded or {}, path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file or shipped config name (None: all defaults) with ``--set`` overrides
    applied. Errors name the file (or the override)."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        data, resolved = read_config_file(path)
        where = str(resolved)
    data = apply_overrides(RunConfig, data, list(overrides or []))
    return from_dict(data, where=where)
