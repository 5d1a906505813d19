"""The bert-base-uncased WordPiece tokenizer, id-for-id equal to the one the official mPLUG code uses.

The official code (fidelity §6) tokenizes with transformers 4.14's slow Python ``BertTokenizer`` loaded from
``bert-base-uncased``. ``Tokenizer`` builds the same pipeline on the Rust ``tokenizers`` library, which is
fast enough to call inside the training loop, and does not depend on ``transformers`` (a test-time oracle
only):

    BertNormalizer   clean text (drop NUL/U+FFFD/control chars, whitespace -> " "), space out CJK chars,
                     lowercase, strip accents (NFD, drop combining marks)
    BertPreTokenizer split on whitespace and punctuation
    WordPiece        greedy longest-match-first, "##" continuation prefix, words > 100 chars -> [UNK]
    Template         [CLS] $A [SEP]   (pair: [CLS] $A [SEP] $B [SEP])

The shipped vocabulary is ``vocab/bert-base-uncased-vocab.txt`` (origin and licence in ``vocab/NOTICE.md``):
[PAD] = 0, [UNK] = 100, [CLS] = 101, [SEP] = 102, [MASK] = 103, ``[unusedN]`` = N + 5 for N >= 99.

Caveats:
    * The five special tokens are matched in the raw text, case-sensitively, before normalization, so
      ``"yes[SEP]"`` and ``"yes [SEP]"`` both encode as ``[CLS] yes [SEP] [SEP]`` (how every official decoder
      target ends), while ``"[sep]"`` is three ordinary tokens -- both as in the official code.
    * ``decode`` cleans spaces before punctuation and in contractions like transformers 4.x
      (``clean_up_tokenization_spaces=True``, the official default); transformers 5 no longer does by default.
    * ``max_length`` without ``truncation=True`` is a bound, not a hint: a longer sequence raises
      ``ValueError`` (transformers ignores ``max_length`` there; the official retrieval training relied on
      that by accident).
    * Padding is on the right; ``attention_mask`` is a LongTensor with 1 = token, 0 = padding.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "vocab" / "bert-base-uncased-vocab.txt"
DEFAULT_VOCAB_SIZE = 30522  # lines of bert-base-uncased vocab.txt
MODEL_MAX_LENGTH = 512  # BERT's position table: longer inputs cannot be embedded
MAX_INPUT_CHARS_PER_WORD = 100  # longer words become [UNK] (as in BERT)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
DEFAULT_SPECIAL_IDS = {PAD: 0, UNK: 100, CLS: 101, SEP: 102, MASK: 103}  # in the shipped vocab

Padding = Literal["longest", "max_length"] | bool
PADDING_MODES = ("longest", "max_length", True, False)
BATCH_FIELDS = ("input_ids", "attention_mask")  # the keys of a TokenizedBatch read as a mapping


def _read_vocab(path: Path, expected_size: int | None) -> dict[str, int]:
    """Reads a BERT vocab.txt (one token per line; id = line index) like transformers' ``load_vocab``.

    Lines are split on "\\n" only (``str.splitlines`` would also split on U+2028 and friends) and a repeated
    token keeps its last id, as in transformers.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"vocab file {str(path)!r} does not exist; pass vocab_path= a BERT vocab.txt, or leave it None "
            f"for the shipped bert-base-uncased vocab (reinstall mplug_fast if that one is missing)"
        )
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if not lines:
        raise ValueError(f"vocab file {str(path)!r} is empty; expected one WordPiece token per line")
    if expected_size is not None and len(lines) != expected_size:
        raise ValueError(
            f"vocab file {str(path)!r} has {len(lines)} lines, expected {expected_size} (bert-base-uncased); "
            f"the packaged file is damaged: reinstall mplug_fast"
        )
    vocab = {token.rstrip("\n"): i for i, token in enumerate(lines)}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"vocab file {str(path)!r} lacks the special token(s) {', '.join(missing)}; "
            f"a BERT vocab must contain all of {', '.join(SPECIAL_TOKENS)}"
        )
    return vocab


def _clean_up_tokenization(text: str) -> str:
    """transformers 4.x ``PreTrainedTokenizerBase.clean_up_tokenization`` (what the official decode ran)."""
    for piece in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):  # in this order
        text = text.replace(piece, piece.strip())  # " ' " -> "'", the others lose their leading space
    return text


