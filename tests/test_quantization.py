"""core.quantization on tiny models built from config: every scheme saves to safetensors and rebuilds
from its record into a fresh model with exactly the outputs it had; what is kept in floating point;
int4 packing; QAT; and the combinations refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llmctl.core import quantization as q
from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.cost import parameter_counts
from llmctl.core.models import count_parameters, weight_bytes

SCHEMES = ["int8-dynamic", "int8-weight", "int4-weight"]
SETTINGS = {"group_size": None, "skip": [], "keep_head": True, "embeddings": True}


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=120,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=3,
        )
    ).eval()


def _llama(tied: bool = True, bias: bool = False):
    """A 2-layer Llama; `bias`: its attention Linears with biases (as Qwen2's), set to non-zero values."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            tie_word_embeddings=tied,
            attention_bias=bias,
        )
    ).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=2, n_positions=64)).eval()


INPUTS = {"input_ids": torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))}


def _out(model):
    with torch.inference_mode():
        return model(**INPUTS).logits


def _roundtrip(model, record, folder, fresh):
    """Save, then rebuild into `fresh` (built from the same config, other random weights)."""
    q.save(model, record, folder)
    q.rebuild(fresh, record, folder, where="test")
    return fresh


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("build", [_bert, _llama, _gpt2], ids=["bert", "llama-tied", "gpt2-conv1d"])
def test_each_scheme_rebuilds_exactly_from_safetensors(tmp_path, scheme, build):
    model = build()
    reference = _out(model)
    record = q.quantize(model, scheme, **SETTINGS)
    quantized = _out(model)
    err = (quantized - reference).abs().max() / reference.abs().max()
    assert 0 < err < (0.25 if scheme == "int4-weight" else 0.05)  # quantized (not a no-op), still the same model
    torch.manual_seed(123)
    fresh = type(model)(model.config)  # other random weights: everything must come from the file
    rebuilt = _roundtrip(model, record, tmp_path, fresh)
    assert torch.equal(_out(rebuilt), quantized)
    with safe_open(str(tmp_path / q.WEIGHTS), "pt") as fh:  # plain tensors only: no pickle anywhere
        assert all(
            fh.get_tensor(k).dtype in (torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64)
            for k in fh.keys()
        )
    assert count_parameters(rebuilt)[0] == count_parameters(build())[0]  # logical sizes are unchanged


@pytest.fixture
def int8_activations(monkeypatch):
    """int8-dynamic with its int8 activations on any CPU (one without int8 dot products may pick torchao's float
    matmul for speed, `kernels._choose_dynamic`): these tests are about what is quantized, not the faster kernel."""
    from llmctl.core.quantization import kernels

    monkeypatch.setattr(kernels, "_choose_dynamic", lambda module, rows: ("int8", "int8 activations (test)"))


def test_what_stays_in_floating_point(tmp_path, int8_activations):
    model = _llama(tied=True)
    record = q.quantize(model, "int8-dynamic", **{**SETTINGS, "skip": ["*.mlp.down_proj"]})
    assert record["kept"] == ["*.mlp.down_proj", "lm_head"]
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied to a kept head: the table stays fp and tied
    assert record["embeddings"] == [] and "model.layers.1.self_attn.q_proj" in record["linear"]
    untied = _llama(tied=False)
    assert q.quantize(untied, "int8-weight", **SETTINGS)["embeddings"] == ["model.embed_tokens"]
    with pytest.raises(LlmctlError, match="matches no module.*did you mean"):
        q.quantize(_bert(), "int8-dynamic", **{**SETTINGS, "skip": ["query"]})
    bert = _bert()
    q.quantize(bert, "int8-dynamic", **{**SETTINGS, "keep_head": False})
    assert type(bert.classifier) is not torch.nn.Linear


def test_int4_groups_that_do_not_divide_a_layer_keep_it_in_floating_point():
    model = _bert()
    record = q.quantize(
        model, "int4-weight", **{**SETTINGS, "group_size": 128}
    )  # hidden 64: only the 128-wide FFN output divides
    assert record["linear"] == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    assert "bert.encoder.layer.0.attention.self.query" in record["kept"]


def test_int4_values_pack_two_per_byte_and_unpack_exactly():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    packed = q.pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(q.unpack_int4(packed), values)


def test_int4_is_smaller_on_disk_than_int8(tmp_path):
    sizes = {}
    for scheme in ("int8-weight", "int4-weight"):
        model = _llama(tied=False)
        record = q.quantize(
            model, scheme, **{**SETTINGS, "embeddings": False, "keep_head": False}
        )  # every Linear, tables in fp32
        q.save(model, record, tmp_path / scheme)
        sizes[scheme] = (tmp_path / scheme / q.WEIGHTS).stat().st_size
    fp32 = 4 * count_parameters(_llama(tied=False))[0]
    assert sizes["int4-weight"] < 0.8 * sizes["int8-weight"] < 0.8 * fp32


