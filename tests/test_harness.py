"""lm-evaluation-harness in-process on a tiny GPT, offline: the shipped local task runs, and the harness's
perplexity of the same text sits beside llmctl's."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmctl.cli import app

pytest.importorskip("lm_eval")


def _eval(tmp_path, bases, corpus, *extra):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            f"ckpt={bases['gpt']}",
            "data=files",
            f"data.train={corpus}",
            "precision=fp32",
            "parents=false",
            "cost.enabled=false",
            f"output_root={tmp_path}",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "evals").rglob("*.json")}
    return result, records


def test_the_shipped_task_runs_offline_and_is_recorded(tmp_path, bases, corpus):
    result, records = _eval(tmp_path, bases, corpus, "harness.tasks=[llmctl_arith]", "harness.limit=12")
    harness = next(r for name, r in records.items() if name.startswith("harness-"))["harness"]["llmctl_arith"]
    assert 0.0 <= harness["acc"] <= 1.0 and harness["acc"] * 12 == pytest.approx(
        round(harness["acc"] * 12)
    )  # 12 questions scored
    assert "acc_stderr" in harness and "llmctl_arith" in result.output


def test_harness_perplexity_of_the_same_text_is_close_to_llmctls(tmp_path, bases, corpus):
    _, records = _eval(tmp_path, bases, corpus, "harness.tasks=[llmctl_perplexity]")
    record = next(r for name, r in records.items() if name.startswith("harness-"))
    ours, theirs = record["metrics"]["bits_per_byte"], record["harness"]["llmctl_perplexity"]["bits_per_byte"]
    # Both score the same documents; llmctl packs them into fixed windows and also predicts each end-of-text,
    # the harness scores each document alone with rolling windows: close, not equal.
    assert theirs > 0 and abs(ours - theirs) / theirs < 0.25, (ours, theirs)
