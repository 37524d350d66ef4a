"""SparseMLM and ChunkedCausalLM compute the loss of the HF model's own forward (and its gradients)
while doing less work: MLM logits on masked positions only; causal-LM logits a chunk at a time."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, BertForPreTraining, GPT2Config, LlamaConfig

from llmctl.core.objectives import ChunkedCausalLM, SparseMLM, chunked_loss_supported, linear_cross_entropy


def _batch(vocab=50, n=4, length=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=g) < 0.3
    labels[picked] = ids[picked]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }


def _config():
    return BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def test_sparse_mlm_loss_and_gradients_match_the_dense_forward():
    torch.manual_seed(0)
    model = BertForMaskedLM(_config()).eval()
    batch = _batch()
    dense = model(**batch).loss
    dense.backward()
    dense_grad = model.bert.embeddings.word_embeddings.weight.grad.clone()
    model.zero_grad()
    sparse = SparseMLM(model)(**batch)
    sparse.backward()
    assert torch.allclose(dense, sparse, atol=1e-6)
    assert torch.allclose(dense_grad, model.bert.embeddings.word_embeddings.weight.grad, atol=1e-6)


def test_sparse_mlm_adds_the_nsp_loss_for_bert_pretraining():
    torch.manual_seed(0)
    model = BertForPreTraining(_config()).eval()
    batch = {**_batch(), "next_sentence_label": torch.tensor([0, 1, 1, 0])}
    assert torch.allclose(model(**batch).loss, SparseMLM(model)(**batch), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# ChunkedCausalLM
# ---------------------------------------------------------------------------------------------
def _causal(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    else:  # tied input / output embeddings, as SmolLM2
        config = LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            tie_word_embeddings=True,
        )
    return AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, so both forwards see the same network


def _lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # e.g. an SFT prompt: no targets there
    return {"input_ids": ids, "labels": labels}


def _grads(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "chunk", [7, None]
)  # 7 does not divide the 60 positions; None = the default size (one chunk here)
def test_chunked_causal_loss_and_gradients_match_the_model_forward(family, chunk):
    model, batch = _causal(family), _lm_batch()
    assert chunked_loss_supported(model)
    dense = model(**batch).loss
    dense.backward()
    dense_grads = _grads(model)
    chunked = ChunkedCausalLM(model, chunk=chunk)(**batch)
    (chunked * 0.5).backward()  # a scaled loss (gradient accumulation) scales every gradient
    assert torch.allclose(dense, chunked, atol=1e-5)
    for name, grad in _grads(model).items():
        assert torch.allclose(2 * grad, dense_grads[name], atol=1e-6), name


def test_chunked_causal_loss_without_gradients_is_the_same_loss():
    model, batch = _causal("gpt2"), _lm_batch()
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, ChunkedCausalLM(model, chunk=5)(**batch), atol=1e-5)


def test_linear_cross_entropy_with_a_bias_matches_the_dense_computation():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    bias = torch.randn(13, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (11,), generator=g)
    targets[3] = -100
    dense = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=-100)
    expected = torch.autograd.grad(dense, (hidden, weight, bias))
    chunked = linear_cross_entropy(hidden, weight, bias, targets, chunk=4)
    assert torch.allclose(dense, chunked, atol=1e-5)
    for got, want in zip(torch.autograd.grad(chunked, (hidden, weight, bias)), expected):
        assert torch.allclose(got, want, atol=1e-5)


def test_chunked_causal_loss_under_bf16_autocast_tracks_the_model_forward():
    model, batch = _causal("gpt2"), _lm_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(**batch).loss
        chunked = ChunkedCausalLM(model, chunk=7)(**batch)
    chunked.backward()
    assert chunked.dtype == torch.float32 and abs(float(dense.detach() - chunked.detach())) < 0.02
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_models_whose_logits_are_scaled_or_capped_keep_their_own_loss():
    model = _causal("gpt2")
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits ≠ lm_head(hidden)
    assert not chunked_loss_supported(model)
