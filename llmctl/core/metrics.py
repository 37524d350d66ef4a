"""Evaluation shared by the training stages and (later) `llmctl eval`: one copy of each metric.

Metric names are stable, since manifests, sweeps and `@best` read them: `eval/loss`,
`eval/perplexity`, `eval/mlm_loss`, `eval/nsp_accuracy`, `baseline/unigram_loss`, ...
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lm_metrics(model, batches, device, *, causal: bool, tokenizer=None) -> dict:
    """Token-weighted validation loss and perplexity of an MLM / causal / BERT-pretraining model.

    For BERT pretraining (MLM + NSP heads), the masked-LM loss and the next-sentence accuracy are
    reported apart, and perplexity is that of the MLM head. A causal model given its `tokenizer`
    also gets bits per byte: the summed loss in bits over the UTF-8 bytes of the scored tokens'
    text (special tokens count no bytes), comparable across tokenizers.
    """
    loss_sum, n_tok, nsp_right, nsp_n, n_bytes = 0.0, 0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        nsp = batch.pop("next_sentence_label", None)
        out = model(**batch)
        logits = out.logits if hasattr(out, "logits") else out.prediction_logits
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]  # causal: predict the next token
        n = int((labels != -100).sum())
        loss_sum += float(
            F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        n_tok += n
        if causal and tokenizer is not None:
            rows = [row[row != -100].tolist() for row in labels]
            n_bytes += sum(len(t.encode("utf-8")) for t in tokenizer.batch_decode(rows, skip_special_tokens=True))
        if nsp is not None:
            nsp_right += int((out.seq_relationship_logits.argmax(-1) == nsp).sum())
            nsp_n += nsp.numel()
    loss = loss_sum / max(n_tok, 1)
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": n_tok}
    if n_bytes:
        metrics["eval/bits_per_byte"] = loss_sum / math.log(2) / n_bytes
    if nsp_n:
        metrics = {
            "eval/loss": loss,
            "eval/mlm_loss": loss,
            "eval/perplexity": metrics["eval/perplexity"],
            "eval/nsp_accuracy": nsp_right / nsp_n,
            "eval/tokens": n_tok,
        }
    return metrics


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, names: list[str], prefix: str = "eval") -> dict:
    """Accuracy, macro and per-class precision / recall / F1, and the confusion matrix (scikit-learn)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    pred, true = logits.argmax(-1).cpu().numpy(), labels.cpu().numpy()
    ids = list(range(len(names)))
    p, r, f, support = precision_recall_fscore_support(true, pred, labels=ids, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(true, pred, labels=ids, average="macro", zero_division=0)
    out = {
        f"{prefix}/accuracy": float(accuracy_score(true, pred)),
        f"{prefix}/macro_precision": float(mp),
        f"{prefix}/macro_recall": float(mr),
        f"{prefix}/macro_f1": float(mf),
    }
    for i, name in enumerate(names):
        out.update(
            {
                f"{prefix}/{name}/precision": float(p[i]),
                f"{prefix}/{name}/recall": float(r[i]),
                f"{prefix}/{name}/f1": float(f[i]),
                f"{prefix}/{name}/support": int(support[i]),
            }
        )
    out[f"{prefix}/confusion_matrix"] = confusion_matrix(true, pred, labels=ids).tolist()
    return out


def ner_metrics(true_tags: list[list[str]], pred_tags: list[list[str]], prefix: str = "eval") -> dict:
    """seqeval entity-level report: per-type P / R / F1 / support and micro / macro / weighted averages."""
    from seqeval.metrics import accuracy_score, classification_report

    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    out = {
        f"{prefix}/f1": float(report["micro avg"]["f1-score"]),
        f"{prefix}/precision": float(report["micro avg"]["precision"]),
        f"{prefix}/recall": float(report["micro avg"]["recall"]),
        f"{prefix}/token_accuracy": float(accuracy_score(true_tags, pred_tags)),
    }
    for name, row in report.items():
        key = name.replace(" avg", "")
        for metric in ("precision", "recall", "f1-score", "support"):
            value = row[metric]
            out[f"{prefix}/{key}/{metric.replace('-score', '')}"] = int(value) if metric == "support" else float(value)
    return out


def format_ner_table(metrics: dict, prefix: str = "test") -> str:
    """The CoNLL-style table (like seqeval's report) from ner_metrics' output."""
    rows = sorted({k.split("/")[1] for k in metrics if k.startswith(prefix + "/") and k.count("/") == 2})
    types = [r for r in rows if r not in ("micro", "macro", "weighted")]
    lines = [f"{'':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for r in [*types, "", "micro", "macro", "weighted"]:
        if not r:
            lines.append("")
            continue
        g = lambda m, r=r: metrics[f"{prefix}/{r}/{m}"]  # noqa: E731
        lines.append(
            f"{r + (' avg' if r in ('micro', 'macro', 'weighted') else ''):>12} {g('precision'):9.4f} "
            f"{g('recall'):9.4f} {g('f1'):9.4f} {g('support'):8d}"
        )
    return "\n".join(lines)
