"""Data loading, deterministic splits, packing, and the errors for bad data."""

import shutil

import pytest
from omegaconf import OmegaConf

from llmctl.core.data import fingerprint, load_data, pack_for_lm
from llmctl.core.errors import LlmctlError
from llmctl.core.tokenizer import train_tokenizer


def _cfg(**kw):
    base = {
        "source": None,
        "config_name": None,
        "train": None,
        "validation": None,
        "test": None,
        "text_column": "text",
        "label_column": "label",
        "split_ratio": [0.8, 0.1, 0.1],
        "split_seed": 0,
        "max_docs": None,
        "max_seq_len": 32,
        "dedupe": True,
    }
    return OmegaConf.create({**base, **kw})


def load_splits(cfg, task="text"):
    return load_data(cfg, task=task).splits


def _norm(texts):
    return {" ".join(t.split()) for t in texts}


def test_bbc_news_is_the_real_corpus_deduplicated_with_a_stable_stratified_split():
    a = load_data(_cfg(source="bbc-news"), task="classification")
    b = load_data(_cfg(source="bbc-news"), task="classification")
    assert a.dropped == {"all": 100}  # 2,225 files, 100 of them repeats of another article
    assert sum(len(a[s]) for s in ("train", "validation", "test")) == 2125
    assert a["train"].features["label"].names == ["business", "entertainment", "politics", "sports", "tech"]
    assert a.fingerprint == b.fingerprint
    test_labels = a["test"]["label"][:]
    assert len(test_labels) == 213 and test_labels.count(3) in range(47, 53)  # stratified: sports is 503/2125
    train = _norm(a["train"]["text"][:])
    for split in ("validation", "test"):  # no leakage: no held-out article has a copy in train
        assert not _norm(a[split]["text"][:]) & train


def test_without_dedupe_the_duplicates_leak_into_held_out_splits():
    raw = load_data(_cfg(source="bbc-news", dedupe=False), task="classification")
    assert raw.dropped == {} and sum(len(raw[s]) for s in ("train", "validation", "test")) == 2225
    train = _norm(raw["train"]["text"][:])
    assert len(_norm(raw["test"]["text"][:]) & train) > 0  # what data.dedupe=true prevents


def test_dedupe_normalises_whitespace_and_cleans_given_splits(tmp_path):
    import datasets

    train = ["alpha beta gamma", "alpha  beta\ngamma", "delta epsilon", "zeta eta", "theta iota", "kappa lambda"]
    datasets.Dataset.from_dict({"text": train}).to_json(str(tmp_path / "train.jsonl"))
    datasets.Dataset.from_dict(
        {"text": ["delta   epsilon", "new text here", "new text here", "more new text"]}
    ).to_json(str(tmp_path / "val.jsonl"))
    data = load_data(_cfg(train=str(tmp_path / "train.jsonl"), validation=str(tmp_path / "val.jsonl")))
    assert data.dropped == {
        "train": 1,
        "validation": 2,
    }  # a whitespace variant in train; a copy of train and a repeat in validation
    assert len(data["train"]) == 5 and data["validation"]["text"][:] == ["new text here", "more new text"]
    assert data.record()["duplicates_dropped"] == {"train": 1, "validation": 2}


