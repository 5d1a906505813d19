"""Tokenizer: the shipped vocab, the official special-token rules, and ids/decoding vs transformers' peers.

Two oracles, both given the shipped vocab file:
  * ``transformers.BertTokenizer(vocab=...)`` -- transformers 5's Rust-backed tokenizer;
  * ``BertTokenizerLegacy(vocab_file=...)`` -- transformers 5's copy of the slow Python ``BertTokenizer`` that
    the official code vendored from transformers 4.14 (``models/tokenization_bert.py``).
"""

import hashlib
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mplug_fast.data import TokenizedBatch, Tokenizer
from mplug_fast.data.tokenizer import DEFAULT_VOCAB_PATH

VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"

TRICKY = [
    "a red square",
    "Café naïve résumé",
    "Hello, World! How are you?",
    "isn't it? I'm sure they're fine; we've won.",
    "3.14159 and 1,000,000 dollars ($42.50) 50%",
    "the year 2022-11-30 at 10:30pm",
    "中文字符测试 mixed with English",
    "日本語のテキスト",
    "한국어 텍스트",
    "emoji 😀🎉 party 👍🏽",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 120,  # a word over 100 chars -> [UNK]
    "yes[SEP]",
    "yes [SEP]",
    "what is [MASK] here?",
    "[CLS] already [SEP] inside [PAD]",
    "[sep] lowercase is not special",
    "[UNK] token",
    "MiXeD CaSe TeXt",
    "multiple    spaces   here",
    "tabs\tand\nnewlines\r\nhere",
    "  leading and trailing  ",
    "",
    "\u00a0non-breaking\u2003spaces\u200b zero width",
    "control\x00chars\x07 and \ufffd replacement",
    "Ångström Œuvre straße ﬁ ligature",
    "Ελληνικά κείμενο και русский текст",
    "عربي نص",
    "quotes “curly” ‘single’ «guillemets» and — dashes…",
    "a.b.c e-mail@example.com http://example.com/path?q=1",
    "COVID-19 vaccine's side-effects",
    "!!!???...",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def legacy_oracle():
    """The slow Python tokenizer the official code vendored (transformers 4.14's BertTokenizer)."""
    pytest.importorskip("transformers")
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    hf = BertTokenizerLegacy(vocab_file=str(DEFAULT_VOCAB_PATH))
    assert len(hf) == 30522, f"legacy oracle loaded {len(hf)} tokens, not the vocab file"
    return hf


@pytest.fixture(scope="module", params=["fast", "legacy"])
def oracle(request):
    """A transformers BERT tokenizer on the shipped vocab (asserted full-size: see environment.md's trap)."""
    if request.param == "legacy":
        return request.getfixturevalue("legacy_oracle")
    transformers = pytest.importorskip("transformers")
    # transformers 5: `vocab_file=` is silently ignored (5-token vocab); `vocab=` loads the file.
    hf = transformers.BertTokenizer(vocab=str(DEFAULT_VOCAB_PATH))
    assert len(hf) == 30522, f"fast oracle loaded {len(hf)} tokens, not the vocab file"
    return hf


# ---- the shipped vocab and special tokens ------------------------------------------------------------------


def test_shipped_vocab_is_bert_base_uncased():
    data = DEFAULT_VOCAB_PATH.read_bytes()
    assert hashlib.md5(data).hexdigest() == VOCAB_MD5
    assert len(data) == 231_508
    assert data.count(b"\n") == 30522
    assert (DEFAULT_VOCAB_PATH.parent / "NOTICE.md").is_file()


def test_sizes_and_special_ids(tok):
    assert len(tok) == tok.vocab_size == 30522
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        100,
        101,
        102,
        103,
    )
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        0,
        100,
        101,
        102,
        103,
    ]


@pytest.mark.parametrize("text", ["yes[SEP]", "yes [SEP]", " yes  [SEP] "])
def test_literal_sep_stays_one_token(tok, text):
    """Official decoder targets are `answer + '[SEP]'` -> [CLS] answer [SEP] [SEP] (fidelity §6, §12)."""
    yes = tok.convert_tokens_to_ids("yes")
    assert tok(text).input_ids.tolist() == [[101, yes, 102, 102]]
    assert tok.tokenize("[sep]") == ["[", "sep", "]"]  # case-sensitive, as in the official code


