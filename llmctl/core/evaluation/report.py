"""Eval records shown: the comparison table (terminal and markdown), each record's details, and the
report folder (report.md, results.json, PNG charts of the metric against size and latency).
`llmctl eval` writes it; distill, prune and quantize print their before / after with the same table.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.core.evaluation.records import headline, metric_value


def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per eval record: its headline metric (core.evaluation.records.headline: bits per byte
    where perplexities are not comparable, and then the perplexities marked so), the delta against its parent,
    its cost."""
    metrics = {r["primary"]["metric"] for r in records}
    one = len(metrics) == 1
    metric, why = headline(records) if one else (None, None)
    switched = one and metric != records[0]["primary"]["metric"]
    seq = {(r.get("cost") or {}).get("seq_len") for r in records} - {None}
    decodes = any("decode_tokens_per_s" in (r.get("cost") or {}) for r in records)  # causal LMs: decode speed too
    headers = [
        "checkpoint",
        (metric + (" (not comparable)" if why and not switched else "") if one else "metric"),
        *(["perplexity (not comparable)"] if switched else []),
        "Δ parent",
        "params (non-emb)",
        "size",
        "size ×",
        "latency p50 / p90 ms" + (f" @{seq.pop()}" if len(seq) == 1 else ""),
        "seq/s",
        *(["decode tok/s (% bound)", "TTFT ms"] if decodes else []),
        "peak mem",
    ]
    rows = []
    for r in records:
        p, c, d = r["primary"], r.get("cost") or {}, r.get("delta") or {}
        value = metric_value(r, metric) if one else p["value"]
        shown = "—" if value is None else f"{value:.4f}" if one else f"{p['metric']} {value:.4f}"
        latency = f"{_num(c.get('latency_ms_p50'))} / {_num(c.get('latency_ms_p90'))}" if c else "—"
        rows.append(
            [
                r["ref"],
                shown,
                *([_fmt(p["value"])] if switched else []),
                f"{d['metric']:+.4f}" + ("" if d.get("metric_name") in (None, metric) else f" {d['metric_name']}")
                if d.get("metric") is not None
                else "—",
                f"{_count(c.get('parameters'))} ({_count(c.get('non_embedding_parameters'))})" if c else "—",
                size_text(c.get("size_bytes")),
                f"{d['size_bytes_ratio']:.2f}×" if "size_bytes_ratio" in d else "—",
                latency,
                _num(c.get("throughput_seq_per_s")),
                *([_decode(c), _num(c.get("ttft_ms"))] if decodes else []),
                size_text(c.get("peak_memory_bytes")),
            ]
        )
    return headers, rows


def _decode(c: dict) -> str:
    """Batch-1 decode tokens/s and its share of the memory-bandwidth bound (core.evaluation.cost.measure_decode)."""
    if c.get("decode_tokens_per_s") is None:
        return "—"
    pct = c.get("decode_pct_of_bound")
    return _num(c["decode_tokens_per_s"]) + (f" ({pct:.0f} %)" if pct is not None else "")


def notes(records: list[dict]) -> list[str]:
    """Why numbers in the table are not compared: the headline's reason, each delta left out and why."""
    out = []
    metric, why = headline(records) if len({r["primary"]["metric"] for r in records}) == 1 else (None, None)
    if why:
        out.append(f"{metric} is the headline: {why}" if metric == "bits_per_byte" else f"{metric}: {why}")
    decoded = [r["cost"] for r in records if (r.get("cost") or {}).get("decode_tokens_per_s") is not None]
    if decoded:
        c = decoded[0]
        out.append(
            f"decode: batch-1 greedy, {c['decode_prompt_tokens']}-token prompt, {c['decode_new_tokens']} new tokens; "
            f"% bound = tokens/s against the copy bandwidth measured here ({c['memory_bandwidth_gbs']:.1f} GB/s) "
            "over the weight bytes a step reads"
        )
    for r in records:
        note = (r.get("delta") or {}).get("note") or r.get("delta_note")
        if note:
            out.append(f"{r['ref']}: no delta ({note})")
        if (r.get("cost") or {}).get("note"):
            out.append(f"{r['ref']}: {r['cost']['note']}")
        if (r.get("cost") or {}).get("kernels"):
            out.append(f"{r['ref']}: kernels: {r['cost']['kernels']}")
    return out


def comparison_table(records: list[dict], title: str):
    """table_rows as a rich Table for the terminal."""
    from rich.table import Table

    headers, rows = table_rows(records)
    table = Table(title=title, caption="\n".join(notes(records)) or None, caption_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h == "checkpoint" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def size_text(n) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _num(x) -> str:
    return "—" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:,.0f}")