def test_the_record_names_files_by_absolute_path(tmp_path, monkeypatch):
    import datasets

    datasets.Dataset.from_dict({"text": [f"document {i} of the corpus" for i in range(20)]}).to_json(
        str(tmp_path / "d.jsonl")
    )
    monkeypatch.chdir(tmp_path)
    data = load_data(_cfg(train="d.jsonl", split_ratio=[0.8, 0.2, 0.0]))
    assert data.config["train"] == str(tmp_path / "d.jsonl")
    monkeypatch.chdir("/")  # a later stage, somewhere else, loads the same data from the record
    again = load_data(OmegaConf.create(data.config))
    assert again.fingerprint == data.fingerprint
    assert (
        load_data(_cfg(source="bbc-news"), task="classification").config["source"] == "bbc-news"
    )  # builtin names stay names


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv not installed")
def test_kjv_gives_one_document_per_chapter():
    dsd = load_splits(_cfg(source="kjv", split_ratio=[0.9, 0.05, 0.05]))
    assert sum(len(d) for d in dsd.values()) == 1189  # chapters in the KJV
    assert any(
        "In the beginning God created" in t
        for t in dsd["train"]["text"][:] + dsd["validation"]["text"][:] + dsd["test"]["text"][:]
    )


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tabular_files_with_a_named_text_column(tmp_path, fmt):
    import datasets

    rows = {"body": [f"document number {i} has some words in it." for i in range(30)]}
    path = tmp_path / f"data.{fmt}"
    ds = datasets.Dataset.from_dict(rows)
    {
        "jsonl": lambda: ds.to_json(str(path)),
        "csv": lambda: ds.to_csv(str(path)),
        "parquet": lambda: ds.to_parquet(str(path)),
    }[fmt]()
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
    tok = train_tokenizer(
        dsd["train"]["text"], family=family, vocab_size=300, lowercase=True, max_len=32, cache_root=tmp_path, data_fp=fp
    )
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


def _labelled_csv(path, rows: int, classes: int = 4):
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(rows):
            w.writerow([f"example number {i} about topic {i % classes}", f"topic-{i % classes}"])
    return path


@pytest.mark.parametrize("rows", [40, 600])
def test_string_labels_are_split_stratified_with_a_validation_set_large_enough_to_select_on(tmp_path, rows):
    from collections import Counter

    csv_path = _labelled_csv(tmp_path / "d.csv", rows)
    splits = load_splits(_cfg(train=str(csv_path), split_ratio=[0.95, 0.05, 0.0]), task="classification")
    val = Counter(splits["validation"]["label"][:])
    assert len(splits["validation"]) == min(100, rows // 5)  # 5 % would be 2 rows of 40, 30 of 600
    assert len(val) == 4 and max(val.values()) - min(val.values()) <= 1  # every class, in proportion
    assert len(splits["train"]) + len(splits["validation"]) == rows


BBC_FINGERPRINT = "34c93f3cb0ef"  # measured before stratification covered plain labels: the split must not move


def test_the_bbc_split_is_unchanged_by_stratifying_plain_labels():
    a = load_data(_cfg(source="bbc-news"), task="classification")
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 1699, "validation": 213, "test": 213}
    assert a.fingerprint.startswith(BBC_FINGERPRINT)


def test_text_in_another_encoding_is_read_with_data_encoding(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(
        "Caf\xe9 au lait in Z\xfcrich.\nA second line, na\xefve.\nA third: \xa3 5.\nA fourth, \xbd.\n".encode("latin-1")
    )
    cfg = _cfg(train=str(tmp_path / "latin1.txt"), split_ratio=[0.5, 0.5, 0.0])
    with pytest.raises(LlmctlError, match=r"not valid utf-8 text \(byte 0xe9 at offset 3\).*data.encoding"):
        load_splits(cfg)
    texts = load_splits(OmegaConf.merge(cfg, {"encoding": "latin-1"}))
    assert {t for s in texts.values() for t in s["text"][:]} == {
        "Café au lait in Zürich.",
        "A second line, naïve.",
        "A third: £ 5.",
        "A fourth, ½.",
    }


def test_local_files_are_cached_under_the_given_folder_not_the_home_cache(tmp_path):
    csv_path = _labelled_csv(tmp_path / "d.csv", 40)
    load_data(_cfg(train=str(csv_path)), task="classification", cache_dir=tmp_path / "store" / ".cache" / "datasets")
    assert list((tmp_path / "store" / ".cache" / "datasets").rglob("*.arrow"))


def test_the_offset_of_a_bad_byte_is_exact_across_read_blocks(tmp_path):
    from llmctl.core.data import check_text_file

    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() + b"\xff tail\n")  # é straddles the 1 MiB read boundary
    with pytest.raises(LlmctlError, match=r"byte 0xff at offset 1048577\)"):
        check_text_file(str(path), "train")
    path.write_bytes(b"fine\n" + "é".encode()[:1])  # cut inside a character at the end
    with pytest.raises(LlmctlError, match="ends inside a character"):
        check_text_file(str(path), "train")