def _as_id_list(ids: Sequence[int] | Tensor, what: str) -> list[int]:
    """A 1-D sequence of ids (list, tuple, numpy array or tensor) as a list of Python ints."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"{what} expects a 1-D tensor of ids, got shape {list(ids.shape)}")
        return ids.tolist()
    try:
        return [operator.index(i) for i in ids]
    except TypeError as e:
        raise TypeError(f"{what} expects a sequence of ints, got {type(ids).__name__}: {e}") from None


@dataclass
class TokenizedBatch(Mapping):
    """The output of ``Tokenizer.__call__``; also readable as a mapping (``batch["input_ids"]``, ``**batch``).

    Attributes:
        input_ids: long [B, L], right-padded with [PAD].
        attention_mask: long [B, L], 1 = token, 0 = padding.
    """

    input_ids: Tensor
    attention_mask: Tensor

    def __getitem__(self, key: str) -> Tensor:
        if key not in BATCH_FIELDS:
            raise KeyError(f"TokenizedBatch has no field {key!r}. Available: {', '.join(BATCH_FIELDS)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(BATCH_FIELDS)

    def __len__(self) -> int:
        return len(BATCH_FIELDS)


class Tokenizer:
    """bert-base-uncased WordPiece tokenizer (uncased, 30522 tokens) on the Rust ``tokenizers`` library.

    Args:
        vocab_path: a BERT ``vocab.txt``; None = the shipped bert-base-uncased vocab (checked to have 30522
            lines and the standard special-token ids).

    Example:
        >>> tok = Tokenizer()
        >>> batch = tok(["yes[SEP]", "a red square."])
        >>> batch.input_ids
        tensor([[ 101, 2748,  102,  102,    0,    0],
                [ 101, 1037, 2417, 2675, 1012,  102]])
        >>> batch.attention_mask
        tensor([[1, 1, 1, 1, 0, 0],
                [1, 1, 1, 1, 1, 1]])
        >>> tok.batch_decode(batch.input_ids)
        ['yes', 'a red square.']
    """

    def __init__(self, vocab_path: str | Path | None = None):
        self.vocab_path = DEFAULT_VOCAB_PATH if vocab_path is None else Path(vocab_path)
        self._vocab = _read_vocab(self.vocab_path, DEFAULT_VOCAB_SIZE if vocab_path is None else None)
        if vocab_path is None:
            wrong = {t: self._vocab[t] for t, i in DEFAULT_SPECIAL_IDS.items() if self._vocab[t] != i}
            if wrong:
                raise ValueError(
                    f"shipped vocab has unexpected special-token ids {wrong}; reinstall mplug_fast"
                )
        self._ids_to_tokens = {i: t for t, i in self._vocab.items()}

        tok = RustTokenizer(
            WordPiece(self._vocab, unk_token=UNK, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
        )
        # strip_accents=None follows lowercase (True), as in BertTokenizer(do_lower_case=True)
        tok.normalizer = BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = BertPreTokenizer()
        # Special added tokens are matched in the raw text before normalization (normalized=False), so a
        # literal "[SEP]" stays one token.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        tok.post_processor = TemplateProcessing(
            single=f"{CLS} $A {SEP}",
            pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
            special_tokens=[(CLS, self._vocab[CLS]), (SEP, self._vocab[SEP])],
        )
        self._tok = tok
        self._special_ids = frozenset(self._vocab[t] for t in SPECIAL_TOKENS)
        self._warned_too_long = False

    # ---- vocabulary ----------------------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        return self._vocab[PAD]

    @property
    def unk_token_id(self) -> int:
        return self._vocab[UNK]

    @property
    def cls_token_id(self) -> int:
        return self._vocab[CLS]

    @property
    def sep_token_id(self) -> int:
        return self._vocab[SEP]

    @property
    def mask_token_id(self) -> int:
        return self._vocab[MASK]

    @property
    def vocab_size(self) -> int:
        """Number of ids (30522 for bert-base-uncased); the size of the embedding and LM-head tables."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_path={str(self.vocab_path)!r}, vocab_size={self.vocab_size})"

    def get_vocab(self) -> dict[str, int]:
        """A copy of the token -> id map."""
        return dict(self._vocab)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token(s) -> id(s); a token not in the vocab maps to [UNK] (as in transformers)."""
        if isinstance(tokens, str):
            return self._vocab.get(tokens, self.unk_token_id)
        return [self._vocab.get(t, self.unk_token_id) for t in tokens]

    def unused_token_id(self, n: int) -> int:
        """Id of ``[unused{n}]`` (bert-base-uncased: n in 0..993; n + 1 for n < 99, n + 5 for n >= 99).

        Visual grounding uses ``[unused339]`` (344) as the box prefix and ``[unused340..676]`` (345..681) as
        the 337 coordinate bins (docs/fidelity.md §5.5).
        """
        token = f"[unused{operator.index(n)}]"
        if token not in self._vocab:
            n_unused = sum(t.startswith("[unused") for t in self._vocab)
            raise ValueError(
                f"{token} is not in the vocab ({n_unused} [unusedN] tokens: N in 0..{n_unused - 1})"
            )
        return self._vocab[token]

    # ---- encoding ------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text``, without [CLS]/[SEP] (e.g. ``"Café!"`` -> ``["cafe", "!"]``)."""
        return self._tok.encode(self._check_texts(text)[0], add_special_tokens=False).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one text, unpadded and untruncated (``[CLS] ... [SEP]`` when ``add_special_tokens``)."""
        return self._tok.encode(self._check_texts(text)[0], add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: Padding = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        add_special_tokens: bool = True,
        return_tensors: Literal["pt"] = "pt",
    ) -> TokenizedBatch:
        """Tokenizes a text or a batch of texts into padded id and mask tensors.

        Args:
            texts: one string (B = 1) or a non-empty list of strings.
            padding: "longest" (or True) pads to the longest sequence of the batch; "max_length" pads to
                ``max_length``; False pads nothing (all sequences must then have the same length).
            max_length: the longest allowed sequence, [CLS] and [SEP] included. Without ``truncation`` a
                longer sequence raises ``ValueError``.
            truncation: cut sequences longer than ``max_length`` (512 when None), keeping ``[CLS] ... [SEP]``:
                the last kept token is always [SEP], as in transformers.
            add_special_tokens: wrap each text as ``[CLS] text [SEP]``.
            return_tensors: only "pt" (torch tensors) is supported.

        Returns:
            ``TokenizedBatch`` with ``input_ids`` long [B, L] and ``attention_mask`` long [B, L] (1 = token).
        """
        batch = self._check_texts(texts)
        if not (padding is True or padding is False or padding in ("longest", "max_length")):
            modes = ", ".join(map(repr, PADDING_MODES))
            raise ValueError(f"padding={padding!r} is not supported. Available: {modes}")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise TypeError(f"max_length must be an int or None, got {type(max_length).__name__}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length=; or use padding='longest'")
        n_special = 2 if add_special_tokens else 0
        if truncation:
            max_length = MODEL_MAX_LENGTH if max_length is None else max_length
            if max_length < n_special + 1:
                raise ValueError(
                    f"max_length={max_length} leaves no room for text besides [CLS] and [SEP]; "
                    f"use max_length >= 3"
                )

        seqs = [e.ids for e in self._tok.encode_batch(batch, add_special_tokens=add_special_tokens)]

        if truncation:  # keeping a final [SEP] when the sequences carry special tokens
            tail = [self.sep_token_id] if add_special_tokens else []
            seqs = [s if len(s) <= max_length else s[: max_length - len(tail)] + tail for s in seqs]
        else:
            longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
            n = len(seqs[longest])
            if max_length is not None and n > max_length:
                raise ValueError(
                    f"text {longest} has {n} tokens, more than max_length={max_length}; pass "
                    f"truncation=True to cut it (keeping [CLS] ... [SEP]), or raise max_length"
                )
            if n > MODEL_MAX_LENGTH and not self._warned_too_long:
                self._warned_too_long = True
                logger.warning(
                    "text %d has %d tokens, more than BERT's %d positions; pass truncation=True, "
                    "max_length=%d (warned once per tokenizer)",
                    longest,
                    n,
                    MODEL_MAX_LENGTH,
                    MODEL_MAX_LENGTH,
                )

        lengths = [len(s) for s in seqs]
        L = max_length if padding == "max_length" else max(lengths)
        if padding is False and min(lengths) != L:  # no padding: the batch must already be rectangular
            raise ValueError(
                f"padding=False but the texts have different lengths (min {min(lengths)}, "
                f"max {max(lengths)} tokens); use padding='longest' or 'max_length'"
            )
        rows = [s + [self.pad_token_id] * (L - len(s)) for s in seqs]
        input_ids = torch.tensor(rows, dtype=torch.long).view(len(rows), L)  # [B, L]
        attention_mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()  # [B, L], 1 = token
        return TokenizedBatch(input_ids=input_ids, attention_mask=attention_mask)

    @staticmethod
    def _check_texts(texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts is an empty list; pass at least one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, expected str")
        return list(texts)

    # ---- decoding ------------------------------------------------------------------------------------------

    def decode(
        self,
        ids: Sequence[int] | Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = True,
    ) -> str:
        """Ids -> text, like transformers 4.x ``BertTokenizer.decode`` (the official decode).

        Tokens are joined with spaces, "##" continuations are merged, and (``clean_up_tokenization_spaces``)
        spaces before ``. ? ! ,`` and in contractions are removed: ``[101, 1037, 2417, 2675, 1012, 102]`` ->
        ``"a red square."``. ``skip_special_tokens`` drops [PAD], [UNK], [CLS], [SEP] and [MASK].

        Args:
            ids: 1-D list or tensor of token ids.
        """
        ids = _as_id_list(ids, "decode")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        unknown = [i for i in ids if i not in self._ids_to_tokens]
        if unknown:
            raise ValueError(
                f"token id {unknown[0]} is not in the vocab (valid ids: 0..{self.vocab_size - 1})"
            )
        text = " ".join(self._ids_to_tokens[i] for i in ids).replace(" ##", "").strip()
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        sequences: Sequence[Sequence[int]] | Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = True,
    ) -> list[str]:
        """``decode`` of each row of a 2-D tensor [B, L] or of each sequence in a list."""
        if isinstance(sequences, Tensor) and sequences.dim() != 2:
            raise ValueError(f"batch_decode expects a 2-D tensor [B, L], got shape {list(sequences.shape)}")
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]
