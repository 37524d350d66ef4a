"""`llmctl pretrain` end to end on tiny models: losses fall, checkpoints reload, lineage, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import metrics_log, run_cli, run_inprocess, tiny
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer

from llmctl.core.store import Store


@pytest.mark.parametrize(
    "objective, auto_cls, kind",
    [
        ("clm", AutoModelForCausalLM, "causal-lm"),
        ("mlm", AutoModelForMaskedLM, "mlm"),
        ("mlm+nsp", AutoModelForPreTraining, "pretraining"),
    ],
)
def test_pretrain_learns_and_writes_a_plain_hf_checkpoint(corpus, tmp_path, objective, auto_cls, kind):
    code, err = run_inprocess(
        "pretrain", *tiny(objective, corpus, tmp_path, "name=t", "train.max_steps=30", "train.lr=3e-3")
    )
    assert code == 0, err
    res = Store(tmp_path).resolve("pretrain/t")
    m = res.manifest
    assert m["kind"] == kind and m["ref"] == "pretrain/t@v001"
    log = metrics_log(res.path)
    evals = [r["eval/loss"] for r in log if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.3, evals  # validation loss falls (about 5.7 → 5.2 in 30 steps)
    assert m["metrics"]["eval/loss"] == pytest.approx(evals[-1])
    assert m["metrics"]["eval/perplexity"] == pytest.approx(torch.tensor(evals[-1]).exp().item(), rel=1e-4)
    for key in ("created", "command", "config", "libraries", "data", "weights_sha256", "runtime", "objective"):
        assert key in m
    assert m["config"]["train"]["max_steps"] == 30 and m["data"]["fingerprint"]
    assert m["runtime"]["precision"] == "fp32"
    assert list((res.path / "tb").glob("events.out.tfevents.*"))  # TensorBoard events
    assert not (res.path / "state").exists()  # the resumable state is dropped once published
    # plain transformers opens it
    model, tok = auto_cls.from_pretrained(res.path), AutoTokenizer.from_pretrained(res.path)
    with torch.no_grad():
        out = model(**tok("the central bank raised rates", return_tensors="pt"))
    assert torch.isfinite(out.logits if hasattr(out, "logits") else out.prediction_logits).all()


def test_init_from_records_the_parent_and_starts_from_its_weights(corpus, tmp_path):
    assert run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=base"))[0] == 0
    code, err = run_inprocess(
        "pretrain", *tiny("clm", corpus, tmp_path, "name=child", "init_from=pretrain/base", "train.max_steps=4")
    )
    assert code == 0, err
    store = Store(tmp_path)
    base, child = store.resolve("pretrain/base"), store.resolve("pretrain/child")
    parent = child.manifest["parents"][0]
    assert parent["ref"] == "pretrain/base@v001" and parent["weights_sha256"] == base.manifest["weights_sha256"]
    first_eval_child = metrics_log(child.path)[0]["eval/loss"]
    assert first_eval_child == pytest.approx(base.manifest["metrics"]["eval/loss"], abs=1e-4)  # same weights at step 0
    assert [r.ref for r in store.lineage("pretrain/child")] == ["pretrain/child@v001", "pretrain/base@v001"]


def test_multirun_sweep_writes_one_version_per_job_and_is_read_back_as_one_sweep(corpus, tmp_path):
    """Each job's version records its sweep and trial; `@best` of the name is the sweep's best, not an earlier run
    made another way under the same name (here a longer one, with the lowest loss of all); `llmctl ckpt sweep`
    prints the trials and writes trials.csv / best.yaml beside the sweep."""
    import csv

    import yaml
    from conftest import run_cli

    code, err = run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=sweep", "train.max_steps=40"))
    assert code == 0, err
    code, err = run_inprocess(
        "pretrain", "-m", *tiny("clm", corpus, tmp_path, "name=sweep", "train.max_steps=4", "train.lr=3e-4,1e-3")
    )
    assert code == 0, err
    store = Store(tmp_path)
    assert store.versions("pretrain", "sweep") == [1, 2, 3]
    single, *manifests = [store.resolve(f"pretrain/sweep@v{v}").manifest for v in (1, 2, 3)]
    assert {m["config"]["train"]["lr"] for m in manifests} == {3e-4, 1e-3}
    overrides = sorted(o for m in manifests for o in m["overrides"] if o.startswith("train.lr="))
    assert overrides == ["train.lr=0.0003", "train.lr=0.001"]  # each job's own value, not the sweep's list
    assert "sweep" not in single and [m["sweep"]["job"] for m in manifests] == [0, 1]
    (sweep_id,) = {m["sweep"]["id"] for m in manifests}
    losses = {v: m["objective"]["value"] for v, m in zip((2, 3), manifests)}
    assert single["objective"]["value"] < min(losses.values())  # the longer run: best of all, but no trial
    assert store.resolve("pretrain/sweep@best").ref == f"pretrain/sweep@v{min(losses, key=losses.get):03d}"

    out = run_cli("ckpt", "sweep", sweep_id, "--output-root", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "train.lr" in out.stdout and "pretrain/sweep@v002" in out.stdout and "pretrain/sweep@v001" not in out.stdout
    folder = tmp_path / ".sweeps" / sweep_id
    rows = list(csv.DictReader((folder / "trials.csv").read_text().splitlines()))
    assert [r["train.lr"] for r in rows] == ["0.0003", "0.001"] and [r["ref"] for r in rows][0].endswith("@v002")
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["ref"] == store.resolve("pretrain/sweep@best").ref and set(best["swept"]) == {"train.lr"}
    missing = run_cli("ckpt", "sweep", "no-such-sweep", "--output-root", str(tmp_path))
    assert missing.returncode == 2 and "no version" in missing.stderr and missing.stderr.count("\n") == 1
    by_ref = run_cli("ckpt", "sweep", "pretrain/sweep@v002", "--output-root", str(tmp_path))  # its version names it
    assert by_ref.returncode == 0 and by_ref.stdout == out.stdout, by_ref.stderr
    alone = run_cli("ckpt", "sweep", "pretrain/sweep@v001", "--output-root", str(tmp_path))
    assert alone.returncode == 2 and "was not made by a sweep" in alone.stderr, alone.stderr


def test_the_optuna_sweeper_logs_no_alembic_set_up_and_no_colour(corpus, tmp_path):
    out = run_cli(
        "pretrain",
        "-m",
        *tiny("clm", corpus, tmp_path, "name=opt", "train.max_steps=2", "train.eval_every=0"),
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=1",
        "train.lr=interval(1e-4,1e-3)",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "alembic" not in out.stdout + out.stderr and "\x1b[" not in out.stdout + out.stderr
    assert "Best parameters" in out.stdout + out.stderr


def test_joblib_launcher_runs_jobs_in_parallel_processes(corpus, tmp_path):
    out = run_cli(
        "pretrain",
        "-m",
        *tiny(
            "clm",
            corpus,
            tmp_path,
            "name=par",
            "train.max_steps=3",
            "train.lr=3e-4,1e-3",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
        ),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert Store(tmp_path).versions("pretrain", "par") == [1, 2]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["data.train=/no/such/file.txt"], "data.train: no such file"),
        (["init_from=pretrain/ghost"], "no checkpoint pretrain/ghost"),
        (["init_from=./not-a-folder"], "neither a checkpoint"),
        (["objective=clm"], "objective=clm needs a gpt2 or llama model"),
        (["train.scheduler=zigzag"], "train.scheduler"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path, extra, fragment):
    out_root = tmp_path / "out"
    args = tiny("mlm", corpus, out_root, *extra)
    code, err = run_inprocess("pretrain", *args)
    assert code == 2 and fragment in err and "\n" not in err
    assert not out_root.exists() or not any((out_root / "pretrain").glob("*/v*")), "nothing may be published"


def test_empty_corpus_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    out = run_cli("pretrain", "data=files", f"data.train={tmp_path / 'empty'}", f"output_root={tmp_path / 'out'}")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "empty" in out.stderr
    assert not (tmp_path / "out").exists()


def test_ckpt_commands(corpus, tmp_path):
    assert run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=c", "train.max_steps=2"))[0] == 0
    listing = run_cli("ckpt", "list", "-o", str(tmp_path))
    assert listing.returncode == 0 and "pretrain/c@v001" in listing.stdout and "causal-lm" in listing.stdout
    shown = run_cli("ckpt", "show", "pretrain/c", "-o", str(tmp_path), "--json")
    assert json.loads(shown.stdout)["ref"] == "pretrain/c@v001"
    assert run_cli("ckpt", "show", "pretrain/zzz", "-o", str(tmp_path)).returncode == 2
    assert "pretrain/c@v001" in run_cli("ckpt", "lineage", "pretrain/c", "-o", str(tmp_path)).stdout
    assert run_cli("ckpt", "rm", "pretrain/c@v1", "-o", str(tmp_path)).returncode == 0
    assert Store(tmp_path).versions("pretrain", "c") == []


def test_tokenizer_from_a_folder_that_holds_only_a_tokenizer(corpus, tmp_path):
    from llmctl.core.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [p.read_text() for p in sorted(corpus.iterdir())],
        family="gpt2",
        vocab_size=280,
        lowercase=False,
        max_len=32,
        cache_root=tmp_path / "c",
        data_fp="t",
    )
    tok.save_pretrained(tmp_path / "tok")
    code, err = run_inprocess(
        "pretrain", *tiny("clm", corpus, tmp_path, "name=t", "train.max_steps=2", f"tokenizer.from={tmp_path / 'tok'}")
    )
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(Store(tmp_path).resolve("pretrain/t").path).get_vocab() == tok.get_vocab()


def test_the_chunked_causal_loss_trains_the_model_the_hf_loss_trains(corpus, tmp_path):
    """clm_chunked_loss changes how the loss is computed, not what is learnt: same seed, same data,
    the two runs' losses agree to float rounding at every step."""
    logs = {}
    for chunked in ("true", "false"):
        code, err = run_inprocess(
            "pretrain",
            *tiny(
                "clm",
                corpus,
                tmp_path,
                f"name=c{chunked}",
                f"clm_chunked_loss={chunked}",
                "+model.config.resid_pdrop=0",
                "+model.config.embd_pdrop=0",
                "+model.config.attn_pdrop=0",
            ),
        )
        assert code == 0, err
        res = Store(tmp_path).resolve(f"pretrain/c{chunked}")
        assert res.manifest["task"]["loss"] == ("chunked" if chunked == "true" else "model")
        logs[chunked] = metrics_log(res.path)
    train = {k: [r["loss"] for r in log if "loss" in r] for k, log in logs.items()}
    evals = {k: [r["eval/loss"] for r in log if "eval/loss" in r] for k, log in logs.items()}
    assert len(train["true"]) == 16 and train["true"][-1] < train["true"][0] - 0.2  # it learns
    assert train["true"] == pytest.approx(train["false"], abs=1e-4)
    assert evals["true"] == pytest.approx(evals["false"], abs=1e-4)


