"""Issue 5 item 1: the synthetic world is learnable *from the image*.

A small VQA model trained from scratch with the trainer answers colour questions far above their per-type
prior (answers ranked over the world's answer list with ``mplug_fast.generation.rank_answers``), and the
accuracy collapses to chance when each question is paired with another scene's image: what it learned is
read from the pixels, not from the question text or the answer prior.

Findings behind the settings (the ``vqa_tiny_synthetic`` config): with 8 px patches on 32 px images a
5-10 px object shares its patch with the grey background and colour stays at chance after 300 steps
(0.29 vs prior 0.15 on one-object scenes); 4 px patches learn it (0.96 at lr 1e-3, 0.89 at 2e-3). With
colour and shape questions mixed, 3e-3 learns colour faster than 1e-3 (0.99 vs 0.38 after 400 steps), but
2e-3 and 3e-3 collapse the two-object all-types run onto a question-blind plateau; the config keeps 1e-3.
Shape questions do not learn within minutes at this model size (loss stuck at ln 4 after 400 steps, even
shape-only), so only colour is asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mplug_fast.data import Tokenizer
from mplug_fast.data.synthetic import QA_TYPES, SyntheticWorld, VQADataset, majority_baseline
from mplug_fast.generation import rank_answers
from mplug_fast.tasks import get_task
from mplug_fast.train.config import load_config
from mplug_fast.train.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[2] / "mplug_fast" / "configs" / "vqa_tiny_synthetic.yaml"
EVAL_QUESTIONS = 300
EVAL_START = 1_000_000  # far from the training scenes


@torch.no_grad()
def vqa_accuracy(
    model,
    tokenizer,
    world: SyntheticWorld,
    n: int,
    start: int,
    types: tuple[str, ...] = QA_TYPES,
    shuffle_images: bool = False,
) -> tuple[float, dict[str, float]]:
    """Top-1 accuracy of answer ranking over ``world.answer_list()`` on ``n`` held-out questions.

    ``shuffle_images``: pair question i with the image of question i + 1 of its batch (a control: a model
    that reads the image drops to chance on image-dependent types). Returns (overall, per-type accuracy).
    """
    model.eval()
    ds = VQADataset(world, n, start=start, types=types)
    collate = get_task("vqa").collate(tokenizer)
    answers = world.answer_list()
    enc = tokenizer([a + "[SEP]" for a in answers])
    hits: dict[str, list[bool]] = {}
    for i in range(0, n, 100):
        batch = collate([ds[j] for j in range(i, min(i + 100, n))])
        images = batch["images"].roll(1, dims=0) if shuffle_images else batch["images"]
        memory, memory_mask = model.fused_memory(images, batch["question_ids"], batch["question_mask"])
        ranked = rank_answers(
            model.decoder, memory, memory_mask, enc.input_ids, enc.attention_mask.bool(), k=len(answers)
        )
        for q, best in enumerate(ranked.indices[:, 0].tolist()):
            hits.setdefault(batch["type"][q], []).append(answers[best] == batch["answers"][q][0])
    total = sum(sum(v) for v in hits.values()) / n
    return total, {t: sum(v) / len(v) for t, v in hits.items()}


def train_and_evaluate(tmp_path: Path, overrides: list[str]):
    """Trains the config with ``overrides`` and returns (summary, seconds, world, types, baseline, model)."""
    cfg = load_config(
        CONFIG,
        [
            f"output_dir={tmp_path}",
            "device=cpu",
            "logging.progress=false",
            "logging.plots=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )
    trainer = Trainer.from_config(cfg)
    start = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - start
    s = cfg.data.synthetic
    world = SyntheticWorld(
        image_size=s.image_size, max_objects=s.max_objects, min_objects=s.min_objects, seed=s.seed
    )
    types = tuple(s.vqa_types or QA_TYPES)
    ds = VQADataset(world, EVAL_QUESTIONS, start=EVAL_START, types=types)
    base = majority_baseline(ds.question(i)[1] for i in range(EVAL_QUESTIONS))
    return summary, seconds, world, types, base, trainer


def _report(name: str, steps: int, seconds: float, summary, acc, base, per_type, shuffled) -> None:
    print(
        f"\n{name}: {steps} steps in {seconds:.0f} s ({summary['steps_per_s']:.2f} steps/s), "
        f"loss {summary['first']['loss']:.3f} -> {summary['last']['loss']:.3f}; accuracy {acc:.3f} vs "
        f"majority {base.accuracy:.3f}, per-type prior {base.prior_accuracy:.3f}; per type "
        + ", ".join(
            f"{t} {v:.2f} (prior {base.per_type[t][1]:.2f}, shuffled images {shuffled.get(t, 0.0):.2f})"
            for t, v in sorted(per_type.items())
        )
    )


@pytest.mark.long
def test_tiny_vqa_learns_colour_from_the_image(tmp_path):
    """One object per scene, colour questions: the answer is only in the pixels (8 colours, chance 1/8)."""
    steps = 300
    summary, seconds, world, types, base, trainer = train_and_evaluate(
        tmp_path,
        [
            f"schedule.max_steps={steps}",
            f"schedule.warmup_steps={steps // 10}",
            "data.synthetic.max_objects=1",
            "data.synthetic.vqa_types=[color]",
        ],
    )
    model, tok = trainer.objective.model, Tokenizer()
    acc, per_type = vqa_accuracy(model, tok, world, EVAL_QUESTIONS, EVAL_START, types)
    _, shuffled = vqa_accuracy(model, tok, world, EVAL_QUESTIONS, EVAL_START, types, shuffle_images=True)
    _report("VQA colour from the image", steps, seconds, summary, acc, base, per_type, shuffled)
    prior = base.per_type["color"][1]
    assert summary["last"]["loss"] < 0.2 * summary["first"]["loss"]
    assert per_type["color"] >= prior + 0.35, (per_type, base)
    # the control: another scene's image gives ~chance (8 colours); only the image carries the answer
    assert shuffled["color"] <= prior + 0.1, (shuffled, base)
    assert per_type["color"] >= shuffled["color"] + 0.35


@pytest.mark.slow
def test_tiny_vqa_full_config(tmp_path):
    """The shipped config as is (one-object scenes, every question type, 1500 steps: ~4.5 min on 2 busy
    cores) beats the majority answer and learns colour from the image (measured: 0.85 vs prior 0.18)."""
    summary, seconds, world, types, base, trainer = train_and_evaluate(tmp_path, [])
    model, tok = trainer.objective.model, Tokenizer()
    acc, per_type = vqa_accuracy(model, tok, world, EVAL_QUESTIONS, EVAL_START, types)
    _, shuffled = vqa_accuracy(model, tok, world, EVAL_QUESTIONS, EVAL_START, types, shuffle_images=True)
    steps = trainer.config.schedule.max_steps
    _report("VQA full config", steps, seconds, summary, acc, base, per_type, shuffled)
    assert summary["last"]["loss"] < 0.6 * summary["first"]["loss"]
    assert acc >= base.accuracy + 0.15, (acc, base)
    assert per_type["color"] >= base.per_type["color"][1] + 0.3, (per_type, base)
    assert per_type["color"] >= shuffled["color"] + 0.3, (per_type, shuffled)
