"""The task layer: what a model is trained and judged on, for every stage.

Six tasks, each with the artifact kind it produces, the columns it reads and its default
objective (the metric `@best`, sweeps and best-checkpoint selection use):

| task             | kind         | data columns                  | objective            |
|------------------|--------------|-------------------------------|----------------------|
| `clm`            | causal-lm    | text (packed, no padding)     | eval/loss (min)      |
| `mlm`            | mlm          | text (packed, [CLS] … [SEP])  | eval/loss (min)      |
| `mlm+nsp`        | pretraining  | text (sentence pairs)         | eval/loss (min)      |
| `classification` | seq-cls      | text [+ text_pair], label     | eval/accuracy (max)  |
| `ner`            | token-cls    | tokens, ner_tags              | eval/f1 (max)        |
| `sft`            | causal-lm    | prompt + response, messages   | eval/loss (min)      |

`prepare(task, data, tokenizer, ...)` turns loaded data into a `Prepared`: tokenized splits, the
collator, the head a model needs (label maps), and `evaluate(model, split, prefix)`, which runs on
whatever device the model is on. `task_record(...)` is the manifest's `task` entry, one shape for
every stage, complete enough for a later stage (eval, prune's recovery, distill) to run the same
task and evaluation again with no extra flags: `record_data_config` and `load_data` give back the
same data, `prepare` the same preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.core.errors import LlmctlError

KIND = {
    "clm": "causal-lm",
    "mlm": "mlm",
    "mlm+nsp": "pretraining",
    "classification": "seq-cls",
    "ner": "token-cls",
    "sft": "causal-lm",
}
OBJECTIVE = {
    "clm": ("eval/loss", "min"),
    "mlm": ("eval/loss", "min"),
    "mlm+nsp": ("eval/loss", "min"),
    "classification": ("eval/accuracy", "max"),
    "ner": ("eval/f1", "max"),
    "sft": ("eval/loss", "min"),
}
# A checkpoint without a task record (a plain HF folder) is judged and trained on the task its head does.
KIND_TASK = {
    "causal-lm": "clm",
    "mlm": "mlm",
    "pretraining": "mlm+nsp",
    "seq-cls": "classification",
    "token-cls": "ner",
}
DATA_TASK = {
    "clm": "text",
    "mlm": "text",
    "mlm+nsp": "text",
    "classification": "classification",
    "ner": "ner",
    "sft": "sft",
}
PACKED = ("clm", "mlm", "mlm+nsp")


@dataclass
class Prepared:
    """A task's data made ready for a model: tokenized splits, collator, head kwargs, evaluation."""

    task: str
    splits: dict  # split name → tokenized dataset (torch format)
    collate: Callable
    evaluate_fn: Callable  # (model, split, prefix) → metrics
    head: dict = field(default_factory=dict)  # from_pretrained kwargs giving a model a fresh head with this label map
    info: dict = field(default_factory=dict)  # what the task record keeps (labels, chat template, ...)
    data: object = None  # the core.data.Data it was prepared from (raw examples: SFT prompts, reports)

    @property
    def kind(self) -> str:
        return KIND[self.task]

    def evaluate(self, model, split: str = "validation", prefix: str = "eval") -> dict:
        if split not in self.splits:
            raise LlmctlError(f"the data has no {split} split (it has {', '.join(self.splits)})")
        return self.evaluate_fn(model, split, prefix)

    def batches(self, split: str, batch_size: int, limit: int):
        """The first `limit` batches of a split, in its order (calibration: prune's Taylor scores, quantize's outlier scan)."""
        from itertools import islice

        from torch.utils.data import DataLoader

        return islice(DataLoader(self.splits[split], batch_size=batch_size, collate_fn=self.collate), limit)


def check_task(task: str) -> str:
    if task not in KIND:
        raise LlmctlError(f"task={task!r} is not one of {', '.join(KIND)}")
    return task


def prepare(
    task: str,
    data,
    tokenizer,
    *,
    max_seq_len: int,
    batch_size: int,
    seed: int = 0,
    cache_root: Path | None = None,
    eval_batches: int | None = None,
    mlm_probability: float = 0.15,
    system_prompt: str | None = None,
) -> Prepared:
    """Tokenize `data` (a core.data.Data) for `task` with `tokenizer`."""
    check_task(task)
    if task in PACKED:
        prepared = _prepare_packed(
            task,
            data,
            tokenizer,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            seed=seed,
            cache_root=cache_root,
            eval_batches=eval_batches,
            mlm_probability=mlm_probability,
        )
    else:
        builder = {"classification": _prepare_classification, "ner": _prepare_ner, "sft": _prepare_sft}[task]
        prepared = builder(data, tokenizer, max_seq_len=max_seq_len, batch_size=batch_size, system_prompt=system_prompt)
    prepared.data = data
    return prepared


