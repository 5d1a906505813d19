"""ITM learns in pretraining on the synthetic world with uniform negatives (``hard_negatives=False``): the ITM
loss falls clearly below its label prior (1 positive : 2 negatives) and on held-out scenes a matching
caption scores above another scene's caption."""

from __future__ import annotations

import math

import pytest
import torch

from mplug_fast.config import get_config
from mplug_fast.data import SyntheticWorld, Tokenizer
from mplug_fast.data.synthetic import PretrainDataset
from mplug_fast.objectives.pretrain import PretrainObjective
from mplug_fast.tasks import build_model, get_task
from tests.objectives.loop import train_steps

STEPS, B, TRAIN_SCENES, HELD_OUT = 150, 32, 4000, 200
PRIOR = -(math.log(1 / 3) + 2 * math.log(2 / 3)) / 3  # 0.6365: CE of always answering P(match) = 1/3


def _train(world: SyntheticWorld, tokenizer: Tokenizer) -> tuple[PretrainObjective, list[float]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)  # the batches and the ITM negatives
    model = build_model(get_config("micro"), "pretrain")  # the demo's model
    # the demo's pretrain options (mplug_fast/configs/demo/pretrain.yaml) with uniform ITM negatives, on
    # ITC + ITM only (MLM and PrefixLM do not touch the ITM head and triple the step time)
    objective = PretrainObjective.from_tokenizer(
        model,
        tokenizer,
        queue_size=0,
        temp_range=(0.07, 0.5),
        same_text_positive=True,
        momentum=0.9,
        alpha_warmup_steps=100,
        hard_negatives=False,
        weights={"mlm": 0.0, "prefix_lm": 0.0},
        sampler=lambda w: torch.multinomial(w, 1, generator=g).squeeze(1),
    )
    train = PretrainDataset(world, TRAIN_SCENES, 0)
    collate = get_task("pretrain").collate(tokenizer)

    def next_batch() -> dict:
        rows = torch.randint(len(train), (B,), generator=g).tolist()
        return collate([train[i] for i in rows])

    losses = train_steps(objective, next_batch, STEPS, lr=3e-3, weight_decay=0.02, clip=5.0, record="itm")
    return objective, losses


@pytest.mark.long
def test_itm_loss_falls_below_its_prior_and_ranks_held_out_pairs(one_thread):
    world = SyntheticWorld(image_size=32, max_objects=1, object_scale=2.0, seed=0)
    tokenizer = Tokenizer()
    objective, losses = _train(world, tokenizer)
    model = objective.model.eval()
    held_out = PretrainDataset(world, HELD_OUT, TRAIN_SCENES)
    items = [held_out[k] for k in range(HELD_OUT)]
    batch = get_task("pretrain").collate(tokenizer)(items)
    other = torch.roll(torch.arange(HELD_OUT), 1)  # each image with the next scene's caption
    with torch.no_grad():
        v = model.encode_image(batch["images"])
        t = model.encode_text(batch["text_ids"], batch["text_mask"].bool())
        mask = batch["text_mask"].bool()
        match = model.itm_logits(v, t, mask).softmax(-1)[:, 1]
        mismatch = model.itm_logits(v, t[other], mask[other]).softmax(-1)[:, 1]
    # a mismatched pair that the captions cannot tell apart (the same words) is not a mistake either way
    differ = torch.tensor([items[k]["caption"] != items[int(other[k])]["caption"] for k in range(HELD_OUT)])
    ranked = (match > mismatch)[differ].float().mean().item()
    last = sum(losses[-20:]) / 20
    print(f"itm {sum(losses[:10]) / 10:.3f} -> {last:.3f} (prior {PRIOR:.4f}); held-out ranked {ranked:.3f}")
    assert last < PRIOR - 0.06
    assert ranked > 0.65
