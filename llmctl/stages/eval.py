"""llmctl eval — judge checkpoints on their own task, with what they cost; compare several.

    llmctl eval ckpt=finetune/bbc                                   # its task and test split, from the manifest
    llmctl eval ckpt=pretrain/gpt-tiny data=kjv                     # perplexity (and bits per byte) on another corpus
    llmctl eval 'ckpt=[finetune/bbc,finetune/bbc-lora,finetune/bert-tiny-classification]' report=reports/bbc
    llmctl eval ckpt=packaged:smollm2-135m 'harness.tasks=[llmctl_arith]'

Each checkpoint is judged on the task its manifest records, on the same data, split seed and
preprocessing it was trained with (`data=` for other data): perplexity and bits per byte for
language models; accuracy, macro P/R/F1, the per-class report and the confusion matrix for
classification; the seqeval entity report for NER; loss, perplexity and sample answers for SFT.
Every checkpoint also gets the same cost figures (parameters, non-embedding parameters, size on
disk, batch-1 latency median / p90, throughput, peak memory) on the configured device and threads.

Results go into an eval record beside the checkpoint (`<version>/evals/<task>-<split>-<data fingerprint>.json`;
the weights and manifest are never touched) and, with `report=<folder>`, into a markdown report,
results.json and PNG charts (the metric against size and against latency). Each checkpoint's
parent, when it does the same task, is judged too (or its saved record reused) and the table shows
the deltas. `harness.tasks=[...]` runs EleutherAI lm-evaluation-harness on the loaded model
(optional extra: pip install 'llmctl[harness]'); nothing is published to the store.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from llmctl.core import harness, schema
from llmctl.core import run as stage_run
from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation import judging, records, report
from llmctl.core.evaluation.cost import cost_settings
from llmctl.core.loading import resolve_source, source_kind
from llmctl.core.store import Store


class Harness(schema.Section):
    tasks: list[str]
    include_path: str | None = None
    limit: float | None = Field(default=None, gt=0)
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(ge=1)


class Config(schema.StageConfig):
    """conf/eval.yaml, checked before the stage runs (core/schema.py)."""

    ckpt: str | list[str]
    data: schema.Data | None = None
    split: str | None = None
    batch_size: int = Field(ge=1)
    max_batches: int | None = Field(default=None, ge=1)
    max_seq_len: int | None = Field(default=None, ge=8)
    samples: int = Field(ge=0)
    max_new_tokens: int = Field(ge=1)
    parents: bool
    report: str | None = None
    cost: schema.Cost
    harness: Harness


def run(cfg) -> float | None:
    refs = _refs(cfg.ckpt)
    data_cfg = cfg.get("data") or None
    tasks = [str(t) for t in cfg.harness.tasks or []]
    if tasks:
        harness.check_installed()
    report_dir = _report_dir(cfg.report)
    with stage_run.start("eval", cfg, default_name="eval", publishes=False) as run:
        sources = [resolve_source(run.store, ref, what="ckpt") for ref in refs]  # all checked before any work
        plans = [judging.plan(s, data_cfg=data_cfg, need_data=not tasks) for s in sources]
        if tasks:
            _check_harness(cfg, sources, plans, tasks)
        judged_all = []
        for source in sources:
            judged = _evaluate(run, cfg, source, data_cfg, cost=bool(cfg.cost.enabled), need_data=not tasks)
            record = judged.record
            if tasks:
                record["harness"] = _harness(run, cfg, judged, tasks)
            saved = records.save_record(run.store, record)
            if tasks:
                records.save_record(run.store, record, key=f"harness-{'-'.join(tasks)}"[:120])
            for item in report.details(record):
                run.print(item)
            run.print(f"[dim]record: {saved}[/]")
            judged_all.append(record)  # the model is released here: one checkpoint in memory at a time
            del judged
        if cfg.parents:
            for record in judged_all:
                record["delta"] = records.delta(record, _parent_record(run, cfg, record))
        tasks_seen = sorted({f"{r['task']} on {r['split']}" if r["split"] else r["task"] for r in judged_all})
        title = (
            f"llmctl eval · {', '.join(tasks_seen)} · device {run.rt.device}, "
            f"{judged_all[0]['runtime']['threads']} threads"
        )
        run.print(report.comparison_table(judged_all, title))
        if report_dir is not None:
            written = report.write_report(report_dir, judged_all)
            run.print(f"[green]wrote[/] {', '.join(str(p) for p in written)}")
        return _result(cfg, judged_all)


def _result(cfg, judged_all: list[dict]):
    """What a sweep of one checkpoint's eval gets: its primary metric, or the values of `objectives` (its metrics
    as eval/<metric>, its cost figures as cost/<figure>); None for several checkpoints."""
    if len(judged_all) != 1:
        return None
    record = judged_all[0]
    chosen = stage_run.resolve_objectives(cfg)
    if not chosen:
        return record["primary"]["value"]
    metrics = {f"eval/{k}": v for k, v in record.get("metrics", {}).items()}
    values = tuple(o["value"] for o in stage_run.objective_values(chosen, metrics, record.get("cost")))
    return values if len(values) > 1 else values[0]


def objective(cfg) -> tuple[str, str] | None:
    """What a sweep of this stage optimises: one checkpoint's primary metric (several return nothing)."""
    refs = _refs(cfg.ckpt)
    if len(refs) > 1:
        return None
    plan = judging.plan(resolve_source(Store(cfg.output_root), refs[0], what="ckpt"), data_cfg=cfg.get("data") or None)
    return judging.PRIMARY[plan["task"]]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _refs(ckpt) -> list[str]:
    refs = [str(r) for r in ckpt] if not isinstance(ckpt, str) else [ckpt]
    if not refs or any(not r.strip() for r in refs):
        raise LlmctlError(
            "ckpt: give a checkpoint reference, e.g. ckpt=finetune/bbc, or a list: 'ckpt=[finetune/a,finetune/b]'"
        )
    if len(set(refs)) != len(refs):
        raise LlmctlError(
            f"ckpt: {next(r for r in refs if refs.count(r) > 1)} is named twice; name each checkpoint once"
        )
    return refs


