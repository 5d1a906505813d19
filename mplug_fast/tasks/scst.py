"""Caption SCST: self-critical sequence training with an in-process CIDEr-D reward (fidelity §5.3), the
CIDEr-D-optimised continuation of a CE-finetuned caption model.

As a task, everything but the loss is the captioning task's: the model (the caption model's weights, saved
under the name "scst"), the evaluation (beam 5, min 8, max 25; BLEU, ROUGE-L, CIDEr-D), the metric, the
most-frequent-caption baseline and the predictions file. Training reads one sample per training image with
all of its gold captions (the test form of the caption datasets, for both splits), collated by
``CaptionCollator``, which passes them on as ``captions``.

Per image, k candidate captions are drawn without gradients (ancestral sampling with the KV-cache
generator, or the k hypotheses of a beam search), decoded, PTB-tokenised and scored with CIDEr-D against
that image's gold references. The document frequencies of CIDEr-D come from a **fixed** table built once
from the training references (`CiderD(refs_corpus)`), so a candidate's reward does not depend on the other
images of its batch (pycocoevalcap's corpus CIDEr takes its idf from the evaluated set: fine for a test
split, wrong for a reward). The baseline is the mean reward of the image's other k - 1 candidates
("others", leave-one-out) or of all k ("all", official), and

    loss = mean over (image, candidate) of  -(reward - baseline) * log p(candidate)

where log p(candidate) is a teacher-forced re-scoring of the candidate ids **with** gradients (one batched
decoder forward over all B*k candidates, reading each image's memory K/V through ``memory_index=k``, never
tiled): the sum of the generated tokens' log-probs, the final [SEP] included, the padding after it and the
prompt tokens excluded. ``length_norm=False`` (default) uses that sum as is; ``length_norm=True`` divides
it by the candidate's number of scored tokens (the official code divides its beam score by the number of
token ids, [CLS] included: one token more). Rewards and baselines are constants: the gradient flows only
through the log-probs.

Differences from the official ``caption_mplug_scst.py`` (docs/fidelity.md §5.3, §10.7, §10.11), by design:
    * the official code back-propagates through the beam search's own scores (the whole search graph is
      kept; the score is the cumulative log-prob over the GNMT length penalty, with the min-length [SEP]
      mask); here the search runs under ``no_grad`` with the KV cache and the chosen ids are re-scored in
      one forward with the model's plain log-probs (no length penalty, no mask), at a fraction of the memory;
    * candidates are drawn with the decoder in eval mode (the official search runs with dropout on); the
      re-scoring runs in the module's mode;
    * the official reward tokenises with the Java PTBTokenizer in a process pool; here the pure-Python
      ``ptb_tokenize_sentence`` (equal on ordinary captions, see ``mplug_fast.metrics.caption``).
    * the image encoder runs once per step: candidates are drawn from the detached image states that the
      re-scoring reads with gradients.

    SCSTObjective(model, tokenizer, references_df=..., num_samples=5, candidates="sample"|"beam", ...)
    document_frequencies(references) -> CiderD     the fixed table from raw training references
    references_from_data(spec) -> list[list[str]]  the training references of a run's data section
    advantages(rewards, baseline) -> [B, k]        reward - baseline
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mplug_fast.data.official import KarpathyCaptionDataset
from mplug_fast.data.synthetic import CaptionDataset
from mplug_fast.generation import CLS_ID, GenerationOutput, beam_search, sample
from mplug_fast.metrics.caption import CiderD, ptb_tokenize_sentence
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.losses import IGNORE, lm_targets
from mplug_fast.objectives.pretrain import require_keys
from mplug_fast.tasks.caption import CaptionTask
from mplug_fast.tasks.evaluation import eval_mode
from mplug_fast.tasks.protocol import DataSource, TaskError, call_reader
from mplug_fast.tasks.sources import synthetic_scenes

Candidates = Literal["sample", "beam"]
BaselineKind = Literal["others", "all"]


def document_frequencies(references: CiderD | Sequence[Sequence[str]]) -> CiderD:
    """The fixed CIDEr-D document-frequency table: ``references`` is one list of raw captions per training
    image (PTB-tokenised here) or an existing `CiderD` (returned as is; its references must already be
    tokenised)."""
    if isinstance(references, CiderD):
        return references
    if isinstance(references, (str, Mapping)) or len(references) == 0:
        raise ValueError(
            "references_df must be a CiderD or a non-empty list of reference lists (one per training "
            f"image), got {type(references).__name__}"
        )
    return CiderD([tokenized(refs, f"training image {i}") for i, refs in enumerate(references)])


def tokenized(references: Sequence[str], what: str) -> list[str]:
    """One image's gold captions, PTB-tokenised; ValueError naming ``what`` unless a non-empty list."""
    if isinstance(references, str) or len(references) == 0:
        raise ValueError(f"{what}: expected a non-empty list of captions, got {references!r}")
    return [ptb_tokenize_sentence(r) for r in references]


