"""Pretraining: ITC (momentum queue) + ITM (hard negatives) + MLM + PrefixLM on image-text pairs
(fidelity §4).

Training: ``PretrainObjective`` (``mplug_fast.objectives.pretrain``) on the model with every component and
momentum copies. Data: the synthetic ``PretrainDataset`` or the official ``PretrainJsonDataset`` (a list of
{image, caption} files); batches from ``PretrainCollator``. Pretraining has no evaluation of its own: its
models are evaluated by finetuning (``model.init_from``) or zero-shot through the retrieval task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from mplug_fast.data.collate import PretrainCollator
from mplug_fast.data.official import PretrainJsonDataset
from mplug_fast.data.synthetic import PretrainDataset
from mplug_fast.modeling import MPlugForPretraining
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.pretrain import ContrastiveOptions, PretrainObjective
from mplug_fast.tasks.protocol import Baseline, DataSource, Task, TaskError, call_reader


@dataclass(frozen=True)
class PretrainOptions(ContrastiveOptions):
    """`PretrainObjective` options: the ITC / ITM ones of `ContrastiveOptions` (official: queue 65536,
    momentum 0.995, alpha 0.4), the MLM masking rate (official 15 %) and the loss weights."""

    mlm_probability: float = 0.15
    weights: dict[str, float] | None = None  # per-loss weights (itc, itm, mlm, prefix_lm); 0 skips one


class PretrainTask(Task):
    name = "pretrain"
    metric = "loss"
    evaluable = False
    model_class = MPlugForPretraining
    collator = PretrainCollator
    reader = PretrainJsonDataset
    synthetic_class = PretrainDataset
    Options = PretrainOptions

    def _objective(
        self, model: nn.Module, tokenizer: Any, options: PretrainOptions, data: DataSource | None
    ) -> Objective:
        return PretrainObjective.from_tokenizer(model, tokenizer, **vars(options))

    def official_dataset(self, split: str = "train", **kwargs: Any) -> Dataset:
        """The pretraining list has no splits (``split`` is ignored)."""
        return call_reader(self.reader, self.name, kwargs)

    def evaluate(self, model: nn.Module, dataset: Dataset, tokenizer: Any, **options: Any) -> dict[str, Any]:
        raise TaskError("pretraining has no evaluation of its own: finetune its model or evaluate retrieval")

    def baseline(self, train: Dataset, evaluation: Dataset) -> Baseline:
        raise TaskError("pretraining has no evaluation metric, hence no baseline")
