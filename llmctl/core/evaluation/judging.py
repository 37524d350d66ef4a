"""Judging a checkpoint: its task metric (and, through `cost`, what it costs), the same way for every artifact.

    judged = evaluate(store, "finetune/bbc", rt=rt)          # the checkpoint's own task, data and split
    judged.record["metrics"]["accuracy"], judged.record["cost"]["latency_ms_p50"]
    judged.model, judged.tokenizer, judged.rows              # still loaded, for the caller (lm-eval harness)

The task is the checkpoint's own, read from its manifest's task record (`core.tasks`), so the
parent's data, split seed, preprocessing and label map come back with no flags; `data=` evaluates
the same task on other data. Plain HF folders without a manifest get the task of their head.
`llmctl eval` is a thin layer over this module; distill, prune and quantize judge their before and
after with `BeforeAfter`, so every number llmctl prints about a checkpoint comes from one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.cost import cost_settings, measure_cost, threads
from llmctl.core.evaluation.records import delta
from llmctl.core.evaluation.report import comparison_table
from llmctl.core.manifest import first_parent
from llmctl.core.store import Resolved
from llmctl.core.tokenizer import tokenizer_hash

# The metric a task is judged by first (the comparison table's and the charts' metric).
PRIMARY = {
    "classification": ("accuracy", "max"),
    "ner": ("f1", "max"),
    "clm": ("perplexity", "min"),
    "mlm": ("perplexity", "min"),
    "mlm+nsp": ("perplexity", "min"),
    "sft": ("perplexity", "min"),
}


OWN = "\x00own"  # system_prompt=OWN: the checkpoint's own (its task record's), not a given one


@dataclass
class Judged:
    """One checkpoint judged: its eval record (plain data, saved as it is) and what is still loaded."""

    record: dict
    model: object
    tokenizer: object
    rows: object  # the judged split's examples (a datasets.Dataset), None when no data was judged


def plan(source: Resolved, *, data_cfg=None, need_data: bool = True, task: str | None = None) -> dict:
    """What evaluating `source` means, before anything is loaded: its task and the data config.
    Raises one clear line when the checkpoint has nothing to be judged on. `need_data=False`
    (harness-only runs): a checkpoint that records no data gets cost figures and no task metrics.
    `task` judges it on another task of its kind (a base LM on its SFT child's task, for deltas)."""
    from llmctl.core.loading import source_kind
    from llmctl.core.manifest import task_record
    from llmctl.core.tasks import KIND_TASK, record_data_config, task_of

    kind = source_kind(source)
    record = task_record(source.manifest)
    if not task and not (record or {}).get("name") and kind not in KIND_TASK:
        raise LlmctlError(
            f"ckpt={source.ref} is a bare {kind} with no task head; evaluate a checkpoint that has one "
            f"(fine-tune it first: llmctl finetune init_from={source.ref})"
        )
    task = task_of(kind, record, data_cfg=data_cfg, task=task)
    if data_cfg is None:
        if (record is None or not record.get("data")) and not need_data:
            return {"kind": kind, "task": task, "record": record, "data_cfg": None}
        data_cfg = record_data_config(record, f"ckpt={source.ref}")
    return {"kind": kind, "task": task, "record": record, "data_cfg": data_cfg}


def evaluate(
    store,
    spec,
    *,
    rt,
    data_cfg=None,
    split: str | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
    max_seq_len: int | None = None,
    cost: dict | None = None,
    samples: int = 0,
    max_new_tokens: int = 40,
    seed: int = 0,
    cache_root: Path | None = None,
    console=None,
    need_data: bool = True,
    task: str | None = None,
    system_prompt: str | None = OWN,
) -> Judged:
    """Judge one checkpoint on its task (see the module docstring). `max_seq_len` and `system_prompt` default to
    the checkpoint's own; a parent is judged with its child's (`like` settings), so the two compare."""
    from llmctl.core.data import load_data
    from llmctl.core.loading import load_checkpoint, resolve_source
    from llmctl.core.tasks import DATA_TASK, check_labels, choose_split, prepare, sample_generations, sequence_length

    source = resolve_source(store, spec, what="ckpt")
    p = plan(source, data_cfg=data_cfg, need_data=need_data, task=task)
    task, record = p["task"], p["record"] or {}
    system_prompt = record.get("system_prompt") if system_prompt == OWN else system_prompt
    data = None
    if p["data_cfg"] is not None:  # (None: harness only, cost figures and no task metrics)
        cache_root = Path(cache_root or Path(store.root) / ".cache")
        data = load_data(p["data_cfg"], task=DATA_TASK[task], cache_dir=cache_root / "datasets")
        split = choose_split(data, split, p["data_cfg"])
    loaded = load_checkpoint(store, source, what="ckpt")
    model, tok = loaded.on(rt.device).eval(), loaded.tokenizer
    out = {
        "ref": source.ref,
        "path": str(source.path),
        "kind": p["kind"],
        "task": task,
        "split": None,
        "data": None,
        "metrics": {},
        "primary": primary(task, {}),
        "parent": first_parent(source.manifest),
        "weights_sha256": loaded.sha256,
        "tokenizer_sha256": tokenizer_hash(tok),
        "runtime": {**rt.record(), "threads": threads()},
        "cost_settings": cost,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if data is not None:
        length = sequence_length(max_seq_len, record, p["data_cfg"], model.config, task)
        prepared = prepare(
            task,
            data,
            tok,
            max_seq_len=length,
            batch_size=batch_size,
            seed=seed,
            cache_root=cache_root,
            eval_batches=max_batches,
            system_prompt=system_prompt,
        )
        check_labels(model, prepared, source.ref)
        if console is not None:
            console.print(
                f"[bold]{source.ref}[/] · {task} on {split} ({len(data[split])} examples, "
                f"data {data.fingerprint[:12]}) · {length} tokens"
            )
        started = time.perf_counter()
        out.update(
            judge(model, prepared, split, rt=rt, seed=seed),
            labels=prepared.info.get("labels"),
            max_seq_len=length,
            max_batches=max_batches,
            system_prompt=system_prompt,
            data={"fingerprint": data.fingerprint, "examples": len(data[split]), "config": data.config},
            eval_seconds=round(time.perf_counter() - started, 3),
        )
        if task == "sft" and samples:
            out["samples"] = sample_generations(
                model,
                tok,
                data[split],
                system_prompt=system_prompt,
                num=samples,
                max_new_tokens=max_new_tokens,
            )
    elif console is not None:
        console.print(f"[bold]{source.ref}[/] · records no data: cost figures and harness tasks only")
    if cost is not None:
        out["cost"] = measure_cost(model, source.path, rt, **cost)
    return Judged(record=out, model=model, tokenizer=tok, rows=data[split] if data is not None else None)


def judge(
    model,
    prepared,
    split: str,
    *,
    rt,
    seed: int = 0,
    folder: Path | None = None,
    cost: dict | None = None,
    capped: bool = True,
) -> dict:
    """A model's metrics on `split` of a prepared task (core.tasks), and with `cost` (and the folder its
    weights are saved in) its cost figures: what `evaluate` records, for a model already in memory
    (distill and prune judge before / after with it). `capped=False`: the whole split, whatever the task's cap."""
    from llmctl.core.train import evaluate_model

    raw = evaluate_model(model, lambda m: prepared.evaluate(m, split, "x", capped=capped), rt, seed)
    metrics = {k.split("/", 1)[1]: v for k, v in raw.items()}
    out = {
        "task": prepared.task,
        "split": split,
        "scored": len(prepared.scored(split, capped=capped)),  # examples (packed sequences) scored
        "metrics": metrics,
        "primary": primary(prepared.task, metrics),
    }
    if cost is not None:
        out["cost"] = measure_cost(model, folder, rt, **cost)
    return out


def task_metrics(model, prepared, rt, seed: int) -> dict:
    """Validation (and test) metrics of a model not trained further, in the shape the fine-tuning loop returns."""
    from llmctl.core.train import evaluate_model

    metrics = evaluate_model(model, lambda m: prepared.evaluate(m, "validation", "eval"), rt, seed)
    if "test" in prepared.splits:
        test = evaluate_model(model, lambda m: prepared.evaluate(m, "test", "test", capped=False), rt, seed)
        metrics.update(test)
    return metrics


def primary(task: str, metrics: dict) -> dict:
    name, mode = PRIMARY[task]
    return {"metric": name, "mode": mode, "value": metrics.get(name)}


class BeforeAfter:
    """A stage's before / after, judged by eval's code: `before` (the input checkpoint) now, `after` on the
    saved folder while publishing; both go into the manifest's `compare` under `names` and print as one
    table (distill: teacher / student; prune and quantize: before / after).

        judged = BeforeAfter.of(on, model, run, cfg)      # on: the checkpoint on its task (core.tasks.checkpoint)
        ...                                              # cut, train or quantize the model
        published = judged.publish(run, model, tok, title="llmctl prune · ...", kind=..., metrics=..., ...)
    """

    def __init__(
        self,
        model,
        prepared,
        split: str,
        *,
        ref: str,
        folder: Path,
        rt,
        seed: int,
        cost: dict | None,
        names: tuple[str, str] = ("before", "after"),
    ):
        self.prepared, self.split, self.rt, self.seed, self.cost, self.names = prepared, split, rt, seed, cost, names
        # rank 0 alone judges (under torchrun the other ranks would time their copies on the same cores meanwhile)
        self.before = {"ref": ref, **self._judge(model, folder)} if rt.is_main else None
        self.after: dict | None = None

    @classmethod
    def of(cls, on, model, run, cfg, names: tuple[str, str] = ("before", "after")) -> BeforeAfter:
        """`model` judged as the `before` of a checkpoint on its task (`on`: core.tasks.checkpoint.OnTask),
        on the run's device with the config's `cost` settings."""
        return cls(
            model,
            on.prepared,
            on.split,
            ref=on.source.ref,
            folder=on.source.path,
            rt=run.rt,
            seed=int(cfg.seed),
            cost=cost_settings(cfg.get("cost")),
            names=names,
        )

    def _judge(self, model, folder: Path) -> dict:
        """The whole split (a recovery run's train.eval_batches caps its validation, not this comparison)."""
        return judge(
            model, self.prepared, self.split, rt=self.rt, seed=self.seed, folder=folder, cost=self.cost, capped=False
        )

    def _measure(self, model, ref: str):
        def measure(folder: Path) -> dict:
            self.after = {"ref": ref, **self._judge(model, folder)}
            self.after["delta"] = delta(self.after, self.before)
            return {"compare": {self.names[0]: self.before, self.names[1]: self.after}}

        return measure

    def publish(self, run, model, tokenizer, *, title: str, **publish_args):
        """Publish `model` as the run's next version (core.run.publish), judging it on the saved folder
        first; print the before / after table and where it was written. None on non-zero ranks."""
        from llmctl.core.run import publish

        published = publish(
            run, model, tokenizer, after_save=self._measure(model, f"{run.stage}/{run.name}"), **publish_args
        )
        if published is None:
            return None
        self.after["ref"] = published.ref
        run.print(comparison_table([self.before, self.after], f"{title} · {self.prepared.task} on {self.split}"))
        run.print(f"[green]wrote[/] {published.ref} → {published.path}")
        return published
