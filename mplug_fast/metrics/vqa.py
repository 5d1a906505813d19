"""The official VQA accuracy (VQA v2 API ``vqaEval.py``, shipped by mPLUG in ``vqaTools/``), EvalAI output.

Accuracy of one prediction against the human answers (10 in VQA v2):

    acc = mean over i of min(1, #{j != i : gt_j == pred} / 3)

i.e. "at least 3 of the other 9 annotators said it", averaged over the 10 leave-one-out subsets.

Normalisation, as the official evaluation does it (``normalize_answer``):
    1. newline / tab -> space, strip;
    2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when it touches a space
       somewhere in the text (or when the text has a digit,digit comma anywhere), otherwise replaced by a
       space; then periods not followed by a digit are deleted -- only the first 32 of them (the official
       code passes ``re.UNICODE`` = 32 as ``count``); the apostrophe is kept;
    3. lower-case, split on whitespace, number words zero..ten (and "none") -> digits, drop a / an / the;
    4. contractions written without an apostrophe are restored ("dont" -> "don't", "whats" -> "what's").

Quirks of the official code, all reproduced with ``official=True`` (the default):
    * the prediction gets steps 1-4, but the ground-truth answers get none of them, only step 2 when the
      annotators disagree (more than one distinct raw answer); so with unanimous answers "two" the prediction
      "two" (normalised to "2") scores 0, and a ground truth with leading or trailing whitespace ("2 ") or a
      newline never matches (the prediction is stripped, the ground truth is not). The released VQA v2
      annotations are already normalised, which is why this rarely shows. ``official=False`` applies all
      steps to both sides.
    * the contraction table has keys that can never match (capitalised "Im", "Ive", "Id've", "I'dve" --
      the text is lower-cased first), identity entries ("let's", "she's", "'ow'sat") and one reversed entry
      ("somebody'd" -> "somebodyd").
    * the punctuation decision for every character looks at the *original* text, not the partly cleaned one,
      and nothing is stripped afterwards: a ground-truth "dog!" (with disagreeing annotators) becomes "dog "
      and never matches (the prediction "dog!" becomes "dog" through the split/join of step 3).
    * with a single ground-truth answer the leave-one-out set is empty and the accuracy is always 0 (the
      formula assumes 10 annotators); ``exact_match`` is the natural metric for single-answer data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mplug_fast.io import atomic_write_json

# ---- the official normalisation tables ---------------------------------------------------------------------

PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')  # each character, in the official order
NUMBER_WORDS = {"none": "0"} | {
    w: str(n) for n, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table as data: "canonical=variant[,variant...]", each variant (a spelling without
# its apostrophes) mapped to the canonical form, the official quirks kept (see the module docstring).
_CONTRACTION_VARIANTS = """
ain't=aint aren't=arent can't=cant could've=couldve couldn't=couldnt couldn't've=couldn'tve,couldnt've
didn't=didnt doesn't=doesnt don't=dont hadn't=hadnt hadn't've=hadnt've,hadn'tve hasn't=hasnt haven't=havent
he'd=hed he'd've=hed've,he'dve he's=hes how'd=howd how'll=howll how's=hows I'd've=Id've,I'dve I'm=Im
I've=Ive isn't=isnt it'd=itd it'd've=itd've,it'dve it'll=itll let's=let's ma'am=maam mightn't=mightnt
mightn't've=mightnt've,mightn'tve might've=mightve mustn't=mustnt must've=mustve needn't=neednt not've=notve
o'clock=oclock oughtn't=oughtnt 'ow's'at=ow's'at,'ows'at 'ow'sat='ow'sat shan't=shant
she'd've=shed've,she'dve she's=she's should've=shouldve shouldn't=shouldnt
shouldn't've=shouldnt've,shouldn'tve somebodyd=somebody'd somebody'd've=somebodyd've,somebody'dve
somebody'll=somebodyll somebody's=somebodys someone'd=someoned someone'd've=someoned've,someone'dve
someone'll=someonell someone's=someones something'd=somethingd something'd've=somethingd've,something'dve
something'll=somethingll that's=thats there'd=thered there'd've=thered've,there'dve there're=therere
there's=theres they'd=theyd they'd've=theyd've,they'dve they'll=theyll they're=theyre they've=theyve
'twas=twas wasn't=wasnt we'd've=wed've,we'dve we've=weve weren't=werent what'll=whatll what're=whatre
what's=whats what've=whatve when's=whens where'd=whered where's=wheres where've=whereve who'd=whod
who'd've=whod've,who'dve who'll=wholl who's=whos who've=whove why'll=whyll why're=whyre why's=whys
won't=wont would've=wouldve wouldn't=wouldnt wouldn't've=wouldnt've,wouldn'tve y'all=yall
y'all'll=yall'll,y'allll y'all'd've=yall'd've,y'alld've,y'all'dve you'd=youd you'd've=youd've,you'dve
you'll=youll you're=youre you've=youve
"""
CONTRACTIONS: dict[str, str] = {
    variant: canonical
    for entry in _CONTRACTION_VARIANTS.split()
    for canonical, variants in [entry.split("=")]
    for variant in variants.split(",")
}

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_LIMIT = 32  # the official code passes re.UNICODE (= 32) as re.sub's count


def process_punctuation(text: str) -> str:
    """Step 2 of the normalisation (see the module docstring), official quirks included."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        touches_space = (p + " " in text) or (" " + p in text)  # tested on the original text (official)
        out = out.replace(p, "" if (touches_space or delete_all) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def normalize_answer(answer: str) -> str:
    """The full official normalisation of a predicted answer (steps 1-4)."""
    text = process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


# ---- accuracy ----------------------------------------------------------------------------------------------


def vqa_score(prediction: str, gt_answers: Sequence[str], official: bool = True) -> float:
    """VQA accuracy in [0, 1] of one prediction against its human answers (10 in VQA v2).

    Args:
        prediction: the model's answer (raw text).
        gt_answers: the annotators' answers, duplicates included (they are the votes).
        official: True = the official normalisation asymmetry (see the module docstring: ground truths are
            not whitespace-stripped); False = both sides fully normalised (symmetric).
    """
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise ValueError(f"gt_answers must be a non-empty list of strings, got {gt_answers!r}")
    pred = normalize_answer(prediction)
    if not official:
        gts = [normalize_answer(a) for a in gt_answers]
    elif len(set(gt_answers)) > 1:  # the official compares raw ground truths: no whitespace cleaning
        gts = [process_punctuation(a) for a in gt_answers]
    else:
        gts = list(gt_answers)
    matches = [g == pred for g in gts]
    total = sum(matches)
    # leave annotator i out: the matches among the others are total - matches[i]
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0 (single-answer data)."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) == pred for a in answers))


@dataclass(frozen=True)
class VQAAccuracy:
    """overall: mean accuracy in percent; per_question: question id -> accuracy in [0, 1];
    per_type: answer/question type -> mean accuracy in percent (when types were given)."""

    overall: float
    per_question: dict[Hashable, float]
    per_type: dict[str, float] = field(default_factory=dict)


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    gt_answers: Mapping[Hashable, Sequence[str]],
    types: Mapping[Hashable, str] | None = None,
    official: bool = True,
) -> VQAAccuracy:
    """The official VQA accuracy over a set of questions (the official reports ``round(100 * mean, 2)``).

    Args:
        predictions: question id -> predicted answer; every id must be in ``gt_answers``.
        gt_answers: question id -> the human answers (10 in VQA v2).
        types: optional question id -> type (e.g. answer_type "yes/no" / "number" / "other").
    """
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [q for q in predictions if q not in gt_answers]
    if missing:
        raise KeyError(f"{len(missing)} predicted question ids have no ground truth, e.g. {missing[:5]}")
    per_q = {q: vqa_score(p, gt_answers[q], official) for q, p in predictions.items()}
    per_type: dict[str, float] = {}
    if types is not None:
        groups: dict[str, list[float]] = {}
        for q, acc in per_q.items():
            groups.setdefault(types[q], []).append(acc)
        per_type = {t: 100.0 * sum(v) / len(v) for t, v in groups.items()}
    return VQAAccuracy(100.0 * sum(per_q.values()) / len(per_q), per_q, per_type)


# ---- EvalAI result file ------------------------------------------------------------------------------------


def write_vqa_results(
    results: Iterable[tuple[int, str]] | Mapping[int, str], path: str | os.PathLike[str]
) -> Path:
    """Writes the EvalAI submission JSON: ``[{"question_id": int, "answer": str}, ...]`` (atomic write).

    Args:
        results: (question_id, answer) pairs or a {question_id: answer} mapping; ids must be unique ints.
        path: output file; parent folders are created.
    """
    answers: dict[int, str] = {}
    for qid, ans in results.items() if isinstance(results, Mapping) else results:
        try:
            qid = int(qid)
        except (TypeError, ValueError) as e:
            raise TypeError(f"question_id must be an integer, got {qid!r}") from e
        if qid in answers:
            raise ValueError(f"duplicate question_id {qid} in VQA results")
        if not isinstance(ans, str):
            raise TypeError(f"answer for question {qid} must be a str, got {type(ans).__name__}")
        answers[qid] = ans
    return atomic_write_json(path, [{"question_id": q, "answer": a} for q, a in answers.items()], indent=None)
