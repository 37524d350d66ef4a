"""core.quantization.kernels: weight-only int8 / int4 Linears run by torch's packed kernels compute what torchao's
dequantizing matmul computes (to the rounding of their activations), on any CPU, from tensors wherever they start
in memory; large batches go through the float matmul; a saved model rebuilds with the same kernels. int8-dynamic's
Linears compute the per-row int8 product exactly; int8 tables look up the rows they hold."""

from __future__ import annotations

import pytest
import torch
from test_quantization import SETTINGS, _llama, _roundtrip

from llmctl.core import quantization as q
from llmctl.core.models import weight_bytes
from llmctl.core.quantization.kernels import SMALL_BATCH, DynamicInt8Linear, Int8Embedding, PackedLinear, describe

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the output's size: bf16 activations round


def _quantized_linear(bits: int, *, asymmetric: bool = False, shape=(128, 96)) -> torch.nn.Linear:
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup, quantize_

    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Linear(*shape))
    config = IntxWeightOnlyConfig(
        weight_dtype=torch.int4 if bits == 4 else torch.int8,
        granularity=PerGroup(32) if bits == 4 else PerAxis(0),
        mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC,
    )
    quantize_(linear, config)
    return linear[0]


@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,asymmetric", [(8, False), (4, False), (4, True)], ids=["int8", "int4", "int4-asym"])
def test_the_packed_kernels_compute_what_the_dequantized_weights_do(bits, asymmetric, activations):
    linear = _quantized_linear(bits, asymmetric=asymmetric)
    if asymmetric:
        assert linear.weight.zero_point.any()  # the zero points are real: the kernel's zero term is exercised
    packed = PackedLinear(linear, bits=bits, group=32 if bits == 4 else None, activations=activations)
    x = torch.randn(3, 5, 128)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight.dequantize(), linear.bias)
        got = packed(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert (got - expected).abs().max() < TOLERANCE[activations] * expected.abs().max()


def test_inputs_that_start_mid_cache_line_do_not_crash_the_kernels():
    """The kernels read with aligned vector loads: a slice of a larger tensor (and safetensors' tensors, which
    start at any byte) segfaulted before the inputs were re-allocated."""
    linear = _quantized_linear(8)
    packed = PackedLinear(linear, bits=8, group=None, activations=torch.bfloat16)
    big = torch.randn(1000).bfloat16()
    x = big[3 : 3 + 2 * 128].view(2, 128)
    assert x.data_ptr() % 64
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x.float(), linear.weight.dequantize(), linear.bias)
        assert (packed(x).float() - expected).abs().max() < 2e-2 * expected.abs().max()


