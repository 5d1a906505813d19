"""Every shipped run config (``mplug_fast/configs/*.yaml``) loads, builds its model and objective on the meta
device, and its options fit the readers / evaluate functions they are passed to; the real task configs carry
the official settings.

Oracles: the parameter counts of docs/fidelity.md §12 (per module, so any resolution / stride / task can be
composed from them) and the settings of docs/fidelity.md §5, §9 and §13, restated here
by hand (not read from the YAML files).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mplug_fast.train.build import build_model as build_model_from_config
from mplug_fast.train.build import build_objective as build_objective_from_config
from mplug_fast.train.config import RunConfig, from_dict, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "mplug_fast" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
REAL_TASK_CONFIGS = (
    "vqa_base.yaml",
    "vqa_large.yaml",
    "caption_coco_base.yaml",
    "caption_coco_large.yaml",
    "retrieval_coco_base.yaml",
    "retrieval_flickr_base.yaml",
    "grounding_refcoco_base.yaml",
)

# ---- parameter counts composed from docs/fidelity.md §12 --------------------------------------------------

VISION_B16_224 = 86_192_640  # CLIP ViT-B/16 visual @224 (197 tokens), incl. visual.proj [768, 512]
VISION_L14_224 = 303_966_208  # CLIP ViT-L/14 visual @224 (257 tokens), incl. visual.proj [1024, 768]
TEXT_ENCODER = 66_364_416
FUSION_LAYER = 9_451_776  # self + cross + FFN
CROSS_BLOCK = 2_363_904  # the cross-attention a connected layer does not have (not built here)
DECODER = 137_881_146
RETRIEVAL_HEADS = 395_267  # vision_proj, text_proj, itm_head, temp
ADAPTER = 788_736  # large: visn_fc + visn_layer_norm
MLM_HEAD = 622_650  # transform dense + LayerNorm + vocab bias (the vocab weight is tied to the embeddings)


def vision_params(preset: str, image_size: int) -> int:
    """The ViT without the (dead) visual.proj: the 224 px count of §12 plus/minus position-table rows."""
    width, patch, total_224 = (768, 16, VISION_B16_224) if preset == "base" else (1024, 14, VISION_L14_224)
    tokens = (image_size // patch) ** 2 + 1
    tokens_224 = (224 // patch) ** 2 + 1
    return total_224 + (tokens - tokens_224) * width - width * (512 if preset == "base" else 768)


COUNTED_TASKS = ("vqa", "caption", "retrieval", "grounding", "pretrain")


def expected_params(preset: str, task: str, image_size: int, stride: int, layers: int = 6) -> int:
    """Our task model's parameter count: the official modules that run (§1.7, §12), the dead ones dropped."""
    vision = vision_params(preset, image_size) + (ADAPTER if preset == "large" else 0)
    connected = sum(1 for i in range(layers) if i != 0 and i % stride == 0)
    fusion = layers * FUSION_LAYER - connected * CROSS_BLOCK
    if task == "caption":
        return vision + DECODER
    if task in ("vqa", "grounding"):
        return vision + TEXT_ENCODER + fusion + DECODER
    # momentum copies: the encoders and the ITC projections (§4); pretraining adds fusion and decoder (its
    # MLM head has no momentum copy)
    proj = RETRIEVAL_HEADS - 1 - 1538  # vision_proj + text_proj (no temp, no itm_head)
    if task == "retrieval":
        return vision + TEXT_ENCODER + fusion + RETRIEVAL_HEADS + (vision + TEXT_ENCODER + proj)
    if task == "pretrain":
        online = vision + TEXT_ENCODER + fusion + DECODER + RETRIEVAL_HEADS + MLM_HEAD
        return online + (vision + TEXT_ENCODER + fusion + DECODER + proj)
    raise ValueError(task)


