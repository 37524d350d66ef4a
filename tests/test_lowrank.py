"""core.quantization.lowrank: a fine-tune merged onto a 4-bit base (its changes under half a step) is rounded
away by int4 and given back by the low-rank correction; plain rounding noise gets none; the correction is saved,
reloaded and computed by the packed kernels and by torchao's matmul alike."""

from __future__ import annotations

import pytest
import torch
from test_quantization import SETTINGS, _llama, _on_a_4bit_grid, _roundtrip

from llmctl.core import quantization as q
from llmctl.core.quantization import kernels


def _fine_tuned_on_a_4bit_base(rank: int = 2, untouched: tuple[str, ...] = ()):
    """A tiny Llama whose Linears are a 4-bit-grid base plus a small rank-`rank` delta (a merged LoRA; none in the
    layers whose names end with one of `untouched`), and its base weights."""
    model = _llama()
    base = {}
    g = torch.Generator().manual_seed(7)
    for i, (name, m) in enumerate(n_m for n_m in model.named_modules() if isinstance(n_m[1], torch.nn.Linear)):
        if name == "lm_head":
            continue
        out, width = m.weight.shape
        base[name] = _on_a_4bit_grid(out, width, seed=i)
        b, a = torch.randn(out, rank, generator=g), torch.randn(rank, width, generator=g)
        delta = b @ a
        delta *= 0.001 / delta.abs().mean()  # a tenth of the finest step (0.01–0.03): rounding snaps it back
        delta *= 0 if name.endswith(untouched) else 1
        with torch.no_grad():
            m.weight.copy_(base[name] + delta)
    return model, base


def _kept(quantized, base, fine_tuned) -> float:
    """The share of the fine-tune (fine_tuned − base) that `quantized` keeps (1: all of it, 0: the base weights)."""
    delta = fine_tuned - base
    return float(((quantized - base) * delta).sum() / delta.pow(2).sum())


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def test_int4_rounds_a_merged_fine_tune_away_and_the_correction_gives_it_back(tmp_path):
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    model, base = _fine_tuned_on_a_4bit_base()
    expected = _logits(model, ids)
    plain, _ = _fine_tuned_on_a_4bit_base()
    record = q.quantize(plain, "int4-weight", **SETTINGS)
    assert "lowrank" not in record
    fixed, _ = _fine_tuned_on_a_4bit_base()
    record = q.quantize(fixed, "int4-weight", **{**SETTINGS, "error_rank": 4})
    assert set(record["lowrank"]) == set(record["linear"]) and record["lowrank_rank"] == 4
    for name in record["linear"]:  # the weights each layer computes with: int4 values + B A
        w = model.get_submodule(name).weight.detach()
        layer = fixed.get_submodule(name)
        effective = layer.weight.dequantize() + layer.lowrank_b @ layer.lowrank_a
        snapped = plain.get_submodule(name).weight.dequantize()
        assert _kept(effective, base[name], w) > 0.9 > 0.5 > _kept(snapped, base[name], w), name
        assert (effective - w).norm() < 0.7 * (snapped - w).norm()  # what is left: the groups' re-rounding noise
    plain_gap, fixed_gap = (_logits(plain, ids) - expected).abs().max(), (_logits(fixed, ids) - expected).abs().max()
    assert fixed_gap < plain_gap  # (the packed kernels' bf16 activations bound how close the logits come)
    # saved and rebuilt into a model with other weights: the same outputs, the correction in the packed kernels
    torch.manual_seed(3)
    rebuilt = _roundtrip(fixed, record, tmp_path, type(fixed)(fixed.config))
    assert torch.equal(_logits(rebuilt, ids), _logits(fixed, ids))
    module = rebuilt.get_submodule("model.layers.0.mlp.up_proj")
    if isinstance(module, kernels.PackedLinear):
        assert module.lowrank and "rank-4 correction" in module.extra_repr()