def references_from_data(spec: Mapping[str, Any]) -> list[list[str]]:
    """The gold captions of every training image of a run's data section, for `document_frequencies`.

    ``spec`` has exactly one key: ``synthetic`` (the ``data.synthetic`` section: image_size, num_scenes,
    max_objects, ...; training scenes 0..num_scenes-1, all captions of each) or ``official`` (the
    ``data.official`` section of a ``KarpathyCaptionDataset``: ann, karpathy_splits, ...; all sentences of
    each training image; images are not opened).
    """
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in ("synthetic", "official"):
        raise ValueError(
            "references_df as a data spec must be {'synthetic': {...data.synthetic...}} or "
            f"{{'official': {{...data.official...}}}}, got {spec!r}"
        )
    ((source, options),) = spec.items()
    options = dict(options or {})
    if source == "synthetic":
        scenes = synthetic_scenes("train", **options)
        return [list(scenes.world.scene(i).captions) for i in range(scenes.count)]

    options["split"] = "test"  # the per-image form: all sentences of each image
    return [list(g) for g in KarpathyCaptionDataset(**options).gold]


def advantages(rewards: Tensor, baseline: BaselineKind = "others") -> Tensor:
    """rewards [B, k] -> reward - baseline [B, k]; "others": the mean of the image's other k - 1 rewards
    (needs k >= 2), "all": the mean of all k (official; the same direction, scaled by (k - 1) / k)."""
    k = rewards.shape[1]
    total = rewards.sum(dim=1, keepdim=True)  # [B, 1]
    if baseline == "others":
        if k < 2:
            raise ValueError("the leave-one-out baseline needs num_samples >= 2")
        return rewards - (total - rewards) / (k - 1)
    if baseline == "all":
        return rewards - total / k
    raise ValueError(f"baseline must be 'others' or 'all', got {baseline!r}")


@dataclass(frozen=True)
class SCSTOptions:
    """The options of `SCSTObjective` and of the "scst" task (the run config's ``objective.options``)."""

    num_samples: int = 5  # k candidates per image (official: 5 beams)
    # "sample" (ancestral sampling: top_k / top_p / temperature) or "beam" (the k hypotheses of a beam search
    # with beam_size = k, beam_mode)
    candidates: Candidates = "sample"
    max_length: int = 25  # generated tokens after the start ids at most (official 25)
    min_length: int = 8  # ... at least (official 8)
    baseline: BaselineKind = "others"  # "others" (leave-one-out mean) or "all" (official: mean of the k)
    length_norm: bool = False  # divide each candidate's log-prob by its number of scored tokens (official)
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    beam_mode: Literal["official", "standard"] = "official"
    prompt: str = ""  # text before the caption ("" for COCO, official); its tokens are not scored
    seed: int | None = (
        None  # of the sampling generator (None: torch's RNG, which the trainer seeds and saves)
    )
    # the task's: a data spec of the training references (None: this run's training data); the objective
    # takes the table itself (`references_df`)
    references_df: dict[str, Any] | None = None


