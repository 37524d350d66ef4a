"""Device, precision and process-group setup from the `device` / `precision` config keys.

`precision=auto` picks bf16 autocast where the hardware computes bf16 natively (CUDA with bf16,
or a CPU with AVX512-BF16 or AMX), fp32 otherwise: on AVX2-only CPUs bf16 matmuls run ~100×
slower than fp32, while on AVX512-BF16/AMX CPUs they run 2-6× faster. The choice is printed
once and recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from llmctl.core.errors import LlmctlError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16: the autocast dtype (weights stay fp32)
    reason: str  # why this precision (printed and recorded)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # how several processes share training: ddp (whole model each) | fsdp (FSDP2, sharded)
    auto: bool = False  # precision=auto chose the precision (for_model may choose again for a quantized model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Training shards parameters, gradients and optimizer state over the processes (FSDP2)."""
        return self.distributed and self.strategy == "fsdp"

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    @contextlib.contextmanager
    def inference(self):
        """Autocast where the precision asks for it, and under it the grad mode inference runs in
        (`inference_grad_mode`)."""
        with self.autocast(), inference_grad_mode(self.device.type):
            yield

    def for_model(self, model) -> Runtime:
        """This runtime for running `model` alone (generate, serve): where precision=auto chose bf16 and the model's
        layers run llmctl's quantized CPU kernels, fp32 outside them. The kernels pick their activation dtype
        themselves (`model.llmctl_own_activations`: bf16 inside, where the CPU computes it); bf16 autocast around
        them only re-casts the activations, the attention and its KV cache at every step (SmolLM2-135M int4 on 2
        AMX cores: 25.4 against 17.7 ms a token). Runs that compare models (eval, quantize) keep one precision."""
        own = getattr(model, "llmctl_own_activations", None)
        if not (own and self.auto and self.precision != "fp32" and self.device.type == "cpu"):
            return self
        why = f"auto: the quantized layers compute in {own} themselves, autocast around them would only cast"
        return dataclasses.replace(self, precision="fp32", reason=why)

    def describe(self) -> str:
        procs = f" · {self.world_size} processes ({self.strategy.upper()})" if self.distributed else ""
        return f"device {self.device} · precision {self.precision} ({self.reason}){procs}"

    def record(self) -> dict:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "precision_reason": self.reason,
            "world_size": self.world_size,
            **({"strategy": self.strategy} if self.distributed else {}),
            "cpu_bf16": cpu_has_native_bf16(),
        }


def inference_grad_mode(device_type: str):
    """The grad mode for running a model without training it: `torch.inference_mode()` (the least work per op: no
    version counters, no view tracking; SmolLM2-135M int4 decoding on 2 AMX cores: 16.6 against 17.6 ms a token
    under no_grad), or `torch.no_grad()` where autocast is on: autocast keeps its weight casts only outside inference
    mode, so under it every forward pass re-casts every fp32 weight (bf16 decoding on the same machine: 11.8 tokens/s
    against 27.7). Enter it inside the autocast context."""
    return torch.no_grad() if torch.is_autocast_enabled(device_type) else torch.inference_mode()


def cpu_has_native_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_has_int8_dot() -> bool:
    """The CPU has int8 dot-product instructions (AVX512-VNNI / AVX-VNNI, or AMX): int8 matmuls beat fp32 there."""
    return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def scheduler_job() -> str | None:
    """The id of the scheduler job this process runs in (Slurm or submitit's local executor, through submitit; a
    requeued job keeps it), None outside one."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit

    return str(submitit.JobEnvironment().job_id)


def join_scheduler_tasks() -> None:
    """Under the submitit launcher a job runs once per task (`hydra.launcher.tasks_per_node`, `nodes`): the task's
    place (Slurm's SLURM_* variables, or the local executor's) is exported as torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK and MASTER_ADDR / MASTER_PORT (submitit's TorchDistributedEnvironment), so the tasks form one
    process group exactly as torchrun's processes do. Nothing changes outside submitit or under torchrun."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # GPU by LOCAL_RANK


def parallel_job_device(device_cfg, launcher: str | None, job_num: int, gpus: int):
    """`device` for one job of a sweep whose launcher runs jobs side by side (joblib): with device auto or cuda on
    a machine of several GPUs, each job takes its own (job number modulo the GPUs) instead of all on cuda:0; any
    other launcher or device is kept as given."""
    if launcher != "joblib" or gpus < 2 or str(device_cfg) not in ("auto", "cuda"):
        return device_cfg
    return f"cuda:{job_num % gpus}"


def gpu_ids(device_cfg) -> list[int] | None:
    """The GPU ids of a list-valued `device` ([0,1]), else None."""
    if isinstance(device_cfg, (list, tuple)) or type(device_cfg).__name__ == "ListConfig":
        return [int(x) for x in device_cfg]
    return None


def torchrun_command(stage: str, ids: list[int], overrides: list[str], config_dirs: list[str]) -> list[str]:
    """`device=[0,1,...]`: the command that runs this one job as one process per GPU under torchrun.

    It carries the job's own overrides (under -m, one sweep point), never the whole command line:
    each sweep job starts its own torchrun, which runs that job once."""
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={len(ids)}",
        "-m",
        "llmctl",
        stage,
    ]
    for folder in config_dirs:
        cmd += ["--config-dir", folder]
    return cmd + list(overrides)


