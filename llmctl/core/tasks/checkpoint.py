"""A checkpoint made ready on its own task: what distill, prune and quantize do before they reshape or retrain it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl.core.data import load_data
from llmctl.core.errors import LlmctlError
from llmctl.core.loading import Loaded, load_checkpoint, require_float_weights, resolve_source, source_kind
from llmctl.core.manifest import task_record
from llmctl.core.run import resolve_objective
from llmctl.core.store import Resolved, Store
from llmctl.core.tasks import (
    DATA_TASK,
    OBJECTIVE,
    Prepared,
    check_labels,
    choose_split,
    prepare,
    record_data_config,
    sequence_length,
    task_of,
)


@dataclass
class OnTask:
    """A checkpoint a stage works on (distill's teacher, prune's and quantize's init_from) with its own task
    ready: the data its manifest records (or the config's `data`), tokenized at its sequence length."""

    source: Resolved
    loaded: Loaded
    kind: str
    task: str
    record: dict  # its task record ({} for a plain HF folder)
    data_cfg: object
    data: object  # core.data.Data
    length: int  # tokens per example / packed sequence
    prepared: Prepared
    split: str  # the split it is judged on: test where the data has one, else validation


def load_on_task(run, cfg, source: Resolved, *, what: str, stage: str, task: str | None = None) -> OnTask:
    """Load `source` (refused when quantized or an export) onto the run's device with its task prepared: what
    distill, prune, quantize and export do before they reshape, retrain or convert it. `what` is the config key that
    named it. Batches are `train.batch_size` (a stage that trains) or `batch_size`; `train.eval_batches` caps the
    validation of a stage that trains."""
    require_float_weights(source, what=what, stage=stage)
    train = cfg.get("train") or {}
    kind = source_kind(source)
    record = task_record(source.manifest) or {}
    task = task_of(kind, record, data_cfg=cfg.get("data") or None, task=task)
    data_cfg = cfg.get("data") or record_data_config(record, f"{what}={cfg[what]}")
    data = load_data(data_cfg, task=DATA_TASK[task], cache_dir=Path(cfg.output_root) / ".cache" / "datasets")
    loaded = load_checkpoint(run.store, source, kind=kind, what=what)
    loaded.model.to(run.rt.device)
    length = sequence_length(cfg.max_seq_len, record, data_cfg, loaded.model.config, task)
    prepared = prepare(
        task,
        data,
        loaded.tokenizer,
        max_seq_len=length,
        batch_size=int(train.get("batch_size") or cfg.batch_size),
        eval_batches=train.get("eval_batches"),  # a recovery / QAT run's validation
        seed=int(cfg.seed),
        cache_root=Path(cfg.output_root) / ".cache",
        system_prompt=record.get("system_prompt"),
    )
    check_labels(loaded.model, prepared, source.ref)
    return OnTask(
        source=source,
        loaded=loaded,
        kind=kind,
        task=task,
        record=record,
        data_cfg=data_cfg,
        data=data,
        length=length,
        prepared=prepared,
        split=choose_split(data, None, data_cfg),
    )


def checkpoint_objective(cfg, key: str, *, task: str | None = None) -> tuple[str, str]:
    """(metric, mode) a stage working on the checkpoint `cfg[key]` optimises: its task's objective (other data
    given: the task that data makes), or objective_metric / objective_mode. Read before anything is loaded."""
    if not cfg.get(key):
        raise LlmctlError(f"{key} is required here; set {key}=<reference or HF folder>")
    source = resolve_source(Store(cfg.output_root), cfg[key], what=key)
    chosen = task_of(source_kind(source), task_record(source.manifest), data_cfg=cfg.get("data") or None, task=task)
    return resolve_objective(cfg, OBJECTIVE[chosen])