@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_large_batch_runs_the_dequantized_float_matmul_in_the_kernels_activation_dtype(monkeypatch, activations):
    """Above SMALL_BATCH rows (prefill) the weight is dequantized once and multiplied in the activation dtype the
    kernels use, on a CPU with native bf16 (faster than torchao's fp32 dequantizing matmul there)."""
    from llmctl.core.quantization import kernels

    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: True)
    for bits, asymmetric in ((4, True), (8, False)):
        linear = _quantized_linear(bits, asymmetric=asymmetric)
        packed = PackedLinear(linear, bits=bits, group=32 if bits == 4 else None, activations=activations)
        x = torch.randn(SMALL_BATCH + 1, 128)
        with torch.inference_mode():
            got = packed(x)
            exact = linear(x)  # torchao's own fp32 dequantizing matmul
            assert got.dtype == torch.float32
            assert (got - exact).abs().max() < TOLERANCE[activations] * exact.abs().max()
            w = linear.weight.dequantize()  # the stored values, scales (and zero points), in the activation dtype:
            assert packed.dequantized().dtype == activations
            assert (packed.dequantized().float() - w).abs().max() <= TOLERANCE[activations] * w.abs().max()
            assert bool((got == exact).all()) == (activations == torch.float32)  # bf16 really ran in bf16


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_a_quantized_model_states_its_kernels_and_rebuilds_with_them(tmp_path, scheme):
    model = _llama()
    record = q.quantize(model, scheme, **{**SETTINGS, "embeddings": False})
    chosen = describe(model)
    assert chosen and ("aten._" in chosen or "torchao" in chosen)  # which one depends on the CPU
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(ids).logits
    torch.manual_seed(5)
    rebuilt = _roundtrip(model, record, tmp_path, type(model)(model.config))
    assert describe(rebuilt) == chosen
    kinds = {type(m).__name__ for n, m in rebuilt.named_modules() if n in record["linear"]}
    fast = "DynamicInt8Linear" if "aten._int_mm" in chosen else "PackedLinear"  # (int8-dynamic: weight-only on AVX2)
    assert kinds == ({fast} if "aten" in chosen else {"Linear"})
    with torch.inference_mode():
        assert torch.equal(rebuilt(ids).logits, before)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_a_cpu_without_native_bf16_times_the_kernels_once_and_reloads_alike(tmp_path, monkeypatch, scheme):
    """Without native bf16 the packed kernel (fp32 activations) is timed against torchao's dequantizing matmul;
    the decision holds for the process, so a model and its reload compute exactly alike (AVX2 CI machines)."""
    from llmctl.core.quantization import kernels

    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(kernels, "cpu_has_int8_dot", lambda: False)  # (int8-dynamic: an AVX2 CPU)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    model = _llama()
    record = q.quantize(model, scheme, **{**SETTINGS, "embeddings": False})
    chosen = describe(model)
    assert "µs" in chosen and "natively" not in chosen
    assert len(kernels._CHOSEN) >= (1 if scheme == "int8-dynamic" else 2)  # (weight-only: bf16 and fp32 activations)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(ids).logits
    rebuilt = _roundtrip(model, record, tmp_path, type(model)(model.config))
    assert describe(rebuilt) == chosen
    with torch.inference_mode():
        assert torch.equal(rebuilt(ids).logits, before)


def test_layers_the_kernels_cannot_take_keep_torchaos_matmul():
    """_convert_weight_to_int4pack_for_cpu needs an output width divisible by 16 (it raises otherwise);
    _weight_int8pack_mm an input width divisible by 16 (24 inputs came out wrong by hundreds, without an error)."""
    from llmctl.core.quantization.kernels import packable

    assert packable(_quantized_linear(4), 4) and packable(_quantized_linear(8, shape=(48, 40)), 8)
    assert not packable(_quantized_linear(4, shape=(128, 24)), 4)
    assert not packable(_quantized_linear(8, shape=(24, 32)), 8)


@pytest.mark.parametrize("width", [16, 48, 80])
def test_the_int8_kernel_is_right_at_every_width_it_is_given(width):
    linear = _quantized_linear(8, shape=(width, 32))
    packed = PackedLinear(linear, bits=8, group=None, activations=torch.bfloat16)
    x = torch.randn(2, width)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight.dequantize(), linear.bias)
        assert (packed(x) - expected).abs().max() < 2e-2 * expected.abs().max()


def _per_row_int8_reference(x: torch.Tensor, linear) -> torch.Tensor:
    """What int8-dynamic computes, in float64: each row of x rounded to int8 with its own scale (max |x| / 127),
    times the stored int8 weights, scaled back."""
    w = linear.weight
    rows = x.reshape(-1, x.shape[-1]).double()
    scale = rows.abs().amax(-1, keepdim=True) / 127
    q = torch.round(rows / scale)
    y = (q @ w.qdata.double().t()) * scale * w.scale.reshape(1, -1).double() + linear.bias.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("halves", [False, True], ids=["int8", "7-bit halves"])
