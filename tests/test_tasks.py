"""The shared task layer: end-of-text is learned, SFT loss covers the response only, and every
stage's manifest carries one task record from which the task and its data come back."""

import json
import random

import pytest
import torch
from conftest import cls_args, run_inprocess, tiny
from omegaconf import OmegaConf

from llmctl.core.data import load_data
from llmctl.core.manifest import task_record as read_task_record
from llmctl.core.store import Store
from llmctl.core.tasks import collate_packed_clm, prepare, record_data_config

RECORD_KEYS = {"name", "kind", "objective", "labels", "columns", "max_seq_len", "data", "split_seed", "fingerprint"}


def test_causal_lm_batches_keep_end_of_text_in_the_labels():
    rows = [{"input_ids": torch.tensor([5, 0, 7, 8])}, {"input_ids": torch.tensor([0, 9, 9, 0])}]  # 0 = <|endoftext|>
    batch = collate_packed_clm(rows)
    assert torch.equal(batch["labels"], batch["input_ids"])  # nothing masked: packed sequences hold no padding


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """288 one-sentence documents: a model has to learn where each one ends."""
    subjects = ["the cat", "a dog", "the bank", "my friend", "the team", "our coach", "the singer", "a minister"]
    verbs = ["saw", "liked", "found", "met", "called", "praised"]
    objects = ["the ball", "a film", "the bill", "the chip", "a song", "the cup"]
    docs = sorted(f"{s} {v} {o}." for s in subjects for v in verbs for o in objects)
    random.Random(0).shuffle(docs)
    path = tmp_path_factory.mktemp("short") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


def test_a_pretrained_gpt_learns_to_end_documents(short_docs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, docs = short_docs
    code, err = run_inprocess(
        "pretrain",
        *tiny(
            "clm",
            path,
            tmp_path,
            "name=eos",
            "train.max_steps=150",
            "train.lr=3e-3",
            "train.eval_every=0",
            "data.split_ratio=[0.9,0.1,0]",
        ),
    )
    assert code == 0, err
    folder = Store(tmp_path).resolve("pretrain/eos").path
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    at_end, inside = [], []
    for doc in docs[:40]:
        with torch.no_grad():
            p_eos = model(torch.tensor([tok(doc)["input_ids"]])).logits[0].softmax(-1)[:, tok.eos_token_id]
        at_end.append(float(p_eos[-1]))
        inside.extend(p_eos[:-1].tolist())
    mean_end, mean_inside = sum(at_end) / len(at_end), sum(inside) / len(inside)
    # seeded runs reach ~0.85 at the end vs ~0.015 inside; with end-of-text dropped from the labels it is ~0
    assert mean_end > 0.5 and mean_end > 10 * mean_inside, (mean_end, mean_inside)


def test_sft_masks_the_prompt(tmp_path):
    from datasets import Dataset, DatasetDict

    from llmctl.core.data import Data
    from llmctl.core.tokenizer import train_tokenizer

    # a trained BPE has no chat template: this exercises the plain "### user / ### assistant" format
    t = train_tokenizer(
        ["What is 2 plus 3? 2 plus 3 is 5."] * 20,
        family="gpt2",
        vocab_size=300,
        lowercase=False,
        max_len=64,
        cache_root=tmp_path,
        data_fp="sft",
    )
    splits = DatasetDict(
        {"train": Dataset.from_dict({"prompt": ["What is 2 plus 3?"], "response": ["2 plus 3 is 5."]})}
    )
    row = prepare("sft", Data(splits, "fp", {}), t, max_seq_len=64, batch_size=1).splits["train"][0]
    labelled = [int(i) for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert t.decode(labelled).startswith("2 plus 3 is 5.")
    assert labelled[-1] == t.eos_token_id  # the answer ends with end-of-text, and it is learned
    assert row["labels"][0] == -100 and len(row["labels"]) == len(row["input_ids"])


def test_pretrain_and_finetune_write_one_task_record_that_gives_back_the_data(bases, reviews, corpus, tmp_path):
    assert run_inprocess("pretrain", *tiny("mlm", corpus, tmp_path, "name=p", "train.max_steps=2"))[0] == 0
    assert run_inprocess("finetune", *cls_args(bases, reviews, tmp_path, "name=f", "train.max_steps=2"))[0] == 0
    store = Store(tmp_path)
    for ref, name, task in (("pretrain/p", "mlm", "text"), ("finetune/f", "classification", "classification")):
        manifest = store.resolve(ref).manifest
        record = manifest["task"]
        assert set(record) >= RECORD_KEYS and record["name"] == name and record["kind"] == manifest["kind"]
        again = load_data(record_data_config(record), task=task)  # the same data, from the record alone
        assert again.fingerprint == record["fingerprint"] == manifest["data"]["fingerprint"]
    f = store.resolve("finetune/f").manifest["task"]
    assert f["labels"] == ["business", "entertainment", "politics", "sport", "tech"]
    assert f["columns"] == {"text": "review", "label": "sentiment", "text_pair": None}
    assert f["objective"] == {"metric": "eval/macro_f1", "mode": "max"} and f["max_seq_len"] == 48


def test_records_of_older_manifests_are_read_in_todays_shape():
    old_pretrain = {
        "kind": "causal-lm",
        "task": {"stage": "pretrain", "objective": "clm", "max_seq_len": 128},
        "objective": {"metric": "eval/loss", "mode": "min"},
        "data": {"fingerprint": "abc", "config": {"source": "kjv", "split_seed": 0}},
    }
    old_finetune = {
        "kind": "token-cls",
        "task": {"stage": "finetune", "task": "ner", "method": "full", "labels": ["O", "B-PER"]},
        "objective": {"metric": "eval/f1", "mode": "max"},
        "data": {"fingerprint": "def", "config": {"source": "conll-fixture", "max_seq_len": 64}},
    }
    a, b = read_task_record(old_pretrain), read_task_record(old_finetune)
    assert a["name"] == "clm" and a["kind"] == "causal-lm" and a["max_seq_len"] == 128 and a["data"]["source"] == "kjv"
    assert b["name"] == "ner" and b["labels"] == ["O", "B-PER"] and b["max_seq_len"] == 64 and b["fingerprint"] == "def"
    assert OmegaConf.to_container(record_data_config(b))["source"] == "conll-fixture"


def test_a_capped_evaluation_scores_sequences_from_every_part_of_the_split():
    """train.eval_batches: the scored sequences are spread over the whole (document-ordered) split, not its
    first documents; the same ones at every evaluation; all of them when the cap covers the split."""
    from datasets import Dataset

    from llmctl.core.tasks import evaluated_rows

    ds = Dataset.from_dict({"input_ids": [[i] for i in range(100)]})
    picked = [row[0] for row in evaluated_rows(ds, 3, 4)["input_ids"]]
    assert len(picked) == 12 and len(set(picked)) == 12
    assert min(picked) == 0 and max(picked) >= 90  # the last documents are scored too (the first 12 rows end at 11)
    assert picked == [row[0] for row in evaluated_rows(ds, 3, 4)["input_ids"]]
    assert len(evaluated_rows(ds, 30, 4)) == 100 and len(evaluated_rows(ds, None, 4)) == 100
