"""core/sweeps.py: an Optuna sweep optimises in the direction of the stage's objective, never against it."""

from __future__ import annotations

import pytest
import yaml
from conftest import cls_args, run_cli
from typer.testing import CliRunner

from llmctl.cli import app


def _direction(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "hydra/sweeper=optuna", "--cfg", "hydra"])
    assert result.exit_code == 0, result.output + result.stderr
    return next(
        line.split(":", 1)[1].strip() for line in result.output.splitlines() if line.strip().startswith("direction:")
    )


@pytest.mark.parametrize(
    "args, want",
    [
        (["pretrain"], "minimize"),  # eval/loss
        (["finetune"], "maximize"),  # eval/macro_f1 of the default classification task
        (["finetune", "task=ner"], "maximize"),  # eval/f1
        (["finetune", "task=sft"], "minimize"),  # eval/loss
        (["finetune", "objective_metric=eval/loss"], "minimize"),  # a loss is minimised, whatever the task
        (["finetune", "task=sft", "objective_metric=eval/bits_per_byte"], "minimize"),
        (["finetune", "objective_metric=eval/macro_f1"], "maximize"),
        (["pretrain", "objective_metric=eval/nsp_accuracy", "objective=mlm+nsp"], "maximize"),
    ],
)
def test_the_sweepers_direction_follows_the_stages_objective(args, want):
    assert _direction(*args) == want


def test_a_direction_against_the_objective_and_a_stage_without_one_are_refused(tmp_path):
    result = CliRunner().invoke(
        app, ["finetune", "hydra/sweeper=optuna", "hydra.sweeper.direction=minimize", "--cfg", "hydra"]
    )
    assert result.exit_code == 2 and "would optimise eval/macro_f1 the wrong way" in result.stderr
    result = CliRunner().invoke(
        app, ["generate", "-m", "hydra/sweeper=optuna", "ckpt=x", "prompt=hi", f"output_root={tmp_path}"]
    )
    assert result.exit_code == 2 and "returns no objective" in result.stderr
    result = CliRunner().invoke(
        app, ["finetune", "objective_metric=eval/odd", "hydra/sweeper=optuna", "--cfg", "hydra"]
    )
    assert result.exit_code == 2 and "set objective_mode=min or objective_mode=max" in result.stderr


