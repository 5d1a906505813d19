"""Caption metrics: BLEU-1..4, ROUGE-L, CIDEr-D in pure Python, a PTB-like tokenizer, METEOR/SPICE wrappers.

The COCO caption metrics as pycocoevalcap (salaniz fork: the scorers behind the official mPLUG evaluation's
``language_evaluation``) computes them, written here and checked against pycocoevalcap's own scorers on the
same tokenised input (``tests/metrics/test_caption.py``: equal within 1e-9).

Inputs everywhere: ``gts`` {image key: [reference, ...]} and ``res`` {image key: [hypothesis]} (exactly one
hypothesis per image), sentences already tokenised (space-separated tokens; see ``ptb_tokenize``).

pycocoevalcap quirks reproduced (they define the numbers people report):
    * CIDEr-D's "length" in the Gaussian penalty is the number of **bigrams** of a sentence (``counts2vec``
      counts n-grams with index 1): max(words - 1, 0), so length differences equal word-count differences
      except against an empty sentence, and with ``n=1`` every length is 0 (no penalty at all).
    * ROUGE-L splits on single spaces (``split(" ")``), so an empty hypothesis is one empty token.
    * BLEU's per-image scores (``BleuResult.per_image``) apply the brevity penalty per image; the corpus score
      uses the summed lengths.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Ngram = tuple[str, ...]
Gts = Mapping[Hashable, Sequence[str]]
Res = Mapping[Hashable, Sequence[str]]

BLEU_TINY = 1e-15  # pycocoevalcap: added to matched counts and lengths (0 matches -> ~0, not an error)
BLEU_SMALL = 1e-9  # pycocoevalcap: added to denominators
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0


def _check_pairs(gts: Gts, res: Res) -> list[Hashable]:
    """The image keys, after checking both dicts have the same keys, one hypothesis and >= 1 reference."""
    if set(gts) != set(res):
        missing, extra = set(gts) - set(res), set(res) - set(gts)
        raise ValueError(
            f"gts and res must have the same image keys; missing in res: {sorted(map(str, missing))[:5]}, "
            f"extra in res: {sorted(map(str, extra))[:5]}"
        )
    if not gts:
        raise ValueError("no images to score (gts is empty)")
    for k in gts:
        if isinstance(res[k], str) or len(res[k]) != 1:
            raise ValueError(f"res[{k!r}] must be a list with exactly one hypothesis, got {res[k]!r}")
        if isinstance(gts[k], str) or len(gts[k]) < 1:
            raise ValueError(f"gts[{k!r}] must be a non-empty list of references, got {gts[k]!r}")
    return list(gts)


def ngram_counts(sentence: str, n: int = 4) -> Counter[Ngram]:
    """All 1..n-grams of a whitespace-split sentence with their counts."""
    words = sentence.split()
    counts: Counter[Ngram] = Counter()
    for k in range(1, n + 1):
        counts.update(tuple(words[i : i + k]) for i in range(len(words) - k + 1))
    return counts


# ---- BLEU --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BleuResult:
    """scores: corpus BLEU-1..n; per_image: per image [n] BLEU-1..n (own brevity penalty each)."""

    scores: list[float]
    per_image: list[list[float]]


def bleu(gts: Gts, res: Res, n: int = 4) -> BleuResult:
    """Corpus BLEU-1..n as pycocoevalcap's ``Bleu(n).compute_score`` (option "closest"): clipped n-gram
    precisions summed over the corpus, the brevity penalty from the closest reference length of each image
    (a tie: the shorter reference)."""
    keys = _check_pairs(gts, res)
    matched, guessed = [0] * n, [0] * n
    hyp_total, ref_total = 0, 0
    per_image: list[list[float]] = []
    for key in keys:
        hyp = ngram_counts(res[key][0], n)
        hyp_len = len(res[key][0].split())
        ref_max: dict[Ngram, int] = {}
        ref_lens = []
        for ref in gts[key]:
            ref_lens.append(len(ref.split()))
            for g, c in ngram_counts(ref, n).items():
                ref_max[g] = max(ref_max.get(g, 0), c)
        ref_len = min(ref_lens, key=lambda r: (abs(r - hyp_len), r))  # closest; a tie goes to the shorter
        m, g_ = [0] * n, [max(0, hyp_len - k) for k in range(n)]
        for g, c in hyp.items():
            m[len(g) - 1] += min(ref_max.get(g, 0), c)
        matched, guessed = [a + b for a, b in zip(matched, m)], [a + b for a, b in zip(guessed, g_)]
        hyp_total += hyp_len
        ref_total += ref_len
        per_image.append(_bleu_from_counts(m, g_, hyp_len, ref_len))
    return BleuResult(_bleu_from_counts(matched, guessed, hyp_total, ref_total), per_image)


def _bleu_from_counts(matched: list[int], guessed: list[int], hyp_len: float, ref_len: float) -> list[float]:
    """BLEU-1..n from clipped matches and candidate n-gram counts: geometric means of the precisions times
    the brevity penalty exp(1 - r/c) when c < r."""
    out, prod = [], 1.0
    for k in range(len(matched)):
        prod *= (matched[k] + BLEU_TINY) / (guessed[k] + BLEU_SMALL)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (hyp_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


# ---- ROUGE-L -----------------------------------------------------------------------------------------------


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) DP, one row)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            cur = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = cur
    return row[-1]


def rouge_l(gts: Gts, res: Res, beta: float = ROUGE_BETA) -> tuple[float, list[float]]:
    """Mean ROUGE-L over images and the per-image scores (pycocoevalcap ``Rouge().compute_score``): per image,
    F_beta of the max LCS precision and the max LCS recall of its hypothesis over its references."""
    scores = []
    for k in _check_pairs(gts, res):
        hyp = res[k][0].split(" ")
        lcs = [(lcs_length(r, hyp), len(r)) for r in (ref.split(" ") for ref in gts[k])]  # (LCS, |ref|)
        p, r = max(n / len(hyp) for n, _ in lcs), max(n / m for n, m in lcs)  # max LCS precision, recall
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return sum(scores) / len(scores), scores


# ---- CIDEr-D -----------------------------------------------------------------------------------------------


class CiderD:
    """CIDEr-D with a fixed document-frequency table (the training references: the in-process SCST reward,
    per-candidate scores that do not depend on the batch).

    Args:
        refs_corpus: the reference sets that define document frequency: one entry (a list of tokenised
            references) per image; df(g) = number of images with g in any of its references, and the
            log document count is log(len(refs_corpus)).
        n: largest n-gram. sigma: width of the Gaussian length penalty.

    ``score(hyps, refs)`` -> per-candidate CIDEr-D ([len(hyps)] floats); candidates may share references
    (pass the same list object repeatedly: its vectors are computed once per call).
    """

    def __init__(self, refs_corpus: Sequence[Sequence[str]], n: int = 4, sigma: float = CIDER_SIGMA):
        if len(refs_corpus) == 0:
            raise ValueError("CiderD needs at least one reference set for its document frequencies")
        if n < 1 or sigma <= 0:
            raise ValueError(f"need n >= 1 and sigma > 0, got n={n}, sigma={sigma}")
        self.n, self.sigma = n, sigma
        self.df: Counter[Ngram] = Counter()
        for refs in refs_corpus:
            if isinstance(refs, str):
                raise TypeError("refs_corpus must be a list of reference *lists* (one per image), got a str")
            self.df.update({g for ref in refs for g in ngram_counts(ref, n)})
        self.log_num_docs = math.log(float(len(refs_corpus)))

    def _vector(self, sentence: str) -> tuple[list[dict[Ngram, float]], list[float], int]:
        """tf-idf vectors per n-gram order, their norms, and the pycocoevalcap "length" (#bigrams)."""
        vec: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        sq = [0.0] * self.n
        length = 0
        for g, tf in ngram_counts(sentence, self.n).items():
            k = len(g) - 1
            w = float(tf) * (self.log_num_docs - math.log(max(1.0, float(self.df.get(g, 0)))))
            vec[k][g] = w
            sq[k] += w**2
            if k == 1:  # quirk (reproduced): the length is the number of bigrams
                length += tf
        return vec, [math.sqrt(s) for s in sq], length

    def _sim(self, hyp: tuple, ref: tuple) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.e ** (-(float(lh - lr) ** 2) / (2 * self.sigma**2))
        out = []
        for k in range(self.n):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * penalty)
        return out

    def score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
        """Per-candidate CIDEr-D: 10 * mean over n of (sum over refs of the clipped cosine) / #refs."""
        if len(hyps) != len(refs):
            raise ValueError(f"need one reference list per hypothesis, got {len(hyps)} vs {len(refs)}")
        cache: dict[int, list[tuple]] = {}
        out = []
        for hyp, rs in zip(hyps, refs):
            if isinstance(rs, str) or len(rs) == 0:
                raise ValueError(f"each hypothesis needs a non-empty list of references, got {rs!r}")
            if id(rs) not in cache:
                cache[id(rs)] = [self._vector(r) for r in rs]
            h = self._vector(hyp)
            total = [0.0] * self.n
            for rv in cache[id(rs)]:
                total = [a + b for a, b in zip(total, self._sim(h, rv))]
            out.append(sum(total) / self.n / len(rs) * 10.0)
        return out