@pytest.mark.parametrize("width", [16, 24, 40, 96])
def test_the_dynamic_int8_linear_computes_the_per_row_int8_product_at_any_width(monkeypatch, width, halves):
    """`_int_mm` is exact integer arithmetic: the result matches the float64 reference to float32 rounding, at input
    widths _weight_int8pack_mm gets wrong, for inputs that start mid cache line and for bf16 inputs too; so do the
    weights as two 7-bit halves (what a CPU whose `_int_mm` saturates runs)."""
    from llmctl.core.quantization import kernels

    if kernels.int_mm_saturates() and not halves:
        pytest.skip("this CPU's _int_mm saturates full-range int8 (no int8 dot products): it runs the halves")
    monkeypatch.setattr(kernels, "int_mm_saturates", lambda: halves)
    linear = _quantized_linear(8, shape=(width, 48))
    dynamic = DynamicInt8Linear(linear)
    assert dynamic.halves == halves
    big = torch.randn(4 * width * 5 + 3)
    x = big[3 : 3 + 4 * 5 * width].view(4, 5, width)  # starts mid cache line
    assert x.data_ptr() % 64
    with torch.inference_mode():
        expected = _per_row_int8_reference(x, linear)
        got = dynamic(x)
        assert got.shape == (4, 5, 48) and got.dtype == torch.float32
        assert (got.double() - expected).abs().max() < 1e-5 * expected.abs().max()
        exact = torch.nn.functional.linear(x, linear.weight.dequantize(), linear.bias)
        assert 0 < (got - exact).abs().max() < 0.05 * exact.abs().max()  # activations really are rounded
        half = dynamic(x.bfloat16())
        assert half.dtype == torch.bfloat16
        assert (half.double() - _per_row_int8_reference(x.bfloat16().float(), linear)).abs().max() < 2e-2 * (
            expected.abs().max()
        )


SATURATING = """
import torch
from llmctl.core.quantization import kernels
from test_kernels import _per_row_int8_reference, _quantized_linear

linear = _quantized_linear(8, shape=(64, 32))
with torch.no_grad():  # every weight and input at the top of the int8 range: the pair sums overflow int16
    linear.weight.qdata.fill_(127)
x = torch.ones(3, 64)
expected = _per_row_int8_reference(x, linear)
single = torch._int_mm(torch.full((17, 64), 127, dtype=torch.int8), torch.full((64, 8), 127, dtype=torch.int8))
print("SATURATES" if kernels.int_mm_saturates() else "EXACT", int(single[0, 0]))
dynamic = kernels.DynamicInt8Linear(linear)
with torch.inference_mode():
    error = float(((dynamic(x).double() - expected).abs().max() / expected.abs().max()))
print("HALVES" if dynamic.halves else "SINGLE", error)
"""


