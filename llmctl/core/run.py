"""What every stage does around its own work: open the store, set up the runtime, start or resume
a run folder, and publish the result as a versioned checkpoint with a complete manifest.

    with start("finetune", cfg, default_name=...) as run:      # runtime chosen and printed, seeds set
        ...                                                    # load inputs (core.loading), data, task
        open_run_dir(run, identity)                            # a new run, or resume=auto / <folder>
        ...                                                    # train (core.train / core.finetuning)
        result = publish(run, model, tokenizer, ...)           # vNNN appears whole; state removed after

A run folder is locked by the live process that owns it (so `resume=auto` never takes over a sweep
job's run) and its resumable state records what it was training (`identity`: data fingerprint,
world size, model, tokenizer, task), so a resume with anything else is refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from llmctl.core.config import command_line, job_overrides, preset_name, sweep_record, to_container
from llmctl.core.device import broadcast_str, scheduler_job, seed_everything, setup_runtime
from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.cost import MODES, cost_settings, measure_cost
from llmctl.core.files import disk_space
from llmctl.core.loading import artifact_record
from llmctl.core.manifest import read_manifest
from llmctl.core.models import count_parameters, weight_bytes
from llmctl.core.store import (
    TRAINER_STATE,
    Resolved,
    RunLock,
    Store,
    check_name,
    parse_ref,
    read_state,
    state_dir,
    weights_sha256,
)
from llmctl.core.tokenizer import tokenizer_hash

LIBRARIES = ("llmctl", "torch", "transformers", "tokenizers", "datasets", "safetensors", "peft", "hydra-core")
_FAILED = "\x00failed:"  # what rank 0 broadcasts instead of a run folder when it refuses the run
RESULT_FILE_ENV = (
    "LLMCTL_RESULT_FILE"  # set by a parent that started this run under torchrun: where to report the result
)
IDENTITY_WORDS = {
    "stage": "another stage",
    "task": "another task",
    "data_fingerprint": "other data",
    "world_size": "another number of processes",
    "model": "another model",
    "tokenizer": "another tokenizer",
}
# What a resume may change (recorded in the manifest's `resumed`): the length of the run (the schedule is
# recomputed for the new max_steps, as the HF Trainer does), how often it logs / evaluates / saves, where
# it runs. Everything else in the config must be what the interrupted run had; data, model and tokenizer
# are compared by their fingerprints / hashes instead of their config keys.
RESUME_ADJUSTABLE = (
    "train.max_steps",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.save_every",
    "train.num_workers",
    "dist_timeout_min",
    "patience",
    "sft.num_samples",
    "sft.max_new_tokens",
    "device",
    "output_root",
    "resume",
    "name",
)
RESUME_BY_HASH = ("data.", "model.", "tokenizer.", "init_from", "hydra.")


@dataclass
class StageRun:
    stage: str
    cfg: object
    store: Store
    name: str
    rt: object  # device.Runtime
    console: object  # rich Console (rank 0) or None
    run_dir: Path | None = None
    state_dir: Path | None = None  # where the resumable state is saved (beside run_dir)
    resume_state: Path | None = None  # the state to continue from, when resuming
    parents: list = field(default_factory=list)
    identity: dict = field(default_factory=dict)  # what this run trains (saved with its state, checked on resume)
    lock: RunLock | None = None
    resumed: dict | None = None  # set when continuing an interrupted run: which run, and the settings it changed
    title: str = ""  # the stage's first line, before its device and precision (`announce`)
    announced: bool = False

    def print(self, *args, **kwargs) -> None:
        if self.console is not None:
            self.console.print(*args, **kwargs)

    def announce(self) -> None:
        """Print the stage's header line: its title, device and precision (once)."""
        if not self.announced:
            self.print(f"{self.title} · {self.rt.describe()}")
            self.announced = True

    def run_model(self, model) -> None:
        """Take the runtime this stage runs `model` under (`Runtime.for_model`): the header says it, or, once that
        is out, a line of its own."""
        rt = self.rt.for_model(model)
        if rt is not self.rt and self.announced:
            self.print(f"precision {rt.precision} for this model ({rt.reason})")
        self.rt = rt

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A stopped run with a resumable state stays (resume=auto continues it); a run that failed
        before saving any state is removed, so failures leave nothing behind in the store."""
        if self.lock is None:
            return
        resumable = self.state_dir is not None and (self.state_dir / TRAINER_STATE).is_file()
        if exc_type is not None and not resumable and self.run_dir is not None and self.run_dir.exists():
            self.store.remove_run(self.run_dir, self.lock)
            self.store.prune_empty(self.stage, self.name)
        else:
            self.lock.release()


def start(
    stage: str, cfg, default_name: str | None = None, *, publishes: bool = True, stderr: bool = False
) -> StageRun:
    """Validate the shared keys, choose device and precision (printed once), seed everything.

    The checkpoint name is `name`, else `default_name`, else the chosen preset (conf=...);
    `publishes=False` for stages that write no version (generate); `stderr=True` sends everything the
    stage reports to stderr, keeping stdout for its output (generate's text), and leaves the header line
    to `run.announce()` once the input is checked (bad input on stderr is then one line alone)."""
    from rich.console import Console

    quiet_libraries()
    resolve_objectives(cfg)  # a bad objectives list is one line before any work
    name = check_name(str(cfg.name or default_name or preset_name(default=stage)))
    rt = setup_runtime(cfg.device, cfg.precision, cfg.get("strategy") or "ddp", cfg.get("dist_timeout_min") or 60)
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ  # logs and CI: tables are not squeezed into 80 columns
    console = Console(highlight=False, width=160 if piped else None, stderr=stderr) if rt.is_main else None
    run = StageRun(stage=stage, cfg=cfg, store=Store(cfg.output_root), name=name, rt=rt, console=console)
    run.title = f"[bold]llmctl {stage}[/]" + (f" → {stage}/{name}" if publishes else "")
    if not stderr:
        run.announce()
    seed_everything(int(cfg.seed))
    return run


def quiet_libraries() -> None:
    """llmctl reports progress itself: silence datasets' bars and transformers' info chatter, and torchao's
    import-time notes (transformers imports it when installed) about CUDA / Triton extensions a CPU lacks."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="Creating a tensor from a list of numpy")  # HF collators, harmless here
    transformers.utils.logging.disable_progress_bar()
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def open_run_dir(run: StageRun, identity: dict) -> None:
    """Pick the run folder: a new one, or (resume=auto | <folder>) an interrupted one to continue.

    `identity` says what this run trains; an interrupted run that trained something else (other
    data, model, tokenizer, task or number of processes) is refused rather than silently mixed."""

    identity = {**identity, "settings": resume_settings(run.cfg)}
    chosen = None
    if run.rt.is_main:
        try:
            resume = run.cfg.get("resume")
            if resume == "auto":
                chosen = _take_newest_free_run(run)
            elif resume:
                chosen = _take_named_run(run, Path(str(resume)))
            elif job := scheduler_job():  # a requeued scheduler job continues the run it was stopped in
                chosen = _take_requeued_run(run, job)
            if chosen is not None:
                _check_identity(run, chosen, identity)
            else:
                chosen = run.store.new_run_dir(run.stage, run.name)
                run.lock = RunLock(chosen)
                run.lock.try_acquire()
        except LlmctlError as e:
            broadcast_str(run.rt, _FAILED + str(e))  # the other ranks fail with it rather than wait forever
            raise
    path = broadcast_str(run.rt, str(chosen) if chosen else None)
    if path.startswith(_FAILED):
        raise LlmctlError(path[len(_FAILED) :])
    path = Path(path)
    run.run_dir, run.state_dir = path, state_dir(path)
    run.resume_state = run.state_dir if (run.state_dir / TRAINER_STATE).is_file() else None
    run.identity = identity


def _take_newest_free_run(run: StageRun) -> Path | None:
    for candidate in run.store.resumable_runs(run.stage, run.name):
        lock = RunLock(candidate)
        if lock.try_acquire():
            run.lock = lock
            return candidate
        run.print(f"resume=auto: {candidate.name} belongs to a live process (pid {lock.holder()}); leaving it alone")
    run.print(f"resume=auto: no free interrupted run of {run.stage}/{run.name}; starting fresh")
    return None


def _take_requeued_run(run: StageRun, job: str) -> Path | None:
    """The interrupted run this scheduler job saved before it was stopped (a time limit, a preemption), if any."""
    for candidate in run.store.resumable_runs(run.stage, run.name):
        if read_state(state_dir(candidate)).get("scheduler_job") == job:
            lock = RunLock(candidate)
            if lock.try_acquire():
                run.lock = lock
                run.print(f"requeued scheduler job {job}: continuing its run {candidate.name}")
                return candidate
    return None


def _take_named_run(run: StageRun, folder: Path) -> Path:
    if folder.name.endswith(".state"):  # the state folder named instead of its run
        folder = folder.with_name(folder.name[: -len(".state")])
    if not (state_dir(folder) / TRAINER_STATE).is_file():
        raise LlmctlError(
            f"resume={folder}: no resumable state there (expected {state_dir(folder)}/{TRAINER_STATE}); use resume=auto"
        )
    lock = RunLock(folder)
    if not lock.try_acquire():
        raise LlmctlError(
            f"resume={folder}: a live process (pid {lock.holder()}) is running it; wait for it or stop it first"
        )
    run.lock = lock
    return folder


def _check_identity(run: StageRun, folder: Path, identity: dict) -> None:
    """Refuse to continue a run that trained something else; allow (and record) the adjustable settings."""
    state = read_state(state_dir(folder))
    saved = state.get("identity") or {}
    old = saved.get("settings") or {
        "fixed": identity["settings"]["fixed"],
        "adjustable": {},
    }  # states from before settings were kept
    new = identity["settings"]
    step = int(state.get("step", 0))
    max_steps = int(run.cfg.train.max_steps) if "train" in run.cfg else step
    problem = _refusal(identity, saved, old["fixed"], new["fixed"], step, max_steps)
    if problem is not None:
        run.lock.release()
        raise LlmctlError(f"resume: the interrupted run {folder} {problem}")
    changed = {
        k: [old["adjustable"].get(k), v]
        for k, v in new["adjustable"].items()
        if old["adjustable"] and old["adjustable"].get(k) != v and k not in ("resume", "output_root")
    }
    run.resumed = {"run": folder.name, "from_step": step, "changed": changed}
    run.print(
        f"resume: continuing {folder.name} from step {step}"
        + "".join(f" · {k} {_show(a)} → {_show(b)}" for k, (a, b) in changed.items())
    )


def _refusal(identity: dict, saved: dict, old_fixed: dict, new_fixed: dict, step: int, max_steps: int) -> str | None:
    """Why a run cannot be resumed with this identity and these settings (None: it can)."""
    keep = (
        f"; resume it with the settings it had (what may change: {', '.join(RESUME_ADJUSTABLE[:5])}, patience, "
        "device), "
        f"or start a new run without resume="
    )
    for key, value in identity.items():
        if key != "settings" and key in saved and saved[key] != value:
            return (
                f"trained with {IDENTITY_WORDS.get(key, 'another ' + key)} ({_short(saved[key])}, now {_short(value)})"
                + keep
            )
    for key in sorted(set(old_fixed) | set(new_fixed)):
        if old_fixed.get(key) != new_fixed.get(key):
            return f"trained with {key}={_show(old_fixed.get(key))} (now {_show(new_fixed.get(key))})" + keep
    if max_steps < step:
        return f"has {step} steps already, more than train.max_steps={max_steps}; set train.max_steps={step} or more"
    return None


def resume_settings(cfg) -> dict:
    """The run's settings as flat dotted keys: `fixed` (a resume must match them) and `adjustable`."""
    from omegaconf import OmegaConf

    flat: dict = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), "")
    keep = {k: v for k, v in flat.items() if not k.startswith(RESUME_BY_HASH) or k == "data.max_seq_len"}
    return {
        "fixed": {k: v for k, v in keep.items() if k not in RESUME_ADJUSTABLE},
        "adjustable": {k: v for k, v in keep.items() if k in RESUME_ADJUSTABLE},
    }


