"""`llmctl eval` on tiny checkpoints of every kind: the task comes back from the manifest (the metrics
equal what the fine-tune measured on the same split), records land beside the checkpoint, a
comparison writes its report and charts with deltas against parents, other data can be given."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from conftest import cls_args, run_inprocess, tiny
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.store import Store


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bases, reviews, corpus):
    """A store with a classifier, a child of it (same task), an NER tagger, an SFT model and a GPT."""
    root = tmp_path_factory.mktemp("evalstore")
    runs = [
        ("finetune", *cls_args(bases, reviews, root, "name=cls", "train.max_steps=60")),
        ("finetune", *cls_args(bases, reviews, root, "name=child", "init_from=finetune/cls", "train.max_steps=4")),
        (
            "finetune",
            "task=ner",
            "data=conll-fixture",
            f"init_from={bases['nerenc']}",
            "name=ner",
            "train.max_steps=20",
            "train.batch_size=16",
            "train.eval_every=20",
            "train.lr=3e-3",
            "data.max_seq_len=48",
            "precision=fp32",
            f"output_root={root}",
        ),
        (
            "finetune",
            "task=sft",
            "data=tiny-instruct",
            f"init_from={bases['gpt']}",
            "name=sft",
            "train.max_steps=10",
            "train.batch_size=8",
            "train.eval_every=10",
            "sft.num_samples=0",
            "precision=fp32",
            f"output_root={root}",
        ),
        ("pretrain", *tiny("clm", corpus, root, "name=gpt", "train.max_steps=20", "train.lr=3e-3")),
    ]
    for args in runs:
        code, err = run_inprocess(*args)
        assert code == 0, err
    return root


def _eval(root, *extra):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "precision=fp32",
            f"output_root={root}",
            "cost.runs=3",
            "cost.throughput_runs=1",
            "cost.batch_size=4",
            "cost.seq_len=32",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _record(root, ref: str) -> dict:
    store = Store(root)
    files = sorted((store.resolve(ref).path / "evals").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert files, f"no eval record for {ref}"
    return json.loads(files[-1].read_text())


@pytest.mark.parametrize(
    "ref, metric", [("finetune/cls", "accuracy"), ("finetune/ner", "f1"), ("finetune/sft", "loss")]
)
def test_a_checkpoint_is_judged_on_its_own_task_and_split_with_no_flags(trained, ref, metric):
    manifest = Store(trained).resolve(ref).manifest
    before = {p.name for p in Store(trained).resolve(ref).path.iterdir()}
    _eval(trained, f"ckpt={ref}", "batch_size=8", "parents=false", "samples=2", "max_new_tokens=6")
    record = _record(trained, ref)
    split = "test" if f"test/{metric}" in manifest["metrics"] else "validation"
    assert record["split"] == split and record["data"]["fingerprint"] == manifest["data"]["fingerprint"]
    recorded = manifest["metrics"][f"{'test' if split == 'test' else 'eval'}/{metric}"]
    assert record["metrics"][metric] == pytest.approx(
        recorded, rel=1e-4, abs=1e-6
    )  # the fine-tune's own measurement, re-run from the manifest
    if ref == "finetune/cls":
        assert len(record["metrics"]["confusion_matrix"]) == len(record["labels"]) == 5
        assert sum(map(sum, record["metrics"]["confusion_matrix"])) == record["data"]["examples"]
    if ref == "finetune/ner":
        assert {"PER", "ORG", "LOC", "MISC"} <= {k.split("/")[0] for k in record["metrics"] if "/" in k}
    if ref == "finetune/sft":
        assert len(record["samples"]) == 2 and all(s["prompt"] and "output" in s for s in record["samples"])
        assert record["metrics"]["perplexity"] == pytest.approx(math.exp(record["metrics"]["loss"]), rel=1e-6)
    after = {p.name for p in Store(trained).resolve(ref).path.iterdir()}
    assert after - before <= {"evals"}  # weights and manifest untouched; the record sits in evals/


def test_cost_figures_are_measured_the_same_way_for_every_checkpoint(trained):
    from transformers import AutoModelForSequenceClassification

    _eval(trained, "ckpt=finetune/cls", "parents=false")
    cost = _record(trained, "finetune/cls")["cost"]
    path = Store(trained).resolve("finetune/cls").path
    model = AutoModelForSequenceClassification.from_pretrained(path)
    embeddings = sum(m.weight.numel() for m in model.bert.embeddings.children() if isinstance(m, torch.nn.Embedding))
    assert cost["parameters"] == sum(p.numel() for p in model.parameters())
    assert cost["non_embedding_parameters"] == cost["parameters"] - embeddings
    assert cost["size_bytes"] == (path / "model.safetensors").stat().st_size
    assert 0 < cost["latency_ms_p50"] <= cost["latency_ms_p90"] and cost["latency_runs"] == 3
    assert cost["throughput_seq_per_s"] > 0 and cost["throughput_tokens_per_s"] == pytest.approx(
        cost["throughput_seq_per_s"] * 32
    )
    weights = sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])
    assert cost["peak_memory_bytes"] >= weights


def test_a_comparison_writes_table_report_and_charts_with_deltas_against_parents(trained, tmp_path):
    report = tmp_path / "report"
    result = _eval(trained, "ckpt=[finetune/child,finetune/ner]", f"report={report}", "batch_size=8")
    assert "finetune/child@v001" in result.output and "finetune/ner@v001" in result.output
    child, parent = _record(trained, "finetune/child"), _record(trained, "finetune/cls")  # the parent was judged too
    results = json.loads((report / "results.json").read_text())
    assert [r["ref"] for r in results] == ["finetune/child@v001", "finetune/ner@v001"]
    delta = results[0]["delta"]
    assert delta["ref"] == "finetune/cls@v001"
    assert delta["metric"] == pytest.approx(child["metrics"]["accuracy"] - parent["metrics"]["accuracy"])
    assert delta["size_bytes_ratio"] == pytest.approx(1.0)  # same architecture, same file size
    assert results[1]["delta"] is None and results[1]["delta_note"]  # the NER model's parent is an MLM: another task
    text = (report / "report.md").read_text()
    assert "| checkpoint |" in text and "finetune/child@v001" in text and "Confusion matrix" in text
    for png in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 600 and height >= 400


def test_a_language_model_on_other_data_gets_perplexity_and_bits_per_byte(trained, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"The coach said the team had played its best football on day {i}." for i in range(60)))
    _eval(
        trained,
        "ckpt=pretrain/gpt",
        "data=files",
        f"data.train={other}",
        "data.split_ratio=[0.5,0.5,0]",
        "parents=false",
    )
    record = _record(trained, "pretrain/gpt")
    own = Store(trained).resolve("pretrain/gpt").manifest["data"]["fingerprint"]
    assert record["split"] == "validation" and record["data"]["fingerprint"] != own  # no test split: validation
    m = record["metrics"]
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
    assert 0 < m["bits_per_byte"] < m["loss"] / math.log(2)  # a token covers more than one byte


def test_a_plain_hf_folder_with_data_is_recorded_under_the_store(trained, bases, corpus):
    _eval(trained, f"ckpt={bases['gpt']}", "data=files", f"data.train={corpus}", "parents=false", "cost.enabled=false")
    records = list((trained / "evals").rglob("clm-*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["path"] == str(bases["gpt"])


def test_a_base_language_model_is_judged_on_its_sft_childs_task_for_the_delta(trained, bases, tmp_path):
    _eval(trained, "ckpt=finetune/sft", f"report={tmp_path}", "cost.enabled=false", "samples=0")
    result = json.loads((tmp_path / "results.json").read_text())[0]
    parent = json.loads(
        next((trained / "evals").rglob("sft-*.json")).read_text()
    )  # the base GPT's record, outside the store
    assert parent["task"] == "sft" and parent["path"] == str(bases["gpt"])
    assert result["delta"]["metric"] == pytest.approx(result["metrics"]["perplexity"] - parent["metrics"]["perplexity"])


def test_a_parent_is_judged_as_its_child_was_never_by_a_record_measured_otherwise(trained, bases, reviews):
    """A delta subtracts only numbers measured alike: the parent is judged at its child's sequence length with the
    child's cost settings; a saved parent record measured otherwise is not reused."""
    assert Store(trained).resolve("finetune/cls").manifest["task"]["max_seq_len"] == 48
    args = cls_args(bases, reviews, trained, "name=short", "init_from=finetune/cls", "train.max_steps=2")
    code, err = run_inprocess("finetune", *[a.replace("data.max_seq_len=48", "data.max_seq_len=24") for a in args])
    assert code == 0, err
    _eval(
        trained, "ckpt=finetune/cls", "parents=false", "cost.seq_len=64"
    )  # a record of the parent, measured otherwise
    assert _record(trained, "finetune/cls")["cost_settings"]["seq_len"] == 64
    _eval(trained, "ckpt=finetune/short")
    parent, child = _record(trained, "finetune/cls"), _record(trained, "finetune/short")
    assert child["max_seq_len"] == parent["max_seq_len"] == 24  # the parent judged at its child's length
    assert parent["cost_settings"] == child["cost_settings"] and parent["cost_settings"]["seq_len"] == 32
    from llmctl.core.evaluation.records import delta, unlike

    assert unlike(child, parent) == []
    assert delta(child, parent)["metric"] == pytest.approx(child["metrics"]["accuracy"] - parent["metrics"]["accuracy"])


