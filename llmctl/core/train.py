"""The training loop every training stage calls (pretrain now; finetune, distill, QAT later).

Why a plain PyTorch loop rather than HF Trainer or Accelerate: at equal work they run within a
few percent of each other on CPU, and a short explicit loop lets stages plug in a custom loss
(`loss_fn(model, batch)`, e.g. distillation against a frozen teacher) and their own evaluation,
keeps resumable state in safetensors + JSON (nothing pickled), and runs under `torchrun` with
plain DDP. Features: gradient accumulation, warmup + decay (transformers' schedulers), global
norm clipping, autocast (bf16/fp16), periodic evaluation, a rich progress bar (loss, tokens/s,
ETA), TensorBoard events and a `metrics.jsonl` log, resumable state every `save_every` steps and
on SIGTERM/SIGINT, and `resume` restoring weights, optimizer, scheduler, RNG and data position so
the same loss curve continues.
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
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from llmctl.core.device import Runtime, barrier
from llmctl.core.errors import Interrupted, LlmctlError

STATE = "state"
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


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


class Trainer:
    """Fit `model` on `train_data` (a map-style dataset) with the knobs of the `train` config group."""

    def __init__(self, model, *, train_data, collate, cfg, rt: Runtime, run_dir: Path, seed: int,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None, loss_fn: LossFn = default_loss, console=None,
                 select: tuple[str, str] | None = None, patience: int = 0, lr: float | None = None):
        """`select` = (metric, "min"|"max") keeps the best evaluated weights and restores them at the end;
        `patience` > 0 stops after that many evaluations without improvement (early stopping)."""
        self.cfg, self.rt, self.run_dir, self.seed = cfg, rt, Path(run_dir), seed
        self.select, self.patience, self.lr = select, int(patience), float(lr if lr is not None else cfg.lr)
        self.best: dict | None = None  # {"step", "value", "metrics"} of the best evaluation so far
        self._last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest evaluation
        self._bad_evals = 0
        self.train_data, self.collate, self.evaluate, self.loss_fn = train_data, collate, evaluate, loss_fn
        self.console = console
        self.model = model.to(rt.device)
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.per_rank_batch = int(cfg.batch_size)
        self.per_epoch = len(train_data) // (self.per_rank_batch * rt.world_size)
        if self.per_epoch == 0:
            raise LlmctlError(f"train.batch_size={cfg.batch_size} × {rt.world_size} process(es) is larger than the "
                              f"{len(train_data)} training sequences; lower train.batch_size or add data")
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.step, self.micro, self.tokens = 0, 0, 0
        self.history: list[dict] = []
        self._stop_signal: int | None = None

    # ---- setup --------------------------------------------------------------------------------
    def _optimizer(self):
        decay, no_decay = [], []
        for name, p in unwrap(self.model).named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": float(self.cfg.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.cfg.betas), foreach=True)

    def _scheduler(self):
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(self.cfg.scheduler, self.cfg.scheduler)
        warmup = int(round(float(self.cfg.warmup_ratio) * int(self.cfg.max_steps)))
        try:
            return get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=int(self.cfg.max_steps))
        except ValueError as e:
            raise LlmctlError(f"train.scheduler={self.cfg.scheduler!r}: {str(e).splitlines()[0][:160]}") from None

    # ---- data order ---------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of one epoch: a seeded permutation, cut into global batches."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(len(self.train_data), generator=g).tolist()
        b, world, r = self.per_rank_batch, self.rt.world_size, self.rt.rank
        return [perm[i * b * world + r * b: i * b * world + (r + 1) * b] for i in range(self.per_epoch)]

    def _micro_batches(self):
        from torch.utils.data import DataLoader

        while True:
            epoch, offset = divmod(self.micro, self.per_epoch)
            # its own generator: creating an iterator must not draw from the global RNG (dropout, masking),
            # or a resumed run (which creates one mid-epoch) would diverge from an uninterrupted one
            loader = DataLoader(self.train_data, batch_sampler=self._epoch_batches(epoch)[offset:], collate_fn=self.collate,
                                num_workers=int(self.cfg.get("num_workers", 0)), generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, resume_state: Path | None = None) -> dict:
        """Train to `max_steps`; returns the final evaluation metrics."""
        if resume_state is not None:
            self._load_state(resume_state)
        max_steps, accum = int(self.cfg.max_steps), int(self.cfg.grad_accum)
        writer = self._tensorboard()
        final: dict = {}
        if self.step == 0:
            final = self._run_eval(writer)
        batches = self._micro_batches()
        old_handlers = self._catch_signals()
        t_start, tok_start, step_start = time.perf_counter(), self.tokens, self.step
        window_t, window_tok = time.perf_counter(), self.tokens
        try:
            with self._progress() as progress:
                task = progress.add_task("train", total=max_steps, completed=self.step, info="") if progress else None
                while self.step < max_steps:
                    loss = self._optimizer_step(batches, accum)
                    self.step += 1
                    if progress:
                        progress.update(task, completed=self.step)
                    if self.step % int(self.cfg.log_every) == 0 or self.step == max_steps:
                        now = time.perf_counter()
                        tps = (self.tokens - window_tok) / max(now - window_t, 1e-9)
                        window_t, window_tok = now, self.tokens
                        self._log({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps}, writer)
                        if progress:
                            progress.update(task, info=f"loss {loss:.4f} · {tps:,.0f} tok/s")
                    evaluate_now = int(self.cfg.eval_every) and self.step % int(self.cfg.eval_every) == 0
                    if evaluate_now and self.step < max_steps:
                        self._run_eval(writer)
                        if self._early_stop():
                            if self.console:
                                self.console.print(f"early stopping at step {self.step}: {self.select[0]} has not improved for {self.patience} evaluations")
                            break
                    if int(self.cfg.save_every) and self.step % int(self.cfg.save_every) == 0 and self.step < max_steps:
                        self.save_state()
                    if self._stop_signal is not None:
                        self.save_state()
                        raise Interrupted(f"stopped by signal {self._stop_signal} at step {self.step}/{max_steps}; "
                                          f"state saved in {self.run_dir}; continue with resume=auto")
            evaluated_here = self._last_eval is not None and self._last_eval[0] == self.step  # e.g. early stopping
            final = self._last_eval[1] if evaluated_here else self._run_eval(writer)
            if self.best is not None and self.best["step"] != self.step:
                load_model(unwrap(self.model), str(self.run_dir / "best.safetensors"), device=str(self.rt.device))
                final = {**self.best["metrics"]}
                if self.console:
                    self.console.print(f"restored the best weights: step {self.best['step']}, {self.select[0]} {self.best['value']:.4f}")
            (self.run_dir / "best.safetensors").unlink(missing_ok=True)
        finally:
            self._restore_signals(old_handlers)
            if writer:
                writer.close()
        wall = time.perf_counter() - t_start
        return {**final,
                "train/loss": self.history_last("loss"),
                "train/steps": self.step,
                "train/best_step": self.best["step"] if self.best else self.step,
                "train/tokens": self.tokens,
                "train/tokens_per_s": (self.tokens - tok_start) / max(wall, 1e-9),  # this process's run only
                "train/wall_s": wall,
                "train/steps_this_run": self.step - step_start}

    def _optimizer_step(self, batches, accum: int) -> float:
        model, rt = self.model, self.rt
        model.train()
        total = 0.0
        for k in range(accum):
            batch = {key: v.to(rt.device, non_blocking=True) for key, v in next(batches).items()}
            self.micro += 1
            sync = contextlib.nullcontext() if not rt.distributed or k == accum - 1 else model.no_sync()
            with sync:
                with rt.autocast():
                    loss = self.loss_fn(model, batch)
                (loss / accum).backward()
            total += float(loss.detach()) / accum
            mask = batch.get("attention_mask")
            self.tokens += int(mask.sum()) * rt.world_size if mask is not None else batch["input_ids"].numel() * rt.world_size
        if not math.isfinite(total):
            raise LlmctlError(f"the loss became {total} at step {self.step + 1}; lower train.lr or use precision=fp32")
        if float(self.cfg.max_grad_norm) > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _run_eval(self, writer) -> dict:
        if self.evaluate is None:
            return {}
        metrics = {}
        if self.rt.is_main:
            metrics = evaluate_model(self.model, self.evaluate, self.rt, self.seed)
            self._log({"step": self.step, **metrics}, writer)
            self._track_best(metrics)
            if self.console:
                shown = " · ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k.count("/") == 1)
                self.console.print(f"[dim]step {self.step:>6}[/] {shown}")
        self._last_eval = (self.step, metrics)  # on every rank, so all skip (or all run) the final evaluation together
        barrier(self.rt)
        return metrics

    def _early_stop(self) -> bool:
        """Rank 0 decides; every rank learns the decision (they must leave the loop together)."""
        stop = torch.tensor([float(bool(self.patience) and self._bad_evals >= self.patience)], device=self.rt.device)
        if self.rt.distributed:
            torch.distributed.broadcast(stop, src=0)
        return bool(stop.item())

    def _track_best(self, metrics: dict) -> None:
        if not self.select or self.select[0] not in metrics:
            return
        value, sign = float(metrics[self.select[0]]), (1.0 if self.select[1] == "min" else -1.0)
        if self.best is None or sign * value <= sign * self.best["value"]:  # a tie goes to the later, longer-trained weights
            self.best = {"step": self.step, "value": value, "metrics": metrics}
            self._bad_evals = 0
            save_model(unwrap(self.model), str(self.run_dir / "best.safetensors"))
        else:
            self._bad_evals += 1

    # ---- logging ------------------------------------------------------------------------------
    def _tensorboard(self):
        if not self.rt.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"))

    def _log(self, record: dict, writer) -> None:
        if not self.rt.is_main:
            return
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if writer:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k if "/" in k else f"train/{k}", v, record["step"])

    def history_last(self, key: str):
        return next((r[key] for r in reversed(self.history) if key in r), None)

    def _progress(self):
        if not self.rt.is_main or self.console is None:
            return contextlib.nullcontext()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False)

    # ---- signals ------------------------------------------------------------------------------
    def _catch_signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._stop_signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signals(old) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)

    # ---- resumable state (safetensors + JSON; nothing pickled) ---------------------------------
    def save_state(self) -> None:
        """Write weights, optimizer, scheduler, RNG and data position to run_dir/state atomically."""
        if self.rt.is_main:
            tmp = self.run_dir / f".{STATE}.{uuid.uuid4().hex}"
            tmp.mkdir()
            save_model(unwrap(self.model), str(tmp / "model.safetensors"))
            opt = self.optimizer.state_dict()
            tensors = {f"{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
                       for pid, st in opt["state"].items() for k, v in st.items()}
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"param_groups": json.dumps(opt["param_groups"])})
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / "rng.safetensors"))
            np_state = np.random.get_state()
            state = {"step": self.step, "micro": self.micro, "tokens": self.tokens, "world_size": self.rt.world_size,
                     "scheduler": self.scheduler.state_dict(), "python_rng": _jsonable(random.getstate()),
                     "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
            (tmp / "trainer_state.json").write_text(json.dumps(state, default=str))
            final = self.run_dir / STATE
            if final.exists():
                old = self.run_dir / f".{STATE}.old.{uuid.uuid4().hex}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old)
            else:
                os.rename(tmp, final)
        barrier(self.rt)

    def _load_state(self, folder: Path) -> None:
        state = json.loads((folder / "trainer_state.json").read_text())
        load_model(unwrap(self.model), str(folder / "model.safetensors"), device=str(self.rt.device))
        from safetensors import safe_open

        with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as fh:
            groups = json.loads(fh.metadata()["param_groups"])
        flat = load_file(str(folder / "optimizer.safetensors"), device=str(self.rt.device))
        opt_state: dict[int, dict] = {}
        for key, value in flat.items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value.cpu() if name == "step" else value
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"cuda{i}" in rng:
                    torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
        random.setstate(_tuplify(state["python_rng"]))
        np_state = state["numpy_rng"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        self.step, self.micro, self.tokens = state["step"], state["micro"], state["tokens"]
        log = self.run_dir / "metrics.jsonl"
        if self.rt.is_main and log.is_file():  # drop what a killed run logged after its last saved state
            kept = [r for r in map(json.loads, log.read_text().splitlines()) if r["step"] <= self.step]
            log.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.history = kept
        if self.rt.is_main and self.console:
            self.console.print(f"resumed from {folder} at step {self.step}")


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tuplify(obj):
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, list) else obj
