"""core/evaluation/records.py and report.py: deltas against a parent and the comparison table."""

from __future__ import annotations

import pytest

from llmctl.core.evaluation.records import delta, headline, unlike
from llmctl.core.evaluation.report import notes, table_rows


def test_delta_and_table_rows_compare_a_child_with_its_parent():
    parent = {
        "ref": "finetune/a@v001",
        "task": "classification",
        "split": "test",
        "primary": {"metric": "accuracy", "mode": "max", "value": 0.9},
        "cost": {
            "size_bytes": 400,
            "latency_ms_p50": 10.0,
            "latency_ms_p90": 12.0,
            "parameters": 100,
            "non_embedding_parameters": 60,
            "throughput_seq_per_s": 5.0,
            "peak_memory_bytes": 2**20,
            "seq_len": 128,
        },
    }
    child = {
        **parent,
        "ref": "prune/a@v001",
        "primary": {**parent["primary"], "value": 0.88},
        "cost": {**parent["cost"], "size_bytes": 100, "latency_ms_p50": 5.0},
    }
    d = delta(child, parent)
    assert d["metric"] == pytest.approx(-0.02) and d["size_bytes_ratio"] == 0.25 and d["latency_ms_p50_ratio"] == 0.5
    assert delta(child, {**parent, "task": "ner"})["metric"] is None
    headers, rows = table_rows([parent, {**child, "delta": d}])
    assert (
        headers[1] == "accuracy" and rows[1][0] == "prune/a@v001" and rows[1][2] == "-0.0200" and rows[1][5] == "0.25×"
    )


def _lm(ref: str, ppl: float, bpb: float, tokenizer: str, length: int = 128, **extra) -> dict:
    return {
        "ref": ref,
        "task": "clm",
        "split": "validation",
        "data": {"fingerprint": "abc"},
        "max_seq_len": length,
        "tokenizer_sha256": tokenizer,
        "runtime": {"device": "cpu", "precision": "fp32", "threads": 2},
        "primary": {"metric": "perplexity", "mode": "min", "value": ppl},
        "metrics": {"perplexity": ppl, "bits_per_byte": bpb},
        **extra,
    }


def test_a_delta_is_only_taken_between_records_measured_alike():
    parent, child = _lm("a", 20.0, 1.5, "t1"), _lm("b", 18.0, 1.4, "t1")
    assert delta(child, parent)["metric"] == pytest.approx(-2.0)
    for change in (
        {"max_seq_len": 64},
        {"runtime": {"device": "cpu", "precision": "bf16", "threads": 2}},
        {"system_prompt": "Be brief."},
        {"max_batches": 4},
    ):
        other = {**parent, **change}
        assert unlike(child, other) and delta(child, other)["metric"] is None, change
        assert "measured differently" in delta(child, other)["note"]


def test_perplexity_across_tokenizers_is_compared_in_bits_per_byte():
    a, b = _lm("a", 20.0, 1.5, "t1"), _lm("b", 40.0, 1.3, "t2")
    assert headline([a, b]) == ("bits_per_byte", "perplexity per token is not comparable: tokenizers differ")
    d = delta(b, a)
    assert d["metric_name"] == "bits_per_byte" and d["metric"] == pytest.approx(-0.2)  # lower: b is better
    headers, rows = table_rows([a, {**b, "delta": d}])
    assert headers[1:3] == ["bits_per_byte", "perplexity (not comparable)"] and rows[1][1:3] == ["1.3000", "40.0000"]
    assert any("tokenizers differ" in n for n in notes([a, b]))
    assert headline([a, _lm("c", 22.0, 1.6, "t1")]) == ("perplexity", None)  # one tokenizer: perplexity stands
