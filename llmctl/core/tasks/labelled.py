"""Classification and NER: a fresh head with the data's label map, judged by scikit-learn / seqeval."""

from __future__ import annotations

from collections.abc import Callable

from llmctl.core.errors import LlmctlError
from llmctl.core.tasks.base import Prepared, _device, _loader


def labels_of(data, column: str, where: str) -> tuple[list[str], Callable[[list], list[int]]]:
    """(label names, raw values → label ids). Names come from a ClassLabel feature (whose values are
    already ids), else the sorted values seen in training; labels unseen in training are an error."""
    splits = data.splits
    feature = splits["train"].features[column]
    inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for NER
    if type(inner).__name__ == "ClassLabel":
        return list(inner.names), list
    flat = lambda values: [v for row in values for v in row] if column == "ner_tags" else list(values)  # noqa: E731
    seen = sorted({str(v) for v in flat(splits["train"][column][:])})
    if column == "ner_tags" and "O" in seen:
        seen = ["O", *[s for s in seen if s != "O"]]
    for split in splits:
        unseen = sorted({str(v) for v in flat(splits[split][column][:])} - set(seen))
        if unseen:
            raise LlmctlError(
                f"{where}: label {unseen[0]!r} in the {split} split never appears in training; "
                f"add training examples for it or drop it ({len(unseen)} unseen)"
            )
    index = {n: i for i, n in enumerate(seen)}
    return seen, lambda values: [index[str(v)] for v in values]


def head_kwargs(names: list[str]) -> dict:
    """from_pretrained kwargs that give the model a head for this label map (recorded in its config.json)."""
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def _predict(model, ds, collate, batch_size) -> tuple[float, list, list]:
    """Mean loss over the examples of `ds`, and each batch's logits and labels (float, on the CPU)."""
    device = _device(model)
    loss_sum, n, logits, labels = 0.0, 0, [], []
    for batch in _loader(ds, collate, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        loss_sum, n = loss_sum + float(out.loss) * len(batch["labels"]), n + len(batch["labels"])
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    return loss_sum / max(n, 1), logits, labels


def _encoded(data, encode) -> dict:
    """Every split of `data` through `encode` (batched), as torch tensors."""
    return {
        k: v.map(encode, batched=True, remove_columns=v.column_names).with_format("torch")
        for k, v in data.splits.items()
    }


def prepare_classification(data, tokenizer, *, max_seq_len, batch_size, system_prompt) -> Prepared:
    import torch
    from transformers import DataCollatorWithPadding

    from llmctl.core.metrics import classification_metrics

    names, to_ids = labels_of(data, "label", "data.label_column")

    def encode(batch):
        enc = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_seq_len)
        enc["labels"] = to_ids(batch["label"])
        return enc

    splits = _encoded(data, encode)
    collate = DataCollatorWithPadding(tokenizer)

    def evaluate(model, rows, prefix):
        loss, logits, labels = _predict(model, rows, collate, batch_size)
        return {f"{prefix}/loss": loss, **classification_metrics(torch.cat(logits), torch.cat(labels), names, prefix)}

    return Prepared("classification", splits, collate, evaluate, head_kwargs(names), {"labels": names})


def prepare_ner(data, tokenizer, *, max_seq_len, batch_size, system_prompt) -> Prepared:
    from transformers import DataCollatorForTokenClassification

    from llmctl.core.metrics import ner_metrics

    if not getattr(tokenizer, "is_fast", False):
        raise LlmctlError("task=ner needs a fast tokenizer (tokenizer.json) to align sub-words with words")
    names, to_ids = labels_of(data, "ner_tags", "data (ner_tags)")

    def encode(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_seq_len)
        labels = []
        for i, tags in enumerate(batch["ner_tags"]):
            ids = to_ids(tags)
            previous, row = None, []
            for word in enc.word_ids(i):
                row.append(-100 if word is None or word == previous else ids[word])  # first sub-word only
                previous = word
            labels.append(row)
        enc["labels"] = labels
        return enc

    splits = _encoded(data, encode)
    collate = DataCollatorForTokenClassification(tokenizer)

    def evaluate(model, rows, prefix):
        loss, logits, labels = _predict(model, rows, collate, batch_size)
        true, pred = [], []
        for batch_logits, batch_labels in zip(logits, labels):  # batches are padded to different lengths
            for p_row, l_row in zip(batch_logits.argmax(-1).tolist(), batch_labels.tolist()):
                keep = [(p, t) for p, t in zip(p_row, l_row) if t != -100]
                true.append([names[t] for _, t in keep])
                pred.append([names[p] for p, _ in keep])
        return {f"{prefix}/loss": loss, **ner_metrics(true, pred, prefix)}

    return Prepared("ner", splits, collate, evaluate, head_kwargs(names), {"labels": names})


def class_weights(prepared: Prepared, how: str):
    """Per-label loss weights from the training split's label counts: `balanced` (n / (labels × count), sklearn's
    class_weight="balanced": every label weighs the same in total), `sqrt` (its square root, normalised to mean 1:
    halfway), `none` (None: the plain mean)."""
    import torch

    if how == "none":
        return None
    names = prepared.info["labels"]
    labels = torch.cat([torch.as_tensor(row).reshape(-1) for row in prepared.splits["train"]["labels"]])
    counts = torch.bincount(labels[labels != -100], minlength=len(names)).float().clamp(min=1)
    weights = counts.sum() / (len(names) * counts)
    if how == "sqrt":
        weights = weights.sqrt() / weights.sqrt().mean()
    return weights


def weighted_loss(weights):
    """`loss_fn(model, batch)` for the training loop: cross-entropy of a classifier / tagger with per-label weights
    (padding and non-first sub-words, labelled -100, left out as in the model's own loss)."""
    import torch.nn.functional as F

    def loss(model, batch):
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            weight=weights.to(logits.device),
            ignore_index=-100,
        )

    return loss