def test_int8_dynamic_stays_exact_where_the_int8_matmul_saturates(tmp_path):
    """oneDNN held to AVX2 (what a CPU without VNNI runs) saturates `_int_mm`'s int16 pair sums: a product of 64
    values of 127 came out 8,160. The probe sees it, and the Linear runs its weights as two 7-bit halves: exact."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([sys.executable, "-c", SATURATING], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    probe, result = run.stdout.split("\n")[-3:-1]
    assert probe.startswith("SATURATES") and int(probe.split()[1]) != 64 * 127 * 127  # the env reproduced it
    mode, error = result.split()
    assert mode == "HALVES" and float(error) < 1e-6


def test_an_int8_table_looks_up_the_rows_it_holds():
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_

    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Embedding(300, 40, padding_idx=0))
    quantize_(
        holder, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=lambda m, f: f == "0"
    )
    table = Int8Embedding(holder[0])
    ids = torch.tensor([[0, 5, 299], [17, 17, 1]])
    with torch.inference_mode():
        assert torch.equal(table(ids), holder[0].weight.dequantize()[ids])
    assert table.padding_idx == 0 and table.embedding_dim == 40


@pytest.mark.parametrize("rows", [3, SMALL_BATCH + 1], ids=["kernel", "prefill"])
def test_float_zero_points_far_from_zero_compute_the_stored_weights(rows):
    """Min–max int4 groups (float zero points) whose values sit far from 0 have zero points in the hundreds: the
    kernel (its zeros formed in fp32) and the prefill path (q − zero point in the activation dtype) both compute
    the stored weights to the rounding of their activations."""
    from llmctl.core.quantization.schemes import minmax_int4

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    weight = 3.0 + 0.02 * torch.randn(96, 128)  # every group far from 0, a narrow range
    linear.weight = torch.nn.Parameter(minmax_int4(weight, 32), requires_grad=False)
    assert linear.weight.zero_point.abs().min() > 100
    w = linear.weight.dequantize()
    assert (w - weight).abs().max() < 0.02  # within half a step of the float weights
    for activations in (torch.float32, torch.bfloat16):
        packed = PackedLinear(linear, bits=4, group=32, activations=activations)
        x = torch.randn(rows, 128)
        with torch.inference_mode():
            expected = torch.nn.functional.linear(x, w, linear.bias)
            got = packed(x)
        assert (got - expected).abs().max() < TOLERANCE[activations] * expected.abs().max()


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "biased q-k-v"])
def test_int4_layers_that_read_one_input_share_a_kernel_call_and_compute_what_each_computes_alone(monkeypatch, bias):
    """q / k / v and gate / up read the same tensor: found by tracing one token, each group runs as one kernel call
    over the weights side by side; o_proj and down_proj (inputs of their own) stay alone. Every member returns what
    its own kernel gives (its bias included: Qwen2's q / k / v have them), in any call order, and a decode step's
    logits are unchanged."""
    from llmctl.core.quantization import kernels

    model = _llama(bias=bias)
    q.quantize(model, "int4-weight", **{**SETTINGS, "embeddings": False})
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        pytest.skip(f"this CPU runs int4 through {describe(model)}")
    monkeypatch.setattr(kernels, "fuse", lambda model: (0, 0))
    alone = _llama(bias=bias)
    q.quantize(alone, "int4-weight", **{**SETTINGS, "embeddings": False})
    layers = [(model.model.layers[i], alone.model.layers[i]) for i in range(2)]
    for fused, _ in layers:
        attention, mlp = fused.self_attn, fused.mlp
        assert attention.q_proj.shared is not None
        assert attention.q_proj.shared is attention.k_proj.shared is attention.v_proj.shared
        assert mlp.gate_proj.shared is mlp.up_proj.shared is not None
        assert attention.o_proj.shared is None and mlp.down_proj.shared is None
        assert attention.q_proj.shared is not mlp.gate_proj.shared
    assert "10 int4 layers that read the same input run as 4 kernel calls" in describe(model)
    assert all(m.shared is None for m in alone.modules() if isinstance(m, PackedLinear))
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        for fused, single in layers:
            for order in (["q_proj", "k_proj", "v_proj"], ["v_proj", "q_proj", "k_proj"]):
                for name in order:
                    got, expected = getattr(fused.self_attn, name)(x), getattr(single.self_attn, name)(x)
                    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (order, name)
            for name in ("up_proj", "gate_proj"):
                assert torch.allclose(getattr(fused.mlp, name)(x), getattr(single.mlp, name)(x), rtol=1e-5, atol=1e-6)
        ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
        assert torch.allclose(model(ids).logits, alone(ids).logits, rtol=1e-5, atol=1e-5)
    # the shared layout is as resident as the members' own were: the model's weight bytes count it (eval's peak)
    extra = sum(t.nbytes for m in model.modules() for n, t in m.named_buffers(recurse=False) if n in ("shared_bias",))
    assert weight_bytes(model) == weight_bytes(alone) + extra


def _held_tensors(model):
    """Every tensor the model's modules hold, in attributes, tuples (a kernel's operands) and shared groups."""
    from llmctl.core.quantization.kernels import SharedInput

    def walk(value):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from walk(item)
        elif isinstance(value, SharedInput):
            yield from walk([v for k, v in vars(value).items() if k not in ("input", "outputs")])

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                yield from walk(value)
        yield from module.parameters(recurse=False)
        yield from module.buffers(recurse=False)


@pytest.mark.parametrize("scheme", ["int8-weight", "int4-weight"])
def test_a_packed_model_placed_on_another_device_is_packed_again_for_it(scheme):
    """The kernels' layout belongs to the device it was built on (the CPU and CUDA int4 kernels take different
    ones) and a kernel holds its operands directly: `model.to(device)` left them on the CPU (CUDA generate / eval /
    serve of a quantized checkpoint failed in the first packed Linear). `place` unpacks, moves and packs again for
    the device — here meta, which has no packed kernels: torchao's matmul runs there, every tensor is there."""
    model = _llama()
    q.quantize(model, scheme, **{**SETTINGS, "embeddings": False})
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        pytest.skip(f"this CPU runs {scheme} through {describe(model)}")
    q.place(model, "cpu")  # the same device: nothing rebuilt
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    q.place(model, "meta")
    assert {t.device.type for t in _held_tensors(model)} == {"meta"}
    assert describe(model) == "torchao dequantizing matmul (no packed kernels on meta)"
    assert not hasattr(model, "llmctl_own_activations")  # (Runtime.for_model: no quantized kernels run it now)
    corrected = [m for m in model.modules() if hasattr(m, "lowrank_a")]
    assert all(m._forward_hooks for m in corrected)  # an unpacked layer's low-rank correction runs as its hook
    with torch.inference_mode():
        assert model(torch.zeros(1, 4, dtype=torch.long, device="meta")).logits.shape == (1, 4, 96)


