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

import json
from pathlib import Path

from pydantic import Field

from llmctl.core import evaluation, harness, schema
from llmctl.core import run as stage_run
from llmctl.core.errors import LlmctlError
from llmctl.core.loading import resolve_source


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
    report = _report_dir(cfg.report)
    with stage_run.start("eval", cfg, default_name="eval", publishes=False) as run:
        sources = [
            resolve_source(run.store, ref, what="ckpt") for ref in refs
        ]  # every reference checked before any work
        plans = [evaluation.plan(s, data_cfg=data_cfg, need_data=not tasks) for s in sources]
        if tasks:
            _check_harness(cfg, sources, plans, tasks)
        records = []
        for source in sources:
            record = _evaluate(run, cfg, source, data_cfg, cost=bool(cfg.cost.enabled), need_data=not tasks)
            if tasks:
                record["harness"] = _harness(run, cfg, record, tasks)
            saved = evaluation.save_record(run.store, record)
            if tasks:
                evaluation.save_record(run.store, record, key=f"harness-{'-'.join(tasks)}"[:120])
            _print_one(run, record)
            run.print(f"[dim]record: {saved}[/]")
            records.append(_release(record))
        if cfg.parents:
            for record in records:
                record["delta"] = evaluation.delta(record, _parent_record(run, cfg, record))
        tasks_seen = sorted({f"{r['task']} on {r['split']}" if r["split"] else r["task"] for r in records})
        run.print(
            evaluation.comparison_table(
                records,
                f"llmctl eval · {', '.join(tasks_seen)} · device {run.rt.device}, "
                f"{records[0]['runtime']['threads']} threads",
            )
        )
        if report is not None:
            written = _write_report(report, records, run.rt)
            run.print(f"[green]wrote[/] {', '.join(str(p) for p in written)}")
        return records[0]["primary"]["value"] if len(records) == 1 else None


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
def _evaluate(run, cfg, source, data_cfg, *, cost: bool, need_data: bool = True, task: str | None = None) -> dict:
    return evaluation.evaluate(
        run.store,
        source,
        rt=run.rt,
        data_cfg=data_cfg,
        split=cfg.split,
        batch_size=int(cfg.batch_size),
        max_batches=cfg.max_batches,
        max_seq_len=cfg.max_seq_len,
        samples=int(cfg.samples),
        max_new_tokens=int(cfg.max_new_tokens),
        seed=int(cfg.seed),
        console=run.console,
        need_data=need_data,
        task=task,
        cost=evaluation.cost_settings(cfg.cost) if cost else None,
    )


def _harness(run, cfg, record: dict, tasks: list[str]) -> dict:
    h = cfg.harness
    split = record["_split"]
    documents = list(split["text"]) if split is not None and "text" in split.column_names else None
    run.print(f"lm-evaluation-harness: {', '.join(tasks)}")
    return harness.run_tasks(
        record["_model"],
        record["_tokenizer"],
        tasks,
        rt=run.rt,
        documents=documents,
        include_path=h.include_path,
        limit=h.limit,
        num_fewshot=h.num_fewshot,
        batch_size=int(h.batch_size),
        seed=int(cfg.seed),
    )


def _release(record: dict) -> dict:
    """Drop the loaded model from a record once it is judged (several checkpoints in one process)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _parent_record(run, cfg, record: dict) -> dict | None:
    """The parent judged on the same data and split: its saved record, else measured now (and saved)."""
    from omegaconf import OmegaConf

    parent = record.get("parent")
    if not parent or record.get("data") is None:
        return None
    source = _first_resolvable(run.store, [parent.get("ref"), parent.get("path")])
    if source is None:
        record["delta_note"] = f"parent {parent.get('ref')} is gone"
        return None
    from llmctl.core.loading import source_kind

    kind = source_kind(source)
    if kind != record["kind"]:  # a classifier's MLM parent cannot classify: no delta
        record["delta_note"] = f"parent {source.ref} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} checkpoint"
        return None
    saved = evaluation.load_record(run.store, source.ref, str(source.path), evaluation.record_key(record))
    if saved is not None and saved.get("task") == record["task"] and (saved.get("cost") or not cfg.cost.enabled):
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
        )
    except LlmctlError as e:
        record["delta_note"] = f"parent {source.ref} cannot be judged on this task ({e})"
        return None
    evaluation.save_record(run.store, fresh)
    return _release(fresh)


def _first_resolvable(store, specs: list):
    """The first of a parent's reference / recorded path that still resolves (None: it is gone)."""
    for spec in filter(None, specs):
        try:
            return resolve_source(store, spec, what="parent")
        except LlmctlError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Printing and reports
