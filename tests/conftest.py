"""Shared fixtures: a small real-text corpus, tiny model overrides, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

# Forty short "articles" built from real English sentences, so tokenizers and models see structure.
_SENTENCES = [
    "The central bank raised interest rates by a quarter point on Tuesday.",
    "Shares in the telecom group fell sharply after the profit warning.",
    "The striker scored twice as the home side won the cup final.",
    "Ministers will publish the new education bill next month.",
    "The film took more money at the box office than any other this year.",
    "Engineers say the new chip uses half the power of its predecessor.",
    "Voters in the north are expected to decide the close election.",
    "The coach said the team had played its best football of the season.",
    "Analysts expect growth to slow as exports weaken across the region.",
    "The singer announced a world tour starting in the spring.",
    "Mobile phone makers are racing to add faster networks to their handsets.",
    "The opposition leader called for an inquiry into the spending plans.",
]


def make_corpus(folder: Path, docs: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        picks = [_SENTENCES[(d * 5 + k * 7) % len(_SENTENCES)] for k in range(6 + d % 4)]
        (folder / f"doc{d:03d}.txt").write_text(" ".join(picks[:3]) + "\n\n" + " ".join(picks[3:]) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def tiny(objective: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a model small enough to train in about a second."""
    common = ["data=files", f"data.train={corpus}", "data.max_seq_len=32", "tokenizer.vocab_size=300",
              "train.max_steps=16", "train.batch_size=8", "train.eval_every=8", "train.eval_batches=4", "train.log_every=1",
              "train.save_every=0", "precision=fp32", f"output_root={out}"]
    if objective == "clm":
        return ["conf=gpt-tiny", "model.config.n_embd=32", "model.config.n_layer=1", *common, *extra]
    return ["conf=bert-tiny", f"objective={objective}", "model.config.hidden_size=32", "model.config.num_hidden_layers=1",
            "model.config.intermediate_size=64", *common, *extra]


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console script, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})


def run_inprocess(*args: str) -> tuple[int, str]:
    """The same CLI in this process (fast: imports are paid once). Returns (exit code, stderr line)."""
    from llmctl.core.config import run_stage
    from llmctl.core.errors import LlmctlError

    stage, *rest = args
    try:
        run_stage(stage, list(rest))
    except LlmctlError as e:
        return e.exit_code, str(e)
    return 0, ""


def metrics_log(version_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (version_dir / "metrics.jsonl").read_text().splitlines()]
