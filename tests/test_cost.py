"""core/evaluation/cost.py: timing runs in eval mode, parameter counts, peak memory of one model alone."""

from __future__ import annotations

import pytest
import torch
from test_quantization import _llama
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


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_decode_step_reads_every_matmul_weight_once_and_one_embedding_row(tied):
    from llmctl.core.evaluation.cost import bytes_per_token

    model = _llama(tied)
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # the output layer (lm_head) is read whole; tied, it is the embedding table, counted once; untied, the input
    # table adds the one row a token looks up
    assert bytes_per_token(model) == 4 * linears + (0 if tied else 4 * 64)


def test_int4_packed_weights_are_a_fraction_of_the_bytes_a_decode_step_reads():
    from llmctl.core import quantization
    from llmctl.core.evaluation.cost import bytes_per_token
    from llmctl.core.quantization.kernels import PackedLinear

    model = _llama(tied=False)
    fp32 = bytes_per_token(model)
    record = quantization.quantize(model, "int4-weight", group_size=None, skip=[], keep_head=True, embeddings=False)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not packed:
        pytest.skip(f"this CPU runs int4 through {model.llmctl_kernels}")
    inner = sum(m.in_features * m.out_features for m in packed)
    width = torch.empty(0, dtype=packed[0].activations).element_size()  # bf16 where the CPU has it natively
    # int4 values at half a byte, one scale and one zero per 32 values; the head stays fp32
    assert bytes_per_token(model) == fp32 - 4 * inner + inner // 2 + inner // 32 * 2 * width
    assert len(packed) == len(record["linear"])


def test_a_causal_lm_gets_decode_speed_time_to_first_token_and_its_bound(tmp_path):
    from llmctl.core.evaluation.cost import bytes_per_token

    model = _llama(tied=True)
    model.save_pretrained(tmp_path)
    quick = {"seq_len": 16, "batch_size": 2, "warmup": 1, "runs": 2, "throughput_runs": 1}
    rt = setup_runtime("cpu", "fp32")
    cost = measure_cost(model, tmp_path, rt, **quick, decode_prompt=8, decode_tokens=6, decode_runs=2)
    assert cost["decode_prompt_tokens"] == 8 and cost["decode_new_tokens"] == 6
    assert cost["decode_tokens_per_s"] > 0 and cost["ttft_ms"] > 0 and cost["memory_bandwidth_gbs"] > 0.1
    assert cost["decode_bytes_per_token"] == bytes_per_token(model)
    assert cost["decode_bound_tokens_per_s"] == pytest.approx(
        cost["memory_bandwidth_gbs"] * 1e9 / cost["decode_bytes_per_token"]
    )
    assert (
        0
        < cost["decode_pct_of_bound"]
        == pytest.approx(100 * cost["decode_tokens_per_s"] / cost["decode_bound_tokens_per_s"])
    )
    encoder = measure_cost(model.model, tmp_path, rt, **quick)  # the base model cannot generate: no decode figures
    assert "decode_tokens_per_s" not in encoder


def test_a_quantized_model_is_timed_as_generate_runs_it_and_says_so(tmp_path):
    """precision=auto chose bf16: a model of packed int4 kernels is timed in fp32 around them (Runtime.for_model,
    what generate / serve do), and its figures carry the note; a float model is timed under the run's autocast."""
    from llmctl.core import quantization
    from llmctl.core.device import Runtime

    model = _llama(tied=True)
    model.save_pretrained(tmp_path)
    quantization.quantize(model, "int4-weight", group_size=None, skip=[], keep_head=True, embeddings=False)
    if not getattr(model, "llmctl_own_activations", None):
        pytest.skip(f"this CPU runs int4 through {model.llmctl_kernels}")
    auto = Runtime(device=torch.device("cpu"), precision="bf16", reason="auto: CPU has native bf16", auto=True)
    quick = {"seq_len": 16, "batch_size": 2, "warmup": 1, "runs": 2, "throughput_runs": 1}
    for m, timed_in_bf16 in ((model, False), (_llama(tied=True), True)):
        seen = set()
        hook = m.register_forward_pre_hook(lambda mod, a, seen=seen: seen.add(torch.is_autocast_enabled("cpu")))
        cost = measure_cost(m, tmp_path, auto, **quick, decode_prompt=8, decode_tokens=4, decode_runs=1)
        hook.remove()
        assert seen == {timed_in_bf16}
        assert ("note" in cost) != timed_in_bf16
    assert "timed in fp32 around its quantized kernels" in measure_cost(model, tmp_path, auto, **quick)["note"]
