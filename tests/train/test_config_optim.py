"""Run config (YAML, --set overrides, errors), AdamW parameter groups and the lr schedule."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mplug_fast.config import get_config
from mplug_fast.tasks import build_model
from mplug_fast.train.config import (
    ConfigError,
    RunConfig,
    from_dict,
    load_config,
    resolve_config_path,
    shipped_configs,
)
from mplug_fast.train.optim import build_optimizer, param_groups
from mplug_fast.train.schedule import WarmupCosine, lr_at
from tests.train.helpers import micro_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "mplug_fast" / "configs"


# ---- config --------------------------------------------------------------------------------------------


def test_defaults_and_typed_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  betas: [0.9, 0.98]\ndata:\n  synthetic:\n    image_size: 32\n")
    cfg = load_config(
        path,
        [
            "optim.lr=3e-5",
            "schedule.max_steps=7",
            "precision.dtype=bf16",
            "optim.grad_clip=null",
            "model.overrides.fusion.stride=6",
            "model.overrides={vision.layers: 2}",
            "data.synthetic.vqa_types=[color, shape]",
        ],
    )
    assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == [0.9, 0.98]
    assert cfg.schedule.max_steps == 7 and cfg.precision.dtype == "bf16" and cfg.optim.grad_clip is None
    assert cfg.model.overrides == {"vision.layers": 2}  # the later --set replaced the mapping
    assert cfg.data.synthetic.image_size == 32 and cfg.data.synthetic.vqa_types == ["color", "shape"]
    assert load_config(None, ["model.overrides.fusion.stride=6"]).model.overrides == {"fusion": {"stride": 6}}
    assert from_dict(cfg.to_dict()) == cfg  # round trip
    assert RunConfig().optim.lr == 1e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"unknown key 'optim.lrr'.*valid keys of optim"),
        ("nothing.x=1", r"unknown key 'nothing'"),
        ("optim.lr=fast", r"optim.lr must be a number, got str 'fast'"),
        ("schedule.max_steps=2.5", r"schedule.max_steps must be an integer"),
        ("precision.dtype=fp8", r"precision.dtype must be one of \['fp32', 'bf16', 'fp16'\]"),
        ("logging.progress=maybe", r"logging.progress must be true or false"),
        ("optim.lr.x=1", r"'optim.lr' is a value, not a section"),
        ("optim.lr", r"must look like key.path=value"),
        ("schedule.warmup_steps=-1", r"schedule.warmup_steps=-1 is out of range: must be >= 0"),
        ("data.batch_size=0", r"data.batch_size=0 is out of range: must be >= 1"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(bad))}: unknown key 'optim.learning_rate'; valid"
    ):
        load_config(bad)
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(bad))}: optim.lr must be a number, got str 'fast'"
    ):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_model_overrides_and_preset_are_checked_at_load(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  preset: micro\n  overrides:\n    vision.image_sise: 32\n")
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(bad))}: model.overrides: unknown key 'vision.image_sise'; valid keys",
    ):
        load_config(bad)
    bad.write_text("model:\n  overrides:\n    fusion: {stride: three}\n")
    with pytest.raises(
        ConfigError, match=r"model.overrides.fusion.stride must be an integer, got str 'three'"
    ):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"model.overrides: unknown key 'fusion.strid'"):
        load_config(None, ["model.overrides.fusion.strid=6"])
    with pytest.raises(ConfigError, match=r"model.preset 'tinny' is unknown; available: \['base', 'huge'"):
        load_config(None, ["model.preset=tinny"])


def test_yaml_exponent_numbers_are_floats(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; the config loader reads it as a number everywhere."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-4\nobjective:\n  options:\n    alpha: 4e-1\n")
    cfg = load_config(path, ["eval.options.temperature=1e-3"])
    assert cfg.optim.lr == 1e-4 and cfg.objective.options["alpha"] == 0.4
    assert cfg.eval.options["temperature"] == 1e-3


def test_shipped_config_names():
    names = shipped_configs()
    assert "vqa_tiny_synthetic" in names and "demo/vqa" in names and "vqa_base" in names
    assert resolve_config_path("vqa_tiny_synthetic") == CONFIGS / "vqa_tiny_synthetic.yaml"
    assert resolve_config_path("demo/vqa.yaml") == CONFIGS / "demo" / "vqa.yaml"
    assert resolve_config_path("configs/vqa_base.yaml") == CONFIGS / "vqa_base.yaml"  # the old repo path
    assert load_config("demo/vqa").model.task == "vqa"
    with pytest.raises(
        FileNotFoundError, match=r"'vqa_tiny' is neither a file nor a shipped .*vqa_tiny_synthetic"
    ):
        load_config("vqa_tiny")


def test_micro_preset_replaces_the_pasted_model():
    """The demo and tiny-synthetic configs name the micro preset instead of pasting its fields."""
    for name in ("demo/vqa", "demo/pretrain", "ve_tiny_synthetic", "nlvr2_tiny_synthetic"):
        cfg = load_config(name)
        assert cfg.model.preset == "micro" and cfg.model.overrides == {}, name
    assert get_config("micro").vision.num_tokens == 65


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    get_config(cfg.model.preset, **cfg.model.overrides)  # the model overrides are valid too
    if name.startswith("pretrain_base"):
        assert (cfg.optim.lr, cfg.optim.lr_visual, cfg.data.batch_size) == (1e-4, 1e-5, 256)
    if name.startswith("pretrain_large"):
        assert (cfg.optim.lr, cfg.optim.lr_visual, cfg.data.batch_size) == (5e-5, 5e-6, 128)


# ---- optimizer -----------------------------------------------------------------------------------------


def _pretrain_model() -> nn.Module:
    return build_model(get_config("micro", **micro_overrides()), "pretrain")


def test_param_groups_split_and_no_decay():
    model = _pretrain_model()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, lr_visual=1e-5, weight_decay=0.02)}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "visual/decay": (1e-5, 0.02),
        "visual/no_decay": (1e-5, 0.0),
        "rest/decay": (1e-4, 0.02),
        "rest/no_decay": (1e-4, 0.0),
    }
    no_decay = by_group["visual/no_decay"] | by_group["rest/no_decay"]
    for n in (
        "temp",
        "vision.cls_token",
        "vision.pos_embed",
        "vision.norm_pre.weight",
        "vision.blocks.0.attn.qkv.bias",
        "text_encoder.embeddings.word.weight",
        "text_encoder.embeddings.position.weight",
        "text_encoder.layers.0.norm_attn.weight",
        "mlm_head.bias",
        "decoder.head.norm.weight",
    ):
        assert n in no_decay, n
    for n in ("vision.patch_embed.weight", "vision.blocks.0.attn.qkv.weight"):
        assert n in by_group["visual/decay"], n
    for n in (
        "text_encoder.layers.0.attn.qkv.weight",
        "fusion.layers.0.cross.q_proj.weight",
        "vision_proj.weight",
        "itm_head.weight",
        "decoder.layers.0.mlp.fc1.weight",
    ):
        assert n in by_group["rest/decay"], n
    assert all(n.startswith("vision.") for n in by_group["visual/decay"] | by_group["visual/no_decay"])
    assert not any(n.startswith("vision.") for n in by_group["rest/decay"] | by_group["rest/no_decay"])
    # only trainable parameters, each once: the momentum copies are frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_group.values()) == trainable
    assert sum(len(v) for v in by_group.values()) == len(trainable)
    assert not any(n.startswith("momentum.") for n in trainable)


def test_build_optimizer_implementations():
    model = _pretrain_model()
    opt = build_optimizer(model, 1e-4, 1e-5)
    assert opt.defaults["foreach"] is True and len(opt.param_groups) == 4
    assert build_optimizer(model, 1e-4, implementation="for").defaults["foreach"] is False
    with pytest.raises(ValueError, match="unknown AdamW implementation"):
        build_optimizer(model, 1e-4, implementation="magic")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, 1e-4)


# ---- schedule ------------------------------------------------------------------------------------------


def test_lr_values():
    base, W, T, m = 1e-3, 4, 14, 1e-5
    assert [lr_at(s, base, W, T) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, base, W, T, m) == pytest.approx(base)
    assert lr_at(9, base, W, T, m) == pytest.approx(m + (base - m) * 0.5)  # half-way through the cosine
    assert lr_at(14, base, W, T, m) == pytest.approx(m) and lr_at(99, base, W, T, m) == pytest.approx(m)
    assert lr_at(1, base, W, T, warmup_start=0.5) == pytest.approx(base * (0.5 + 0.5 * 2 / 4))
    s = 7
    expect = m + (base - m) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))
    assert lr_at(s, base, W, T, m) == pytest.approx(expect)
    assert lr_at(3, 1e-6, 0, 10, min_lr=1e-5) <= 1e-6  # the floor never exceeds a group's lr
    with pytest.raises(ValueError):
        lr_at(-1, base, W, T)


def test_scheduler_drives_groups_and_resumes():
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-3}, {"params": [q], "lr": 1e-4}])
    sched = WarmupCosine(opt, warmup_steps=2, max_steps=10, min_lr=0.0)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        sched.step()
    assert seen[0] == pytest.approx([5e-4, 5e-5]) and seen[1] == pytest.approx([1e-3, 1e-4])
    assert all(a / b == pytest.approx(10) for a, b in seen)
    opt2 = torch.optim.AdamW([{"params": [p], "lr": 1e-3}, {"params": [q], "lr": 1e-4}])
    sched2 = WarmupCosine(opt2, warmup_steps=2, max_steps=10)
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_official_data_source(tmp_path):
    """``data.source: official`` builds the official-format reader of the task from ``data.official``."""
    import json

    from PIL import Image

    from mplug_fast.tasks import get_task
    from mplug_fast.train.build import build_dataset as build_dataset_from_config

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "p.json").write_text(json.dumps([{"image": "a.jpg", "caption": "A red thing!"}]))
    cfg = load_config(
        CONFIGS / "pretrain_base.yaml",
        [f"data.official={{ann: {tmp_path / 'p.json'}, image_root: {tmp_path}, image_size: 32}}"],
    )
    ds = build_dataset_from_config(cfg, "pretrain")
    batch = get_task("pretrain").collate()([ds[0]])
    assert type(ds).__name__ == "PretrainJsonDataset" and batch["images"].shape == (1, 3, 32, 32)
    bad = load_config(None, ["data.source=official", "data.official={nonsense: 1}"])
    with pytest.raises(ValueError, match="do not fit PretrainJsonDataset"):
        build_dataset_from_config(bad, "pretrain")