def task_record(prepared: Prepared, data, *, max_seq_len: int, objective: tuple[str, str], **extra) -> dict:
    """The manifest's `task` entry: one shape for every stage and task."""
    cfg = data.config
    columns = {
        "text": {"text": cfg.get("text_column") or "text"},
        "classification": {
            "text": cfg.get("text_column") or "text",
            "label": cfg.get("label_column") or "label",
            "text_pair": cfg.get("text_pair_column"),
        },
        "ner": {"tokens": "tokens", "ner_tags": "ner_tags"},
        "sft": {"prompt": "prompt", "response": "response", "messages": "messages"},
    }[DATA_TASK[prepared.task]]
    return {
        "name": prepared.task,
        "kind": prepared.kind,
        "objective": {"metric": objective[0], "mode": objective[1]},
        "labels": prepared.info.get("labels"),
        "columns": columns,
        "max_seq_len": int(max_seq_len),
        "data": cfg,
        "split_seed": cfg.get("split_seed"),
        "fingerprint": data.fingerprint,
        **{k: v for k, v in prepared.info.items() if k != "labels"},
        **extra,
    }


def read_task_record(manifest: dict | None) -> dict | None:
    """A manifest's task entry in today's shape; manifests written before it had one shape are converted."""
    if not manifest or not manifest.get("task"):
        return None
    task = dict(manifest["task"])
    if "name" in task:
        return task
    name = task.get("task") or task.get("objective")  # finetune wrote `task`, pretrain `objective`
    data = manifest.get("data") or {}
    objective = manifest.get("objective") or {}
    return {
        "name": name,
        "kind": KIND.get(name),
        "objective": {"metric": objective.get("metric"), "mode": objective.get("mode")},
        "labels": task.get("labels"),
        "columns": None,
        "max_seq_len": task.get("max_seq_len") or (data.get("config") or {}).get("max_seq_len"),
        "data": data.get("config"),
        "split_seed": (data.get("config") or {}).get("split_seed"),
        "fingerprint": data.get("fingerprint"),
        **{k: v for k, v in task.items() if k not in ("task", "objective", "labels", "max_seq_len")},
    }


def task_of(kind: str, record: dict | None, *, other_data: bool, task: str | None = None) -> str:
    """The task a later stage runs on a checkpoint: `task` when given, else the checkpoint's own (its
    task record, else its head's); a causal LM given other data (a text corpus) runs clm."""
    if task:
        chosen = str(task)
    elif other_data and kind == "causal-lm":
        chosen = "clm"
    else:
        chosen = (record or {}).get("name") or KIND_TASK.get(kind)
    if chosen is None:
        raise LlmctlError(f"a bare {kind} checkpoint has no task head to judge or train it on; fine-tune it first")
    if KIND[check_task(chosen)] != kind:
        raise LlmctlError(
            f"task={chosen} makes a {KIND[chosen]} model, but the checkpoint is a {kind}; leave task unset or choose a {kind} task"
        )
    return chosen


def record_data_config(record: dict | None, where: str = "this checkpoint"):
    """The data config a task record names, ready for `load_data` (paths are absolute, so any folder works)."""
    from omegaconf import OmegaConf

    if not record or not record.get("data"):
        raise LlmctlError(
            f"{where} records no data of its own (a plain model folder); give data=<preset> "
            f"or data=files data.train=<file>"
        )
    return OmegaConf.create(record["data"])


def sequence_length(override, record: dict | None, data_cfg, config) -> int:
    """Tokens per example / packed sequence: `override`, else what the checkpoint was trained with, else
    the data config's; never more than the model's positions."""
    from llmctl.core.models import max_positions

    length = int(override or (record or {}).get("max_seq_len") or data_cfg.get("max_seq_len") or 128)
    positions = max_positions(config)
    return min(length, positions) if positions else length


# ---------------------------------------------------------------------------------------------
# Packed language modelling: clm, mlm, mlm+nsp
# ---------------------------------------------------------------------------------------------
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


def _prepare_packed(
    task, data, tokenizer, *, max_seq_len, batch_size, seed, cache_root, eval_batches, mlm_probability
) -> Prepared:
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
    ).with_format("torch")
    collate = (
        collate_packed_clm
        if task == "clm"
        else DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=float(mlm_probability))
    )
    splits = {k: packed[k] for k in packed}

    def evaluate(model, split, prefix):
        rows = evaluated_rows(splits[split], eval_batches, batch_size)
        metrics = lm_metrics(
            model, _loader(rows, collate, batch_size), _device(model), causal=task == "clm", tokenizer=tokenizer
        )
        return {k.replace("eval/", f"{prefix}/", 1): v for k, v in metrics.items()}

    return Prepared(task, splits, collate, evaluate)


