"""The task layer: what a model is trained and judged on, for every stage.

Six tasks, each with the artifact kind it produces, the columns it reads and its default
objective (the metric `@best`, sweeps and best-checkpoint selection use):

| task             | kind         | data columns                  | objective            |
|------------------|--------------|-------------------------------|----------------------|
| `clm`            | causal-lm    | text (packed, no padding)     | eval/loss (min)      |
| `mlm`            | mlm          | text (packed, [CLS] … [SEP])  | eval/loss (min)      |
| `mlm+nsp`        | pretraining  | text (sentence pairs)         | eval/loss (min)      |
| `classification` | seq-cls      | text [+ text_pair], label     | eval/macro_f1 (max)  |
| `ner`            | token-cls    | tokens, ner_tags              | eval/f1 (max)        |
| `sft`            | causal-lm    | prompt + response, messages   | eval/loss (min)      |

`prepare(task, data, tokenizer, ...)` turns loaded data into a `Prepared`: tokenized splits, the
collator, the head a model needs (label maps), and `evaluate(model, split, prefix)`, which runs on
whatever device the model is on. `task_record(...)` is the manifest's `task` entry, one shape for
every stage, complete enough for a later stage (eval, prune's recovery, distill) to run the same
task and evaluation again with no extra flags: `record_data_config` and `load_data` give back the
same data, `prepare` the same preprocessing.
"""

from pathlib import Path

from llmctl.core.tasks.base import (
    DATA_TASK,
    KIND,
    KIND_TASK,
    OBJECTIVE,
    PACKED,
    Prepared,
    check_labels,
    check_task,
    choose_split,
    evaluated_rows,
    record_data_config,
    sequence_length,
    task_of,
    task_record,
)
from llmctl.core.tasks.labelled import head_kwargs, labels_of, prepare_classification, prepare_ner
from llmctl.core.tasks.packed import collate_packed_clm, prepare_packed
from llmctl.core.tasks.sft import prepare_sft, sample_generations

__all__ = [
    "DATA_TASK",
    "KIND",
    "KIND_TASK",
    "OBJECTIVE",
    "PACKED",
    "Prepared",
    "check_labels",
    "check_task",
    "choose_split",
    "collate_packed_clm",
    "evaluated_rows",
    "head_kwargs",
    "labels_of",
    "prepare",
    "record_data_config",
    "sample_generations",
    "sequence_length",
    "task_of",
    "task_record",
]


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
    """Tokenize `data` (a core.data.Data) for `task` with `tokenizer`. `eval_batches` caps every evaluation
    of the task (spread over the split) unless the caller asks for the whole split (`capped=False`)."""
    check_task(task)
    if task in PACKED:
        prepared = prepare_packed(
            task,
            data,
            tokenizer,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            seed=seed,
            cache_root=cache_root,
            mlm_probability=mlm_probability,
        )
    else:
        builder = {"classification": prepare_classification, "ner": prepare_ner, "sft": prepare_sft}[task]
        prepared = builder(data, tokenizer, max_seq_len=max_seq_len, batch_size=batch_size, system_prompt=system_prompt)
    prepared.data, prepared.eval_batches, prepared.batch_size = data, eval_batches, int(batch_size)
    return prepared