def setup_runtime(device_cfg, precision_cfg: str, strategy: str = "ddp", timeout_min: float = 60) -> Runtime:
    """Resolve device and precision, and join the process group when launched by torchrun; a collective waits
    `timeout_min` minutes for the other processes (rank 0 evaluates or writes alone meanwhile) before the run
    fails (NCCL's own default, 10 minutes, is shorter than a long evaluation)."""
    import datetime

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    spec = device_spec(
        device_cfg,
        world_size=world_size,
        local_rank=local_rank,
        cuda=torch.cuda.is_available(),
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    device = torch.device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision, reason = _choose_precision(str(precision_cfg), device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=float(timeout_min))
        )
    return Runtime(
        device=device,
        precision=precision,
        reason=reason,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        strategy=str(strategy),
        auto=str(precision_cfg) == "auto",
    )


def device_spec(device_cfg, *, world_size: int, local_rank: int, cuda: bool, visible: str | None) -> str:
    """The torch device string this process uses for `device=...`.

    Under torchrun (world_size > 1) each process takes the GPU of its LOCAL_RANK, so a single named
    GPU (`cuda:1`) is refused: every rank would land on it."""
    ids = gpu_ids(device_cfg)
    spec = "cuda" if ids else str(device_cfg)
    if spec == "auto":
        spec = "cuda" if cuda else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or re.fullmatch(r"cuda:\d+", spec):
        if not cuda:
            raise LlmctlError(
                f"device={device_cfg} asks for CUDA but this machine has no usable GPU; use device=cpu or device=auto"
            )
        if spec != "cuda" and world_size > 1:
            raise LlmctlError(
                f"device={spec} names one GPU, but torchrun started {world_size} processes that would all use it; "
                f"use device=cuda (each process takes the GPU of its LOCAL_RANK) or device=[ids]"
            )
        if spec == "cuda":
            spec = f"cuda:{ids[local_rank] if ids and not visible else local_rank}"
        return spec
    raise LlmctlError(
        f"device={device_cfg!r} is not understood; use auto, cpu, cuda, cuda:N or a list of GPU ids like [0,1]"
    )


def _choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    if requested not in ("auto", *_DTYPES):
        raise LlmctlError(f"precision={requested!r} is not one of auto, fp32, bf16, fp16")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", "auto: GPU supports bf16") if bf16_ok else ("fp32", "auto: GPU lacks bf16")
        if requested == "bf16" and not bf16_ok:
            raise LlmctlError("precision=bf16: this GPU does not support bf16; use precision=fp16 or fp32")
        return requested, "requested"
    native = cpu_has_native_bf16()
    if requested == "auto":
        return (
            ("bf16", "auto: CPU has native bf16 (AVX512-BF16/AMX)")
            if native
            else ("fp32", "auto: CPU lacks native bf16")
        )
    if requested == "fp16":
        raise LlmctlError("precision=fp16 gains nothing on CPU; use precision=bf16 (native bf16 CPUs) or fp32")
    if requested == "bf16" and not native:
        return "bf16", "requested; this CPU lacks native bf16, expect it to be far slower than fp32"
    return requested, "requested"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own random stream (masking, dropout): the run's seed on rank 0, distinct on the others."""
    return seed + 1_000_003 * rank


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def all_ranks_sum(rt: Runtime, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (one small all-reduce): how ranks agree on a loss, a NaN or a stop signal."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_floats(rt: Runtime, values: list[float]) -> list[float]:
    """Rank 0's numbers on every rank (the others pass placeholders of the same length)."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    torch.distributed.broadcast(t, src=0)
    return t.tolist()


def broadcast_str(rt: Runtime, text: str | None) -> str:
    """Rank 0's string on every rank (sent as bytes in a tensor: nothing is pickled)."""
    if not rt.distributed:
        return text or ""
    data = torch.zeros(1024, dtype=torch.uint8)
    if rt.is_main:
        raw = (text or "").encode()[:1024]
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    data = data.to(rt.device)
    torch.distributed.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).rstrip(b"\0").decode()
