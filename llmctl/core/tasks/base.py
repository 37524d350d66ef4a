"""What every task shares: the task table, `Prepared`, the manifest's task record, and which split and labels
judge it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llmctl.core.data import columns_of
from llmctl.core.errors import LlmctlError
from llmctl.core.families import max_positions

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
    # macro F1, not accuracy: on imbalanced labels accuracy favours checkpoints that predict the majority class
    # (benchmarks/imbalanced_defaults.py: test macro F1 0.7396 vs 0.7359 and accuracy 0.8178 vs 0.8156, 3 seeds)
    "classification": ("eval/macro_f1", "max"),
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
    evaluate_fn: Callable  # (model, rows of a split, prefix) → metrics
    head: dict = field(default_factory=dict)  # from_pretrained kwargs giving a model a fresh head with this label map
    info: dict = field(default_factory=dict)  # what the task record keeps (labels, chat template, ...)
    data: object = None  # the core.data.Data it was prepared from (raw examples: SFT prompts, reports)
    eval_batches: int | None = None  # evaluations score this many batches, spread over the split (None: all of it)
    batch_size: int = 16

    @property
    def kind(self) -> str:
        return KIND[self.task]

    def evaluate(self, model, split: str = "validation", prefix: str = "eval", *, capped: bool = True) -> dict:
        """Metrics of `model` on `split`; `capped`: only the `eval_batches` the evaluation is limited to."""
        return self.evaluate_fn(model, self.scored(split, capped=capped), prefix)

    def scored(self, split: str, *, capped: bool = True):
        """The examples (packed sequences) of `split` an evaluation scores: all, or `eval_batches` batches of them
        spread evenly over the split."""
        if split not in self.splits:
            raise LlmctlError(f"the data has no {split} split (it has {', '.join(self.splits)})")
        return evaluated_rows(self.splits[split], self.eval_batches if capped else None, self.batch_size)

    def batches(self, split: str, batch_size: int, limit: int):
        """The first `limit` batches of a split, in its order (calibration: prune's Taylor scores, quantize's
        outlier scan)."""
        from itertools import islice

        from torch.utils.data import DataLoader

        return islice(DataLoader(self.splits[split], batch_size=batch_size, collate_fn=self.collate), limit)


def check_task(task: str) -> str:
    if task not in KIND:
        raise LlmctlError(f"task={task!r} is not one of {', '.join(KIND)}")
    return task


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


def task_of(kind: str, record: dict | None, *, data_cfg=None, task: str | None = None) -> str:
    """The task a later stage runs on a checkpoint: `task` when given, else the checkpoint's own (its task
    record, else its head's). A causal LM given other data (`data_cfg`) runs the task the data's own columns
    say: conversations (prompt / response, messages) are SFT, a text corpus is clm."""
    if task:
        chosen = str(task)
    elif data_cfg is not None and kind == "causal-lm":
        columns = columns_of(data_cfg) or set()
        chat = "messages" in columns or {"prompt", "response"} <= columns
        chosen = "sft" if chat and (data_cfg.get("text_column") or "text") not in columns else "clm"
    else:
        chosen = (record or {}).get("name") or KIND_TASK.get(kind)
    if chosen is None:
        raise LlmctlError(f"a bare {kind} checkpoint has no task head to judge or train it on; fine-tune it first")
    if KIND[check_task(chosen)] != kind:
        raise LlmctlError(
            f"task={chosen} makes a {KIND[chosen]} model, but the checkpoint is a {kind}; leave task unset or "
            f"choose a {kind} task"
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


def sequence_length(override, record: dict | None, data_cfg, config, task: str | None = None) -> int:
    """Tokens per example / packed sequence: `override`, else what the checkpoint was trained with for this
    task (a base LM's packing length says nothing about the conversations of another task), else the data
    config's; never more than the model's positions."""
    own = (record or {}).get("max_seq_len") if task is None or (record or {}).get("name") == task else None
    length = int(override or own or data_cfg.get("max_seq_len") or 128)
    positions = max_positions(config)
    return min(length, positions) if positions else length


def evaluated_rows(ds, eval_batches: int | None, batch_size: int):
    """The sequences an evaluation of `eval_batches` batches scores: the whole split when None (or when
    it is that small), else that many sequences spread evenly over it. Packed splits keep document order,
    so the first N sequences would be the first document or two (on a corpus of books, one book);
    an even spread covers every part of the split and is the same subset at every evaluation."""
    n = len(ds) if eval_batches is None else int(eval_batches) * int(batch_size)
    return ds if n >= len(ds) else ds.select([i * len(ds) // n for i in range(n)])


def choose_split(data, split: str | None, data_cfg) -> str:
    """`split`, else test where the data has one, else validation; a split the data lacks is one line."""
    if split is None:
        return "test" if "test" in data else "validation"
    if split not in data:
        raise LlmctlError(
            f"split={split}: the data ({data_cfg.get('train') or data_cfg.get('source')}) has no {split} split "
            f"(it has {', '.join(data.splits)}); choose one of those"
        )
    return split


def check_labels(model, prepared: Prepared, ref: str) -> None:
    """A classifier / tagger must be judged on its own label map: the data's labels must be the model's, in its
    order."""
    labels = prepared.info.get("labels")
    if not labels or prepared.task not in ("classification", "ner"):
        return
    own = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    if labels != own:
        unknown = sorted(set(labels) - set(own))
        why = (
            f"label {unknown[0]!r} is not one of its {len(own)} labels"
            if unknown
            else f"the labels come in another order ({', '.join(labels[:4])}… vs {', '.join(own[:4])}…)"
        )
        raise LlmctlError(
            f"ckpt={ref}: the data does not match the model's label map: {why}; "
            f"evaluate it on data with the labels it was trained on"
        )


def _loader(ds, collate, batch_size: int):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=int(batch_size), collate_fn=collate)


def _device(model):
    """Where a model runs: its first parameter's device, or its first buffer's (a model whose weights live outside
    torch, such as an ONNX export, keeps one to say so)."""
    return next(iter([*model.parameters(), *model.buffers()])).device