def cider_d(gts: Gts, res: Res, n: int = 4, sigma: float = CIDER_SIGMA) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (pycocoevalcap ``Cider().compute_score``): ``CiderD`` scores (tf-idf n-gram vectors,
    clipped cosine, Gaussian length penalty, x10) with the idf from the references of ``gts``."""
    keys = _check_pairs(gts, res)
    refs = [list(gts[k]) for k in keys]
    scores = CiderD(refs, n, sigma).score([res[k][0] for k in keys], refs)
    return sum(scores) / len(scores), scores


# ---- PTB-like tokenizer ------------------------------------------------------------------------------------

# Tokens pycocoevalcap drops after Stanford's PTBTokenizer (note: the bracket tokens are compared before
# lower-casing would apply, so the lower-cased "-lrb-" etc. that ``-lowerCase`` produces survive).
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof inc ltd co corp vs etc mt ave blvd rd jan feb mar apr jun jul aug sep sept "
    "oct nov dec no".split()
)
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta"}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SEPARATORS = r";,:\"`()\[\]{}$%#?!"
_PIECE = re.compile(r"\.\.\.+|--+|[?!]+|(?:\d[,:](?=\d)|[^\s" + _SEPARATORS + r"])+|[" + _SEPARATORS + r"]")


def _split_word(word: str) -> list[str]:
    """One whitespace/separator-free run (letters, digits, . ' - / & ...) -> PTB tokens."""
    head: list[str] = []
    tail: list[str] = []
    while word.startswith("'") and len(word) > 1 and not _CLITIC.match(word):
        head.append("'")  # an opening single quote
        word = word[1:]
    if word.endswith("..") and word.strip("."):
        tail = ["..."]  # an ellipsis glued to the word
        word = word.rstrip(".")
    elif word.endswith(".") and len(word) > 1:
        stem = word[:-1]
        if not (stem in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+[a-z]", stem)):
            word, tail = stem, ["."]
    while word.endswith(("'", "/")) and len(word) > 1:
        tail.insert(0, word[-1])  # closing quote, plural possessive ("dogs'" -> dogs '), "w/" -> w /
        word = word[:-1]
    if word in _SPLIT_WORDS:
        return head + _SPLIT_WORDS[word].split() + tail
    clitics: list[str] = []
    while (m := _CLITIC.match(word)) is not None:  # from the right: "i'd've" -> i 'd 've, "can't" -> ca n't
        word = m.group(1)
        clitics.insert(0, m.group(2))
    return head + [word] + clitics + tail


def ptb_tokenize_sentence(sentence: str) -> str:
    """A Python stand-in for ``PTBTokenizer -preserveLines -lowerCase`` + pycocoevalcap's punctuation filter.

    Lower-cases; splits off , ; : ? ! ... -- $ % # " ` and brackets (which become -lrb- -rrb- -lsb- -rsb-
    -lcb- -rcb- and, as in pycocoevalcap, are kept); splits clitics (n't 's 're 've 'll 'd 'm: "isn't" ->
    "is n't", "can't" -> "ca n't"), "cannot"/"gonna"/"wanna"/"gotta"; splits a sentence-final period unless
    the word is an abbreviation (mr. st. etc. or a.m.-style); keeps hyphenated words, decimals, times,
    "and/or" and inner periods; finally drops pycocoevalcap's punctuation tokens. Checked against the Java
    tokenizer on ordinary captions (``tests/metrics/test_caption.py``); exotic text (URLs, emoticons, unicode
    quotes) may differ.
    """
    text = sentence.replace("\n", " ").lower()
    tokens: list[str] = []
    for piece in _PIECE.findall(text):
        if piece in _BRACKETS:
            tokens.append(_BRACKETS[piece])
        elif len(piece) > 1 and piece[0] not in ".-?!":
            tokens.extend(_split_word(piece))
        else:
            tokens.append(piece)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS and t != '"')


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """{key: [raw caption, ...]} -> {key: [tokenised caption, ...]} with ``ptb_tokenize_sentence``."""
    return {k: [ptb_tokenize_sentence(c) for c in caps] for k, caps in captions.items()}


def ptb_tokenize_java(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's own ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, needs ``java``): the exact reference."""
    if not java_available():
        raise RuntimeError(
            "the Java PTBTokenizer needs `java` on PATH; use ptb_tokenize (pure Python) instead"
        )
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})
    return {k: out[k] for k in captions}