def test_layers_sharing_one_kernel_call_each_keep_their_own_correction(monkeypatch):
    """q / k / v and gate / up run as one kernel call (kernels.SharedInput) with the corrections of those that
    have one added together: each layer's output is what it computes alone, k_proj (no correction) included."""
    fused, _ = _fine_tuned_on_a_4bit_base(untouched=("k_proj",))
    record = q.quantize(fused, "int4-weight", **{**SETTINGS, "error_rank": 4})
    attention = fused.model.layers[0].self_attn
    if not isinstance(attention.q_proj, kernels.PackedLinear):
        pytest.skip(f"this CPU runs int4 through {kernels.describe(fused)}")
    assert "model.layers.0.self_attn.k_proj" not in record["lowrank"] and attention.q_proj.lowrank
    assert attention.q_proj.shared is attention.k_proj.shared is attention.v_proj.shared is not None
    monkeypatch.setattr(kernels, "fuse", lambda model: (0, 0))
    alone, _ = _fine_tuned_on_a_4bit_base(untouched=("k_proj",))
    q.quantize(alone, "int4-weight", **{**SETTINGS, "error_rank": 4})
    x = torch.randn(1, 2, 64)
    with torch.no_grad():
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            got = fused.model.layers[1].get_submodule(name)(x)
            assert torch.allclose(got, alone.model.layers[1].get_submodule(name)(x), rtol=1e-5, atol=1e-6), name
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(fused, ids), _logits(alone, ids), rtol=1e-4, atol=1e-5)


def test_the_correction_stays_fp32_under_a_bf16_runs_autocast():
    """Under precision=bf16 autocast would run the correction's two thin matmuls in bf16 (and cast both factors
    at every call): the packed layers, shared or alone, give what they give without autocast."""
    model, _ = _fine_tuned_on_a_4bit_base()
    q.quantize(model, "int4-weight", **{**SETTINGS, "error_rank": 4})
    layer = model.model.layers[0]
    if not isinstance(layer.self_attn.q_proj, kernels.PackedLinear):
        pytest.skip(f"this CPU runs int4 through {kernels.describe(model)}")
    assert layer.self_attn.q_proj.shared is not None and layer.self_attn.o_proj.lowrank  # shared and alone
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        for name in ("self_attn.q_proj", "self_attn.o_proj"):
            plain = layer.get_submodule(name)(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                under = layer.get_submodule(name)(x)
            assert torch.equal(under, plain), name


def test_rounding_noise_gets_no_correction():
    """A float model's int4 error is full-rank noise: no layer's top directions hold half of it."""
    model = _llama()
    record = q.quantize(model, "int4-weight", **{**SETTINGS, "error_rank": 4})
    assert record["lowrank"] == {}


def test_the_correction_is_added_where_torchaos_matmul_runs_the_layer(monkeypatch):
    """A layer the packed kernels do not take (or any layer on a CUDA device) keeps torchao's matmul; a forward hook
    adds the correction there, so both paths compute the same."""
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    packed, _ = _fine_tuned_on_a_4bit_base()
    expected = _logits(packed, ids)
    q.quantize(packed, "int4-weight", **{**SETTINGS, "error_rank": 4})
    monkeypatch.setattr(kernels, "packable", lambda *a, **k: False)
    hooked, _ = _fine_tuned_on_a_4bit_base()
    q.quantize(hooked, "int4-weight", **{**SETTINGS, "error_rank": 4})
    assert type(hooked.get_submodule("model.layers.0.mlp.up_proj")) is torch.nn.Linear
    a, b = _logits(packed, ids), _logits(hooked, ids)
    assert (a - b).abs().max() < 0.03 * a.abs().max()  # (the packed path may run bf16 activations)
    plain, _ = _fine_tuned_on_a_4bit_base()
    q.quantize(plain, "int4-weight", **SETTINGS)  # the same fp32 matmul without the correction
    assert (b - expected).abs().max() < 0.6 * (_logits(plain, ids) - expected).abs().max()