def test_perplexities_of_different_tokenizers_are_compared_in_bits_per_byte(trained, corpus, tmp_path):
    code, err = run_inprocess("pretrain", *tiny("clm", corpus, trained, "name=gpt400", "tokenizer.vocab_size=400"))
    assert code == 0, err
    report = tmp_path / "ppl"
    _eval(trained, "ckpt=[pretrain/gpt,pretrain/gpt400]", "data=files", f"data.train={corpus}", f"report={report}")
    rows = json.loads((report / "results.json").read_text())
    assert rows[0]["tokenizer_sha256"] != rows[1]["tokenizer_sha256"]
    text = (report / "report.md").read_text()
    assert "| checkpoint | bits_per_byte | perplexity (not comparable) |" in text
    assert "perplexity per token is not comparable: tokenizers differ" in text
    assert (report / "bits_per_byte_vs_size.png").is_file() and not (report / "perplexity_vs_size.png").exists()


@pytest.mark.parametrize("ref", ["finetune/cls", "finetune/ner", "finetune/sft"])
def test_a_capped_evaluation_scores_only_its_batches_for_every_task(trained, ref):
    """max_batches caps classification, NER and SFT too (not only the packed LM tasks), and the record says so."""
    _eval(trained, f"ckpt={ref}", "batch_size=4", "parents=false", "cost=off")
    whole = _record(trained, ref)
    _eval(trained, f"ckpt={ref}", "batch_size=4", "parents=false", "cost=off", "max_batches=1")
    capped = _record(trained, ref)
    assert capped["max_batches"] == 1 and capped["scored"] == 4 < whole["scored"] == whole["data"]["examples"]
    m, w = capped["metrics"], whole["metrics"]
    if ref == "finetune/cls":
        assert sum(map(sum, m["confusion_matrix"])) == 4 < sum(map(sum, w["confusion_matrix"]))
    elif ref == "finetune/ner":
        assert m["micro/support"] < w["micro/support"]
    else:
        assert 0 < m["tokens"] < w["tokens"]