# ---- Java-based metrics (optional) -------------------------------------------------------------------------


def java_available() -> bool:
    return shutil.which("java") is not None


def _as_lists(captions: Gts) -> dict[Hashable, list[str]]:
    """The dict of lists pycocoevalcap's scorers index."""
    return {k: list(v) for k, v in captions.items()}


def meteor(gts: Gts, res: Res) -> tuple[float | None, str]:
    """METEOR 1.5 via pycocoevalcap's bundled jar (needs ``java`` on PATH; ~5 s start-up). Returns (score or
    None, note)."""
    _check_pairs(gts, res)
    if not java_available():
        return None, "METEOR skipped: no `java` on PATH (install a JRE to compute it)"
    from pycocoevalcap.meteor.meteor import Meteor

    score, _ = Meteor().compute_score(_as_lists(gts), _as_lists(res))
    return float(score), "METEOR 1.5 (pycocoevalcap, java)"


def spice_jars_present() -> bool:
    """True when pycocoevalcap's SPICE finds Stanford CoreNLP 3.6.0 on disk (so it would not download)."""
    try:
        import pycocoevalcap.spice as spice_pkg
    except ImportError:
        return False
    lib = Path(spice_pkg.__file__).parent / "lib"
    return all((lib / f"stanford-corenlp-3.6.0{s}.jar").exists() for s in ("", "-models"))


