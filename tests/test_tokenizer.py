"""Trained tokenizers behave like the HF ones, reload with AutoTokenizer, and train reproducibly."""

import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llmctl.core import tokenizer as tokenizer_module
from llmctl.core.tokenizer import tokenizer_hash, train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import _SENTENCES  # noqa: E402

TEXTS = ["The central bank raised interest rates.", "Shares fell sharply after the warning."] * 50


def test_wordpiece_for_bert_adds_cls_sep_and_reloads(tmp_path):
    tok = train_tokenizer(
        TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="t"
    )
    enc = tok("The Bank", "shares")
    assert tok.convert_ids_to_tokens(enc["input_ids"])[0] == "[CLS]"
    assert enc["token_type_ids"][-1] == 1 and tok.mask_token == "[MASK]"
    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again("the bank")["input_ids"] == tok("the bank")["input_ids"]
    assert again.decode(again("the bank", add_special_tokens=False)["input_ids"]) == "the bank"


def test_byte_level_bpe_for_gpt_roundtrips_any_text(tmp_path):
    tok = train_tokenizer(
        TEXTS, family="gpt2", vocab_size=300, lowercase=False, max_len=64, cache_root=tmp_path, data_fp="t"
    )
    text = "Zürich's ☃ rates rose 3.5%"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is unknown
    assert tok.eos_token == "<|endoftext|>"
    assert (
        tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    )  # padding is never mistaken for end-of-text


def test_trained_tokenizer_is_cached_by_corpus(tmp_path):
    train_tokenizer(TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="a")
    train_tokenizer(TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="a")
    train_tokenizer(TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="b")
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2


# Documents whose rare pieces tie in frequency at the vocabulary's edge: tokenizers' own WordPiece
# trainer breaks those ties in hash-map order, so it gave a different vocabulary almost every run.
DOCS = [" ".join(_SENTENCES[(d * 5 + k * 7) % 12] for k in range(6 + d % 4)) for d in range(40)]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_training_twice_gives_the_same_tokenizer(tmp_path, family):
    hashes = {
        tokenizer_hash(
            train_tokenizer(
                DOCS,
                family=family,
                vocab_size=300,
                lowercase=True,
                max_len=64,
                cache_root=tmp_path / str(i),
                data_fp="same",
            )
        )
        for i in range(4)
    }
    assert len(hashes) == 1


def test_wordpiece_keeps_what_the_wordpiece_trainer_learns(tmp_path):
    tok = train_tokenizer(
        DOCS, family="bert", vocab_size=300, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="x"
    )
    assert len(tok) == 300
    pieces = tok.convert_ids_to_tokens(tok("The footballers announced", add_special_tokens=False)["input_ids"])
    assert pieces[0] == "the" and all(p.startswith("##") for p in pieces[2:3]) and "[UNK]" not in pieces, pieces
    assert (
        tok.decode(tok("the central bank raised interest rates", add_special_tokens=False)["input_ids"])
        == "the central bank raised interest rates"
    )


def test_the_cache_says_which_tokenizer_it_reuses_and_ignores_older_formats(tmp_path, monkeypatch):
    said = []
    first = train_tokenizer(
        DOCS,
        family="gpt2",
        vocab_size=300,
        lowercase=False,
        max_len=64,
        cache_root=tmp_path,
        data_fp="c",
        say=said.append,
    )
    again = train_tokenizer(
        DOCS,
        family="gpt2",
        vocab_size=300,
        lowercase=False,
        max_len=64,
        cache_root=tmp_path,
        data_fp="c",
        say=said.append,
    )
    assert "trained" in said[0] and "reused" in said[1] and tokenizer_hash(first)[:12] in said[1]
    assert tokenizer_hash(again) == tokenizer_hash(first)
    monkeypatch.setattr(tokenizer_module, "FORMAT_VERSION", tokenizer_module.FORMAT_VERSION + 1)
    train_tokenizer(
        DOCS,
        family="gpt2",
        vocab_size=300,
        lowercase=False,
        max_len=64,
        cache_root=tmp_path,
        data_fp="c",
        say=said.append,
    )
    assert "trained" in said[2] and len(list((tmp_path / "tokenizers").iterdir())) == 2


def test_the_hash_names_the_tokenizer_not_its_last_call(tmp_path):
    tok = train_tokenizer(
        TEXTS, family="bert", vocab_size=300, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="h"
    )
    before = tokenizer_hash(tok)
    tok("a sentence long enough to be cut", truncation=True, max_length=4, padding="max_length")  # sets backend state
    assert tokenizer_hash(tok) == before
