"""The training loop: resume continues the same run (loss curve, best checkpoint, patience); the
best-keeper's rules; DDP under torchrun on 2 CPU processes (gloo) agrees, synchronises and splits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cls_args, metrics_log, run_cli, run_inprocess, stop_at, tiny

from llmctl.core.device import Runtime
from llmctl.core.store import Store, weights_sha256
from llmctl.core.train import BestKeeper, Trainer

VOLATILE = ("train/wall_s", "train/tokens_per_s", "train/steps_this_run")  # timings and per-process counts


def _losses(log):
    return {r["step"]: r["loss"] for r in log if "loss" in r}


def _run_folder(runs: Path) -> Path:
    return next(
        p for p in runs.iterdir() if p.is_dir() and not p.name.endswith(".state") and not p.name.startswith(".")
    )


def test_sigterm_then_resume_auto_continues_the_same_curve(corpus, tmp_path):
    steps = "train.max_steps=200"
    ref = run_cli("pretrain", *tiny("clm", corpus, tmp_path / "a", "name=r", steps, "train.eval_every=0"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    straight = _losses(metrics_log(Store(tmp_path / "a").resolve("pretrain/r").path))

    args = [
        sys.executable,
        "-m",
        "llmctl",
        "pretrain",
        *tiny("clm", corpus, tmp_path / "b", "name=r", steps, "train.eval_every=0"),
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "b" / "pretrain" / "r" / ".runs"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training has logged a few steps, then stop it like a scheduler would
        logs = list(runs.glob("*/metrics.jsonl")) if runs.exists() else []
        if logs and len(logs[0].read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "resume=auto" in err
    assert Store(tmp_path / "b").versions("pretrain", "r") == []  # nothing published
    stopped_at = max(_losses(metrics_log(_run_folder(runs))))
    assert stopped_at < 200

    resumed = run_cli(
        "pretrain", *tiny("clm", corpus, tmp_path / "b", "name=r", steps, "train.eval_every=0", "resume=auto")
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    curve = _losses(metrics_log(Store(tmp_path / "b").resolve("pretrain/r").path))
    assert sorted(curve) == sorted(straight)
    for step in straight:
        assert curve[step] == pytest.approx(straight[step], abs=1e-4), step
    assert not list(runs.glob("*.state"))  # the resumable state is gone once the version is published


def test_resume_keeps_the_best_checkpoint_and_the_patience_count(bases, reviews, tmp_path, monkeypatch):
    # Selecting the *highest* validation loss makes an early evaluation the best and later ones worse,
    # so the run stops early and restores weights older than its last step. Stopped just after that
    # best evaluation and resumed, it must publish the same weights and metrics and stop at the same
    # step. (Before the fix, the first evaluation after a resume counted as best and the patience
    # count started again.)
    args = cls_args(
        bases,
        reviews,
        tmp_path,
        "name=b",
        "train.max_steps=60",
        "train.eval_every=5",
        "patience=3",
        "train.warmup_ratio=0",
        "train.lr=3e-3",
        "objective_metric=eval/loss",
        "objective_mode=max",
    )
    assert run_inprocess("finetune", *args, "output_root=" + str(tmp_path / "straight"))[0] == 0
    straight = Store(tmp_path / "straight").resolve("finetune/b")
    best, last = straight.manifest["metrics"]["train/best_step"], straight.manifest["metrics"]["train/steps"]
    assert best < last < 60  # the best is not the last, and early stopping ended the run

    stop_at(monkeypatch, best + 1)  # interrupted right after the best evaluation
    code, err = run_inprocess("finetune", *args, "output_root=" + str(tmp_path / "stopped"))
    assert code == 143 and "resume=auto" in err
    monkeypatch.undo()
    code, err = run_inprocess("finetune", *args, "output_root=" + str(tmp_path / "stopped"), "resume=auto")
    assert code == 0, err
    resumed = Store(tmp_path / "stopped").resolve("finetune/b")
    assert weights_sha256(resumed.path) == weights_sha256(straight.path)
    a = {k: v for k, v in straight.manifest["metrics"].items() if k not in VOLATILE}
    b = {k: v for k, v in resumed.manifest["metrics"].items() if k not in VOLATILE}
    assert a == b


def _keeper(tmp_path, mode="min", patience=2):
    from safetensors.torch import load_model, save_model

    return BestKeeper(
        "eval/loss",
        mode,
        patience,
        tmp_path / "best.safetensors",
        Runtime(device=None, precision="fp32", reason=""),
        save=lambda model, path: save_model(model, str(path)),
        load=lambda model, path: load_model(model, str(path)),
    )


def test_best_keeper_ties_go_to_later_weights_and_nan_never_wins(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    keeper = _keeper(tmp_path)
    assert keeper.update(0, 2.0, {"eval/loss": 2.0}, model) and keeper.step == 0
    assert keeper.update(5, 2.0, {"eval/loss": 2.0}, model) and keeper.step == 5  # a tie: the longer-trained weights
    assert not keeper.update(10, float("nan"), {}, model) and keeper.step == 5
    assert not keeper.should_stop
    assert not keeper.update(15, 3.0, {}, model) and keeper.should_stop  # two evaluations without improvement
    state = keeper.state_dict()
    again = _keeper(tmp_path)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.state_dict() == state


# ---------------------------------------------------------------------------------------------
# DDP on 2 CPU processes (gloo)
# ---------------------------------------------------------------------------------------------
def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def test_ddp_ranks_stay_in_sync_see_different_batches_and_draw_different_masks(tmp_path):
    out = _torchrun(str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["initial"] == ranks[1]["initial"]  # the same starting weights on both ranks
    assert ranks[0]["final"] == ranks[1]["final"] != ranks[0]["initial"]  # gradients synchronised: trained, and equal
    for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert not set(a) & set(b)  # within every step the ranks read different examples
    assert ranks[0]["draws"] != ranks[1]["draws"]  # masking and dropout draw from per-rank streams
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the logged loss is agreed (averaged over ranks)


def test_ddp_ranks_stop_together_when_one_is_signalled(tmp_path):
    out = _torchrun(
        str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path), "stop", timeout=180
    )  # a hang fails by timeout
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stopped_at"] == ranks[1]["stopped_at"] == 3  # rank 0 was never signalled, yet stops with rank 1
    assert {p.name for p in (tmp_path / "run.state").iterdir()} >= {
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
        "trainer_state.json",
    }


def test_torchrun_two_processes_on_cpu_write_one_checkpoint(corpus, tmp_path):
    out = _torchrun(
        "-m", "llmctl", "pretrain", *tiny("clm", corpus, tmp_path, "name=ddp", "train.max_steps=6", "device=cpu")
    )
    assert out.returncode == 0, out.stderr[-3000:]
    store = Store(tmp_path)
    assert store.versions("pretrain", "ddp") == [1]
    m = store.resolve("pretrain/ddp").manifest
    assert m["runtime"]["world_size"] == 2
    assert m["metrics"]["train/tokens"] == 6 * 8 * 2 * 32  # steps × per-rank batch × ranks × tokens


def test_torchrun_trains_distill_prune_recovery_and_qat_on_two_processes(bases, reviews, tmp_path):
    """Every training stage runs under torchrun: each publishes one version trained by 2 processes over the
    steps asked, judged by rank 0 alone (its before / after both measured, none while another rank timed)."""
    code, err = run_inprocess("finetune", *cls_args(bases, reviews, tmp_path, "name=c", "train.max_steps=40"))
    assert code == 0, err
    common = ("device=cpu", "precision=fp32", f"output_root={tmp_path}", "train.max_steps=6", "train.batch_size=4")
    common += ("train.eval_every=3", "cost.runs=2", "cost.warmup=1", "cost.throughput_runs=1", "cost.seq_len=16")
    for stage, args in (
        ("distill", ["teacher=finetune/c", "student.num_layers=1", "name=d"]),
        ("prune", ["init_from=finetune/c", "method=structured", "prune.heads=1", "recover=true", "name=p"]),
        ("quantize", ["init_from=finetune/c", "method=qat", "name=q"]),
    ):
        out = _torchrun("-m", "llmctl", stage, *args, *common)
        assert out.returncode == 0, out.stderr[-3000:]
        m = Store(tmp_path).resolve(f"{stage}/{args[-1].split('=')[1]}").manifest
        assert m["runtime"]["world_size"] == 2 and m["metrics"]["train/steps"] == 6, stage
        before, after = m["compare"].values()
        assert before["primary"]["value"] is not None and after["cost"]["latency_ms_p50"] > 0, stage


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_finetune_restores_a_best_step_that_is_not_the_last(strategy, bases, reviews, tmp_path):
    # every rank must restore the same best weights (rank 0 writes them; the others wait, then load; under FSDP
    # the best is gathered whole to be written and scattered back into every rank's shards)
    args = cls_args(
        bases,
        reviews,
        tmp_path,
        "name=d",
        "train.max_steps=12",
        "train.eval_every=4",
        "patience=0",
        "device=cpu",
        "train.warmup_ratio=0",
        "train.lr=3e-3",
        "objective_metric=eval/loss",
        "objective_mode=max",
        f"strategy={strategy}",
    )
    out = _torchrun("-m", "llmctl", "finetune", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    res = Store(tmp_path).resolve("finetune/d")
    m = res.manifest["metrics"]
    assert res.manifest["runtime"]["world_size"] == 2 and m["train/best_step"] < m["train/steps"] == 12
    at_best = next(r for r in metrics_log(res.path) if "eval/loss" in r and r["step"] == m["train/best_step"])
    assert m["eval/loss"] == pytest.approx(at_best["eval/loss"])  # the published model is the best step's
    # and the published weights are that step's: re-evaluated from the checkpoint and its task record alone
    import torch

    from llmctl.core.data import load_data
    from llmctl.core.loading import load_checkpoint
    from llmctl.core.tasks import prepare, record_data_config

    loaded = load_checkpoint(Store(tmp_path), "finetune/d")
    data = load_data(record_data_config(loaded.task), task="classification")
    task = prepare("classification", data, loaded.tokenizer, max_seq_len=loaded.task["max_seq_len"], batch_size=8)
    with torch.no_grad():
        again = task.evaluate(loaded.model.eval())
    assert again["eval/loss"] == pytest.approx(at_best["eval/loss"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# FSDP2 on 2 CPU processes (gloo)
# ---------------------------------------------------------------------------------------------
NO_DROPOUT = ("++model.config.resid_pdrop=0", "++model.config.embd_pdrop=0", "++model.config.attn_pdrop=0")


def test_fsdp_on_two_processes_follows_one_process_and_resumes_where_it_stopped(corpus, tmp_path):
    """strategy=fsdp: 2 processes with half the batch each follow the one-process loss curve (dropout off, so the
    only difference is the order of float sums), publish one HF checkpoint gathered whole, and a run stopped by
    a signal saves each rank's shards and, resumed, ends on exactly the weights of a run never stopped."""
    import torch
    from transformers import AutoModelForCausalLM

    def args(name, *extra):
        return tiny(
            "clm",
            corpus,
            tmp_path,
            f"name={name}",
            "device=cpu",
            "train.eval_every=0",
            *NO_DROPOUT,
            *extra,
            "train.eval_batches=null",
        )

    # states saved right after evaluations (every 5 steps): the root unit then holds its parameters whole
    long = ("train.max_steps=40", "train.batch_size=4", "strategy=fsdp", "train.save_every=5", "train.eval_every=5")
    code, err = run_inprocess(
        "pretrain", *args("one", "train.max_steps=40", "train.batch_size=8", "train.eval_every=5")
    )
    assert code == 0, err
    out = _torchrun("-m", "llmctl", "pretrain", *args("straight", *long))
    assert out.returncode == 0, out.stderr[-3000:]
    store = Store(tmp_path)
    one, sharded = store.resolve("pretrain/one"), store.resolve("pretrain/straight")
    assert sharded.manifest["runtime"]["world_size"] == 2 and sharded.manifest["runtime"]["strategy"] == "fsdp"
    losses = [[r["loss"] for r in metrics_log(res.path) if "loss" in r] for res in (one, sharded)]
    assert len(losses[0]) == len(losses[1]) == 40 and losses[0][-1] < losses[0][0] - 0.5  # it learned
    assert losses[1] == pytest.approx(losses[0], abs=1e-3)
    assert sharded.manifest["metrics"]["eval/loss"] == pytest.approx(one.manifest["metrics"]["eval/loss"], abs=1e-3)
    a = AutoModelForCausalLM.from_pretrained(one.path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sharded.path).state_dict()  # the whole model, as one process saves it
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "llmctl", "pretrain", *args("stopped", *long)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    runs = tmp_path / "pretrain" / "stopped"
    deadline = time.time() + 240
    while not list(runs.rglob("trainer_state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the agent and both workers, as a scheduler's stop does
    _, err = proc.communicate(timeout=240)
    assert "resume=auto" in err.decode(), err.decode()[-3000:]
    (state,) = [p.parent for p in runs.rglob("trainer_state.json")]
    assert {p.name for p in state.iterdir()} >= {"model-rank0.safetensors", "model-rank1.safetensors"}
    stopped_at = json.loads((state / "trainer_state.json").read_text())["step"]
    assert 0 < stopped_at < 40
    out = _torchrun("-m", "llmctl", "pretrain", *args("stopped", *long), "resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = store.resolve("pretrain/stopped")
    assert resumed.manifest["resumed"]["from_step"] == stopped_at
    assert weights_sha256(resumed.path) == weights_sha256(store.resolve("pretrain/straight").path)


def test_submitit_tasks_form_one_process_group_and_a_requeued_job_resumes_its_run(corpus, tmp_path):
    """hydra/launcher=submitit_local with 2 tasks (Slurm's path without Slurm): the tasks become ranks 0 and 1 of
    one run; the time-limit warning (USR2, sent here as submitit's local executor and Slurm send it) saves the
    state, submitit requeues the job, and the requeued job continues that run to the end: one version."""
    args = tiny("clm", corpus, tmp_path, "name=s", "device=cpu", "train.eval_every=0", "train.log_every=50")
    args += ["train.max_steps=300", "train.batch_size=4", "train.save_every=5"]
    cmd = [sys.executable, "-m", "llmctl", "pretrain", "-m", *args]
    cmd += ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(tmp_path.rglob("trainer_state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    tasks = subprocess.run(["pgrep", "-f", f"submitit.core._submit {tmp_path}"], capture_output=True, text=True)
    assert len(tasks.stdout.split()) == 2, tasks
    for pid in tasks.stdout.split():
        os.kill(int(pid), signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    store = Store(tmp_path)
    assert store.versions("pretrain", "s") == [1]
    m = store.resolve("pretrain/s").manifest
    assert m["runtime"]["world_size"] == 2 and m["metrics"]["train/steps"] == 300
    assert 0 < m["resumed"]["from_step"] < 300  # stopped by the warning, continued by the requeued job
    logs = "".join(p.read_text() for p in tmp_path.rglob("*_0_log.out"))
    assert "Requeued job" in logs and "requeued scheduler job" in logs


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-base"])  # (bert-tiny sets 0.98 for its lr of 3e-3)
def test_the_default_pretraining_optimizer_is_the_hf_trainers(preset, tmp_path):
    """What a user leaves unset in `llmctl pretrain` (AdamW betas and eps, which tensors decay) is what the
    HF Trainer uses, so the two compared at equal lr / schedule / weight decay run the same optimizer.
    The root cause of the loss gap against the Trainer: pretrain's betas were (0.9, 0.98), 0.017 nats
    worse at 300 steps (GPT 4 × 256, KJV by book, 3 seeds each: 4.559 vs 4.542; the Trainer 4.546)."""
    import torch
    from hydra import compose, initialize_config_dir
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, TrainingArguments
    from transformers import Trainer as HFTrainer

    from llmctl.core.config import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(config_name="pretrain", overrides=[f"conf={preset}"])
    torch.manual_seed(0)
    model = (
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
        if preset.startswith("gpt")
        else BertForMaskedLM(
            BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        )
    )
    ours = Trainer(
        model,
        train_data=[{"input_ids": torch.zeros(4, dtype=torch.long)}] * int(cfg.train.batch_size),
        collate=None,
        cfg=cfg.train,
        rt=Runtime(device=torch.device("cpu"), precision="fp32", reason="test"),
        run_dir=tmp_path,
        state_dir=tmp_path / "state",
        seed=0,
    ).optimizer
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        learning_rate=float(cfg.train.lr),
        weight_decay=float(cfg.train.weight_decay),
        use_cpu=True,
        report_to=[],
    )
    theirs = HFTrainer(model=model, args=args).create_optimizer()

    def settings(optimizer):
        return {
            id(p): (g.get("initial_lr", g["lr"]), tuple(g["betas"]), g["eps"], g["weight_decay"])
            for g in optimizer.param_groups
            for p in g["params"]
        }

    assert settings(ours) == settings(theirs)