def test_train_eval_batches_caps_a_fine_tunes_validation_and_never_its_test_split(bases, reviews, tmp_path):
    code, err = run_inprocess(
        "finetune", *cls_args(bases, reviews, tmp_path, "train.max_steps=4", "train.eval_batches=1")
    )
    assert code == 0, err
    metrics = Store(tmp_path).resolve("finetune/enc-classification").manifest["metrics"]
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    assert sum(metrics[f"eval/{n}/support"] for n in labels) == 8  # one batch of 8, of the 25 validation reviews
    assert sum(metrics[f"test/{n}/support"] for n in labels) == 25  # the test split whole


def test_conversations_given_as_data_are_judged_as_sft_for_base_and_child(trained, bases, tmp_path):
    """A prompt / response file given to a base LM and its SFT child is judged as SFT for both (it asked for a
    `text` column): the data's own columns say which task it is."""
    import shutil

    from llmctl.core.data import ASSETS

    data = tmp_path / "chat.jsonl"
    shutil.copy(ASSETS / "sft" / "instructions.jsonl", data)
    report = tmp_path / "sft-report"
    _eval(
        trained,
        f"ckpt=[{bases['gpt']},finetune/sft]",
        "data=files",
        f"data.train={data}",
        f"report={report}",
        "cost=off",
        "samples=0",
    )
    rows = json.loads((report / "results.json").read_text())
    assert [r["task"] for r in rows] == ["sft", "sft"] and all(r["metrics"]["tokens"] > 0 for r in rows)
    assert rows[0]["max_seq_len"] == 128  # the base: the data's length (its 32-token packing is for clm)
    corpus = tmp_path / "plain.txt"
    corpus.write_text("\n".join(f"The bank said profits rose by {i} per cent." for i in range(40)))
    _eval(trained, f"ckpt={bases['gpt']}", "data=files", f"data.train={corpus}", "cost=off", "parents=false")


def test_an_sft_split_whose_every_response_is_cut_off_is_one_line_not_a_loss_of_zero(trained):
    """Judged at 8 tokens no response starts inside the window: before, the record said loss 0 / perplexity 1."""
    code, err = run_inprocess("eval", "ckpt=finetune/sft", "max_seq_len=8", "precision=fp32", f"output_root={trained}")
    assert code == 2 and "before its response starts, so nothing would be learned or scored" in err, err
    assert "max_seq_len=8" in err
