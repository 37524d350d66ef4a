"""Eval records: one JSON file per checkpoint, task, split and data, kept beside the checkpoint, and the
deltas between a checkpoint's record and its parent's.

    <version>/evals/<task>-<split>-<data fingerprint>.json   (store versions; weights and manifest untouched)
    <output_root>/evals/<folder>-<hash>/...json              (HF folders and packaged models, maybe read-only)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmctl.core.files import write_json
from llmctl.core.store import parse_ref

EVALS = "evals"  # the folder beside a checkpoint's weights that keeps its eval records


def record_key(record: dict) -> str:
    """`<task>-<split>-<data fingerprint>`, with `-<N>b` when only the split's first N batches were scored
    (`cost-only` for a harness run on a checkpoint without data)."""
    if record.get("data") is None:
        return "cost-only"
    capped = f"-{record['max_batches']}b" if record.get("max_batches") else ""
    return f"{record['task']}-{record['split']}-{record['data']['fingerprint'][:12]}{capped}"


def record_dir(store, ref: str, path: str) -> Path:
    """Where a checkpoint's eval records live: inside a store version (never touching its weights or
    manifest), else under <output_root>/evals/ for HF folders and packaged models, which may be read-only."""
    if parse_ref(ref):
        return Path(path) / EVALS
    slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(path).name)[:40]
    return Path(store.root) / EVALS / f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def save_record(store, record: dict, key: str | None = None) -> Path:
    folder = record_dir(store, record["ref"], record["path"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key or record_key(record)}.json"
    write_json(path, record)
    return path


def load_record(store, ref: str, path: str, key: str) -> dict | None:
    file = record_dir(store, ref, path) / f"{key}.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None  # a damaged record is measured again, not trusted


def settings(record: dict) -> dict:
    """How a record was measured: what must be equal for two records' numbers to be compared."""
    runtime = record.get("runtime") or {}
    return {
        "task": record.get("task"),
        "split": record.get("split"),
        "data": (record.get("data") or {}).get("fingerprint"),
        "max_seq_len": record.get("max_seq_len"),
        "max_batches": record.get("max_batches"),
        "system_prompt": record.get("system_prompt"),
        "device": runtime.get("device"),
        "precision": runtime.get("precision"),
        "threads": runtime.get("threads"),
        "cost": record.get("cost_settings") if record.get("cost") else None,
    }


def unlike(a: dict, b: dict, *, cost: bool = True) -> list[str]:
    """The settings two records were measured with differently (empty: their numbers compare). `cost=False`
    leaves the cost settings out (a task-metric delta needs only the task settings alike)."""
    sa, sb = settings(a), settings(b)
    return [k for k in sa if sa[k] != sb[k] and (cost or k != "cost")]


def headline(records: list[dict]) -> tuple[str, str | None]:
    """The metric records are compared by: their primary metric, except that perplexity per token is not
    comparable across tokenizers or packings, so bits per byte stands in for it there (with the reason why)."""
    metric = records[0]["primary"]["metric"]
    if metric != "perplexity" or len(records) < 2:
        return metric, None
    tokenizers = {r.get("tokenizer_sha256") for r in records}
    packings = {r.get("max_seq_len") for r in records}
    if len(tokenizers) == 1 and len(packings) == 1:
        return metric, None
    why = "tokenizers differ" if len(tokenizers) > 1 else "sequence lengths differ"
    if all("bits_per_byte" in (r.get("metrics") or {}) for r in records):
        return "bits_per_byte", f"perplexity per token is not comparable: {why}"
    return metric, f"not comparable: {why}, and there are no bits per byte for this task"


def metric_value(record: dict, metric: str):
    return record["primary"]["value"] if metric == record["primary"]["metric"] else record["metrics"].get(metric)


def delta(child: dict, parent: dict | None) -> dict | None:
    """The child's headline metric minus its parent's, and its size / latency as ratios of the parent's; a
    `note` instead of numbers when the two were measured differently (then nothing is subtracted)."""
    if not parent:
        return None
    diff = unlike(child, parent, cost=bool(child.get("cost") and parent.get("cost")))
    if diff:
        return {"ref": parent["ref"], "metric": None, "note": f"parent measured differently ({', '.join(diff)})"}
    metric, why = headline([child, parent])
    a, b = metric_value(child, metric), metric_value(parent, metric)
    if a is None or b is None or (why and metric == child["primary"]["metric"]):
        return {"ref": parent["ref"], "metric": None, "note": why or f"no {metric} to compare"}
    out = {"ref": parent["ref"], "metric_name": metric, "metric": a - b}
    c, p = child.get("cost") or {}, parent.get("cost") or {}
    for key in ("size_bytes", "latency_ms_p50", "parameters"):
        if c.get(key) and p.get(key):
            out[f"{key}_ratio"] = c[key] / p[key]
    return out
