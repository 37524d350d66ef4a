"""The training loop: resume continues the same loss curve; DDP under torchrun writes one checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, metrics_log, run_cli, tiny

from llmctl.core.store import Store


def _losses(log):
    return {r["step"]: r["loss"] for r in log if "loss" in r}


def test_sigterm_then_resume_auto_continues_the_same_curve(corpus, tmp_path):
    steps = "train.max_steps=200"
    ref = run_cli("pretrain", *tiny("clm", corpus, tmp_path / "a", "name=r", steps, "train.eval_every=0"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    straight = _losses(metrics_log(Store(tmp_path / "a").resolve("pretrain/r").path))

    args = [sys.executable, "-m", "llmctl", "pretrain", *tiny("clm", corpus, tmp_path / "b", "name=r", steps, "train.eval_every=0")]
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
    stopped_at = max(_losses(metrics_log(next(runs.iterdir()))))
    assert stopped_at < 200

    resumed = run_cli("pretrain", *tiny("clm", corpus, tmp_path / "b", "name=r", steps, "train.eval_every=0", "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from" in resumed.stdout
    curve = _losses(metrics_log(Store(tmp_path / "b").resolve("pretrain/r").path))
    assert sorted(curve) == sorted(straight)
    for step in straight:
        assert curve[step] == pytest.approx(straight[step], abs=1e-4), step


def test_torchrun_two_processes_on_cpu_write_one_checkpoint(corpus, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llmctl", "pretrain",
           *tiny("clm", corpus, tmp_path, "name=ddp", "train.max_steps=6", "device=cpu")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    store = Store(tmp_path)
    assert store.versions("pretrain", "ddp") == [1]
    m = store.resolve("pretrain/ddp").manifest
    assert m["runtime"]["world_size"] == 2
    assert m["metrics"]["train/tokens"] == 6 * 8 * 2 * 32  # steps × per-rank batch × ranks × tokens
