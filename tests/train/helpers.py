"""Small models, objectives and data shared by the trainer tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.config import get_config
from mplug_fast.data import Tokenizer
from mplug_fast.data.synthetic import SyntheticWorld, VQADataset
from mplug_fast.objectives.base import Objective
from mplug_fast.tasks import build_model, get_task
from mplug_fast.train.config import from_dict

IMAGE_SIZE = 16


def micro_overrides(dropout: float = 0.0) -> dict[str, Any]:
    """Overrides of the ``micro`` preset for the unit tests: D=32 (2 heads, one layer per stack, one fusion
    layer), 16 px images in 8 px patches (5 image tokens), 64 text positions; ``dropout`` on the text hidden
    states. Use with ``get_config("micro", **micro_overrides())`` or a run config with ``preset: micro``."""
    return {
        "vision.width": 32,
        "vision.patch_size": 8,
        "vision.image_size": IMAGE_SIZE,
        "text.hidden_size": 32,
        "text.intermediate_size": 64,
        "text.max_position_embeddings": 64,
        "text.hidden_dropout": dropout,
        "fusion.layers": 1,
        "embed_dim": 16,
    }


class VQALoss(Objective):
    """A test objective written here, independent of the VQA task's: the weighted per-answer
    summed token CE of ``MPlugForVQA`` / number of questions, plus a buffer and an after-step hook so that
    checkpoints must carry objective state."""

    def __init__(self, model: nn.Module, nan_at: set[int] | None = None):
        super().__init__()
        self.model = model
        self.nan_at = set(nan_at or ())
        self.calls = 0
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_loss", torch.zeros(()))

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        logits = self.model(
            batch["images"],
            batch["question_ids"],
            batch["question_mask"],
            batch["answer_ids"],
            batch["answer_mask"],
            batch["answer_index"],
        )
        targets = batch["answer_ids"][:, 1:].masked_fill(~batch["answer_mask"][:, 1:], -100)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        seq = ce.view(targets.shape).sum(1)
        loss = (batch["answer_weights"] * seq).sum() / batch["images"].shape[0]
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        self.calls += 1
        with torch.no_grad():
            self.ema_loss.mul_(0.9).add_(0.1 * loss.detach())
        return {"loss": loss, "loss_vqa": loss.detach()}

    def after_optimizer_step(self) -> None:
        self.updates += 1


def make_objective(seed: int = 0, dropout: float = 0.0, nan_at: set[int] | None = None) -> VQALoss:
    torch.manual_seed(seed)
    return VQALoss(build_model(get_config("micro", **micro_overrides(dropout)), "vqa"), nan_at)


_TOKENIZER: Tokenizer | None = None


def tokenizer() -> Tokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer()
    return _TOKENIZER


class MemoryDataset(torch.utils.data.Dataset):
    """A synthetic VQA dataset rendered once into memory (the tests read it many times)."""

    def __init__(self, n: int = 24, seed: int = 0):
        ds = VQADataset(SyntheticWorld(image_size=IMAGE_SIZE, max_objects=2, seed=seed), n)
        self.items = [ds[i] for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


_DATA: dict[int, MemoryDataset] = {}


def dataset(n: int = 24) -> MemoryDataset:
    if n not in _DATA:
        _DATA[n] = MemoryDataset(n)
    return _DATA[n]


def collate():
    return get_task("vqa").collate(tokenizer())


def run_config(tmp_path, **sections: Any):
    """A RunConfig for the test objective: CPU, fp32, no progress bar, no plots unless asked."""
    data = {
        "output_dir": str(tmp_path),
        "device": "cpu",
        "seed": 7,
        "model": {"task": "vqa", "preset": "micro"},
        "data": {"batch_size": 4, "shuffle": True},
        "optim": {"lr": 1e-3, "lr_visual": 5e-4, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": {"max_steps": 4, "warmup_steps": 1},
        "logging": {"every_steps": 1, "progress": False, "tensorboard": False, "plots": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return from_dict(data)


def state_equal(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose tensors differ (bitwise); recurses into nested dicts / lists."""
    diffs = []

    def walk(x, y, path):
        if isinstance(x, Tensor):
            if not (isinstance(y, Tensor) and x.shape == y.shape and torch.equal(x, y)):
                diffs.append(path)
        elif isinstance(x, dict):
            if set(x) != set(y):
                diffs.append(f"{path} keys")
            for k in x:
                if k in y:
                    walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y):
                diffs.append(f"{path} len")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                diffs.append(path)
        elif x != y:
            diffs.append(path)

    walk(a, b, "")
    return diffs
