"""`llmctl prune` on a tiny classifier and a tiny GPT: each method's result reloads through its reference
with the outputs it had when saved, records before / after, and recovery keeps magnitude zeros."""

from __future__ import annotations

import json

import pytest
from conftest import cls_args, run_inprocess
from transformers import AutoModelForSequenceClassification

from llmctl.core.loading import load_checkpoint
from llmctl.core.pruning import layer_heads as pruning_heads
from llmctl.core.pruning import prunable_linears
from llmctl.core.store import Store


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, bases, reviews):
    root = tmp_path_factory.mktemp("prune")
    code, err = run_inprocess("finetune", *cls_args(bases, reviews, root, "name=c"))
    assert code == 0, err
    return root


def _prune(root, *extra):
    code, err = run_inprocess(
        "prune",
        "init_from=finetune/c",
        "train.max_steps=30",
        "train.batch_size=8",
        "train.eval_every=10",
        "train.lr=1e-3",
        "patience=0",
        "precision=fp32",
        f"output_root={root}",
        "cost.runs=3",
        "cost.throughput_runs=1",
        "cost.seq_len=32",
        *extra,
    )
    assert code == 0, err
    return Store(root).resolve(f"prune/{next(e.split('=')[1] for e in extra if e.startswith('name='))}")


def _reloads_with_the_same_metric(root, res):
    """Loaded back through its reference, the checkpoint scores what the saved model scored (eval re-runs its task)."""
    code, err = run_inprocess(
        "eval",
        f"ckpt={res.ref}",
        "precision=fp32",
        f"output_root={root}",
        "cost.enabled=false",
        "parents=false",
        "batch_size=8",
    )
    assert code == 0, err
    record = json.loads(next((res.path / "evals").glob("classification-*.json")).read_text())
    assert record["primary"]["value"] == pytest.approx(res.manifest["compare"]["after"]["primary"]["value"], abs=1e-9)
    return load_checkpoint(Store(root), res.ref).model


def test_magnitude_with_recovery_keeps_its_zeros_and_records_sparsity(classifier):
    res = _prune(classifier, "method=magnitude", "amount=0.5", "recover=true", "name=mag")
    m = res.manifest
    model = _reloads_with_the_same_metric(classifier, res)
    zeros = sum(int((mod.weight == 0).sum()) for _, mod in prunable_linears(model))
    total = sum(mod.weight.numel() for _, mod in prunable_linears(model))
    assert zeros / total == pytest.approx(0.5, abs=0.01)  # recovery trained the rest, the zeros stayed
    assert not any("_orig" in k or "_mask" in k for k in model.state_dict())
    assert set(m["prune"]["cut"]["sparsity"]) and all(0 < s < 1 for s in m["prune"]["cut"]["sparsity"].values())
    assert m["compare"]["before"]["ref"] == "finetune/c@v001" and m["compare"]["after"]["cost"]["size_bytes"] > 0
    assert m["compare"]["after"]["delta"]["metric"] == pytest.approx(
        m["compare"]["after"]["primary"]["value"] - m["compare"]["before"]["primary"]["value"]
    )
    assert [p["role"] for p in m["parents"]] == ["init"]


def test_structured_heads_and_ffn_shrink_and_reload_through_the_reference(classifier):
    res = _prune(classifier, "method=structured", "amount=0.5", "recover=true", "name=st")
    m = res.manifest
    assert m["artifact"]["format"] == "pruned" and m["artifact"]["attention_heads"] == [
        1,
        1,
    ]  # 2 heads of the tiny BERT → 1
    assert m["prune"]["cut"]["ffn"]["after"] == m["prune"]["cut"]["ffn"]["before"] // 2
    assert m["compare"]["after"]["cost"]["parameters"] < m["compare"]["before"]["cost"]["parameters"]
    model = _reloads_with_the_same_metric(classifier, res)  # through the "pruned" format's rebuild
    assert model.config.intermediate_size == m["prune"]["cut"]["ffn"]["after"]
    assert pruning_heads(model) == [1, 1]


def test_ffn_only_and_layer_drops_reload_with_plain_from_pretrained(classifier):
    ffn = _prune(classifier, "method=structured", "prune.heads=0", "prune.ffn=0.25", "name=ffn")
    assert ffn.manifest["artifact"]["format"] == "hf"
    AutoModelForSequenceClassification.from_pretrained(ffn.path)
    layers = _prune(classifier, "method=layers", "prune.keep_layers=[1]", "name=l")
    model = AutoModelForSequenceClassification.from_pretrained(layers.path)
    assert model.config.num_hidden_layers == 1 and layers.manifest["prune"]["cut"]["kept_layers"] == [1]