# ---------------------------------------------------------------------------------------------
def _print_one(run, record: dict) -> None:
    from rich.table import Table

    m, task = record["metrics"], record["task"]
    keys = {
        "classification": ("loss", "accuracy", "macro_precision", "macro_recall", "macro_f1"),
        "ner": ("loss", "f1", "precision", "recall", "token_accuracy"),
    }.get(task, ("loss", "perplexity", "bits_per_byte", "tokens"))
    if m:
        run.print("  " + " · ".join(f"{k} {_fmt(m[k])}" for k in keys if k in m))
    if task == "classification":
        labels = record["labels"]
        per_class = Table("label", "precision", "recall", "f1", "support", box=None, pad_edge=False)
        for name in labels:
            per_class.add_row(
                name, *(_fmt(m[f"{name}/{k}"]) for k in ("precision", "recall", "f1")), str(m[f"{name}/support"])
            )
        run.print(per_class)
        matrix = Table("true \\ predicted", *labels, box=None, pad_edge=False)
        for name, row in zip(labels, m["confusion_matrix"]):
            matrix.add_row(name, *map(str, row))
        run.print(matrix)
    if task == "ner":
        from llmctl.core.metrics import format_ner_table

        run.print(format_ner_table({f"x/{k}": v for k, v in m.items()}, "x"))
    for sample in record.get("samples") or []:
        run.print(f"  [dim]{sample['prompt']!r}[/] → {sample['output']!r}")
    for task_name, values in (record.get("harness") or {}).items():
        run.print(f"  harness {task_name}: " + " · ".join(f"{k} {_fmt(v)}" for k, v in values.items()))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _write_report(folder: Path, records: list[dict], rt) -> list[Path]:
    """report.md (the table, the charts, each checkpoint's details), results.json and the PNG charts."""
    folder.mkdir(parents=True, exist_ok=True)
    charts = _charts(folder, records)
    headers, rows = evaluation.table_rows(records)
    runtime = records[0].get("runtime") or {}
    lines = [
        "# llmctl eval report",
        "",
        f"{len(records)} checkpoint(s) · device {runtime.get('device')} · precision {runtime.get('precision')} · "
        f"{runtime.get('threads')} threads · {_cpu_name()}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if h == "checkpoint" else "---:" for h in headers) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows),
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in charts] + [""]
    for r in records:
        judged = (
            f"{r['task']} on the {r['split']} split ({r['data']['examples']} examples, data {r['data']['fingerprint'][:12]}), "
            f"{r['max_seq_len']} tokens"
            if r.get("data")
            else "no task metrics (harness only)"
        )
        lines += [
            f"## {r['ref']}",
            "",
            f"{judged}; parent: {(r.get('parent') or {}).get('ref') or '—'}"
            + (f" ({r['delta_note']}: no delta)" if r.get("delta_note") else ""),
            "",
        ]
        m = r["metrics"]
        if r["task"] == "classification":
            lines += ["| label | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
            lines += [
                f"| {n} | {m[f'{n}/precision']:.4f} | {m[f'{n}/recall']:.4f} | {m[f'{n}/f1']:.4f} | {m[f'{n}/support']} |"
                for n in r["labels"]
            ]
            lines += [
                "",
                "Confusion matrix (rows: true, columns: predicted)",
                "",
                "| | " + " | ".join(r["labels"]) + " |",
                "|---|" + "---:|" * len(r["labels"]),
            ]
            lines += [
                f"| {n} | " + " | ".join(map(str, row)) + " |" for n, row in zip(r["labels"], m["confusion_matrix"])
            ]
        elif r["task"] == "ner":
            from llmctl.core.metrics import format_ner_table

            lines += ["```", format_ner_table({f"x/{k}": v for k, v in m.items()}, "x"), "```"]
        else:
            lines += [
                " · ".join(f"{k} {_fmt(m[k])}" for k in ("loss", "perplexity", "bits_per_byte", "tokens") if k in m)
            ]
        for s in r.get("samples") or []:
            lines += [
                "",
                f"- prompt: {s['prompt']!r}",
                f"  - answer: {s['output']!r}",
                f"  - reference: {s['reference']!r}",
            ]
        for name, values in (r.get("harness") or {}).items():
            lines += ["", f"lm-evaluation-harness `{name}`: " + " · ".join(f"{k} {_fmt(v)}" for k, v in values.items())]
        lines.append("")
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    results = folder / "results.json"
    results.write_text(json.dumps(records, indent=2))
    return [report, results, *charts]


def _charts(folder: Path, records: list[dict]) -> list[Path]:
    """The primary metric against size on disk and against batch-1 latency, one labelled point per checkpoint."""
    import logging
    import math

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    metric = records[0]["primary"]["metric"]
    points = [
        r for r in records if r["primary"]["metric"] == metric and r["primary"]["value"] is not None and r.get("cost")
    ]
    if not points:
        return []
    written = []
    for key, label, scale, name in (
        ("size_bytes", "size on disk (MiB)", 2**-20, "size"),
        ("latency_ms_p50", f"batch-1 latency, median (ms, {points[0]['cost']['seq_len']} tokens)", 1, "latency"),
    ):
        fig, ax = plt.subplots(figsize=(8.5, 5), dpi=120)
        xs = [r["cost"][key] * scale for r in points]
        ys = [r["primary"]["value"] for r in points]
        ax.scatter(xs, ys, s=60, zorder=3)
        ax.set_xscale("log")  # compression moves size and latency by factors
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        middle = math.sqrt(min(xs) * max(xs))
        span = (max(ys) - min(ys)) or 1.0
        row: dict[
            int, int
        ] = {}  # points at (nearly) the same height: labels alternate above / below, further out each time
        for x, y, r in sorted(
            zip(xs, ys, points), key=lambda p: p[0]
        ):  # labels point inwards, so none runs off the chart
            right = x > middle
            k = row[round(y / span * 25)] = row.get(round(y / span * 25), -1) + 1
            dy = 6 + 11 * (k // 2) if k % 2 == 0 else -14 - 11 * (k // 2)
            ax.annotate(
                r["ref"],
                (x, y),
                textcoords="offset points",
                xytext=(-8 if right else 8, dy),
                fontsize=8,
                ha="right" if right else "left",
            )
        ax.set_xlabel(label + " · log scale")
        better = "higher is better" if records[0]["primary"]["mode"] == "max" else "lower is better"
        ax.set_ylabel(f"{metric} ({better})")
        ax.set_title(f"{metric} against {name} · {points[0]['task']} on {points[0]['split']}")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.15)
        fig.tight_layout()
        path = folder / f"{metric}_vs_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