def spice(gts: Gts, res: Res) -> tuple[float | None, str]:
    """SPICE via pycocoevalcap only when java and the Stanford CoreNLP 3.6.0 jars are already present
    (pycocoevalcap would download them; we never do)."""
    _check_pairs(gts, res)
    if not java_available():
        return None, "SPICE skipped: no `java` on PATH"
    if not spice_jars_present():
        return None, (
            "SPICE skipped: Stanford CoreNLP 3.6.0 jars are not in pycocoevalcap/spice/lib "
            "(pycocoevalcap would download them; we never download at run time)"
        )
    from pycocoevalcap.spice.spice import Spice

    score, _ = Spice().compute_score(_as_lists(gts), _as_lists(res))
    return float(score), "SPICE 1.0 (pycocoevalcap, java)"


def caption_scores(
    gts: Gts, res: Res, tokenize: str | None = "python", use_java: bool = False
) -> tuple[dict[str, float], list[str]]:
    """All caption metrics: {"BLEU_1".."BLEU_4", "ROUGE_L", "CIDEr"[, "METEOR", "SPICE"]} and notes.

    Args:
        gts, res: raw captions, or already tokenised ones with ``tokenize=None``.
        tokenize: "python" (``ptb_tokenize``), "java" (pycocoevalcap's PTBTokenizer) or None.
        use_java: also try METEOR and SPICE (each skipped with a note when unavailable).
    """
    if tokenize not in ("python", "java", None):
        raise ValueError(f"tokenize={tokenize!r} is not supported. Available: 'python', 'java', None")
    if tokenize is not None:
        fn = ptb_tokenize if tokenize == "python" else ptb_tokenize_java
        gts, res = fn(gts), fn(res)
    b = bleu(gts, res).scores
    out = {f"BLEU_{i + 1}": b[i] for i in range(4)}
    out["ROUGE_L"] = rouge_l(gts, res)[0]
    out["CIDEr"] = cider_d(gts, res)[0]
    notes: list[str] = []
    if use_java:
        for name, fn in (("METEOR", meteor), ("SPICE", spice)):
            value, note = fn(gts, res)
            notes.append(note)
            if value is not None:
                out[name] = value
    else:
        notes.append("METEOR and SPICE not requested (use_java=False)")
    return out, notes
