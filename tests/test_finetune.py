"""`llmctl finetune` on tiny models: each task × method learns, label maps round-trip, bad input fails cleanly."""

import json

import pytest
import torch
from conftest import cls_args as _cls_args
from conftest import metrics_log, run_inprocess
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from llmctl.core.store import Store


@pytest.mark.parametrize(
    "method, extra, min_accuracy",
    [  # chance is 0.2; fewer trainable weights learn slower
        ("full", [], 0.4),
        ("freeze", ["method.freeze_layers=1"], 0.3),
        ("lora", ["method.lr=1e-2"], 0.3),
    ],
)
def test_classification_learns_with_each_method(bases, reviews, tmp_path, method, extra, min_accuracy):
    code, err = run_inprocess("finetune", *_cls_args(bases, reviews, tmp_path, f"method={method}", "name=c", *extra))
    assert code == 0, err
    res = Store(tmp_path).resolve("finetune/c")
    m = res.manifest
    assert m["kind"] == "seq-cls" and m["task"]["method"] == method
    evals = [r["eval/loss"] for r in metrics_log(res.path) if "eval/loss" in r]
    assert min(evals[1:]) < evals[0], evals  # the validation loss falls
    assert m["metrics"]["test/accuracy"] >= min_accuracy
    for key in ("test/macro_f1", "test/sport/f1", "test/confusion_matrix", "eval/accuracy"):
        assert key in m["metrics"]
    share = m["metrics"]["parameters/trainable_share"]
    assert (share == 1.0) if method == "full" else (0 < share < 1.0)
    # the label map round-trips through config.json and plain transformers reloads the model
    model = AutoModelForSequenceClassification.from_pretrained(res.path)
    assert model.config.id2label == {0: "business", 1: "entertainment", 2: "politics", 3: "sport", 4: "tech"}
    assert model.config.label2id["tech"] == 4
    if method == "freeze":  # embeddings and layer 0 arrive unchanged from pretrain's input side; layer 1 trained
        base = AutoModelForMaskedLM.from_pretrained(bases["enc"])
        words = base.bert.embeddings.word_embeddings.weight
        assert not torch.equal(base.cls.predictions.decoder.weight, words)  # bert-tiny's MLM output layer is its own
        assert torch.equal(model.bert.embeddings.word_embeddings.weight, words)
        assert torch.equal(
            model.bert.encoder.layer[0].output.dense.weight, base.bert.encoder.layer[0].output.dense.weight
        )
        assert not torch.equal(
            model.bert.encoder.layer[1].output.dense.weight, base.bert.encoder.layer[1].output.dense.weight
        )
    if method == "lora":
        assert (res.path / "adapter" / "adapter_model.safetensors").is_file()
        assert not any("lora" in k for k in model.state_dict())  # merged: a plain HF model


def test_ner_on_the_shipped_conll_fixture(bases, tmp_path):
    code, err = run_inprocess(
        "finetune",
        "task=ner",
        "data=conll-fixture",
        f"init_from={bases['nerenc']}",
        "name=n",
        "train.max_steps=60",
        "train.batch_size=16",
        "train.eval_every=20",
        "train.lr=3e-3",
        "data.max_seq_len=48",
        "precision=fp32",
        f"output_root={tmp_path}",
    )
    assert code == 0, err
    res = Store(tmp_path).resolve("finetune/n")
    m = res.manifest["metrics"]
    assert res.manifest["kind"] == "token-cls"
    assert m["test/f1"] > 0.3, m["test/f1"]  # a 1-layer 32-wide model; half the test entities are unseen names
    for t in ("PER", "ORG", "LOC", "MISC", "micro", "macro", "weighted"):
        assert f"test/{t}/f1" in m and f"test/{t}/support" in m
    model = AutoModelForTokenClassification.from_pretrained(res.path)
    assert set(model.config.id2label.values()) == {
        "O",
        "B-PER",
        "I-PER",
        "B-ORG",
        "I-ORG",
        "B-LOC",
        "I-LOC",
        "B-MISC",
        "I-MISC",
    }


@pytest.mark.parametrize("method, lr, min_drop", [("full", "3e-3", 0.5), ("lora", "3e-2", 0.02)])
def test_sft_learns_the_responses_and_writes_samples(bases, tmp_path, method, lr, min_drop):
    code, err = run_inprocess(
        "finetune",
        "task=sft",
        f"method={method}",
        "data=tiny-instruct",
        f"init_from={bases['gpt']}",
        "name=s",
        "train.max_steps=60",
        "train.batch_size=8",
        "train.eval_every=20",
        f"method.lr={lr}",
        "sft.num_samples=2",
        "sft.max_new_tokens=8",
        "precision=fp32",
        f"output_root={tmp_path}",
    )
    assert code == 0, err
    res = Store(tmp_path).resolve("finetune/s")
    evals = [r["eval/loss"] for r in metrics_log(res.path) if "eval/loss" in r]
    assert evals[-1] < evals[0] - min_drop, evals
    assert res.manifest["metrics"]["eval/perplexity"] == pytest.approx(
        torch.tensor(res.manifest["metrics"]["eval/loss"]).exp().item(), rel=1e-4
    )
    samples = [json.loads(line) for line in (res.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "reference", "before", "after"} <= set(samples[0])
    model = AutoModelForCausalLM.from_pretrained(res.path)
    AutoTokenizer.from_pretrained(res.path)
    assert not any("lora" in k for k in model.state_dict())
    assert (res.path / "adapter" / "adapter_model.safetensors").is_file() == (method == "lora")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["data.label_column=stars"], "no label column 'stars'"),
        (["init_from=GPT"], "is a causal-lm checkpoint; task=classification needs an encoder"),
        (["data.validation=UNSEEN"], "never appears in training"),
        (["data.train=EMPTY"], "empty"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(bases, reviews, tmp_path, extra, fragment):
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("review,sentiment\nthe match was great,weather\n")
    (tmp_path / "empty.csv").write_text("")
    extra = [
        e.replace("GPT", str(bases["gpt"])).replace("UNSEEN", str(unseen)).replace("EMPTY", str(tmp_path / "empty.csv"))
        for e in extra
    ]
    out = tmp_path / "out"
    code, err = run_inprocess("finetune", *_cls_args(bases, reviews, out, *extra))
    assert code == 2 and fragment in err and "\n" not in err, err
    assert (
        not out.exists() or [p for p in out.rglob("*") if ".cache" not in p.relative_to(out).parts] == []
    )  # caches only
