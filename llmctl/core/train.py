"""The training loop every training stage calls (pretrain, finetune; distill and QAT later).

Why a plain PyTorch loop rather than HF Trainer or Accelerate: at equal work they run within a
few percent of each other on CPU, and a short explicit loop lets stages plug in a custom loss
(`loss_fn(model, batch)`, e.g. distillation against a frozen teacher) and their own evaluation,
keeps resumable state in safetensors + JSON (nothing pickled), and runs under `torchrun` with
plain DDP. Features: gradient accumulation, warmup + decay (transformers' schedulers), global
norm clipping, autocast (bf16/fp16), periodic evaluation, best-checkpoint selection with early
stopping, a rich progress bar (loss, tokens/s, ETA), TensorBoard events and a `metrics.jsonl`
log, resumable state every `save_every` steps and on SIGTERM/SIGINT, and `resume` restoring
weights, optimizer, scheduler, every rank's RNG, the data position and the best-so-far, so the
same run continues as if never stopped.

One piece per concern, each with its own rules:
- `MetricSink`: the log (rank 0 writes).
- `BestKeeper`: the best evaluation's weights and the patience counter; every rank keeps the same
  record (rank 0 evaluates and broadcasts the selection value), so they stop and restore together.
- `save_state` / `load_state` on the Trainer: the resumable state beside the run folder.
- DDP: decisions that end or branch the loop (a stop signal, a non-finite loss, early stopping)
  are agreed across ranks; masking and dropout draw from a per-rank seed while the initial
  weights are rank 0's (DDP broadcasts them); each rank reads its own slice of every global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from llmctl.core import sharding
from llmctl.core.device import (
    Runtime,
    all_ranks_sum,
    barrier,
    broadcast_floats,
    rank_seed,
    scheduler_job,
    seed_everything,
)
from llmctl.core.errors import Interrupted, LlmctlError
from llmctl.core.files import atomic_path, commit, disk_space, remove
from llmctl.core.models import weight_bytes
from llmctl.core.store import TRAINER_STATE

LossFn = Callable[
    [torch.nn.Module, dict], "torch.Tensor | tuple[torch.Tensor, dict]"
]  # a loss, or (loss, {term: tensor}) to log
BEST = "best.safetensors"
STREAM_SHUFFLE_BUFFER = 1000  # data.streaming: packed sequences shuffled within a window of this many


def default_loss(model, batch) -> torch.Tensor:
    return model(**batch).loss


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def evaluate_model(model, fn: Callable, rt: Runtime, seed: int):
    """Run `fn(model)` in eval mode, without gradients, under the run's autocast, with a fixed seed
    (the same MLM masks every time) and without disturbing the training RNG."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]), rt.autocast():
        torch.manual_seed(seed)
        result = fn(model)
    model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------
