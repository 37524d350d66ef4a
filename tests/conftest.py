"""Shared fixtures: a small real-text corpus, tiny model overrides, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl.core.store import Store

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
    for d in range(docs):  # distinct documents (llmctl drops exact duplicates)
        step = (7, 5, 1, 11)[d // 12 % 4]
        picks = [_SENTENCES[(d * 5 + k * step) % len(_SENTENCES)] for k in range(6 + d % 4)]
        (folder / f"doc{d:03d}.txt").write_text(" ".join(picks[:3]) + "\n\n" + " ".join(picks[3:]) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def tiny(objective: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a model small enough to train in about a second."""
    common = [
        "data=files",
        f"data.train={corpus}",
        "data.max_seq_len=32",
        "tokenizer.vocab_size=300",
        "train.max_steps=16",
        "train.batch_size=8",
        "train.eval_every=8",
        "train.eval_batches=4",
        "train.log_every=1",
        "train.save_every=0",
        "precision=fp32",
        f"output_root={out}",
    ]
    if objective == "clm":
        return ["conf=gpt-tiny", "model.config.n_embd=32", "model.config.n_layer=1", *common, *extra]
    return [
        "conf=bert-tiny",
        f"objective={objective}",
        "model.config.hidden_size=32",
        "model.config.num_hidden_layers=1",
        "model.config.intermediate_size=64",
        *common,
        *extra,
    ]


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console script, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def run_inprocess(*args: str) -> tuple[int, str]:
    """The same CLI in this process (fast: imports are paid once). Returns (exit code, stderr line)."""
    from llmctl.cli import run_stage
    from llmctl.core.errors import LlmctlError

    stage, *rest = args
    try:
        run_stage(stage, list(rest))
    except LlmctlError as e:
        return e.exit_code, str(e)
    return 0, ""


def metrics_log(version_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (version_dir / "metrics.jsonl").read_text().splitlines()]


WORDS = {  # topic words that occur in the conftest corpus, so the tiny tokenizer knows them
    "business": "bank interest rates shares profit growth exports analysts",
    "entertainment": "film box office singer tour spring money year",
    "politics": "ministers education bill voters election opposition inquiry spending",
    "sport": "striker scored cup final coach team football season",
    "tech": "engineers chip power mobile phone networks handsets faster",
}


@pytest.fixture(scope="session")
def bases(corpus, tmp_path_factory):
    """A tiny BERT (MLM) and a tiny GPT (causal LM) pre-trained by llmctl, as HF folders."""
    root = tmp_path_factory.mktemp("bases")
    ner_text = root / "ner_text"
    ner_text.mkdir()
    from llmctl.core.data import ASSETS, read_conll

    sents = read_conll([str(ASSETS / "ner" / "train.conll")], "train")["tokens"][:]
    (ner_text / "ner.txt").write_text("\n".join(" ".join(s) for s in sents))
    for obj, name, data in (("mlm", "enc", corpus), ("clm", "gpt", corpus), ("mlm", "nerenc", ner_text / "ner.txt")):
        args = tiny(obj, data, root, f"name={name}", "train.max_steps=20", "train.lr=3e-3")
        if name == "enc":  # two layers, so method=freeze can freeze one and train the other
            args = [a.replace("num_hidden_layers=1", "num_hidden_layers=2") for a in args]
        code, err = run_inprocess("pretrain", *args)
        assert code == 0, err
    store = Store(root)
    return {k: store.resolve(f"pretrain/{k}").path for k in ("enc", "gpt", "nerenc")}


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    """A labelled csv with non-default column names (review → sentiment)."""
    folder = tmp_path_factory.mktemp("cls")
    import random

    rng, rows = random.Random(0), []
    for i in range(150):
        topic = sorted(WORDS)[i % 5]
        words = rng.sample(WORDS[topic].split(), 5) + rng.sample(["the", "a", "on", "in", "said", "new"], 3)
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": topic})
    import csv

    for split, part in (("train", rows[:100]), ("dev", rows[100:125]), ("test", rows[125:])):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["review", "sentiment"])
            w.writeheader()
            w.writerows(part)
    return folder


def cls_args(bases, reviews, out, *extra):
    return [
        "task=classification",
        f"init_from={bases['enc']}",
        "data=files",
        f"data.train={reviews / 'train.csv'}",
        f"data.validation={reviews / 'dev.csv'}",
        f"data.test={reviews / 'test.csv'}",
        "data.text_column=review",
        "data.label_column=sentiment",
        "data.max_seq_len=48",
        "train.max_steps=300",
        "train.batch_size=8",
        "train.eval_every=50",
        "train.log_every=10",
        "train.lr=1e-3",
        "patience=0",
        "precision=fp32",
        f"output_root={out}",
        *extra,
    ]


def stop_at(monkeypatch, step: int) -> None:
    """Send this process SIGTERM when the training loop reaches `step`, as a scheduler would."""
    from llmctl.core.train import Trainer

    real = Trainer._optimizer_step

    def step_then_signal(self, batches, accum):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches, accum)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)