def _show(value) -> str:
    return "null" if value is None else str(value)


def _short(value) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else text


def name_from(spec) -> str:
    """The checkpoint name a stage gives its output by default: the name of what it starts from, so the chain
    keeps one name (`prune init_from=distill/bbc` writes prune/bbc; a checkpoint's folder gives the name in its
    manifest, any other folder its own name)."""
    text = str(spec or "model")
    ref = parse_ref(text)
    if ref:
        base = ref[1]
    elif text.startswith("packaged:"):
        base = text.split(":", 1)[1]
    else:
        base = (read_manifest(Path(text)) or {}).get("name") or Path(text).name
    return re.sub(r"[^A-Za-z0-9._-]", "-", base) or "model"


LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "latency", "size", "memory", "error")
HIGHER_IS_BETTER = ("accuracy", "f1", "precision", "recall", "throughput")
COST = "cost/"  # objectives=[..., cost/<figure>]: a figure measure_cost reports for the published model


def _mode_from_name(metric: str) -> str | None:
    """min for a metric whose name says lower is better (a loss), max for one that says higher is (an accuracy)."""
    name = metric.rsplit("/", 1)[-1]
    if any(word in name for word in LOWER_IS_BETTER):
        return "min"
    if any(word in name for word in HIGHER_IS_BETTER):
        return "max"
    return None


