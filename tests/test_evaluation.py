"""core/evaluation.py pieces: cost timing runs in eval mode, parameter counts, deltas and the table."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llmctl.core.device import setup_runtime
from llmctl.core.evaluation import delta, first_parent, measure_cost, parameter_counts, table_rows


def test_cost_is_timed_without_dropout_and_leaves_the_mode_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.5)
    ).train()
    modes = []
    model.transformer.h[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    model.save_pretrained(tmp_path)
    cost = measure_cost(
        model, tmp_path, setup_runtime("cpu", "fp32"), seq_len=64, batch_size=2, warmup=1, runs=3, throughput_runs=1
    )
    assert modes and not any(modes) and model.training
    assert cost["seq_len"] == 32  # capped by the model's positions
    total, non_embedding = parameter_counts(model)
    assert total - non_embedding == 64 * 16 + 32 * 16  # token + position embeddings; the LM head is tied to the first


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


def test_a_students_comparison_is_its_teacher_unless_it_was_made_from_another_checkpoint():
    teacher = {"role": "teacher", "ref": "finetune/t@v001", "path": "/t"}
    init = {"role": "init", "ref": "prune/p@v001", "path": "/p"}
    assert first_parent({"parents": [teacher]})["ref"] == "finetune/t@v001"
    assert first_parent({"parents": [teacher, init]})["ref"] == "prune/p@v001"
    assert first_parent({"parents": []}) is None