class SCSTObjective(Objective):
    """SCST on a caption model (``MPlugForCaption``-like: ``encode_image`` + ``decoder``); see the module doc.

    Args:
        model: the caption model (task "scst", e.g. initialised from a CE-finetuned caption model).
        tokenizer: ``mplug_fast.data.Tokenizer`` (decodes candidates; encodes the prompt).
        references_df: the fixed CIDEr-D table (`CiderD`) or the raw training references, one list per image.
        options: `SCSTOptions` (but ``references_df``).

    Batch: ``images`` [B, 3, R, R] and ``captions`` (B lists of raw gold captions: the collator's test-form
    caption samples). Returns {"loss", "scst" (detached loss), "reward" (mean CIDEr-D of the candidates),
    "advantage_abs" (mean |reward - baseline|)}.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        references_df: CiderD | Sequence[Sequence[str]],
        **options: Any,
    ):
        super().__init__()
        o = SCSTOptions(**options)
        if o.candidates not in ("sample", "beam"):
            raise ValueError(f"candidates must be 'sample' or 'beam', got {o.candidates!r}")
        if o.baseline not in ("others", "all"):
            raise ValueError(f"baseline must be 'others' or 'all', got {o.baseline!r}")
        if o.num_samples < 2:
            raise ValueError(f"SCST needs num_samples >= 2 candidates per image, got {o.num_samples}")
        if not 0 <= o.min_length <= o.max_length or o.max_length < 1:
            raise ValueError(
                f"need 0 <= min_length <= max_length and max_length >= 1; got {o.min_length}, {o.max_length}"
            )
        if tokenizer is None:
            raise ValueError("SCSTObjective needs the tokenizer (to decode the candidates)")
        self.model, self.tokenizer = model, tokenizer
        self.cider = document_frequencies(references_df)
        self.num_samples, self.candidates = o.num_samples, o.candidates
        self.max_length, self.min_length = o.max_length, o.min_length
        self.baseline, self.length_norm = o.baseline, o.length_norm
        self.top_k, self.top_p, self.temperature, self.beam_mode = (
            o.top_k,
            o.top_p,
            o.temperature,
            o.beam_mode,
        )
        # [CLS] prompt, without the final [SEP]
        self.start_ids = list(tokenizer.encode(o.prompt))[:-1] if o.prompt.strip() else [CLS_ID]
        self.seed = o.seed
        self._generator: torch.Generator | None = None

    # ---- the steps of one forward --------------------------------------------------------------------

    def _rng(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def draw(self, memory: Tensor) -> GenerationOutput:
        """k candidates per image from image states memory [B, Nv, D] (decoder in eval mode, no grad).

        Returns ids [B, k, L] (start ids, generated tokens, [SEP], then padding) and lengths [B, k]."""
        B = memory.shape[0]
        decoder = self.model.decoder
        start = torch.tensor(self.start_ids, dtype=torch.long, device=memory.device).expand(B, -1)
        lengths = dict(num_return=self.num_samples, max_length=self.max_length, min_length=self.min_length)
        with eval_mode(decoder):
            if self.candidates == "sample":
                sampling = dict(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)
                generator = self._rng(memory.device)
                return sample(decoder, memory, None, start, **lengths, **sampling, generator=generator)
            return beam_search(
                decoder, memory, None, start, beam_size=self.num_samples, mode=self.beam_mode, **lengths
            )

    def texts(self, ids: Tensor) -> list[str]:
        """ids [N, L] -> the generated captions (start ids and special tokens dropped), PTB-tokenised."""
        start = len(self.start_ids)
        return [
            ptb_tokenize_sentence(self.tokenizer.decode(row[start:], skip_special_tokens=True))
            for row in ids.tolist()
        ]

    def rewards(self, texts: Sequence[str], references: Sequence[Sequence[str]]) -> Tensor:
        """CIDEr-D [B, k] of B*k tokenised candidates (k consecutive per image) against each image's raw
        gold captions (B lists), with the fixed document-frequency table."""
        B = len(references)
        if B == 0 or len(texts) % B != 0:
            raise ValueError(f"{len(texts)} candidates for {B} images: need k candidates per image")
        k = len(texts) // B
        refs = [tokenized(r, f"image {i} of the batch") for i, r in enumerate(references)]
        per_candidate = [refs[n // k] for n in range(len(texts))]  # the same list object per image
        return torch.tensor(self.cider.score(list(texts), per_candidate), dtype=torch.float32).view(B, k)

    def log_probs(self, memory: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """Teacher-forced log p of the candidates, with gradients: memory [B, Nv, D], ids [B, k, L],
        lengths [B, k] -> [B, k] fp32 (generated tokens only; divided by their count if `length_norm`)."""
        B, k, L = ids.shape
        flat = ids.reshape(B * k, L)
        mask = torch.arange(L, device=ids.device)[None, :] < lengths.reshape(-1, 1)  # bool [B*k, L]
        decoder = self.model.decoder
        logits = decoder(flat, mask, None, None, memory_kv=decoder.project_memory(memory), memory_index=k)
        targets = lm_targets(flat, mask, ignore_prefix=len(self.start_ids) - 1)  # [B*k, L-1]
        token_lp = -F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
        ).view(B * k, L - 1)
        seq = token_lp.sum(dim=1)
        if self.length_norm:
            seq = seq / (targets != IGNORE).sum(dim=1).clamp(min=1)
        return seq.view(B, k)

    def loss(self, log_probs: Tensor, rewards: Tensor) -> Tensor:
        """mean of -(reward - baseline) * log_probs over [B, k]; rewards are constants (no gradient)."""
        adv = advantages(rewards.detach().to(log_probs), self.baseline)
        return -(adv * log_probs).mean()

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images [B, 3, R, R], captions (B lists of gold captions). Returns the loss dict."""
        require_keys(batch, ("images", "captions"), "SCSTObjective")
        references = batch["captions"]
        if len(references) != batch["images"].shape[0]:
            raise ValueError(f"{len(references)} reference lists for {batch['images'].shape[0]} images")
        memory = self.model.encode_image(batch["images"])  # [B, Nv, D] (with grad)
        out = self.draw(memory.detach())
        B, k, L = out.ids.shape
        rewards = self.rewards(self.texts(out.ids.reshape(B * k, L)), references).to(memory.device)
        loss = self.loss(self.log_probs(memory, out.ids, out.lengths), rewards)
        adv = advantages(rewards, self.baseline)
        return {
            "loss": loss,
            "scst": loss.detach(),
            "reward": rewards.mean(),
            "advantage_abs": adv.abs().mean(),
        }


# ---- the task --------------------------------------------------------------------------------------------


class SCSTTask(CaptionTask):
    name = "scst"
    Options = SCSTOptions
    pipeline_method = None  # served as "caption" (the same weights)
    aliases = ()

    def _objective(
        self, model: nn.Module, tokenizer: Any, options: SCSTOptions, data: DataSource | None
    ) -> Objective:
        values = vars(options).copy()
        spec = values.pop("references_df")
        if spec is None:  # the fixed CIDEr-D table: this run's training data
            if data is None:
                raise TaskError("the 'scst' objective needs references_df (or the run's data source)")
            spec = {data.source: data.synthetic if data.source == "synthetic" else data.official}
        return SCSTObjective(model, tokenizer, references_df=references_from_data(spec), **values)

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        """Both splits in the test form: one item per scene with all its captions (the SCST references)."""
        s = synthetic_scenes(split, **world)
        return CaptionDataset(s.world, s.count, s.start, split="test")

    def official_dataset(self, split: str = "train", **kwargs: Any) -> Dataset:
        """The per-image form of the Karpathy reader (all gold captions of each image), for both splits."""
        return call_reader(self.reader, self.name, {**kwargs, "split": "test"})