def test_unused_token_ids(tok):
    assert tok.unused_token_id(0) == 1
    assert tok.unused_token_id(98) == 99
    assert tok.unused_token_id(99) == 104
    assert tok.unused_token_id(339) == 344  # grounding box prefix
    assert tok.unused_token_id(340) == 345  # first coordinate bin
    assert tok.unused_token_id(676) == 681  # last coordinate bin (340 + 336)
    with pytest.raises(ValueError, match=r"\[unused994\] is not in the vocab"):
        tok.unused_token_id(994)


# ---- ids vs transformers -----------------------------------------------------------------------------------


def test_ids_match_transformers(tok, oracle):
    ours = tok(TRICKY)
    ref = oracle(TRICKY, padding="longest", return_tensors="pt")
    assert ours.input_ids.dtype == ours.attention_mask.dtype == torch.long
    assert torch.equal(ours.input_ids, ref["input_ids"])
    assert torch.equal(ours.attention_mask, ref["attention_mask"])
    for text in TRICKY:
        assert tok.tokenize(text) == oracle.tokenize(text), text


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_truncation_matches_transformers(tok, oracle, padding):
    ours = tok(TRICKY, padding=padding, max_length=8, truncation=True)
    ref = oracle(TRICKY, padding=padding, max_length=8, truncation=True, return_tensors="pt")
    assert ours.input_ids.shape == (len(TRICKY), 8)
    assert torch.equal(ours.input_ids, ref["input_ids"])
    assert torch.equal(ours.attention_mask, ref["attention_mask"])
    lengths = ours.attention_mask.sum(1)
    last = ours.input_ids.gather(1, (lengths - 1)[:, None])
    assert (last == 102).all(), "truncation must keep [CLS] ... [SEP]"


def test_without_special_tokens_matches_transformers(tok, oracle):
    ours = tok(TRICKY, add_special_tokens=False, max_length=5, truncation=True)
    ref = oracle(
        TRICKY,
        add_special_tokens=False,
        max_length=5,
        truncation=True,
        padding="longest",
        return_tensors="pt",
    )
    assert torch.equal(ours.input_ids, ref["input_ids"])
    assert torch.equal(ours.attention_mask, ref["attention_mask"])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tok, oracle, skip_special_tokens):
    """transformers 5 no longer cleans spaces by default; the official 4.x decode did (it is our default)."""
    ids = tok(TRICKY).input_ids
    ours = tok.batch_decode(ids, skip_special_tokens=skip_special_tokens)
    ref = [
        oracle.decode(row, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=True)
        for row in ids.tolist()
    ]
    assert ours == ref