def _one_file_corpus(corpus, folder, repeat: int = 1):
    """The corpus's documents as one text file, a document per line (`repeat` times over, each copy numbered)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(p.read_text().split()) for p in sorted(corpus.iterdir())]
    path = folder / "corpus.txt"
    with open(path, "w") as fh:
        for k in range(repeat):
            fh.writelines(f"{k} {line}\n" for line in lines)
    return path


def test_a_streamed_corpus_trains_on_the_fly_and_a_resume_continues_at_its_position(corpus, tmp_path, monkeypatch):
    """data.streaming=true: the corpus is read as a stream (validation held out from its start), tokenized and
    packed as training reads it; a run stopped at step 6 and resumed ends on exactly the weights of a run never
    stopped (the resumed stream skips what was already read)."""
    from conftest import stop_at

    from llmctl.core.store import weights_sha256

    text = _one_file_corpus(corpus, tmp_path / "data", repeat=3)

    def args(root, *extra):
        return tiny("clm", corpus, root, "name=s", f"data.train={text}", "data.streaming=true", *extra)

    extra = ("data.streaming_validation=20", "train.max_steps=12", "train.save_every=3", "train.eval_every=0")
    code, err = run_inprocess("pretrain", *args(tmp_path / "straight", *extra))
    assert code == 0, err
    straight = Store(tmp_path / "straight").resolve("pretrain/s")
    m = straight.manifest
    assert m["data"]["streamed"] is True and m["data"]["examples"] == {"train": "streamed", "validation": 20}
    losses = [r["loss"] for r in metrics_log(straight.path) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.1

    stop_at(monkeypatch, 6)
    code, err = run_inprocess("pretrain", *args(tmp_path / "stopped", *extra))
    assert code == 143 and "resume=auto" in err
    monkeypatch.undo()
    code, err = run_inprocess("pretrain", *args(tmp_path / "stopped", *extra), "resume=auto")
    assert code == 0, err
    resumed = Store(tmp_path / "stopped").resolve("pretrain/s")
    assert resumed.manifest["resumed"]["from_step"] in (6, 7)
    assert weights_sha256(resumed.path) == weights_sha256(straight.path)


def _peak_rss_mb(*args: str) -> float:
    """Peak resident memory (MiB) of `llmctl <args>` run alone in a fresh process."""
    probe = (
        "import resource, subprocess, sys; "
        "code = subprocess.run([sys.executable, '-m', 'llmctl', *sys.argv[1:]]).returncode; "
        "assert code == 0, code; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]) / 1024


def test_a_streamed_corpus_far_larger_than_its_run_reads_costs_no_more_memory(corpus, tmp_path):
    """Peak memory of a streamed run does not grow with the corpus: a ~200 MB corpus costs what a ~20 MB one does
    (each read 1 MiB at a time; a run that loaded them, as data.streaming=false does, would hold them whole)."""
    block = _one_file_corpus(corpus, tmp_path / "block", repeat=3).read_text()

    def corpus_of(mib: int):
        path = tmp_path / f"{mib}" / "corpus.txt"
        path.parent.mkdir()
        with open(path, "w") as fh:  # the documents again and again, each copy numbered
            for k in range(mib * 2**20 // len(block) + 1):
                fh.write(block.replace("\n", f" {k}\n"))
        return path

    def peak(path):
        return _peak_rss_mb(
            "pretrain",
            *tiny("clm", corpus, tmp_path, f"name=c{path.parent.name}", f"data.train={path}", "data.streaming=true"),
            "data.streaming_validation=20",
            "train.max_steps=4",
            "train.eval_every=0",
        )

    medium, big = corpus_of(20), corpus_of(200)
    medium_peak, big_peak = peak(medium), peak(big)
    print(
        f"peak RSS: a {medium.stat().st_size / 2**20:.0f} MiB corpus {medium_peak:.0f} MiB, "
        f"a {big.stat().st_size / 2**20:.0f} MiB corpus {big_peak:.0f} MiB"
    )
    assert big_peak < medium_peak + 40, (medium_peak, big_peak)  # 180 MB more corpus, not more memory