def test_param_formula_reproduces_the_spec_totals():
    """The composition above gives the §12 numbers it was not built from."""
    assert vision_params("base", 256) + 768 * 512 == 86_238_720
    assert vision_params("base", 384) + 768 * 512 == 86_484_480
    assert vision_params("large", 336) + 1024 * 768 == 304_293_888
    # README "350M" base: ViT-B/16@224 + text encoder + executed fusion + decoder = 347.15M (§12)
    assert round((VISION_B16_224 + TEXT_ENCODER + 6 * FUSION_LAYER + DECODER) / 1e6, 2) == 347.15
    # base VQA @384: the official 491,416,635 minus CLIP text tower, visual.proj, fusion slots 0-5,
    # fusion embeddings and the connected layer's cross-attention (tests/modeling/test_param_counts.py)
    assert expected_params("base", "vqa", 384, 3) == 491_416_635 - 63_428_097 - 393_216 - 56_710_656 - (
        23_837_184 + CROSS_BLOCK
    )


# ---- every config ------------------------------------------------------------------------------------------


def _meta_config(cfg: RunConfig) -> RunConfig:
    """The config without its checkpoint (meta-device build: no weights to read)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))


@functools.cache
def _tokenizer():
    from mplug_fast.data import Tokenizer

    return Tokenizer()


def test_the_real_task_configs_exist():
    names = {p.name for p in CONFIGS}
    assert set(REAL_TASK_CONFIGS) <= names, sorted(set(REAL_TASK_CONFIGS) - names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_round_trips(path: Path):
    cfg = load_config(path)
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.objective.name in (None, cfg.model.task) or cfg.model.task == "pretrain"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_model_and_objective_on_meta(path: Path):
    cfg = _meta_config(load_config(path))
    with torch.device("meta"):
        model = build_model_from_config(cfg)
        try:
            objective = build_objective_from_config(cfg, model, _tokenizer())
            assert objective.model is model
        except FileNotFoundError as e:  # an objective that reads the training data (SCST's CIDEr-D table)
            if cfg.data.source != "official" or "data/" not in str(e):
                raise
    n = sum(p.numel() for p in model.parameters())
    if cfg.model.preset in ("base", "large") and cfg.model.task in COUNTED_TASKS:
        c = model.config
        expected = expected_params(cfg.model.preset, cfg.model.task, c.vision.image_size, c.fusion.stride)
        assert n == expected, f"{path.name}: {n:,} parameters, the spec composition gives {expected:,}"
    assert n > 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_options_fit_their_consumers(path: Path):
    """data.official (train and evaluation), data.max_length, eval.options: accepted by the reader's, the
    collator's and the evaluate function's signatures (a typo would otherwise surface hours into a run)."""
    from mplug_fast.tasks import get_task

    cfg = load_config(path)
    task = get_task(cfg.objective.name or cfg.model.task)
    options = {} if cfg.data.max_length is None else {task.length_option: cfg.data.max_length}
    task.collate(_tokenizer(), **options)
    if task.evaluable:
        task.check_eval_options(cfg.eval.options, f"{path.name} eval.options")
    if cfg.data.source != "official":
        assert not cfg.eval.official, "eval.official is for data.source official"
        return
    signature = inspect.signature(task.reader)
    signature.bind(**cfg.data.official)
    signature.bind(**{**cfg.data.official, **cfg.eval.official})
    for key in ("ann", "split_file"):
        for value in (cfg.data.official.get(key), cfg.eval.official.get(key)):
            for p in [value] if isinstance(value, str) else value or []:
                assert str(p).startswith("data/"), f"{path.name}: {key} {p!r} is not a data/ placeholder"


@pytest.mark.parametrize("name", REAL_TASK_CONFIGS)
def test_real_config_yaml_comments_every_value(name: str):
    """Each value line of a real task config carries a comment (its source, or "ours")."""
    lines = (CONFIG_DIR / name).read_text().splitlines()
    bare = [
        line
        for line in lines
        if line.strip()
        and not line.lstrip().startswith("#")
        and not line.rstrip().endswith(":")  # a section header
        and "#" not in line
        and line.split(":")[0].strip() not in ("output_dir", "device")  # run-local by nature
    ]
    assert not bare, f"{name}: values without a source comment: {bare}"


# ---- the official settings, restated from the spec ---------------------------------------------------------

COMMON = {
    "data.source": "official",
    "optim.weight_decay": 0.02,  # §9
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "seed": 42,
    "schedule.max_steps": None,  # epochs-based (§9 gives epochs)
}
EXPECTED: dict[str, dict[str, Any]] = {
    "vqa_base.yaml": {
        "model.preset": "base",
        "model.task": "vqa",
        "model.init_from": "data/mplug_base.pth",
        "image_size": 384,  # fidelity §13: 577 tokens
        "stride": 3,  # config_bert_stride3.json
        "optim.lr": 3e-5,
        "optim.lr_visual": 5e-6,
        "optim.grad_clip": 1.0,  # ds_config
        "schedule.epochs": 8,
        "schedule.warmup_steps": 400,
        "schedule.warmup_lr": 1e-5,
        "schedule.min_lr": 1e-6,
        "data.batch_size": 128,
        "precision.dtype": "bf16",
        "eval.options.beam_size": 5,
        "eval.options.max_answer_length": 10,
        "eval.options.method": "generate",
        "objective.options.alpha": 0.4,
        "objective.options.momentum": 0.995,
    },
    "vqa_large.yaml": {
        "model.preset": "large",
        "image_size": 336,
        "stride": 6,
        "optim.lr": 3e-5,
        "optim.lr_visual": 5e-6,
        "schedule.epochs": 8,
        "schedule.warmup_steps": 400,
        "schedule.warmup_lr": 1e-5,
        "schedule.min_lr": 1e-6,
        "data.batch_size": 256,
        "precision.dtype": "bf16",
        "eval.options.beam_size": 5,
        "eval.options.max_answer_length": 10,
    },
    "caption_coco_base.yaml": {
        "model.preset": "base",
        "model.task": "caption",
        "image_size": 384,
        "optim.lr": 1e-5,
        "optim.lr_visual": 5e-6,
        "schedule.epochs": 5,
        "data.batch_size": 64,
        "optim.accum_steps": 4,
        "data.max_length": 25,
        "data.official.prompt": "",
        "precision.dtype": "fp32",
        "eval.options.beam_size": 5,
        "eval.options.min_length": 8,
        "eval.options.max_length": 25,
    },
    "caption_coco_large.yaml": {
        "model.preset": "large",
        "image_size": 336,
        "stride": 6,
        "optim.lr": 1e-5,
        "optim.lr_visual": 5e-6,
        "schedule.epochs": 5,
        "data.batch_size": 64,
        "optim.accum_steps": 4,
        "eval.options.beam_size": 5,
        "eval.options.min_length": 8,
        "eval.options.max_length": 25,
    },
    "retrieval_coco_base.yaml": {
        "model.task": "retrieval",
        "image_size": 384,
        "optim.lr": 1e-5,
        "optim.lr_visual": 2e-6,
        "schedule.epochs": 8,
        "schedule.warmup_steps": 100,
        "data.batch_size": 128,
        "data.max_length": 30,
        "precision.dtype": "fp16",  # apex amp O1
        "eval.options.k": 256,
    },
    "retrieval_flickr_base.yaml": {
        "model.task": "retrieval",
        "optim.lr": 1e-5,
        "optim.lr_visual": 2e-6,
        "schedule.epochs": 8,
        "data.batch_size": 128,
        "eval.options.k": 256,
    },
    "grounding_refcoco_base.yaml": {
        "model.task": "grounding",
        "image_size": 336,  # bins hard-wired to 336
        "optim.lr": 2e-5,
        "optim.lr_visual": 5e-6,
        "schedule.epochs": 120,
        "schedule.warmup_lr": 1e-6,
        "schedule.warmup_steps": 500,  # 2000 iterations / accum 4
        "optim.accum_steps": 4,
        "data.batch_size": 24,
        "data.max_length": 20,
        "precision.grad_checkpointing": False,
        "objective.options.num_bins": 336,
        "eval.options.threshold": 0.5,
    },
}


def _get(cfg: RunConfig, dotted: str) -> Any:
    if dotted == "image_size":
        return cfg.model.overrides.get("vision.image_size")
    if dotted == "stride":
        return cfg.model.overrides.get("fusion.stride")
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _same(value: Any, want: Any) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, want))
    if numbers:
        return math.isclose(value, want, rel_tol=1e-12)
    return type(value) is type(want) and value == want


@pytest.mark.parametrize("name", REAL_TASK_CONFIGS)
def test_real_config_has_the_official_settings(name: str):
    cfg = load_config(CONFIG_DIR / name)
    wrong = {
        key: (_get(cfg, key), want)
        for key, want in {**COMMON, **EXPECTED[name]}.items()
        if not _same(_get(cfg, key), want)
    }
    assert not wrong, f"{name}: (config, spec) differ: {wrong}"
    if cfg.model.overrides.get("vision.image_size") is not None:  # the readers see the model's resolution
        assert cfg.data.official.get("image_size") == cfg.model.overrides["vision.image_size"]


# ---- the eval section feeds the evaluation ----------------------------------------------------------------


def test_eval_section_gives_the_evaluation_defaults(tmp_path, monkeypatch):
    """Weakest first: the task's eval_options, the config's eval section, the CLI arguments."""
    from mplug_fast import tasks
    from mplug_fast.tasks.protocol import Baseline
    from mplug_fast.train.evaluation import run_evaluation

    seen: dict[str, Any] = {}

    def fake_evaluate(
        model,
        dataset,
        tokenizer,
        *,
        batch_size,
        device,
        output=None,
        method="x",
        beam_size=0,
        max_answer_length=0,
    ):
        seen.update(
            batch=batch_size, method=method, beam=beam_size, max_len=max_answer_length, n=len(dataset)
        )
        return {"vqa_acc": 50.0}

    class FakeVQA(type(tasks.TASKS["vqa"])):
        evaluate = staticmethod(fake_evaluate)
        eval_options = {"method": "generate", "beam_size": 5}

        def baseline(self, train, evaluation):
            return Baseline("vqa_acc", 10.0, "constant")

    monkeypatch.setitem(tasks.TASKS, "vqa", FakeVQA())
    cfg = from_dict(
        {
            "model": {"task": "vqa"},
            "data": {"synthetic": {"image_size": 16, "eval_scenes": 3}},
            "eval": {"batch_size": 7, "options": {"beam_size": 3, "max_answer_length": 6}},
        }
    )

    def run(batch_size, options):
        seen.clear()
        return run_evaluation(
            None,
            None,
            cfg,
            "vqa",
            split="test",
            device="cpu",
            out_dir=tmp_path,
            metrics_name="metrics.json",
            batch_size=batch_size,
            limit=None,
            options=options,
            official_overrides={},
        )

    record = run(None, {"max_answer_length": 4})
    assert seen["batch"] == 7 and seen["method"] == "generate" and seen["beam"] == 3 and seen["max_len"] == 4
    assert record["eval_options"]["beam_size"] == 3 and record["headline"]["above_baseline"] is True
    run(2, {})
    assert seen["batch"] == 2 and seen["max_len"] == 6
    cfg.eval.options = {"beam": 3}
    with pytest.raises(ValueError, match=r"eval.options \['beam'\] unknown"):
        run(None, {})
    cfg.eval.options, cfg.eval.batch_size = {}, None
    run(None, {})
    assert seen["batch"] == 32 and seen["beam"] == 5  # nothing configured: the CLI default and the task's
