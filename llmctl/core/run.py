"""What every stage does around its own work: open the store, set up the runtime, start or resume
a run folder, and publish the result as a versioned checkpoint with a complete manifest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from llmctl.core.config import command_line, preset_name, to_container
from llmctl.core.errors import LlmctlError
from llmctl.core.store import Resolved, Store, check_name, weights_sha256

LIBRARIES = ("llmctl", "torch", "transformers", "tokenizers", "datasets", "safetensors", "peft", "hydra-core")


@dataclass
class StageRun:
    stage: str
    cfg: object
    store: Store
    name: str
    rt: object  # device.Runtime
    console: object  # rich Console (rank 0) or None
    run_dir: Path | None = None
    resume_state: Path | None = None
    parents: list = field(default_factory=list)

    def print(self, *args, **kwargs) -> None:
        if self.console is not None:
            self.console.print(*args, **kwargs)


def start(stage: str, cfg, default_name: str | None = None) -> StageRun:
    """Validate the shared keys, choose device and precision (printed once), seed everything.

    The checkpoint name is `name`, else `default_name`, else the chosen preset (conf=...)."""
    from rich.console import Console

    from llmctl.core.device import gpu_ids, seed_everything, setup_runtime

    quiet_libraries()
    ids = gpu_ids(cfg.device)
    if ids and len(ids) > 1 and "WORLD_SIZE" not in os.environ:
        relaunch_under_torchrun(ids)
    name = check_name(str(cfg.name or default_name or preset_name(default=stage)))
    rt = setup_runtime(cfg.device, cfg.precision)
    console = Console(highlight=False) if rt.is_main else None
    run = StageRun(stage=stage, cfg=cfg, store=Store(cfg.output_root), name=name, rt=rt, console=console)
    run.print(f"[bold]llmctl {stage}[/] → {stage}/{name} · {rt.describe()}")
    seed_everything(int(cfg.seed))
    return run


def quiet_libraries() -> None:
    """llmctl reports progress itself: silence datasets' bars and transformers' info chatter."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="Creating a tensor from a list of numpy")  # HF collators, harmless here
    transformers.utils.logging.disable_progress_bar()


def relaunch_under_torchrun(ids: list[int]) -> None:
    """device=[0,1,...]: start one process per GPU through torchrun, on exactly those GPUs."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}
    stage_and_args = sys.argv[0].split()[1:] + sys.argv[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(ids)}", "-m", "llmctl", *stage_and_args]
    raise SystemExit(subprocess.call(cmd, env=env))


def open_run_dir(run: StageRun) -> None:
    """Pick the run folder: a new one, or (resume=auto | <folder>) an interrupted one to continue."""
    from llmctl.core.device import broadcast_str

    chosen = None
    if run.rt.is_main:
        resume = run.cfg.get("resume")
        if resume == "auto":
            chosen = run.store.latest_run_dir(run.stage, run.name)
            if chosen is None:
                run.print(f"resume=auto: no interrupted run of {run.stage}/{run.name}; starting fresh")
        elif resume:
            chosen = Path(str(resume))
            if not (chosen / "state" / "trainer_state.json").is_file():
                raise LlmctlError(f"resume={resume}: no resumable state there (expected {chosen}/state/trainer_state.json); use resume=auto")
        if chosen is None:
            chosen = run.store.new_run_dir(run.stage, run.name)
    path = Path(broadcast_str(run.rt, str(chosen) if chosen else None))
    run.run_dir = path
    run.resume_state = path / "state" if (path / "state" / "trainer_state.json").is_file() else None


def resolve_objective(cfg, default: tuple[str, str]) -> tuple[str, str]:
    """(metric, mode) a run optimises: objective_metric / objective_mode from config, else the stage's default."""
    return cfg.get("objective_metric") or default[0], cfg.get("objective_mode") or default[1]


def library_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def publish(run: StageRun, model, tokenizer, *, kind: str, metrics: dict, objective: tuple[str, str],
            data: dict, task: dict, extra: dict | None = None) -> Resolved | None:
    """Save model + tokenizer into the run folder, drop the training state, and publish a version.

    `objective` is the stage's default (metric, mode), overridable by config (see `resolve_objective`).
    Only rank 0 writes. Returns the new version (None on other ranks).
    """
    from llmctl.core.models import count_parameters

    if not run.rt.is_main:
        return None
    folder = run.run_dir
    shutil.rmtree(folder / "state", ignore_errors=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    metric, mode = resolve_objective(run.cfg, objective)
    total, trainable = count_parameters(model)
    manifest = {
        "kind": kind,
        "parents": run.parents,
        "task": task,
        "metrics": metrics,
        "objective": {"metric": metric, "mode": mode, "value": metrics.get(metric)},
        "model": {"family": getattr(model.config, "model_type", None), "architecture": type(model).__name__,
                  "parameters": total, "trainable_parameters": trainable},
        "data": data,
        "runtime": run.rt.record(),
        "weights_sha256": weights_sha256(folder),
        "command": command_line(),
        "config": to_container(run.cfg),
        "libraries": library_versions(),
        **(extra or {}),
    }
    return run.store.publish(folder, run.stage, run.name, manifest)