def test_a_kernel_that_disagrees_with_torchaos_matmul_is_not_chosen(monkeypatch):
    """Where a packed kernel is timed against torchao's matmul (a CPU without native bf16; CUDA, whose kernels and
    layouts no CI machine runs) it is also checked against it on the same rows, and kept only where it is right: a
    layout a torch build reads differently would otherwise give fast garbage."""
    from llmctl.core.quantization import kernels

    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    monkeypatch.setattr(kernels, "_best_us", lambda fn, x: 1.0 if isinstance(fn, PackedLinear) else 2.0)
    packing = kernels._int4pack
    monkeypatch.setattr(kernels, "_int4pack", lambda values: packing(values.flip(1)))  # the columns read backwards
    model = _llama()
    q.quantize(model, "int4-weight", **{**SETTINGS, "embeddings": False})
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert "torchao dequantizing matmul" in describe(model)
    assert kernels._CHOSEN[next(iter(kernels._CHOSEN))][2] > kernels.CHECK_TOLERANCE
    monkeypatch.setattr(kernels, "_int4pack", packing)  # the right layout, as fast: chosen
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    q.quantize(model := _llama(), "int4-weight", **{**SETTINGS, "embeddings": False})
    assert any(isinstance(m, PackedLinear) for m in model.modules()) and "activations" in describe(model)


