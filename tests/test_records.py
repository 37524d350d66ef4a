"""core/evaluation/records.py and report.py: deltas against a parent and the comparison table."""

from __future__ import annotations

import pytest

from llmctl.core.evaluation.records import delta
from llmctl.core.evaluation.report import table_rows


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
    assert delta(child, {**parent, "task": "ner"}) is None
    headers, rows = table_rows([parent, {**child, "delta": d}])
    assert (
        headers[1] == "accuracy" and rows[1][0] == "prune/a@v001" and rows[1][2] == "-0.0200" and rows[1][5] == "0.25×"
    )
