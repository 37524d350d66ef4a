"""Device selection, the torchrun launch (one GPU per rank, one torchrun per sweep job) and the precision a
quantized model runs under."""

import contextlib
import json

import pytest
import torch
from conftest import tiny

from llmctl.core.device import Runtime, device_spec, torchrun_command
from llmctl.core.errors import LlmctlError


@pytest.mark.parametrize(
    "cfg, world, rank, visible, expected",
    [
        ("cpu", 1, 0, None, "cpu"),
        ("auto", 1, 0, None, "cuda:0"),
        ("cuda", 2, 1, None, "cuda:1"),  # under torchrun: the GPU of LOCAL_RANK
        ("cuda:3", 1, 0, None, "cuda:3"),  # one process: the named GPU
        ([2, 3], 2, 1, None, "cuda:3"),  # device=[2,3]: rank 1 takes GPU 3
        ([2, 3], 2, 1, "2,3", "cuda:1"),  # ... which is cuda:1 once CUDA_VISIBLE_DEVICES=2,3
    ],
)
def test_each_rank_gets_its_own_device(cfg, world, rank, visible, expected):
    assert device_spec(cfg, world_size=world, local_rank=rank, cuda=True, visible=visible) == expected


def test_one_named_gpu_under_torchrun_is_refused():
    with pytest.raises(LlmctlError, match="device=cuda:1 names one GPU, but torchrun started 2 processes"):
        device_spec("cuda:1", world_size=2, local_rank=0, cuda=True, visible=None)
    with pytest.raises(LlmctlError, match="no usable GPU"):
        device_spec("cuda", world_size=1, local_rank=0, cuda=False, visible=None)
    assert device_spec("auto", world_size=1, local_rank=0, cuda=False, visible=None) == "cpu"


def test_a_sweep_over_gpus_starts_one_torchrun_per_job_with_that_jobs_values(corpus, tmp_path, monkeypatch):
    import subprocess

    from conftest import run_inprocess

    calls = []

    def fake_call(cmd, env):
        calls.append((cmd, env["CUDA_VISIBLE_DEVICES"]))
        with open(env["LLMCTL_RESULT_FILE"], "w") as fh:
            json.dump({"ref": "pretrain/x@v001", "objective": 1.0}, fh)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    (tmp_path / "conf" / "conf").mkdir(parents=True)
    code, err = run_inprocess(
        "pretrain",
        "-m",
        "--config-dir",
        str(tmp_path / "conf"),
        *tiny("clm", corpus, tmp_path, "device=[0,1]", "train.lr=3e-4,1e-3"),
    )
    assert code == 0, err
    assert len(calls) == 2  # one torchrun per job, not the whole sweep inside each
    for (cmd, visible), lr in zip(calls, ("0.0003", "0.001")):
        assert visible == "0,1" and "--nproc-per-node=2" in cmd and "-m" in cmd[: cmd.index("llmctl")]
        rest = cmd[cmd.index("llmctl") + 1 :]
        assert rest[0] == "pretrain" and "-m" not in rest and "--multirun" not in rest
        assert [a for a in rest if a.startswith("train.lr=")] == [f"train.lr={lr}"]
        assert "device=[0,1]" in rest and rest[rest.index("--config-dir") + 1] == str(tmp_path / "conf")


def test_torchrun_command_runs_llmctl_on_every_gpu():
    cmd = torchrun_command("finetune", [0, 1, 2], ["task=ner"], [])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        "-m",
        "llmctl",
        "finetune",
        "task=ner",
    ]


def test_parallel_sweep_jobs_each_take_their_own_gpu():
    from llmctl.core.device import parallel_job_device

    assert [parallel_job_device("auto", "joblib", n, 4) for n in range(6)] == [f"cuda:{n % 4}" for n in range(6)]
    assert parallel_job_device("cuda", "joblib", 3, 2) == "cuda:1"
    assert parallel_job_device("cuda:1", "joblib", 0, 4) == "cuda:1"  # a GPU named by the user is kept
    assert parallel_job_device("cpu", "joblib", 1, 4) == "cpu"
    assert parallel_job_device("auto", "basic", 1, 4) == "auto"  # jobs one after another share nothing
    assert parallel_job_device("auto", "joblib", 1, 1) == "auto"  # one GPU (or none): nothing to spread


def test_auto_precision_runs_a_model_of_quantized_kernels_in_fp32_around_them():
    """precision=auto on a bf16 CPU: a model whose layers run llmctl's quantized kernels (which compute in bf16
    themselves) runs in fp32 around them in generate / serve; a float model, or an explicit bf16, keeps bf16."""
    cpu = torch.device("cpu")
    auto = Runtime(device=cpu, precision="bf16", reason="auto: CPU has native bf16 (AVX512-BF16/AMX)", auto=True)
    quantized, plain = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    quantized.llmctl_own_activations = "bfloat16"
    chosen = auto.for_model(quantized)
    assert chosen.precision == "fp32" and "compute in bfloat16 themselves" in chosen.reason
    assert isinstance(chosen.autocast(), contextlib.nullcontext) and chosen.device == cpu
    assert auto.for_model(plain) is auto
    asked = Runtime(device=cpu, precision="bf16", reason="requested")
    assert asked.for_model(quantized) is asked
