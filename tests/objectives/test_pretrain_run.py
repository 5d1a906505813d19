"""A short pretraining run on the synthetic world: ITC, ITM, MLM and PrefixLM all fall (plain AdamW loop)."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.data import SyntheticWorld, Tokenizer
from mplug_fast.data.synthetic.datasets import PretrainDataset
from mplug_fast.objectives.pretrain import warm_alpha
from mplug_fast.tasks import build_model, build_objective, get_task

from .conftest import small_config

STEPS, B, WINDOW = 70, 8, 10
# Entropy of the 1:2 positive / negative label mix: what a matcher blind to the content scores. Within this
# budget ITM only gets down to it (content matching against hard negatives takes far longer to start).
ITM_PRIOR = 0.6365


def test_alpha_warmup():
    step = torch.tensor(0)
    assert warm_alpha(0.4, step, 0) == 0.4
    assert warm_alpha(0.4, torch.tensor(50), 100) == pytest.approx(0.2)
    assert warm_alpha(0.4, torch.tensor(500), 100) == pytest.approx(0.4)


@pytest.mark.long
def test_pretraining_losses_fall_on_the_synthetic_world(one_thread):
    """16 one-object scenes, batch 8, 70 AdamW steps: MLM / PrefixLM drop by > 1.5 nats, ITC by > 0.25,
    ITM from its start to the label-prior entropy."""
    torch.manual_seed(0)
    tokenizer = Tokenizer()
    model = build_model(small_config(), "pretrain")
    # momentum 0.9 (official 0.995) so the momentum keys follow the online encoders within this short run
    objective = build_objective(
        "pretrain", model, tokenizer, queue_size=B, momentum=0.9, alpha_warmup_steps=20
    )
    dataset = PretrainDataset(SyntheticWorld(image_size=64, seed=0, max_objects=1), num_scenes=16)
    collate = get_task("pretrain").collate(tokenizer)
    items = [dataset[i] for i in range(len(dataset))]
    optimizer = torch.optim.AdamW(
        [p for p in objective.parameters() if p.requires_grad], lr=1e-3, weight_decay=0
    )
    g = torch.Generator().manual_seed(0)
    history: list[dict[str, float]] = []
    while len(history) < STEPS:
        order = torch.randperm(len(items), generator=g).tolist()
        for k in range(0, len(order) - B + 1, B):
            out = objective(collate([items[i] for i in order[k : k + B]]))
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            objective.after_optimizer_step()
            history.append({name: float(value.detach()) for name, value in out.items()})
    first = {
        n: sum(h[n] for h in history[1 : 1 + WINDOW]) / WINDOW for n in history[0]
    }  # step 0: queue empty
    last = {n: sum(h[n] for h in history[-WINDOW:]) / WINDOW for n in history[0]}
    print({n: (round(first[n], 3), round(last[n], 3)) for n in first})
    assert int(objective.step) == len(history)
    assert 0.001 <= model.temp.item() <= 0.5
    assert last["mlm"] < first["mlm"] - 1.5
    assert last["prefix_lm"] < first["prefix_lm"] - 1.5
    assert last["itc"] < first["itc"] - 0.25
    assert last["itm"] < first["itm"] - 0.05 and last["itm"] < ITM_PRIOR + 0.01
