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


def delta(child: dict, parent: dict | None) -> dict | None:
    """The child's primary metric minus its parent's, and its size / latency as ratios of the parent's."""
    if (
        not parent
        or parent.get("task") != child.get("task")
        or parent["primary"]["value"] is None
        or child["primary"]["value"] is None
    ):
        return None
    out = {"ref": parent["ref"], "metric": child["primary"]["value"] - parent["primary"]["value"]}
    c, p = child.get("cost") or {}, parent.get("cost") or {}
    for key in ("size_bytes", "latency_ms_p50", "parameters"):
        if c.get(key) and p.get(key):
            out[f"{key}_ratio"] = c[key] / p[key]
    return out