def _report_dir(report) -> Path | None:
    if not report:
        return None
    path = Path(str(report)).expanduser()
    if path.exists() and not path.is_dir():
        raise LlmctlError(f"report={report} is a file; give a folder for the report (it is created if missing)")
    return path


def _check_harness(cfg, sources, plans, tasks: list[str]) -> None:
    """Harness tasks need causal LMs and real task names: both checked before any model is loaded."""
    import tempfile

    for source, plan in zip(sources, plans):
        if plan["kind"] != "causal-lm":
            raise LlmctlError(
                f"harness.tasks: {source.ref} is a {plan['kind']} checkpoint; the harness judges causal LMs"
            )
    with tempfile.TemporaryDirectory() as tmp:
        harness.task_manager(harness.task_folder(Path(tmp), cfg.harness.include_path, ["-"]), tasks)


# ---------------------------------------------------------------------------------------------
# Evaluating
# ---------------------------------------------------------------------------------------------
def _evaluate(run, cfg, source, data_cfg, *, cost: bool, need_data=True, task=None, like: dict | None = None):
    """Judge `source`; `like`: another record whose split, length, system prompt and cap to use (a parent judged
    as its child was)."""
    own = {"split": cfg.split, "max_batches": cfg.max_batches, "max_seq_len": cfg.max_seq_len}
    settings = {k: like.get(k) for k in (*own, "system_prompt")} if like else {**own, "system_prompt": judging.OWN}
    return judging.evaluate(
        run.store,
        source,
        rt=run.rt,
        data_cfg=data_cfg,
        batch_size=int(cfg.batch_size),
        **settings,
        samples=int(cfg.samples),
        max_new_tokens=int(cfg.max_new_tokens),
        seed=int(cfg.seed),
        console=run.console,
        need_data=need_data,
        task=task,
        cost=cost_settings(cfg.cost) if cost else None,
    )


def _harness(run, cfg, judged, tasks: list[str]) -> dict:
    h = cfg.harness
    rows = judged.rows
    documents = list(rows["text"]) if rows is not None and "text" in rows.column_names else None
    run.print(f"lm-evaluation-harness: {', '.join(tasks)}")
    return harness.run_tasks(
        harness.hf_lm(judged.model, judged.tokenizer, rt=run.rt, batch_size=int(h.batch_size)),
        tasks,
        documents=documents,
        include_path=h.include_path,
        limit=h.limit,
        num_fewshot=h.num_fewshot,
        seed=int(cfg.seed),
    )


def _parent_record(run, cfg, record: dict) -> dict | None:
    """The parent judged as its child was: the same task, data, split, sequence length, system prompt, cap, device,
    precision, threads and cost settings. A saved record is reused only when it was measured exactly so;
    otherwise the parent is judged now, with the child's settings (and that record saved)."""
    from omegaconf import OmegaConf

    parent = record.get("parent")
    if not parent or record.get("data") is None:
        return None
    source = _first_resolvable(run.store, [parent.get("ref"), parent.get("path")])
    if source is None:
        record["delta_note"] = f"parent {parent.get('ref')} is gone"
        return None
    kind = source_kind(source)
    if kind != record["kind"]:  # a classifier's MLM parent cannot classify: no delta
        record["delta_note"] = f"parent {source.ref} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} checkpoint"
        return None
    saved = records.load_record(run.store, source.ref, str(source.path), records.record_key(record))
    if saved is not None and not records.unlike(saved, record):
        return saved
    run.print(f"[dim]parent of {record['ref']}:[/]")
    try:  # the parent judged on the child's task and data (a base LM on its SFT child's conversations)
        fresh = _evaluate(
            run,
            cfg,
            source,
            OmegaConf.create(record["data"]["config"]),
            cost=bool(cfg.cost.enabled),
            task=record["task"],
            like=record,
        )
    except LlmctlError as e:
        record["delta_note"] = f"parent {source.ref} cannot be judged on this task ({e})"
        return None
    records.save_record(run.store, fresh.record)
    return fresh.record


def _first_resolvable(store, specs: list):
    """The first of a parent's reference / recorded path that still resolves (None: it is gone)."""
    for spec in filter(None, specs):
        try:
            return resolve_source(store, spec, what="parent")
        except LlmctlError:
            continue
    return None
