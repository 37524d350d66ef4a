"""core/evaluation/cost.py: timing runs in eval mode, parameter counts, peak memory of one model alone."""

from __future__ import annotations

import pytest
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


def test_peak_memory_counts_the_measured_model_alone(monkeypatch):
    """A teacher or the previously judged checkpoint resident on the GPU is not in a model's peak: the figure is the
    allocator's peak above what was allocated when the pass began (the CUDA allocator simulated here)."""
    from llmctl.core.evaluation import cost

    allocator = {"allocated": 3_000_000, "peak": 3_000_000}  # 3 MB of other models already resident
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda d=None: allocator.update(peak=allocator["allocated"])
    )
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: allocator["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: allocator["peak"])
    with cost._PeakMemory(torch.device("cuda")) as peak:
        allocator["peak"] += 500_000  # the measured pass's activations
    assert peak.bytes == 500_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_cuda_is_the_same_with_another_model_resident(tmp_path):
    rt = setup_runtime("cuda", "fp32")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=2, n_positions=64)).to(rt.device)
    settings = {"seq_len": 64, "batch_size": 4, "warmup": 1, "runs": 2, "throughput_runs": 1}
    alone = measure_cost(model, tmp_path, rt, **settings)["peak_memory_bytes"]
    other = torch.zeros(64 * 2**20, device=rt.device)  # 256 MiB of someone else's weights
    with_other = measure_cost(model, tmp_path, rt, **settings)["peak_memory_bytes"]
    del other
    assert abs(with_other - alone) < 0.1 * alone
