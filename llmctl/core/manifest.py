"""What a checkpoint's manifest (`llmctl.json`) says, read defensively.

A manifest that is not valid JSON (a crash mid-edit, a hand edit gone wrong) must not lock up the
store: `read_manifest` returns `{"damaged": "<why>"}` for it, so `ckpt list` shows it as damaged,
`ckpt rm` removes it and every stage that would load it refuses in one line (`check_intact`).
Manifests written by older llmctl versions are read in today's shape (`task_record`).

Torch-free, like the store.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.core.errors import LlmctlError

MANIFEST = "llmctl.json"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a checkpoint folder; None when it has none; {"damaged": why} when it cannot be read."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {"damaged": f"{MANIFEST} is not valid JSON ({type(e).__name__}: {str(e)[:80]})"}
    if not isinstance(data, dict):
        return {"damaged": f"{MANIFEST} holds a {type(data).__name__}, not a JSON object"}
    return data


def damaged(manifest: dict | None) -> str | None:
    """Why a manifest cannot be used (None when it can)."""
    return (manifest or {}).get("damaged") if isinstance((manifest or {}).get("damaged"), str) else None


def check_intact(manifest: dict | None, ref: str, what: str = "reference") -> None:
    """One line for a checkpoint whose manifest is damaged: it cannot be loaded, judged or built on."""
    why = damaged(manifest)
    if why:
        raise LlmctlError(
            f"{what} {ref}: {why}; the checkpoint cannot be used. Remove it with `llmctl ckpt rm {ref}` "
            f"(or restore its {MANIFEST})"
        )


def artifact(manifest: dict | None) -> dict:
    """How the weights are stored (`{"format": "hf"}` for plain folders and manifests without the record)."""
    return (manifest or {}).get("artifact") or {"format": "hf"}


def task_record(manifest: dict | None) -> dict | None:
    """A manifest's task entry in today's shape; manifests written before it had one shape are converted."""
    if not manifest or not manifest.get("task"):
        return None
    task = dict(manifest["task"])
    if "name" in task:
        return task
    name = task.get("task") or task.get("objective")  # finetune wrote `task`, pretrain `objective`
    data = manifest.get("data") or {}
    config = data.get("config") or {}
    objective = manifest.get("objective") or {}
    return {
        "name": name,
        "kind": manifest.get("kind"),
        "objective": {"metric": objective.get("metric"), "mode": objective.get("mode")},
        "labels": task.get("labels"),
        "columns": None,
        "max_seq_len": task.get("max_seq_len") or config.get("max_seq_len"),
        "data": data.get("config"),
        "split_seed": config.get("split_seed"),
        "fingerprint": data.get("fingerprint"),
        **{k: v for k, v in task.items() if k not in ("task", "objective", "labels", "max_seq_len")},
    }


def first_parent(manifest: dict | None) -> dict | None:
    """What a checkpoint is compared against: the checkpoint it was made from, else (a student built
    from the teacher's layers or at random) its teacher."""
    parents = (manifest or {}).get("parents") or []
    for parent in sorted(parents, key=lambda p: p.get("role") == "teacher"):
        return {"ref": parent.get("ref"), "path": parent.get("path"), "role": parent.get("role")}
    return None
