"""core/evaluation/cost.py: timing runs in eval mode, parameter counts, peak memory of one model alone."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llmctl.core.device import setup_runtime
from llmctl.core.evaluation.cost import measure_cost, parameter_counts


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
