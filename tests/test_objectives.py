"""SparseMLM computes exactly the loss of the HF model's own forward, with the head on masked positions only."""

import torch
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

from llmctl.core.objectives import SparseMLM


def _batch(vocab=50, n=4, length=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=g) < 0.3
    labels[picked] = ids[picked]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


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