class MetricSink:
    """`metrics.jsonl` and TensorBoard events in the run folder; rank 0 writes, the others drop records."""

    def __init__(self, run_dir: Path, rt: Runtime):
        self.path, self.rt = Path(run_dir) / "metrics.jsonl", rt
        self.history: list[dict] = []
        self._writer, self._tb, self._purge = None, Path(run_dir) / "tb", None

    def truncate(self, step: int) -> None:
        """Drop what a stopped run logged after its last saved state (a resumed run logs those steps again),
        from metrics.jsonl and from TensorBoard (whose writer hides events from `purge_step` on)."""
        if self.rt.is_main and self.path.is_file():
            self.history = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self._purge = step + 1

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self._tb), purge_step=self._purge)
        return self._writer

    def log(self, record: dict) -> None:
        if not self.rt.is_main:
            return
        record = {**record, "time": round(time.time(), 3)}  # wall clock (unix seconds): time-to-loss comparisons
        self.history.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self._tensorboard().add_scalar(k if "/" in k else f"train/{k}", v, record["step"])

    def last(self, key: str):
        return next((r[key] for r in reversed(self.history) if key in r), None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ---------------------------------------------------------------------------------------------
# Best-checkpoint selection and early stopping
# ---------------------------------------------------------------------------------------------
class BestKeeper:
    """The best evaluation so far by `metric` (`mode` min|max), its weights in `path`, and the number
    of evaluations since it (early stopping after `patience` of them; 0 = never).

    Every rank calls `update` with the same value (rank 0 evaluates and broadcasts), so every rank
    holds the same record and takes the same decisions; only rank 0 writes the weights file. A tie
    goes to the later, longer-trained weights."""

    def __init__(self, metric: str, mode: str, patience: int, path: Path, rt: Runtime, *, save=None, load=None):
        """`save(model, path)` / `load(model, path)` write and read the weights file (every rank calls them; by
        default rank 0 saves the module and every rank loads it; FSDP gathers and scatters through the Trainer)."""
        self.metric, self.mode, self.patience, self.path, self.rt = metric, mode, int(patience), Path(path), rt
        self._save, self._load = save or self._save_whole, load or self._load_whole
        self.step: int | None = None
        self.value: float | None = None
        self.metrics: dict = {}
        self.bad_evals = 0

    def update(self, step: int, value: float, metrics: dict, model) -> bool:
        sign = 1.0 if self.mode == "min" else -1.0
        if not math.isfinite(value) or (self.value is not None and sign * value > sign * self.value):
            self.bad_evals += 1
            return False
        self.step, self.value, self.metrics, self.bad_evals = step, value, metrics, 0
        self._save(model, self.path)
        return True

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def restore(self, model) -> None:
        """Load the best weights into `model` on every rank (rank 0 wrote them before the barrier)."""
        barrier(self.rt)
        self._load(model, self.path)

    def state_dict(self) -> dict:
        return {"step": self.step, "value": self.value, "metrics": self.metrics, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.value, self.metrics, self.bad_evals = (
            state["step"],
            state["value"],
            state["metrics"],
            state["bad_evals"],
        )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Fit `model` on `train_data` (a map-style dataset) with the knobs of the `train` config group."""

    def __init__(
        self,
        model,
        *,
        train_data,
        collate,
        cfg,
        rt: Runtime,
        run_dir: Path,
        state_dir: Path,
        seed: int,
        evaluate: Callable[[torch.nn.Module], dict] | None = None,
        loss_fn: LossFn = default_loss,
        console=None,
        select: tuple[str, str] | None = None,
        patience: int = 0,
        lr: float | None = None,
        identity: dict | None = None,
    ):
        """`select` = (metric, "min"|"max") keeps the best evaluated weights and restores them at the end;
        `patience` > 0 stops after that many evaluations without improvement (early stopping).
        `identity` describes what is being trained (data, model, world size); it is saved with the
        resumable state so a resume can refuse a different run."""
        self.cfg, self.rt, self.seed, self.console = cfg, rt, int(seed), console
        self.run_dir, self.state_dir, self.identity = Path(run_dir), Path(state_dir), identity or {}
        self.lr = float(lr if lr is not None else cfg.lr)
        self.train_data, self.collate, self.evaluate, self.loss_fn = train_data, collate, evaluate, loss_fn
        self.plain = model  # the caller's module: trained in place, or (FSDP) given the trained weights at the end
        if rt.sharded:  # FSDP2: a sharded copy is trained (rank 0's weights are every rank's start, as with DDP)
            self.model = sharding.shard(model, rt)
        else:
            self.model = model.to(rt.device)
        if rt.distributed and not rt.sharded:  # DDP broadcasts rank 0's weights: every rank starts from the same model
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.best = (
            BestKeeper(*select, patience, self.run_dir / BEST, rt, save=self._save_weights, load=self._load_weights)
            if select
            else None
        )
        seed_everything(rank_seed(self.seed, rt.rank))  # masking and dropout differ per rank
        self.per_rank_batch = int(cfg.batch_size)
        self.streamed = not hasattr(train_data, "__len__")  # data.streaming: read as training goes (`_streamed`)
        self.per_epoch = None if self.streamed else len(train_data) // (self.per_rank_batch * rt.world_size)
        if self.per_epoch == 0:
            raise LlmctlError(
                f"train.batch_size={cfg.batch_size} × {rt.world_size} process(es) is larger than the "
                f"{len(train_data)} training sequences; lower train.batch_size or add data"
            )
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.step, self.micro, self.tokens = 0, 0, 0
        self.sink: MetricSink | None = None
        self._last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest evaluation
        self._stop_signal: int | None = None

    # ---- the weights as one file (the best so far) ---------------------------------------------
    def _save_weights(self, model, path: Path) -> None:
        """Every rank calls it; rank 0 writes `path` (FSDP: the shards gathered into the caller's module first)."""
        if self.rt.sharded:
            sharding.gather_into(model, self.plain, self.rt)
        if self.rt.is_main:
            whole = self.plain if self.rt.sharded else unwrap(model)
            # a new inode each time: a saved state's hard link keeps the previous best
            with atomic_path(path, need=weight_bytes(whole), what="the best weights so far") as tmp:
                save_model(whole, str(tmp))

    def _load_weights(self, model, path: Path) -> None:
        """Every rank loads `path` (FSDP: rank 0 reads it into the caller's module and scatters the shards)."""
        if not self.rt.sharded:
            load_model(unwrap(model), str(path), device=str(self.rt.device))
            return
        if self.rt.is_main:
            load_model(self.plain, str(path), device=str(self.rt.device))
        sharding.scatter_from(model, self.plain, self.rt)

    # ---- setup --------------------------------------------------------------------------------
    def _optimizer(self):
        decay, no_decay = [], []
        for name, p in unwrap(self.model).named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": float(self.cfg.weight_decay)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # one fused kernel for the whole update (CPU and CUDA; HF Trainer's default too): 3.7× faster than foreach here
        try:
            return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.cfg.betas), fused=True)
        except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
            return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.cfg.betas), foreach=True)

    def _scheduler(self):
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(self.cfg.scheduler, self.cfg.scheduler)
        warmup = int(round(float(self.cfg.warmup_ratio) * int(self.cfg.max_steps)))
        try:
            return get_scheduler(
                name, self.optimizer, num_warmup_steps=warmup, num_training_steps=int(self.cfg.max_steps)
            )
        except ValueError as e:
            raise LlmctlError(f"train.scheduler={self.cfg.scheduler!r}: {str(e).splitlines()[0][:160]}") from None

    # ---- data order ---------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of one epoch: one seeded permutation shared by all ranks, cut into
        global batches, each rank taking its own slice (the ranks never see the same example in a step)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(len(self.train_data), generator=g).tolist()
        b, world, r = self.per_rank_batch, self.rt.world_size, self.rt.rank
        return [perm[i * b * world + r * b : i * b * world + (r + 1) * b] for i in range(self.per_epoch)]

    def _micro_batches(self):
        from torch.utils.data import DataLoader

        if self.streamed:
            yield from self._streamed()
            return
        while True:
            epoch, offset = divmod(self.micro, self.per_epoch)
            # its own generator: creating an iterator must not draw from the global RNG (dropout, masking),
            # or a resumed run (which creates one mid-epoch) would diverge from an uninterrupted one
            loader = DataLoader(
                self.train_data,
                batch_sampler=self.epoch_batches(epoch)[offset:],
                collate_fn=self.collate,
                num_workers=int(self.cfg.get("num_workers", 0)),
                generator=torch.Generator().manual_seed(rank_seed(self.seed, self.rt.rank) + epoch),
            )
            yield from loader

    def _streamed(self):
        """Micro-batches of a streamed train split (data.streaming): each rank reads its own part of the stream
        (`split_dataset_by_node`), through a seeded shuffle buffer reseeded every pass; a resumed run skips the
        micro-batches its state counts (re-reading the stream up to there), so it sees what an uninterrupted run
        would have seen next."""
        from datasets.distributed import split_dataset_by_node
        from torch.utils.data import DataLoader

        stream = self.train_data.shuffle(seed=self.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        if self.rt.distributed:
            stream = split_dataset_by_node(stream, rank=self.rt.rank, world_size=self.rt.world_size)
        skip, epoch = self.micro, 0
        while True:
            stream.set_epoch(epoch)
            loader = DataLoader(  # its own generator: an iterator drawing from the global RNG would move dropout's
                stream,
                batch_size=self.per_rank_batch,
                collate_fn=self.collate,
                drop_last=True,
                generator=torch.Generator().manual_seed(rank_seed(self.seed, self.rt.rank) + epoch),
            )
            seen = 0
            for batch in loader:
                seen += 1
                if skip:
                    skip -= 1
                    continue
                yield batch
            if seen == 0:
                raise LlmctlError(
                    f"the training stream holds fewer than train.batch_size={self.per_rank_batch} sequences per "
                    f"process; lower train.batch_size or add data"
                )
            epoch += 1

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, resume_state: Path | None = None) -> dict:
        """Train to `max_steps`; returns the final (or the best) evaluation's metrics and training figures."""
        self.sink = MetricSink(self.run_dir, self.rt)
        if resume_state is not None:
            self.load_state(resume_state)
        max_steps, accum = int(self.cfg.max_steps), int(self.cfg.grad_accum)
        final: dict = {}
        if self.step == 0:
            final = self._run_eval()
        batches = self._micro_batches()
        old_handlers = self._catch_signals()
        t_start, tok_start, step_start = time.perf_counter(), self.tokens, self.step
        window_t, window_tok = time.perf_counter(), self.tokens
        try:
            with self._progress() as progress:
                task = progress.add_task("train", total=max_steps, completed=self.step, info="") if progress else None
                while self.step < max_steps:
                    loss, stop, terms = self._optimizer_step(batches, accum)
                    self.step += 1
                    if progress:
                        progress.update(task, completed=self.step)
                    if self.step % int(self.cfg.log_every) == 0 or self.step == max_steps:
                        now = time.perf_counter()
                        tps = (self.tokens - window_tok) / max(now - window_t, 1e-9)
                        window_t, window_tok = now, self.tokens
                        self.sink.log(
                            {
                                "step": self.step,
                                "loss": loss,
                                **terms,
                                "lr": self.scheduler.get_last_lr()[0],
                                "tokens_per_s": tps,
                            }
                        )
                        if progress:
                            progress.update(task, info=f"loss {loss:.4f} · {tps:,.0f} tok/s")
                    evaluate_now = int(self.cfg.eval_every) and self.step % int(self.cfg.eval_every) == 0
                    if evaluate_now and self.step < max_steps:
                        self._run_eval()
                        if self.best is not None and self.best.should_stop:
                            self._print(
                                f"early stopping at step {self.step}: {self.best.metric} has not improved for "
                                f"{self.best.patience} evaluations"
                            )
                            break
                    if int(self.cfg.save_every) and self.step % int(self.cfg.save_every) == 0 and self.step < max_steps:
                        self.save_state()
                    if stop:
                        self.save_state()
                        self._hand_on_scheduler_signal(old_handlers)  # submitit requeues the job (which resumes)
                        raise Interrupted(
                            f"stopped by a signal at step {self.step}/{max_steps}; "
                            f"state saved in {self.state_dir}; continue with resume=auto"
                        )
            evaluated_here = self._last_eval is not None and self._last_eval[0] == self.step  # e.g. early stopping
            final = self._last_eval[1] if evaluated_here else self._run_eval()
            if self.best is not None and self.best.step is not None and self.best.step != self.step:
                self.best.restore(self.model)
                final = dict(self.best.metrics)
                self._print(
                    f"restored the best weights: step {self.best.step}, {self.best.metric} {self.best.value:.4f}"
                )
            barrier(self.rt)  # every rank has loaded the best weights before rank 0 removes the file
            if self.rt.is_main:
                (self.run_dir / BEST).unlink(missing_ok=True)
            if self.rt.sharded:  # the caller's module (rank 0) receives the trained weights whole
                sharding.gather_into(self.model, self.plain, self.rt)
        finally:
            self._restore_signals(old_handlers)
            self.sink.close()
        wall = time.perf_counter() - t_start
        return {
            **final,
            "train/loss": self.sink.last("loss"),
            "train/steps": self.step,
            "train/best_step": self.best.step if self.best is not None and self.best.step is not None else self.step,
            "train/tokens": self.tokens,
            "train/tokens_per_s": (self.tokens - tok_start) / max(wall, 1e-9),  # this process's run only
            "train/wall_s": wall,
            "train/steps_this_run": self.step - step_start,
        }

    def _optimizer_step(self, batches, accum: int) -> tuple[float, bool, dict]:
        """One optimizer step; returns (the loss averaged over ranks, whether any rank was asked to stop,
        this rank's loss terms when the loss function reports them, e.g. distillation's KL and CE)."""
        model, rt = self.model, self.rt
        model.train()
        total, terms = 0.0, {}
        for k in range(accum):
            batch = {key: v.to(rt.device, non_blocking=True) for key, v in next(batches).items()}
            self.micro += 1
            last = k == accum - 1
            if rt.sharded:  # FSDP2: gradients reduce-scattered on the last micro-batch only
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if not rt.distributed or rt.sharded or last else model.no_sync()
            with sync:
                with rt.autocast():
                    loss = self.loss_fn(model, batch)
                if isinstance(loss, tuple):
                    loss, parts = loss
                    for name, value in parts.items():
                        terms[name] = terms.get(name, 0.0) + float(value) / accum
                (loss / accum).backward()
            total += float(loss.detach()) / accum
            mask = batch.get("attention_mask")
            self.tokens += (
                int(mask.sum()) * rt.world_size if mask is not None else batch["input_ids"].numel() * rt.world_size
            )
        loss_sum, stops = all_ranks_sum(rt, [total, float(self._stop_signal is not None)])  # every rank decides alike
        mean = loss_sum / rt.world_size
        if not math.isfinite(mean):
            bad = ", ".join(f"{k}={v}" for k, v in terms.items() if not math.isfinite(v))
            where = f" ({bad})" if bad else ""
            if self.step == 0:  # no update yet: the learning rate cannot be the cause
                raise LlmctlError(
                    f"the loss is {mean}{where} at the first step, before any update: the model's outputs or the "
                    f"loss settings overflow, not the learning rate; check the loss settings, or use precision=fp32"
                )
            raise LlmctlError(
                f"the loss became {mean}{where} at step {self.step + 1}; lower train.lr or use precision=fp32"
            )
        if float(self.cfg.max_grad_norm) > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean, stops > 0, terms

    def _run_eval(self) -> dict:
        """Rank 0 evaluates and logs; the selection value is broadcast so every rank's BestKeeper agrees."""
        if self.evaluate is None:
            return {}
        metrics = {}
        if self.rt.sharded:  # every rank holds only its shards: the forward passes are collective
            metrics = evaluate_model(self.model, self.evaluate, self.rt, self.seed)
        if self.rt.is_main:
            metrics = metrics or evaluate_model(self.model, self.evaluate, self.rt, self.seed)
            self.sink.log({"step": self.step, **metrics})
            shown = " · ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k.count("/") == 1)
            self._print(f"[dim]step {self.step:>6}[/] {shown}")
        if self.best is not None:
            value = metrics.get(self.best.metric)
            present = isinstance(value, (int, float))
            present, value = broadcast_floats(self.rt, [float(present), float(value) if present else 0.0])
            if not present:  # every rank raises (none is left waiting in a collective)
                known = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)) and k.count("/") == 1)
                raise LlmctlError(
                    f"objective_metric={self.best.metric} is not a metric this task reports ({known or 'see rank 0'}); "
                    f"set objective_metric to one of them"
                )
            self.best.update(self.step, value, metrics, self.model)
        else:
            barrier(self.rt)
        self._last_eval = (self.step, metrics)  # on every rank, so all skip (or all run) the final evaluation together
        return metrics

    def _print(self, text: str) -> None:
        if self.console is not None and self.rt.is_main:
            self.console.print(text)

    def _progress(self):
        if not self.rt.is_main or self.console is None:
            return contextlib.nullcontext()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )

    # ---- signals ------------------------------------------------------------------------------
    def _catch_signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._stop_signal = signum

        # SIGUSR2: the scheduler's warning before a time limit (Slurm --signal, submitit's signal_delay_s)
        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}

    def _hand_on_scheduler_signal(self, old) -> None:
        """A time-limit warning (SIGUSR2) caught while submitit runs the job goes on, once the state is saved, to
        submitit's own handler: it requeues the job (rank 0 exits there), and the requeued job resumes this run."""
        previous = (old or {}).get(signal.SIGUSR2)
        if self._stop_signal == signal.SIGUSR2 and callable(previous):
            self._restore_signals(old)
            previous(signal.SIGUSR2, None)

    @staticmethod
    def _restore_signals(old) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)

    # ---- resumable state (safetensors + JSON; nothing pickled) ---------------------------------
    def save_state(self) -> None:
        """Write weights, optimizer, scheduler, every rank's RNG, the data position and the best-so-far
        to the state folder, atomically (a crash leaves the previous state or the new one)."""
        final = self.state_dir
        tmp = final.with_name(f".{final.name}.tmp")  # one name every rank knows
        try:
            with disk_space(
                final.parent, 3 * weight_bytes(unwrap(self.model)), "the resumable state (weights + optimizer)"
            ):
                if self.rt.is_main:
                    remove(tmp)
                    tmp.mkdir(parents=True)
                barrier(self.rt)
                _save_rng(tmp / f"rng-rank{self.rt.rank}.safetensors")
                if self.rt.sharded:  # each rank its own slices of the weights and the optimizer state
                    sharding.save_local(self.model, self.optimizer, tmp, self.rt.rank)
                barrier(self.rt)
                if self.rt.is_main:
                    self._write_state(tmp)
                    commit(tmp, final)
        except BaseException:
            if self.rt.is_main:
                remove(tmp)  # nothing hidden is left behind; the previous state (if any) is intact
            raise
        barrier(self.rt)

    def _write_state(self, folder: Path) -> None:
        if not self.rt.sharded:  # (FSDP: every rank wrote its own slices)
            save_model(unwrap(self.model), str(folder / "model.safetensors"))
            opt = self.optimizer.state_dict()
            tensors = {
                f"{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
                for pid, st in opt["state"].items()
                for k, v in st.items()
            }
            meta = {"param_groups": json.dumps(opt["param_groups"])}
            save_file(tensors, str(folder / "optimizer.safetensors"), metadata=meta)
        if self.best is not None and (self.run_dir / BEST).is_file():
            os.link(self.run_dir / BEST, folder / BEST)  # the best weights as of this step, whatever is written later
        state = {
            "step": self.step,
            "micro": self.micro,
            "tokens": self.tokens,
            "world_size": self.rt.world_size,
            "scheduler": self.scheduler.state_dict(),
            "identity": self.identity,
            "scheduler_job": scheduler_job(),  # a requeue of this scheduler job continues this run (core.run)
            "best": self.best.state_dict() if self.best is not None else None,
        }
        (folder / TRAINER_STATE).write_text(json.dumps(state, default=str))

    def load_state(self, folder: Path) -> None:
        folder = Path(folder)
        state = json.loads((folder / TRAINER_STATE).read_text())
        if self.rt.sharded:
            sharding.load_local(self.model, self.optimizer, folder, self.rt.rank)
        else:
            load_model(unwrap(self.model), str(folder / "model.safetensors"), device=str(self.rt.device))
            with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as fh:
                groups = json.loads(fh.metadata()["param_groups"])
            flat = load_file(str(folder / "optimizer.safetensors"), device=str(self.rt.device))
            opt_state: dict[int, dict] = {}
            for key, value in flat.items():
                pid, name = key.split(".", 1)
                opt_state.setdefault(int(pid), {})[name] = value.cpu() if name == "step" else value
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        _load_rng(folder / f"rng-rank{self.rt.rank}.safetensors")
        self.step, self.micro, self.tokens = state["step"], state["micro"], state["tokens"]
        if self.best is not None and state.get("best"):
            self.best.load_state_dict(state["best"])
            if self.rt.is_main and (folder / BEST).is_file():
                with atomic_path(self.run_dir / BEST) as tmp:
                    shutil.copyfile(folder / BEST, tmp)
        self.sink.truncate(self.step)
        self._print(f"resumed from {folder} at step {self.step}")
        barrier(self.rt)


def _save_rng(path: Path) -> None:
    """This process's RNG streams (torch CPU and CUDA as tensors; python and numpy in the metadata)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    meta = {
        "python": json.dumps(_jsonable(random.getstate())),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }
    save_file(tensors, str(path), metadata=meta)


def _load_rng(path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{i}"], i)
    random.setstate(_tuplify(json.loads(meta["python"])))
    np_state = json.loads(meta["numpy"])
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tuplify(obj):
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, list) else obj