def evaluated_rows(ds, eval_batches: int | None, batch_size: int):
    """The sequences an evaluation of `eval_batches` batches scores: the whole split when None (or when
    it is that small), else that many sequences spread evenly over it. Packed splits keep document order,
    so the first N sequences would be the first document or two (on a corpus of books, one book);
    an even spread covers every part of the split and is the same subset at every evaluation."""
    n = len(ds) if eval_batches is None else int(eval_batches) * int(batch_size)
    return ds if n >= len(ds) else ds.select([i * len(ds) // n for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Classification and NER: a fresh head with the data's label map
# ---------------------------------------------------------------------------------------------
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


def _prepare_classification(data, tokenizer, *, max_seq_len, batch_size, system_prompt) -> Prepared:
    import torch
    from transformers import DataCollatorWithPadding

    from llmctl.core.metrics import classification_metrics

    names, to_ids = labels_of(data, "label", "data.label_column")

    def encode(batch):
        enc = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_seq_len)
        enc["labels"] = to_ids(batch["label"])
        return enc

    splits = {
        k: v.map(encode, batched=True, remove_columns=v.column_names).with_format("torch")
        for k, v in data.splits.items()
    }
    collate = DataCollatorWithPadding(tokenizer)

    def evaluate(model, split, prefix):
        loss, logits, labels = _predict(model, splits[split], collate, batch_size)
        return {f"{prefix}/loss": loss, **classification_metrics(torch.cat(logits), torch.cat(labels), names, prefix)}

    return Prepared("classification", splits, collate, evaluate, head_kwargs(names), {"labels": names})


def _prepare_ner(data, tokenizer, *, max_seq_len, batch_size, system_prompt) -> Prepared:
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

    splits = {
        k: v.map(encode, batched=True, remove_columns=v.column_names).with_format("torch")
        for k, v in data.splits.items()
    }
    collate = DataCollatorForTokenClassification(tokenizer)

    def evaluate(model, split, prefix):
        loss, logits, labels = _predict(model, splits[split], collate, batch_size)
        true, pred = [], []
        for batch_logits, batch_labels in zip(logits, labels):  # batches are padded to different lengths
            for p_row, l_row in zip(batch_logits.argmax(-1).tolist(), batch_labels.tolist()):
                keep = [(p, t) for p, t in zip(p_row, l_row) if t != -100]
                true.append([names[t] for _, t in keep])
                pred.append([names[p] for p, _ in keep])
        return {f"{prefix}/loss": loss, **ner_metrics(true, pred, prefix)}

    return Prepared("ner", splits, collate, evaluate, head_kwargs(names), {"labels": names})


# ---------------------------------------------------------------------------------------------
# SFT: chat-formatted conversations, loss on the response only
# ---------------------------------------------------------------------------------------------
def conversation(example, system_prompt: str | None) -> list[dict]:
    messages = example.get("messages") or [
        {"role": "user", "content": example["prompt"]},
        {"role": "assistant", "content": example["response"]},
    ]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if messages[-1]["role"] != "assistant":
        raise LlmctlError("data: every SFT conversation must end with an assistant message (the response to learn)")
    return messages


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to where the assistant's answer starts (the chat template, or a
    plain `### role:` format for tokenizers without one)."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"### {m['role']}:\n{m['content']}\n\n" for m in messages) + "### assistant:\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """What ends an assistant turn: ChatML's <|im_end|> where the vocabulary has it, else end-of-text."""
    if "<|im_end|>" in tokenizer.get_vocab():
        return [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if tokenizer.eos_token_id is None:
        raise LlmctlError("task=sft needs a tokenizer with an end-of-text token (eos_token) to end each answer")
    return [tokenizer.eos_token_id]


def _prepare_sft(data, tokenizer, *, max_seq_len, batch_size, system_prompt) -> Prepared:
    from transformers import DataCollatorForSeq2Seq

    from llmctl.core.metrics import lm_metrics

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by attention and by label -100, never by id
    end = end_of_turn_ids(tokenizer)

    def encode(example):
        messages = conversation(example, system_prompt)
        prompt = prompt_ids(tokenizer, messages[:-1])
        answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        ids = (prompt + answer + end)[:max_seq_len]
        labels = ([-100] * len(prompt) + answer + end)[:max_seq_len]  # loss on the response tokens only
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    splits = {k: v.map(encode, remove_columns=v.column_names).with_format("torch") for k, v in data.splits.items()}
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def evaluate(model, split, prefix):
        metrics = lm_metrics(
            model, _loader(splits[split], collate, batch_size), _device(model), causal=True, tokenizer=tokenizer
        )
        return {k.replace("eval/", f"{prefix}/", 1): v for k, v in metrics.items()}

    return Prepared(
        "sft",
        splits,
        collate,
        evaluate,
        {},
        {"chat_template": bool(tokenizer.chat_template), "system_prompt": system_prompt},
    )


def sample_generations(
    model, tokenizer, examples, *, system_prompt: str | None, num: int, max_new_tokens: int
) -> list[dict]:
    """Greedy answers to the first `num` prompts of `examples`, on whatever device the model is on."""
    import torch

    out = []
    device = _device(model)
    was_training = model.training
    model.eval()
    for example in examples.select(range(min(int(num), len(examples)))):
        messages = conversation(example, system_prompt)
        ids = torch.tensor([prompt_ids(tokenizer, messages[:-1])], device=device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=end_of_turn_ids(tokenizer),
            )
        out.append(
            {
                "prompt": messages[-2]["content"],
                "reference": messages[-1]["content"],
                "output": tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip(),
            }
        )
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
def _loader(ds, collate, batch_size: int):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=int(batch_size), collate_fn=collate)


def _device(model):
    return next(model.parameters()).device
