"""core/pruning.py on tiny models: cutting heads / neurons of zero importance changes nothing (BERT and Llama
with grouped-query attention), magnitude pruning is permanent, layer drops keep the named layers, and
every cut reloads."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llmctl.core import pruning
from llmctl.core.errors import LlmctlError

IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 11, 2], [4, 4, 30, 12, 7, 19, 1, 6]])


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            num_labels=3,
        )
    ).eval()


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=8,
            intermediate_size=48,
        )
    ).eval()


def _zero_structures(model, family: str, head_group: int, neurons: list[int]) -> None:
    """Make one head group (a key-value head and its query heads) and some FFN neurons contribute exactly nothing."""
    with torch.no_grad():
        for layer in pruning.transformer_layers(model):
            n_heads, n_kv, d = pruning.head_shape(model.config)
            group = n_heads // n_kv
            q_rows = slice(head_group * group * d, (head_group + 1) * group * d)
            kv_rows = slice(head_group * d, (head_group + 1) * d)
            ((q, _),) = pruning._attention(layer, family)[0]
            kv = [m for m, _ in pruning._attention(layer, family)[1]]
            ((o, _),) = pruning._attention(layer, family)[2]
            q.weight[q_rows] = 0
            o.weight[:, q_rows] = 0
            for m in kv:
                m.weight[kv_rows] = 0
            for m in [q, *kv]:
                if m.bias is not None:
                    m.bias[q_rows if m is q else kv_rows] = 0
            for m, dim in pruning._ffn(layer, family):
                if dim == 0:
                    m.weight[neurons] = 0
                    if m.bias is not None:
                        m.bias[neurons] = 0
                else:
                    m.weight[:, neurons] = 0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_cutting_structures_of_zero_importance_leaves_the_outputs_unchanged(family):
    model = _bert() if family == "bert" else _llama()
    _zero_structures(model, family, head_group=1, neurons=[3, 10, 40])
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    heads = 1 if family == "bert" else 2  # llama: one whole key-value group (2 query heads)
    new, report = pruning.structured(model, heads=heads, ffn=3 / 48)
    with torch.no_grad():
        after = new.eval()(input_ids=IDS).logits
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert report["ffn"]["after"] == 45 and report["heads"]["after"] == (3 if family == "bert" else 4)
    layer = pruning.transformer_layers(new)[0]
    ffn_in = layer.intermediate.dense if family == "bert" else layer.mlp.up_proj
    assert ffn_in.out_features == 45
    if family == "llama":
        assert new.config.num_attention_heads == 4 and new.config.num_key_value_heads == 2 and new.config.head_dim == 8


def test_a_llama_cut_reloads_with_plain_from_pretrained(tmp_path):
    new, _ = pruning.structured(_llama(), heads=1 / 3, ffn=0.25)
    new.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(new.eval()(input_ids=IDS).logits, again(input_ids=IDS).logits, atol=1e-6)


def test_a_bert_ffn_cut_reloads_with_plain_from_pretrained_and_a_head_cut_is_recorded_per_layer(tmp_path):
    ffn_only, _ = pruning.structured(_bert(), heads=0, ffn=0.5)
    assert pruning.shapes_record(ffn_only) is None
    ffn_only.save_pretrained(tmp_path / "ffn")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ffn").eval()
    with torch.no_grad():
        assert torch.allclose(ffn_only.eval()(input_ids=IDS).logits, again(input_ids=IDS).logits, atol=1e-6)
    heads, _ = pruning.structured(_bert(), heads=0.5, ffn=0)
    assert pruning.shapes_record(heads) == {"format": "pruned", "attention_heads": [2, 2], "head_dim": 8}


def test_grouped_query_cuts_that_split_a_group_are_refused():
    with pytest.raises(LlmctlError, match="whole multiple of 2"):
        pruning.structured(_llama(), heads=3, ffn=0)
    with pytest.raises(LlmctlError, match="removes all"):
        pruning.structured(_llama(), heads=0.99, ffn=0)
    with pytest.raises(LlmctlError, match="GPT-2"):
        pruning.structured(GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4)), heads=0.5, ffn=0)


def test_magnitude_pruning_is_permanent_and_reaches_the_amount():
    model = _bert()
    pruning.magnitude(model, amount=0.5, scope="global")
    sparsity = pruning.finalize_magnitude(model)
    assert not any("_orig" in k or "_mask" in k for k in model.state_dict())
    total = sum(m.weight.numel() for _, m in pruning.prunable_linears(model))
    zeros = sum(int((m.weight == 0).sum()) for _, m in pruning.prunable_linears(model))
    assert zeros / total == pytest.approx(0.5, abs=1e-3) and len(sparsity) == 12
    per_layer = _bert()
    pruning.magnitude(per_layer, amount=0.3, scope="layer")
    assert all(s == pytest.approx(0.3, abs=0.01) for s in pruning.finalize_magnitude(per_layer).values())


def test_dropping_layers_keeps_exactly_the_named_layers():
    model = _llama()
    new = pruning.drop_layers(model, keep=[1])
    assert new.config.num_hidden_layers == 1
    for a, b in zip(
        pruning.transformer_layers(new)[0].state_dict().values(),
        pruning.transformer_layers(model)[1].state_dict().values(),
    ):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.isfinite(new(input_ids=IDS).logits).all()
    assert pruning.keep_evenly(6, 3) == [0, 2, 5] and pruning.keep_evenly(4, 1) == [0]
    with pytest.raises(LlmctlError, match="keep_layers"):
        pruning.drop_layers(model, keep=[1, 0])