def resolve_objective(cfg, default: tuple[str, str]) -> tuple[str, str]:
    """(metric, mode) a run optimises: objective_metric / objective_mode from config, else the stage's default.
    An objective_metric given without a mode takes the mode its name says (a loss is minimised, an accuracy
    maximised); one that says nothing needs objective_mode."""
    metric, mode = cfg.get("objective_metric") or default[0], cfg.get("objective_mode")
    if mode:
        return metric, str(mode)
    if metric == default[0]:
        return metric, default[1]
    if found := _mode_from_name(metric):
        return metric, found
    raise LlmctlError(
        f"objective_metric={metric}: set objective_mode=min or objective_mode=max (llmctl cannot tell "
        f"from its name which way is better)"
    )


def resolve_objectives(cfg) -> list[tuple[str, str]] | None:
    """`objectives=[eval/accuracy,cost/latency_ms_p50]`: the metrics a run returns together (a multi-objective
    sweep), each (metric, mode). `cost/<figure>` is a figure `measure_cost` reports, in its own mode (a latency is
    minimised); any other metric is one the stage reports, in the mode its name says, or as written
    (`eval/odd:max`). None when `objectives` is not set. Every problem is one line, before any work."""
    given = cfg.get("objectives")
    if not given:
        return None
    chosen: list[tuple[str, str]] = []
    for item in [given] if isinstance(given, str) else list(given):
        metric, _, mode = str(item).strip().partition(":")
        if metric.startswith(COST):
            figure = metric[len(COST) :]
            if figure not in MODES:
                raise LlmctlError(
                    f"objectives: {metric} is not a cost figure llmctl measures; use one of "
                    f"{', '.join(COST + k for k in MODES)}"
                )
            if mode and mode != MODES[figure]:
                better = "lower" if MODES[figure] == "min" else "higher"
                raise LlmctlError(
                    f"objectives: {item} would optimise {metric} the wrong way ({better} is better); write {metric}"
                )
            if "cost" in cfg and not cfg.cost.get("enabled", True):
                raise LlmctlError(
                    f"objectives: {metric} needs cost figures, which cost=off turns off; drop one of them"
                )
            mode = MODES[figure]
        if mode not in ("", "min", "max"):
            raise LlmctlError(f"objectives: {item}: the mode after ':' is min or max")
        mode = mode or _mode_from_name(metric)
        if mode is None:
            raise LlmctlError(
                f"objectives: llmctl cannot tell from its name whether {metric} is better higher or lower; "
                f"write {metric}:max or {metric}:min"
            )
        if metric in [m for m, _ in chosen]:
            raise LlmctlError(f"objectives: {metric} is named twice; name each metric once")
        chosen.append((metric, mode))
    return chosen


