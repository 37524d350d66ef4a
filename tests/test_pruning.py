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
    with pytest.raises(LlmctlError, match="remove a multiple of 2 heads"):
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


def test_a_share_that_rounds_to_no_whole_group_is_refused_saying_what_can_be_cut():
    """prune.heads=0.25 of 4 heads in 2 key-value groups removed 0 heads and published; now one line."""
    torch.manual_seed(0)
    gqa = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=32,
        )
    )
    with pytest.raises(LlmctlError) as e:
        pruning.structured(gqa, heads=0.25, ffn=0)
    assert "prune.heads=0.25 rounds to removing nothing" in str(e.value)
    assert "4 heads in 2 key-value groups of 2" in str(e.value) and "prune.heads=0.5 or prune.heads=2" in str(e.value)
    with pytest.raises(
        LlmctlError, match=r"prune.ffn=0.001 rounds to removing nothing.*prune.ffn=0.0312 or prune.ffn=1"
    ):
        pruning.structured(gqa, heads=0, ffn=0.001)
    with pytest.raises(LlmctlError, match="nothing would be cut"):
        pruning.structured(gqa, heads=0, ffn=0)
    new, report = pruning.structured(gqa, heads=0.5, ffn=0)
    assert report["heads"] == {"before": 4, "after": 2, "removed_share": 0.5} and new.config.num_key_value_heads == 1


def _planted_bert():
    """A 1-layer BERT whose head 3 has large query / key / value weights but no say in the output (its output
    columns are 0): L1 magnitude ranks it first, Taylor importance last."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=32,
            num_labels=3,
            hidden_dropout_prob=0.5,
            attention_probs_dropout_prob=0.5,
        )
    )
    att = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        for m in (att.self.query, att.self.key, att.self.value):
            m.weight[24:32] *= 20
        att.output.dense.weight[:, 24:32] = 0
    return model


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, 40, (4, 10), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(n)
    ]


def test_taylor_importance_ranks_a_planted_useless_head_below_the_ones_that_matter():
    model = _planted_bert()
    by_magnitude, _ = pruning.structured(model, heads=1, ffn=0)
    kept = pruning.transformer_layers(by_magnitude)[0].attention.self.query.weight
    assert torch.equal(kept[16:24], model.bert.encoder.layer[0].attention.self.query.weight[24:32])  # L1 keeps it
    scores = pruning.taylor_scores(model, _batches(), "cpu")
    by_taylor, _ = pruning.structured(model, heads=1, ffn=0, importance="taylor", scores=scores)
    kept = pruning.transformer_layers(by_taylor)[0].attention.self.query.weight
    assert torch.equal(kept, model.bert.encoder.layer[0].attention.self.query.weight[:24])  # heads 0-2 kept


def test_taylor_scores_are_taken_per_batch_in_eval_mode():
    """Batches that pull a weight opposite ways do not cancel (|w·g| per batch, summed), and dropout is off (the
    same scores twice, the model's own mode given back)."""
    linear = torch.nn.Linear(3, 1, bias=False)

    class Signed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, x, sign):
            return type("Out", (), {"loss": (sign * self.linear(x)).sum()})()

    x = torch.ones(1, 3)
    scores = pruning.taylor_scores(
        Signed(), [{"x": x, "sign": torch.tensor(1.0)}, {"x": x, "sign": torch.tensor(-1.0)}], "cpu"
    )
    assert torch.allclose(scores[id(linear.weight)], 2 * linear.weight.detach().abs())  # summed grads would give 0
    model = _planted_bert().train()
    first, second = pruning.taylor_scores(model, _batches(), "cpu"), pruning.taylor_scores(model, _batches(), "cpu")
    assert all(torch.equal(first[k], second[k]) for k in first) and model.training