def details(record: dict) -> list:
    """What a record shows below the table line: its metrics, per-class report and confusion matrix, NER report,
    SFT samples and harness results (rich renderables and markup strings, printed in order)."""
    from rich.table import Table

    out: list = []
    m, task = record["metrics"], record["task"]
    keys = {
        "classification": ("loss", "accuracy", "macro_precision", "macro_recall", "macro_f1"),
        "ner": ("loss", "f1", "precision", "recall", "token_accuracy"),
    }.get(task, ("loss", "perplexity", "bits_per_byte", "tokens"))
    if m:
        out.append("  " + " · ".join(f"{k} {_fmt(m[k])}" for k in keys if k in m))
    if task == "classification":
        labels = record["labels"]
        per_class = Table("label", "precision", "recall", "f1", "support", box=None, pad_edge=False)
        for name in labels:
            per_class.add_row(
                name, *(_fmt(m[f"{name}/{k}"]) for k in ("precision", "recall", "f1")), str(m[f"{name}/support"])
            )
        out.append(per_class)
        matrix = Table("true \\ predicted", *labels, box=None, pad_edge=False)
        for name, row in zip(labels, m["confusion_matrix"]):
            matrix.add_row(name, *map(str, row))
        out.append(matrix)
    if task == "ner":
        from llmctl.core.metrics import format_ner_table

        out.append(format_ner_table({f"x/{k}": v for k, v in m.items()}, "x"))
    for sample in record.get("samples") or []:
        out.append(f"  [dim]{sample['prompt']!r}[/] → {sample['output']!r}")
    for task_name, values in (record.get("harness") or {}).items():
        out.append(f"  harness {task_name}: " + " · ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def write_report(folder: Path, records: list[dict]) -> list[Path]:
    """report.md (the table, the charts, each checkpoint's details), results.json and the PNG charts."""
    folder.mkdir(parents=True, exist_ok=True)
    charts = _charts(folder, records)
    headers, rows = table_rows(records)
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
        *(f"- {note}" for note in notes(records)),
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in charts] + [""]
    for r in records:
        judged = (
            f"{r['task']} on the {r['split']} split ({r['data']['examples']} examples, data "
            f"{r['data']['fingerprint'][:12]}), "
            f"{r['max_seq_len']} tokens"
            if r.get("data")
            else "no task metrics (harness only)"
        )
        lines += [
            f"## {r['ref']}",
            "",
            f"{judged}; parent: {(r.get('parent') or {}).get('ref') or '—'}",
            "",
        ]
        m = r["metrics"]
        if r["task"] == "classification":
            lines += ["| label | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
            lines += [
                f"| {n} | {m[f'{n}/precision']:.4f} | {m[f'{n}/recall']:.4f} | {m[f'{n}/f1']:.4f} | "
                f"{m[f'{n}/support']} |"
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
    """The headline metric against size on disk and against batch-1 latency, one labelled point per checkpoint."""
    import logging
    import math

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    records = [r for r in records if r["primary"]["metric"] == records[0]["primary"]["metric"]]  # one axis
    metric, why = headline(records)
    if why and metric == records[0]["primary"]["metric"]:
        return []  # not comparable and nothing stands in for it
    points = [r for r in records if metric_value(r, metric) is not None and r.get("cost")]
    if not points:
        return []
    written = []
    for key, label, scale, name in (
        ("size_bytes", "size on disk (MiB)", 2**-20, "size"),
        ("latency_ms_p50", f"batch-1 latency, median (ms, {points[0]['cost']['seq_len']} tokens)", 1, "latency"),
    ):
        fig, ax = plt.subplots(figsize=(8.5, 5), dpi=120)
        xs = [r["cost"][key] * scale for r in points]
        ys = [metric_value(r, metric) for r in points]
        ax.scatter(xs, ys, s=60, zorder=3)
        ax.set_xscale("log")  # compression moves size and latency by factors
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        middle = math.sqrt(min(xs) * max(xs))
        span = (max(ys) - min(ys)) or 1.0
        # points at (nearly) the same height: labels alternate above / below, further out each time; labels
        # point inwards, so none runs off the chart
        row: dict[int, int] = {}
        for x, y, r in sorted(zip(xs, ys, points), key=lambda p: p[0]):
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
        mode = records[0]["primary"]["mode"] if metric == records[0]["primary"]["metric"] else "min"
        better = "higher is better" if mode == "max" else "lower is better"
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