@pytest.mark.parametrize("faster", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_cpu_without_native_bf16_keeps_the_faster_activation_dtype_and_prefills_in_fp32(monkeypatch, faster):
    """Without native bf16 (AVX2) the packed kernels still take bf16 activations fast (they widen them in registers:
    int8 / int4 weight-only decoded 18 / 11 tokens/s against fp32's 27 before, fp32 activations or torchao's matmul
    winning the timing; 37 / 44 with bf16 activations),
    so both dtypes are timed and the faster kept; the large-batch matmul runs in fp32 there (a bf16 GEMM would be
    emulated), and computes exactly what torchao's fp32 matmul does."""
    from llmctl.core.quantization import kernels

    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    monkeypatch.setattr(
        kernels, "_best_us", lambda fn, x: 5.0 if not isinstance(fn, PackedLinear) else 1 + (fn.activations != faster)
    )
    model = _llama()
    q.quantize(model, "int4-weight", **{**SETTINGS, "embeddings": False})
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and {m.activations for m in layers} == {faster} and {m.matmul for m in layers} == {torch.float32}
    assert describe(model).endswith(
        f"{str(faster)[6:]} activations on a CPU without native bf16 (1 µs vs dequantizing 5 µs, "
        f"{'float32' if faster == torch.bfloat16 else 'bfloat16'} 2 µs)"
    )
    linear = _quantized_linear(4, asymmetric=True)
    packed = PackedLinear(linear, bits=4, group=32, activations=torch.bfloat16)
    x = torch.randn(SMALL_BATCH + 1, 128)
    with torch.inference_mode():
        assert torch.equal(packed(x), linear(x))  # prefill: fp32, as torchao computes it
        assert not torch.equal(packed(x[:2]), linear(x[:2]))  # decode: bf16 activations into the kernel


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("bits,asymmetric", [(8, False), (4, False), (4, True)], ids=["int8", "int4", "int4-asym"])
def test_the_cuda_kernels_compute_what_the_dequantized_weights_do(bits, asymmetric):
    """tinygemm's int4 layout (`_convert_weight_to_int4pack`) and the CUDA int8 kernel, against torchao's matmul."""
    linear = _quantized_linear(bits, asymmetric=asymmetric).cuda()
    packed = PackedLinear(linear, bits=bits, group=32 if bits == 4 else None, activations=torch.bfloat16)
    x = torch.randn(3, 5, 128, device="cuda")
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight.dequantize(), linear.bias)
        got = packed(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert (got - expected).abs().max() < TOLERANCE[torch.bfloat16] * expected.abs().max()


@cuda
@pytest.mark.parametrize("scheme", ["int8-weight", "int4-weight"])
def test_a_quantized_model_placed_on_cuda_runs_there_as_it_ran_on_the_cpu(scheme):
    model = _llama()
    q.quantize(model, scheme, **{**SETTINGS, "embeddings": False})
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(ids).logits
    q.place(model, "cuda")
    assert {t.device.type for t in _held_tensors(model)} == {"cuda"}
    with torch.inference_mode():
        after = model(ids.cuda()).logits.cpu()
    assert (after - before).abs().max() < 5e-2 * before.abs().max()
    print(describe(model))


def test_int8_dynamic_without_int8_dot_products_keeps_the_fastest_of_three_ways(monkeypatch):
    """Without int8 dot products (AVX2) `_int_mm` (as two 7-bit halves) is timed against the same int8 weights run
    weight-only by the packed int8 kernel and against torchao's dequantizing matmul, at one row for a decoder, and
    the fastest kept; weight-only, the activations stay in floating point, and the description says so."""
    from llmctl.core.quantization import kernels

    monkeypatch.setattr(kernels, "cpu_has_int8_dot", lambda: False)
    monkeypatch.setattr(kernels, "int_mm_saturates", lambda: False)  # (where it does, the text says "halves")
    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    speed = {DynamicInt8Linear: 9.0, PackedLinear: 1.0}  # µs: the int8 matmul slowest, the packed kernel fastest
    monkeypatch.setattr(kernels, "_best_us", lambda fn, x: speed.get(type(fn), 5.0))
    model = _llama()
    record = q.quantize(model, "int8-dynamic", **{**SETTINGS, "embeddings": False})
    kinds = {type(m) for n, m in model.named_modules() if n in record["linear"]}
    assert kinds == {PackedLinear}
    assert describe(model).endswith(
        "weight-only: its activations are not rounded to int8 on this CPU (int8 activations 9 µs, bfloat16 "
        "weight-only 1 µs, float32 weight-only 1 µs, dequantizing 5 µs at 1 row; no int8 dot products)"
    )
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = model(ids).logits
    speed[PackedLinear] = 7.0  # the packed kernel slower too: torchao's matmul, said as such
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    plain = _llama()
    q.quantize(plain, "int8-dynamic", **{**SETTINGS, "embeddings": False})
    assert describe(plain).startswith("torchao dequantizing matmul: its activations are not rounded to int8")
    with torch.inference_mode():
        expected = plain(ids).logits
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # the same int8 weights, float activations
