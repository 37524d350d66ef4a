"""Evaluation shared by the training stages and (later) `llmctl eval`: one copy of each metric.

Metric names are stable, since manifests, sweeps and `@best` read them: `eval/loss`,
`eval/perplexity`, `eval/mlm_loss`, `eval/nsp_accuracy`, `baseline/unigram_loss`, ...
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lm_metrics(model, batches, device, *, causal: bool, max_batches: int | None = None) -> dict:
    """Token-weighted validation loss and perplexity of an MLM / causal / BERT-pretraining model.

    For BERT pretraining (MLM + NSP heads), the masked-LM loss and the next-sentence accuracy are
    reported apart, and perplexity is that of the MLM head.
    """
    loss_sum, n_tok, nsp_right, nsp_n = 0.0, 0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        nsp = batch.pop("next_sentence_label", None)
        out = model(**batch)
        logits = out.logits if hasattr(out, "logits") else out.prediction_logits
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]  # causal: predict the next token
        n = int((labels != -100).sum())
        loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"))
        n_tok += n
        if nsp is not None:
            nsp_right += int((out.seq_relationship_logits.argmax(-1) == nsp).sum())
            nsp_n += nsp.numel()
    loss = loss_sum / max(n_tok, 1)
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": n_tok}
    if nsp_n:
        metrics = {"eval/loss": loss, "eval/mlm_loss": loss, "eval/perplexity": metrics["eval/perplexity"],
                   "eval/nsp_accuracy": nsp_right / nsp_n, "eval/tokens": n_tok}
    return metrics