def test_quantized_embeddings_count_as_embeddings_and_memory_shrinks():
    model = _bert()
    before_total, before_non_emb = parameter_counts(model)
    before_bytes = weight_bytes(model)
    q.quantize(model, "int8-dynamic", **SETTINGS)
    assert parameter_counts(model) == (before_total, before_non_emb)
    assert weight_bytes(model) < 0.4 * before_bytes


def test_qat_trains_through_fake_quantization_and_converts_to_a_ptq_layout(tmp_path):
    model = _bert()
    record = q.prepare_qat(model, "int4-weight", **SETTINGS)
    assert "FakeQuantized" in type(model.bert.encoder.layer[0].attention.self.query).__name__
    labels = torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(15):
        loss = model(**INPUTS, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    fake = _out(model)
    record = q.finish_qat(model, record)
    assert record["method"] == "qat" and record["scheme"] == "int4-weight"
    assert (
        _out(model) - fake
    ).abs().max() < 0.05 * fake.abs().max()  # convert stores what training saw (+ int8 embeddings)
    rebuilt = _roundtrip(model, record, tmp_path, _bert())
    assert torch.equal(_out(rebuilt), _out(model))
    ptq = _bert()
    ptq_record = q.quantize(ptq, "int4-weight", **SETTINGS)
    assert {k: ptq_record[k] for k in ("linear", "embeddings", "bits", "group_size")} == {
        k: record[k] for k in ("linear", "embeddings", "bits", "group_size")
    }


def test_a_changed_file_or_scheme_is_one_line(tmp_path):
    model = _bert()
    record = q.quantize(model, "int8-weight", **SETTINGS)
    q.save(model, record, tmp_path)
    with pytest.raises(LlmctlError, match="holds int8-weight weights but the manifest says int8-dynamic"):
        q.rebuild(_bert(), {**record, "scheme": "int8-dynamic"}, tmp_path, where="x")
    with pytest.raises(
        LlmctlError, match="quantized in llmctl-quantized.safetensors but not in the recorded quantization"
    ):
        q.rebuild(_bert(), {**record, "linear": record["linear"][:-1]}, tmp_path, where="x")


@pytest.mark.parametrize(
    "args, message",
    [
        (("int8-dynamic", "cuda", None, None), "runs on cpu kernels, not cuda.*int8-weight"),
        (("int8-dynamic", "cpu", 32, None), "int8-dynamic scales each output channel"),
        (("int4-weight", "cpu", 48, None), "power of two"),
        (("qat", "cpu", None, "int8-dynamic"), "QAT trains toward int4-weight or int8-weight"),
    ],
)
def test_unsupported_combinations_are_refused(args, message):
    method, device, group, base = args
    with pytest.raises(LlmctlError, match=message):
        q.check(method, device=torch.device(device), group_size=group, base=base)
    assert q.check("qat", device=torch.device("cpu"), group_size=None, base="int4-weight") == "int4-weight"


def test_bf16_autocast_elsewhere_does_not_reach_the_int8_kernels():
    model = _bert()
    q.quantize(model, "int8-dynamic", **SETTINGS)
    expected = _out(copy.deepcopy(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _out(model)
    assert torch.isfinite(got).all() and (got.float() - expected).abs().max() < 0.1 * expected.abs().max() + 0.1


def test_layers_with_peaked_inputs_are_found_on_calibration_batches_and_kept_in_fp32(int8_activations):
    model = _llama(tied=False)
    with torch.no_grad():  # one FFN channel 1000× louder: layer 0's down_proj sees an outlier, as SmolLM2's do
        model.model.layers[0].mlp.up_proj.weight[7] *= 1000
    names = q.targets(model, skip=[], keep_head=True, embeddings=False)["linear"]
    outliers = q.activation_outliers(
        model, [INPUTS, INPUTS], names, ratio=20
    )  # (one loud channel of 128: ~38×; the rest < 10×)
    assert list(outliers) == ["model.layers.0.mlp.down_proj"] and outliers["model.layers.0.mlp.down_proj"] > 20
    reference = _out(model)
    kept = copy.deepcopy(model)
    record = q.quantize(kept, "int8-dynamic", **SETTINGS, outliers=outliers)
    assert (
        "model.layers.0.mlp.down_proj" in record["kept"] and type(kept.model.layers[0].mlp.down_proj) is torch.nn.Linear
    )
    q.quantize(model, "int8-dynamic", **SETTINGS)  # the same layer in int8: its activations lose the typical values
    error = lambda m: float((_out(m) - reference).abs().mean())  # noqa: E731
    assert error(kept) < 0.75 * error(model)  # (seeded: 0.6×)


def test_a_folder_from_before_the_weights_were_renamed_still_loads(tmp_path):
    model = _bert()
    record = q.quantize(model, "int8-dynamic", **SETTINGS)
    q.save(model, record, tmp_path)
    (tmp_path / q.WEIGHTS).rename(tmp_path / "model.safetensors")  # as llmctl wrote it until now
    rebuilt = _roundtrip_from(tmp_path, record)
    assert torch.equal(_out(rebuilt), _out(model))


def _torch_ao_folder(model, record: dict, folder) -> dict:
    """`model` (quantized int8-dynamic with its tables) saved as llmctl wrote int8-dynamic folders while it ran on
    torch.ao's modules: each Linear as int8 values + a float64 scale and int64 zero point per output channel, each
    table as uint8 values + a float scale and zero point per row, the rest plain, no torchao metadata.
    Returns {table name: float rows that layout holds} (what the converted model must look up)."""
    from safetensors.torch import save_file

    tensors, tables = {}, {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if name in record["linear"]:
            tensors |= {
                f"{name}.weight": w.qdata,
                f"{name}.weight_scale": w.scale.reshape(-1).double(),
                f"{name}.weight_zero_point": torch.zeros(w.shape[0], dtype=torch.int64),
            }
        elif name in record["embeddings"]:
            table = w.dequantize()
            low, high = table.amin(1), table.amax(1)
            scale = ((high - low) / 255).clamp_min(1e-8)  # (a padding row is all zeros)
            zero = -low / scale
            values = torch.round(table / scale[:, None] + zero[:, None]).clamp(0, 255).to(torch.uint8)
            tensors |= {f"{name}.weight": values, f"{name}.weight_scale": scale, f"{name}.weight_zero_point": zero}
            tables[name] = (values.float() - zero[:, None]) * scale[:, None]
    owned = tuple(f"{n}." for n in (*record["linear"], *record["embeddings"]))
    for key, value in model.state_dict().items():
        if not key.startswith(owned) or key.endswith(".bias"):
            tensors[key] = value.detach().clone()
    folder.mkdir()
    save_file(tensors, str(folder / q.WEIGHTS), metadata={"format": "pt", "llmctl_quantization": "int8-dynamic"})
    return tables


@pytest.mark.parametrize("build", [_bert, lambda: _llama(tied=False)], ids=["bert", "llama"])
def test_an_int8_dynamic_folder_written_through_torch_ao_loads_with_the_weights_it_saved(tmp_path, build):
    """torch.ao's quantize_dynamic is deprecated: int8-dynamic now runs torch's int8 matmul on torchao's tensors.
    Folders written before hold torch.ao's layout; the loader converts them exactly (the same int values and
    scales: tables shifted from uint8 with their zero points) and they run on the new kernels."""
    model = build()
    reference = _out(model)
    record = q.quantize(model, "int8-dynamic", **SETTINGS)
    assert record["embeddings"] and not any(
        "torch.ao" in type(m).__module__ for m in model.modules()
    )  # the deprecated API is gone from the path
    old_record = {**record, "backend": "torch.ao"}
    old_record.pop("torchao")
    tables = _torch_ao_folder(model, record, tmp_path / "old")
    torch.manual_seed(7)
    rebuilt = type(model)(model.config).eval()
    q.rebuild(rebuilt, old_record, tmp_path / "old", where="x")
    modules = dict(rebuilt.named_modules())
    for name, rows in tables.items():
        ids = torch.arange(rows.shape[0])
        assert torch.allclose(modules[name](ids), rows, atol=1e-6, rtol=0)  # the rows that were saved
    for name in record["linear"]:
        assert torch.equal(modules[name].weight.qdata, dict(model.named_modules())[name].weight.qdata)
    got = _out(rebuilt)
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()  # the model it was, quantized
    assert "aten._int_mm" in rebuilt.llmctl_kernels or "dequantizing" in rebuilt.llmctl_kernels


def _roundtrip_from(folder, record):
    fresh = _bert()
    q.rebuild(fresh, record, folder, where="x")
    return fresh


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_an_int8_output_layer_beside_int4_weights_rebuilds_exactly(tmp_path, tied):
    """quantize.head_int8: the output layer (for a tied model, its own int8 copy of the table the input embedding
    keeps in floating point) is int8 per channel; the body stays int4 and only the body's values are packed."""
    model = _llama(tied)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    record = q.quantize(model, "int4-weight", **{**SETTINGS, "embeddings": False, "head_int8": True})
    assert record["head_int8"] == ["lm_head"] and "lm_head" not in record["kept"] + record["linear"]
    head = model.lm_head.weight
    assert head.qdata.dtype == torch.int8 and tuple(head.block_size) == (1, 64)  # per output channel
    assert model.model.embed_tokens.weight.dtype == torch.float32
    # the int8 copy of a tied table is the same parameter: counts stay the float model's
    assert parameter_counts(model) == parameter_counts(_llama(tied))
    tensors, metadata = q.state_dict(model, record)
    assert tensors["lm_head._weight_qdata"].shape == (96, 64)  # int8, not packed two per byte
    assert "lm_head._weight_qdata" not in metadata["llmctl_int4_packed"]
    with torch.inference_mode():
        quantized = model(ids).logits
    torch.manual_seed(9)
    rebuilt = _roundtrip(model, record, tmp_path, type(model)(model.config))
    with torch.inference_mode():
        assert torch.equal(rebuilt(ids).logits, quantized)


def test_an_int8_output_layer_needs_a_weight_only_scheme_and_an_output_layer():
    with pytest.raises(LlmctlError, match="quantize.head_int8.*int8-weight or int4-weight"):
        q.quantize(_llama(), "int8-dynamic", **{**SETTINGS, "head_int8": True})
    with pytest.raises(LlmctlError, match="no output layer"):
        q.quantize(_bert(), "int8-weight", **{**SETTINGS, "head_int8": True})


def _row(value, size, speed=None, latency=None):
    cost = {"size_bytes": size, **({"decode_tokens_per_s": speed} if speed else {}), "latency_ms_p50": latency or 10.0}
    return {"judged": {"primary": {"metric": "perplexity", "mode": "min", "value": value}, "cost": cost}}


def test_auto_picks_by_goal_within_the_quality_budget():
    from llmctl.core.quantization.choice import choose

    ref = {**_row(10.0, 400, speed=10), "split": "validation", "scored": 8}["judged"]
    rows = [_row(10.1, 100, speed=20), _row(10.3, 60, speed=30), _row(13.0, 40, speed=40)]  # +1 %, +3 %, +30 %
    assert choose(rows, ref, goal="speed", max_drop=0.05)[0] == 1  # the fastest within 5 %, not the +30 % one
    assert choose(rows, ref, goal="size", max_drop=0.05)[0] == 1
    assert choose(rows, ref, goal="size", max_drop=0.5)[0] == 2
    assert choose(rows, ref, goal="quality", max_drop=0.05)[0] == 0
    pick, why = choose(rows, ref, goal="speed", max_drop=0.001)
    assert pick == 0 and "no candidate keeps" in why  # nothing within budget: the best quality, said
    encoder = [_row(0.9, 100, latency=5.0), _row(0.9, 90, latency=3.0)]  # no decode figure: latency, lower is better
    for r in encoder:
        r["judged"]["primary"].update(metric="accuracy", mode="max")
    eref = {"primary": {"metric": "accuracy", "mode": "max", "value": 0.91}, "cost": {"latency_ms_p50": 8.0}}
    assert choose(encoder, eref, goal="speed", max_drop=0.05)[0] == 1


def _on_a_4bit_grid(out: int, width: int, group: int = 32, seed: int = 0) -> torch.Tensor:
    """Weights as a GGUF Q4_1 model de-quantized holds them: each group d · q + m, q in 0..15, using its range."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, width // group, group), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans its whole range, as a min–max quantizer leaves it
    d = 0.01 + 0.02 * torch.rand(out, width // group, 1, generator=g)
    m = 0.2 * torch.randn(out, width // group, 1, generator=g)
    return (d * q + m).reshape(out, width)


def test_int4_groups_span_their_own_range_and_weights_on_such_a_grid_stay_exact():
    """Default int4 groups take a float zero point (min–max): weights already on a 4-bit grid (a model
    de-quantized from GGUF Q4_1, as the packaged SmolLM2) come back exactly; symmetric groups round them again."""
    from llmctl.core.quantization.schemes import minmax_int4

    w = _on_a_4bit_grid(128, 64)  # up_proj: intermediate × hidden
    exact = minmax_int4(w, 32)
    assert exact.zero_point.dtype == torch.float32
    assert (exact.dequantize() - w).abs().max() < 1e-5 * w.abs().max()
    for zero_point, bound in ((True, 1e-5), (False, None)):
        model = _llama()
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.copy_(w)
        record = q.quantize(model, "int4-weight", **{**SETTINGS, "zero_point": zero_point})
        assert record["zero_point"] is zero_point
        err = (model.model.layers[0].mlp.up_proj.weight.dequantize() - w).abs().max() / w.abs().max()
        assert err < bound if bound else err > 0.01