# Characters of the classes BERT treats specially (accents, CJK, punctuation, controls, zero-width, emoji);
# arbitrary Unicode would also test the two Unicode-table versions (Python's vs the Rust crate's).
FUZZ_ALPHABET = (
    "abcXYZ019 \t\n\r\u00a0\u2003\u200b\u3000.,!?'\"-()[]{}#$%&*@^_~`|\\/<>éàüñçÅŒßﬁ\u0301\u0308"
    "中文日本語한국어😀👍🏽\u200d\ufe0f\x00\x07\x7f\ufffdαβγдеж"
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    texts=st.lists(
        st.text(FUZZ_ALPHABET, max_size=30) | st.sampled_from(["[SEP]", "[MASK]", "yes[SEP]"]),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_matches_official_slow_tokenizer(tok, legacy_oracle, texts):
    text = " ".join(texts) if len(texts) > 1 else texts[0]
    ids = tok.encode(text)
    assert ids == legacy_oracle(text)["input_ids"]
    assert tok.decode(ids) == legacy_oracle.decode(ids, skip_special_tokens=True)


# ---- encode/decode behaviour -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["a red square", "what color is the cat?", "a man riding a skateboard, isn't he.", "2 dogs!"]
)
def test_decode_round_trip(tok, text):
    ids = tok(text).input_ids[0]
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_decode_merges_wordpieces_and_skips_specials(tok):
    ids = tok.encode("Pneumonoultramicroscopic![MASK]")
    assert len(ids) > 6  # split into wordpieces
    assert tok.decode(ids) == "pneumonoultramicroscopic!"
    assert tok.decode(ids, skip_special_tokens=False) == "[CLS] pneumonoultramicroscopic! [MASK] [SEP]"
    assert tok.decode([]) == ""
    padded = tok(["a red square", "a"]).input_ids
    assert tok.batch_decode(padded) == ["a red square", "a"]


def test_batch_layout_and_mapping_access(tok):
    batch = tok(["a", "a red square"])
    assert isinstance(batch, TokenizedBatch)
    assert batch["input_ids"] is batch.input_ids and batch["attention_mask"] is batch.attention_mask
    assert dict(**batch).keys() == {"input_ids", "attention_mask"}
    assert batch.input_ids.tolist() == [[101, 1037, 102, 0, 0], [101, 1037, 2417, 2675, 102]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert tok("a", padding="max_length", max_length=6).input_ids.tolist() == [[101, 1037, 102, 0, 0, 0]]
    assert tok(["a b", "c d"], padding=False).input_ids.shape == (2, 4)
    assert tok(("a",), padding=True).input_ids.shape == (1, 3)
    with pytest.raises(KeyError, match="Available: input_ids, attention_mask"):
        batch["token_type_ids"]


def test_truncation_keeps_literal_sep_and_edges(tok):
    yes = tok.convert_tokens_to_ids("yes")
    assert tok("yes[SEP]", max_length=3, truncation=True).input_ids.tolist() == [[101, yes, 102]]
    # not longer than max_length: unchanged
    assert tok("yes[SEP]", max_length=4, truncation=True).input_ids.tolist() == [[101, yes, 102, 102]]
    # truncation without max_length cuts at BERT's 512 positions
    assert tok("a " * 600, truncation=True).input_ids.shape == (1, 512)


def test_long_text_warns_once(caplog):
    tok = Tokenizer()
    with caplog.at_level(logging.WARNING, logger="mplug_fast.data.tokenizer"):
        assert tok("a " * 600).input_ids.shape == (1, 602)
        tok("b " * 700)
    warnings = [r for r in caplog.records if "more than BERT's 512 positions" in r.getMessage()]
    assert len(warnings) == 1


# ---- errors ------------------------------------------------------------------------------------------------


def test_input_errors(tok):
    with pytest.raises(ValueError, match="empty list"):
        tok([])
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        tok(["a", 3])
    with pytest.raises(TypeError, match="str or a list of str"):
        tok(None)
    with pytest.raises(ValueError, match=r"text 1 has 7 tokens, more than max_length=4.*truncation=True"):
        tok(["a", "a b c d e"], padding="max_length", max_length=4)
    with pytest.raises(ValueError, match="more than max_length=4"):
        tok(["a", "a b c d e"], padding="longest", max_length=4)
    with pytest.raises(ValueError, match="needs max_length"):
        tok("a", padding="max_length")
    with pytest.raises(ValueError, match="padding=False but the texts have different lengths"):
        tok(["a", "a b"], padding=False)
    with pytest.raises(ValueError, match=r"padding='left' is not supported\. Available"):
        tok("a", padding="left")
    with pytest.raises(ValueError, match="return_tensors='np'"):
        tok("a", return_tensors="np")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tok("a", max_length=0)
    with pytest.raises(ValueError, match="no room for text"):
        tok("a", max_length=2, truncation=True)
    with pytest.raises(ValueError, match="token id 30522 is not in the vocab"):
        tok.decode([101, 30522])
    with pytest.raises(ValueError, match="1-D tensor"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


def test_vocab_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        Tokenizer(empty)
    no_specials = tmp_path / "no_specials.txt"
    no_specials.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[CLS\], \[SEP\], \[MASK\]"):
        Tokenizer(no_specials)


def test_custom_vocab(tmp_path):
    """A non-default vocab is not held to 30522 lines; special ids come from the file."""
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "square", "##s"]) + "\n")
    small = Tokenizer(path)
    assert len(small) == 8
    assert (small.pad_token_id, small.unk_token_id, small.cls_token_id, small.sep_token_id) == (0, 1, 2, 3)
    assert small(["Red squares", "blue"]).input_ids.tolist() == [[2, 5, 6, 7, 3], [2, 1, 3, 0, 0]]
    assert small.decode([2, 5, 6, 7, 3]) == "red squares"
