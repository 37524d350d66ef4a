"""Training objectives that do less work for the same loss.

`SparseMLM` wraps a BERT masked-LM (or MLM+NSP pre-training) model so the vocabulary projection
runs only on the masked positions (~15 % of tokens) instead of every position. With a small
encoder the output layer dominates the cost (hidden × vocab per token), so this is most of the
step time; the loss is the same cross-entropy over the same targets as the HF model's own
forward. It is an nn.Module so DDP can wrap it (the forward runs through DDP's hooks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SparseMLM(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model  # BertForMaskedLM or BertForPreTraining (shares its parameters)

    def forward(self, input_ids, labels, attention_mask=None, token_type_ids=None, next_sentence_label=None) -> torch.Tensor:
        encoder = self.model.base_model
        out = encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = out[0]
        picked = labels != -100
        heads = self.model.cls
        predictions = heads.predictions if hasattr(heads, "seq_relationship") else heads
        logits = predictions(hidden[picked])
        loss = F.cross_entropy(logits.float(), labels[picked])
        if next_sentence_label is not None:
            nsp_logits = heads.seq_relationship(out[1])
            loss = loss + F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1))
        return loss


def sparse_mlm_loss(model, batch) -> torch.Tensor:
    """Trainer loss_fn for a SparseMLM-wrapped model (DDP-wrapped or not)."""
    return model(**batch)
