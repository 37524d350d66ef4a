"""Packed language modelling (clm, mlm, mlm+nsp): documents tokenized and packed into fixed-length sequences."""

from __future__ import annotations

from pathlib import Path

from llmctl.core.errors import LlmctlError
from llmctl.core.tasks.base import Prepared, _device, _loader


def collate_packed_clm(rows: list[dict]) -> dict:
    """Causal-LM batches of packed sequences: labels are the input ids, every token included.

    Packed sequences hold no padding, so nothing is masked out of the loss. (HF's
    DataCollatorForLanguageModeling(mlm=False) sets the label of every pad id to -100; with a
    tokenizer whose pad is its end-of-text token, that drops every document separator from the
    loss and perplexity, and the model never learns to stop.)"""
    import torch

    ids = torch.stack(
        [r["input_ids"] if torch.is_tensor(r["input_ids"]) else torch.tensor(r["input_ids"]) for r in rows]
    )
    return {"input_ids": ids, "labels": ids.clone()}


def prepare_packed(task, data, tokenizer, *, max_seq_len, batch_size, seed, cache_root, mlm_probability) -> Prepared:
    from transformers import DataCollatorForLanguageModeling

    from llmctl.core.data import pack_for_lm
    from llmctl.core.metrics import lm_metrics

    if task == "clm" and tokenizer.eos_token_id is None:
        raise LlmctlError("task=clm needs a tokenizer with an end-of-text token (eos_token) to separate documents")
    if task != "clm" and (tokenizer.mask_token_id is None or tokenizer.cls_token_id is None):
        raise LlmctlError(f"task={task} needs a BERT-style tokenizer with [MASK], [CLS] and [SEP] tokens")
    packed = pack_for_lm(
        data.splits,
        tokenizer,
        objective=task,
        max_seq_len=max_seq_len,
        seed=seed,
        cache_root=Path(cache_root or ".cache"),
        data_fp=data.fingerprint,
    )
    packed = {k: v.with_format("torch") for k, v in packed.items()}  # (a streamed train split stays a stream)
    collate = (
        collate_packed_clm
        if task == "clm"
        else DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=float(mlm_probability))
    )
    splits = {k: packed[k] for k in packed}

    def evaluate(model, rows, prefix):
        metrics = lm_metrics(
            model, _loader(rows, collate, batch_size), _device(model), causal=task == "clm", tokenizer=tokenizer
        )
        return {k.replace("eval/", f"{prefix}/", 1): v for k, v in metrics.items()}

    return Prepared(task, splits, collate, evaluate)