def test_an_optuna_sweep_of_a_fine_tune_finds_the_better_end(bases, reviews, tmp_path):
    """Zero training steps (a random head) against 60: a sweep that maximises accuracy must pick 60 (one that
    minimised it, as the sweeper's default did, picked 0)."""
    args = [a for a in cls_args(bases, reviews, tmp_path, "name=sweep") if not a.startswith("train.max_steps")]
    out = run_cli(
        "finetune",
        "-m",
        *args,
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "train.max_steps=choice(0,60)",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (results,) = (tmp_path / ".sweeps").rglob("optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert best["best_params"] == {"train.max_steps": 60}
    assert best["best_value"] > 0.15  # macro F1 over 5 classes; always one class scores 0.07


def test_an_interrupted_optuna_sweep_continues_its_study_and_runs_only_the_missing_trials(corpus, tmp_path):
    """The study lives in SQLite under the store: the same command again (here asking for 3 trials after 1 ran)
    continues it — 2 more jobs, the same sweep folder, one sweep of 3 trials for `llmctl ckpt sweep` — and a third
    start with nothing left runs no job."""
    import optuna
    from conftest import run_inprocess, tiny

    from llmctl.core import sweeps
    from llmctl.core.store import Store

    def sweep(trials: int):
        args = tiny("clm", corpus, tmp_path, "name=opt", "train.max_steps=2", "train.eval_every=0")
        return run_inprocess(
            "pretrain",
            "-m",
            *args,
            "hydra/sweeper=optuna",
            f"hydra.sweeper.n_trials={trials}",
            "hydra.sweeper.n_jobs=1",
            "train.lr=interval(1e-4,1e-3)",
        )

    store = Store(tmp_path)
    assert sweep(1)[0] == 0 and store.versions("pretrain", "opt") == [1]
    assert sweep(3)[0] == 0 and store.versions("pretrain", "opt") == [1, 2, 3]  # 2 more, not 3
    assert sweep(3)[0] == 0 and store.versions("pretrain", "opt") == [1, 2, 3]  # done: none
    ids = {store.resolve(f"pretrain/opt@v{v}").manifest["sweep"]["id"] for v in (1, 2, 3)}
    (study,) = ids
    key, rows = sweeps.trials(store, study)
    assert [r["trial"] for r in rows] == [0, 1, 2] and len({r["overrides"]["train.lr"] for r in rows}) == 3
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / '.sweeps' / 'optuna.db'}")
    assert len(loaded.trials) == 3 and loaded.direction == optuna.study.StudyDirection.MINIMIZE


def test_a_prune_sweep_of_accuracy_and_size_is_a_multi_objective_study_with_its_pareto_front(bases, reviews, tmp_path):
    """objectives=[eval/accuracy,cost/parameters]: Optuna gets a two-direction study (accuracy up, parameters
    down) and each job's two values; every version records them; `llmctl ckpt sweep` marks exactly the trials
    no other beats on both, writes front.yaml / front.png, and @best refuses to pick one of them."""
    import optuna
    from conftest import run_inprocess

    from llmctl.core.store import Store

    code, err = run_inprocess("finetune", *cls_args(bases, reviews, tmp_path, "name=c"))
    assert code == 0, err
    code, err = run_inprocess(
        "prune",
        "-m",
        "init_from=finetune/c",
        "name=p",
        "method=structured",
        "precision=fp32",
        f"output_root={tmp_path}",
        "cost.runs=2",
        "cost.warmup=1",
        "cost.throughput_runs=1",
        "cost.seq_len=16",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        "prune.heads=1",
        "prune.ffn=choice(0.25,0.5,0.75)",
        "objectives=[eval/accuracy,cost/parameters]",
    )
    assert code == 0, err
    store = Store(tmp_path)
    manifests = [store.resolve(f"prune/p@v{v}").manifest for v in store.versions("prune", "p")]
    assert len(manifests) == 3
    for m in manifests:
        assert [o["metric"] for o in m["objectives"]] == ["eval/accuracy", "cost/parameters"]
        assert m["objectives"][1]["value"] == m["compare"]["after"]["cost"]["parameters"]
        assert m["objectives"][0]["value"] == m["metrics"]["eval/accuracy"]
    by_amount = sorted(manifests, key=lambda m: m["prune"]["ffn"])
    assert [m["objectives"][1]["value"] for m in by_amount] == sorted(
        (m["objectives"][1]["value"] for m in by_amount), reverse=True
    )  # more cut, fewer parameters
    (study,) = {m["sweep"]["id"] for m in manifests}
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / '.sweeps' / 'optuna.db'}")
    assert loaded.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert sorted(tuple(t.values) for t in loaded.trials) == sorted(
        tuple(o["value"] for o in m["objectives"]) for m in manifests
    )

    out = run_cli("ckpt", "sweep", study, "--output-root", str(tmp_path))
    assert out.returncode == 0, out.stderr
    points = {
        f"prune/p@v{v:03d}": (m["objectives"][0]["value"], m["objectives"][1]["value"])
        for v, m in zip(store.versions("prune", "p"), manifests, strict=True)
    }
    on_front = {  # by definition: no other trial at least as accurate and as small, and better in one
        ref
        for ref, (acc, n) in points.items()
        if not any(a >= acc and k <= n and (a > acc or k < n) for other, (a, k) in points.items() if other != ref)
    }
    front = yaml.safe_load((tmp_path / ".sweeps" / study / "front.yaml").read_text())
    assert {t["ref"] for t in front["front"]} == on_front
    assert front["objectives"] == {"eval/accuracy": "maximize", "cost/parameters": "minimize"}
    assert (tmp_path / ".sweeps" / study / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front" in out.stdout and all(ref in out.stdout for ref in on_front)

    refused = run_cli("eval", "ckpt=prune/p@best", f"output_root={tmp_path}")
    assert refused.returncode == 2 and "Pareto front" in refused.stderr, refused.stderr