def objective_values(chosen: list[tuple[str, str]], metrics: dict, cost: dict | None) -> list[dict]:
    """{"metric", "mode", "value"} for each of `chosen` (resolve_objectives): `cost/<figure>` from `cost`, any
    other metric from `metrics`; a metric the run did not report is one line naming those it did."""
    out = []
    for metric, mode in chosen:
        source = (cost or {}) if metric.startswith(COST) else metrics
        value = source.get(metric[len(COST) :] if metric.startswith(COST) else metric)
        if not isinstance(value, (int, float)):
            known = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)) and "/" in k)
            raise LlmctlError(
                f"objectives: {metric} is not a figure this run reports (metrics: {known or 'none'}; cost: "
                f"cost/<figure>); name one of them"
            )
        out.append({"metric": metric, "mode": mode, "value": float(value)})
    return out


def result(published: Resolved | None):
    """What a stage returns to a sweeper for the version it published: its objective's value, or the values of
    `objectives` (a tuple: a multi-objective Optuna study); None on non-zero ranks."""
    if published is None:
        return None
    several = published.manifest.get("objectives")
    if several:
        values = tuple(o["value"] for o in several)
        return values if len(values) > 1 else values[0]
    return published.manifest["objective"]["value"]


def save_dtype(run: StageRun) -> str:
    """The dtype a stage saves floating-point weights in: `save_dtype`, where auto is the dtype its input
    checkpoint was stored in (the init parent's, else the teacher's), float32 for a model built from scratch."""
    from llmctl.core.models import DTYPES

    chosen = str(run.cfg.get("save_dtype") or "auto")
    if chosen != "auto":
        return DTYPES[chosen]
    parents = sorted(run.parents, key=lambda p: p.get("role") != "init")
    return (parents[0].get("dtype") if parents else None) or "float32"


