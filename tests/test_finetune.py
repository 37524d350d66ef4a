"""`llmctl finetune` on tiny models: each task × method learns, label maps round-trip, bad input fails cleanly."""

import json

import pytest
import torch
from conftest import metrics_log, run_inprocess, tiny
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          AutoTokenizer)

from llmctl.core.store import Store

WORDS = {  # topic words that occur in the conftest corpus, so the tiny tokenizer knows them
    "business": "bank interest rates shares profit growth exports analysts",
    "entertainment": "film box office singer tour spring money year",
    "politics": "ministers education bill voters election opposition inquiry spending",
    "sport": "striker scored cup final coach team football season",
    "tech": "engineers chip power mobile phone networks handsets faster",
}

@pytest.fixture(scope="module")
def bases(corpus, tmp_path_factory):
    """A tiny BERT (MLM) and a tiny GPT (causal LM) pre-trained by llmctl, as HF folders."""
    root = tmp_path_factory.mktemp("bases")
    ner_text = root / "ner_text"
    ner_text.mkdir()
    from llmctl.core.data import ASSETS, read_conll

    sents = read_conll([str(ASSETS / "ner" / "train.conll")], "train")["tokens"][:]
    (ner_text / "ner.txt").write_text("\n".join(" ".join(s) for s in sents))
    for obj, name, data in (("mlm", "enc", corpus), ("clm", "gpt", corpus), ("mlm", "nerenc", ner_text / "ner.txt")):
        args = tiny(obj, data, root, f"name={name}", "train.max_steps=20", "train.lr=3e-3")
        if name == "enc":  # two layers, so method=freeze can freeze one and train the other
            args = [a.replace("num_hidden_layers=1", "num_hidden_layers=2") for a in args]
        code, err = run_inprocess("pretrain", *args)
        assert code == 0, err
    store = Store(root)
    return {k: store.resolve(f"pretrain/{k}").path for k in ("enc", "gpt", "nerenc")}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A labelled csv with non-default column names (review → sentiment)."""
    folder = tmp_path_factory.mktemp("cls")
    import random

    rng, rows = random.Random(0), []
    for i in range(150):
        topic = sorted(WORDS)[i % 5]
        words = rng.sample(WORDS[topic].split(), 5) + rng.sample(["the", "a", "on", "in", "said", "new"], 3)
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": topic})
    import csv

    for split, part in (("train", rows[:100]), ("dev", rows[100:125]), ("test", rows[125:])):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["review", "sentiment"])
            w.writeheader()
            w.writerows(part)
    return folder


def _cls_args(bases, reviews, out, *extra):
    return ["task=classification", f"init_from={bases['enc']}", "data=files", f"data.train={reviews / 'train.csv'}",
            f"data.validation={reviews / 'dev.csv'}", f"data.test={reviews / 'test.csv'}", "data.text_column=review",
            "data.label_column=sentiment", "data.max_seq_len=48", "train.max_steps=300", "train.batch_size=8", "train.eval_every=50",
            "train.log_every=10", "train.lr=1e-3", "patience=0", "precision=fp32", f"output_root={out}", *extra]


@pytest.mark.parametrize("method, extra, min_accuracy", [  # chance is 0.2; fewer trainable weights learn slower
    ("full", [], 0.4), ("freeze", ["method.freeze_layers=1"], 0.3), ("lora", ["method.lr=1e-2"], 0.3)])
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
        assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, base.bert.encoder.layer[0].output.dense.weight)
        assert not torch.equal(model.bert.encoder.layer[1].output.dense.weight, base.bert.encoder.layer[1].output.dense.weight)
    if method == "lora":
        assert (res.path / "adapter" / "adapter_model.safetensors").is_file()
        assert not any("lora" in k for k in model.state_dict())  # merged: a plain HF model


def test_ner_on_the_shipped_conll_fixture(bases, tmp_path):
    code, err = run_inprocess("finetune", "task=ner", "data=conll-fixture", f"init_from={bases['nerenc']}", "name=n",
                              "train.max_steps=60", "train.batch_size=16", "train.eval_every=20", "train.lr=3e-3",
                              "data.max_seq_len=48", "precision=fp32", f"output_root={tmp_path}")
    assert code == 0, err
    res = Store(tmp_path).resolve("finetune/n")
    m = res.manifest["metrics"]
    assert res.manifest["kind"] == "token-cls"
    assert m["test/f1"] > 0.3, m["test/f1"]  # a 1-layer 32-wide model; half the test entities are unseen names
    for t in ("PER", "ORG", "LOC", "MISC", "micro", "macro", "weighted"):
        assert f"test/{t}/f1" in m and f"test/{t}/support" in m
    model = AutoModelForTokenClassification.from_pretrained(res.path)
    assert set(model.config.id2label.values()) == {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"}


@pytest.mark.parametrize("method, lr, min_drop", [("full", "3e-3", 0.5), ("lora", "3e-2", 0.02)])
def test_sft_learns_the_responses_and_writes_samples(bases, tmp_path, method, lr, min_drop):
    code, err = run_inprocess("finetune", "task=sft", f"method={method}", "data=tiny-instruct", f"init_from={bases['gpt']}", "name=s",
                              "train.max_steps=60", "train.batch_size=8", "train.eval_every=20", f"method.lr={lr}",
                              "sft.num_samples=2", "sft.max_new_tokens=8", "precision=fp32", f"output_root={tmp_path}")
    assert code == 0, err
    res = Store(tmp_path).resolve("finetune/s")
    evals = [r["eval/loss"] for r in metrics_log(res.path) if "eval/loss" in r]
    assert evals[-1] < evals[0] - min_drop, evals
    assert res.manifest["metrics"]["eval/perplexity"] == pytest.approx(torch.tensor(res.manifest["metrics"]["eval/loss"]).exp().item(), rel=1e-4)
    samples = [json.loads(line) for line in (res.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "reference", "before", "after"} <= set(samples[0])
    model = AutoModelForCausalLM.from_pretrained(res.path)
    AutoTokenizer.from_pretrained(res.path)
    assert not any("lora" in k for k in model.state_dict())
    assert (res.path / "adapter" / "adapter_model.safetensors").is_file() == (method == "lora")


def test_sft_masks_the_prompt(tmp_path):
    from datasets import Dataset, DatasetDict
    from omegaconf import OmegaConf

    from llmctl.core.tokenizer import train_tokenizer
    from llmctl.stages.finetune import prepare_sft

    # a trained BPE has no chat template: this exercises the plain "### user / ### assistant" format
    t = train_tokenizer(["What is 2 plus 3? 2 plus 3 is 5."] * 20, family="gpt2", vocab_size=300, lowercase=False, max_len=64,
                        cache_root=tmp_path, data_fp="sft")

    data = DatasetDict({"train": Dataset.from_dict({"prompt": ["What is 2 plus 3?"], "response": ["2 plus 3 is 5."]})})
    cfg = OmegaConf.create({"data": {"max_seq_len": 64}, "sft": {"system_prompt": None}, "train": {"batch_size": 1}})
    row = prepare_sft(cfg, data, t, None).splits["train"][0]
    labelled = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert t.decode(labelled).startswith("2 plus 3 is 5.")
    assert row["labels"][0] == -100 and len(row["labels"]) == len(row["input_ids"])


@pytest.mark.parametrize("extra, fragment", [
    (["data.label_column=stars"], "no label column 'stars'"),
    (["init_from=GPT"], "is a causal-lm checkpoint; task=classification needs an encoder"),
    (["data.validation=UNSEEN"], "never appears in training"),
    (["data.train=EMPTY"], "empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(bases, reviews, tmp_path, extra, fragment):
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("review,sentiment\nthe match was great,weather\n")
    (tmp_path / "empty.csv").write_text("")
    extra = [e.replace("GPT", str(bases["gpt"])).replace("UNSEEN", str(unseen)).replace("EMPTY", str(tmp_path / "empty.csv")) for e in extra]
    out = tmp_path / "out"
    code, err = run_inprocess("finetune", *_cls_args(bases, reviews, out, *extra))
    assert code == 2 and fragment in err and "\n" not in err, err
    assert not out.exists()
