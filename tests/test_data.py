"""Data loading, deterministic splits, packing, and the errors for bad data."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from llmctl.core.data import fingerprint, load_splits, pack_for_lm
from llmctl.core.errors import LlmctlError
from llmctl.core.tokenizer import train_tokenizer


def _cfg(**kw):
    base = {"source": None, "config_name": None, "train": None, "validation": None, "test": None, "text_column": "text",
            "label_column": "label", "split_ratio": [0.8, 0.1, 0.1], "split_seed": 0, "max_docs": None, "max_seq_len": 32}
    return OmegaConf.create({**base, **kw})


def test_bbc_news_is_the_real_corpus_with_a_stable_stratified_split():
    a = load_splits(_cfg(source="bbc-news"))
    b = load_splits(_cfg(source="bbc-news"))
    assert sum(len(a[s]) for s in ("train", "validation", "test")) == 2225
    assert a["train"].features["label"].names == ["business", "entertainment", "politics", "sports", "tech"]
    assert fingerprint(a) == fingerprint(b)
    test_labels = a["test"]["label"][:]
    assert len(test_labels) == 223 and test_labels.count(3) in range(49, 54)  # stratified: sports is 511/2225


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv not installed")
def test_kjv_gives_one_document_per_chapter():
    dsd = load_splits(_cfg(source="kjv", split_ratio=[0.9, 0.05, 0.05]))
    assert sum(len(d) for d in dsd.values()) == 1189  # chapters in the KJV
    assert any("In the beginning God created" in t for t in dsd["train"]["text"][:] + dsd["validation"]["text"][:] + dsd["test"]["text"][:])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tabular_files_with_a_named_text_column(tmp_path, fmt):
    import datasets

    rows = {"body": [f"document number {i} has some words in it." for i in range(30)]}
    path = tmp_path / f"data.{fmt}"
    ds = datasets.Dataset.from_dict(rows)
    {"jsonl": lambda: ds.to_json(str(path)), "csv": lambda: ds.to_csv(str(path)), "parquet": lambda: ds.to_parquet(str(path))}[fmt]()
    dsd = load_splits(_cfg(train=str(path), text_column="body", split_ratio=[0.8, 0.2, 0.0]))
    assert len(dsd["train"]) + len(dsd["validation"]) == 30 and "text" in dsd["train"].column_names
    with pytest.raises(LlmctlError, match="no text column 'review'"):
        load_splits(_cfg(train=str(path), text_column="review"))


def test_folder_of_txt_files_is_one_document_per_file(corpus):
    dsd = load_splits(_cfg(train=str(corpus), split_ratio=[0.9, 0.1, 0.0]))
    assert len(dsd["train"]) + len(dsd["validation"]) == 40
    assert "test" not in dsd


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(LlmctlError, match="data.train: no such file"):
        load_splits(_cfg(train=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LlmctlError, match="empty"):
        load_splits(_cfg(train=str(tmp_path / "empty.txt")))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(LlmctlError, match="(no text|examples)"):
        load_splits(_cfg(train=str(tmp_path / "blank.txt")))


def _packed(corpus, tmp_path, objective, family):
    dsd = load_splits(_cfg(train=str(corpus), split_ratio=[0.8, 0.2, 0.0]))
    fp = fingerprint(dsd)
    tok = train_tokenizer(dsd["train"]["text"], family=family, vocab_size=300, lowercase=True, max_len=32,
                          cache_root=tmp_path, data_fp=fp)
    return tok, pack_for_lm(dsd, tok, objective=objective, max_seq_len=32, seed=1, cache_root=tmp_path, data_fp=fp)


def test_clm_packing_has_no_padding(corpus, tmp_path):
    tok, packed = _packed(corpus, tmp_path, "clm", "gpt2")
    lengths = {len(r) for r in packed["train"]["input_ids"][:]}
    assert lengths == {32}
    assert tok.eos_token_id in sum(packed["train"]["input_ids"][:], [])  # documents separated by EOS


def test_mlm_packing_wraps_blocks_in_cls_sep(corpus, tmp_path):
    tok, packed = _packed(corpus, tmp_path, "mlm", "bert")
    for row in packed["train"]["input_ids"][:]:
        assert len(row) == 32 and row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id


def test_nsp_pairs_are_half_random(corpus, tmp_path):
    tok, packed = _packed(corpus, tmp_path, "mlm+nsp", "bert")
    rows = packed["train"]
    labels = rows["next_sentence_label"][:]
    assert 0.25 < sum(labels) / len(labels) < 0.75
    for ids, types in zip(rows["input_ids"][:20], rows["token_type_ids"][:20]):
        assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2 and len(ids) <= 32
        assert types[0] == 0 and types[-1] == 1 and len(types) == len(ids)


def test_packing_is_cached(corpus, tmp_path):
    _packed(corpus, tmp_path, "clm", "gpt2")
    caches = list((tmp_path / "packed").iterdir())
    _packed(corpus, tmp_path, "clm", "gpt2")
    assert list((tmp_path / "packed").iterdir()) == caches and len(caches) == 1