def library_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[lib] = metadata.version(lib)
    return out


def publish(
    run: StageRun,
    model,
    tokenizer,
    *,
    kind: str,
    metrics: dict,
    objective: tuple[str, str],
    data,
    task: dict,
    extra: dict | None = None,
    after_save=None,
    artifact: dict | None = None,
    save_weights=None,
) -> Resolved | None:
    """Save model + tokenizer into the run folder and publish it as the next version; only then drop
    the resumable state (a crash before leaves a resumable run, after it a complete version).

    `objective` is the stage's default (metric, mode), overridable by config (see `resolve_objective`);
    `data` is the core.data.Data the run used, `task` its core.tasks.task_record; `after_save(folder)`
    returns more manifest entries measured on the saved files (size on disk, latency: distill and
    prune's before / after). `save_weights(folder, dtype)` replaces `model.save_pretrained` and `artifact`
    the artifact record read off the model (quantize: its own file layout and record). Floating-point
    weights are saved in `save_dtype` (see `save_dtype`); the model in memory then holds exactly the saved
    values, so what `after_save` measures is what was published. Only rank 0 writes; returns the new
    version (None on other ranks)."""
    import torch

    if not run.rt.is_main:
        return None
    chosen = resolve_objectives(run.cfg)
    if chosen:  # a metric the run does not report fails here, before anything is saved
        objective_values([o for o in chosen if not o[0].startswith(COST)], metrics, None)
    folder = run.run_dir
    dtype = save_dtype(run)
    with disk_space(folder, weight_bytes(model), "saving the checkpoint"):
        if save_weights is not None:
            save_weights(folder, dtype)
        else:
            model.to(getattr(torch, dtype))
            model.save_pretrained(str(folder))
            model.float()  # fp32 in memory again, holding the values just saved
        tokenizer.save_pretrained(str(folder))
    metric, mode = resolve_objective(run.cfg, objective)
    total, trainable = count_parameters(model)
    manifest = {
        "kind": kind,
        "artifact": {"dtype": dtype, **(artifact or artifact_record(model))},  # an export states its own dtype
        "parents": run.parents,
        "task": task,
        "metrics": metrics,
        "objective": {"metric": metric, "mode": mode, "value": metrics.get(metric)},
        "model": {
            "family": getattr(model.config, "model_type", None),
            "architecture": type(model).__name__,
            "parameters": total,
            "trainable_parameters": trainable,
        },
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "data": data.record(),
        "runtime": run.rt.record(),
        "weights_sha256": weights_sha256(folder),
        "command": command_line(),
        "overrides": job_overrides()[0],
        **({"sweep": sweep} if (sweep := sweep_record()) else {}),  # which sweep and trial (llmctl ckpt sweep)
        "config": to_container(run.cfg),
        **({"resumed": run.resumed} if run.resumed else {}),
        "libraries": library_versions(),
        **(extra or {}),
        **(after_save(folder) if after_save is not None else {}),
    }
    if chosen:
        manifest["objectives"] = objective_values(chosen, metrics, _cost_of(run, model, folder, manifest))
    published = run.store.publish(folder, run.stage, run.name, manifest)
    shutil.rmtree(run.state_dir, ignore_errors=True)
    if run.lock is not None:
        run.lock.release(remove=True)
        run.lock = None
    if os.environ.get(RESULT_FILE_ENV):
        Path(os.environ[RESULT_FILE_ENV]).write_text(json.dumps({"ref": published.ref, "objective": result(published)}))
    return published


def _cost_of(run: StageRun, model, folder: Path, manifest: dict) -> dict:
    """The published model's cost figures: those its stage measured on the saved folder (the last entry of its
    before / after `compare`), else measured now with the config's `cost` settings (recorded as `cost`)."""
    compare = manifest.get("compare") or {}
    if compare and (found := list(compare.values())[-1].get("cost")):
        return found
    manifest["cost"] = measure_cost(model, folder, run.rt, **(cost_settings(run.cfg.get("cost")) or {}))
    return manifest["cost"]
