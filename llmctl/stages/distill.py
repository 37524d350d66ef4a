"""llmctl distill — train a smaller student against a frozen teacher and write distill/<name>/vNNN.

    llmctl distill teacher=finetune/bbc student.num_layers=3                  # student from every 2nd teacher layer
    llmctl distill teacher=finetune/bbc student.init=random student.num_layers=3
    llmctl distill teacher=finetune/bbc student=prune/bbc-structured          # any checkpoint (prune → distill)
    llmctl distill teacher=finetune/smollm2-chat student.num_layers=15 data=bbc-news distill.temperature=2

The teacher (a sequence classifier, token classifier or causal LM) is frozen in eval mode. The
student is the teacher's config with fewer layers (or another width), initialised from every k-th
teacher layer with the teacher's embeddings and head (DistilBERT), or at random; or any existing
checkpoint with the teacher's tokenizer and family, e.g. a pruned one (Minitron's prune-then-distill).
It trains on the teacher's own task and data, read from its manifest (`data=` for other data: a
causal-LM teacher on a text corpus distils next-token logits), through the shared fine-tuning
function with the distillation loss (core/distillation.py): α · KL · T² + (1 − α) · CE, plus an
optional hidden-state loss; the log shows each term. A sequence classifier's teacher logits are
computed once for the training split (`distill.cache_teacher`). The student is a plain HF
checkpoint; its manifest names the teacher (role `teacher`) and holds both models' metric and cost,
measured by eval's code, printed as one table.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field
from transformers import AutoConfig

from llmctl.core import run as stage_run
from llmctl.core import schema
from llmctl.core.distillation import DistillLoss, cache_teacher_logits, student_config, student_from_teacher
from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.judging import BeforeAfter
from llmctl.core.families import WIDTH_KEYS, layout, transformer_layers
from llmctl.core.finetuning import finetune
from llmctl.core.loading import load_checkpoint, require_float_weights, resolve_source, source_kind
from llmctl.core.models import count_parameters
from llmctl.core.tasks import OBJECTIVE, task_record
from llmctl.core.tasks.checkpoint import checkpoint_objective, load_on_task
from llmctl.core.tokenizer import tokenizer_hash

KINDS = ("seq-cls", "token-cls", "causal-lm")


class Student(schema.Section):
    init: Literal["teacher-layers", "random"]
    num_layers: int | None = Field(default=None, ge=1)
    hidden_size: int | None = Field(default=None, ge=8)
    num_heads: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=8)


class Distill(schema.Section):
    alpha: float = Field(ge=0, le=1)
    temperature: float = Field(gt=0, le=100)  # softmax(z / T) at T = 1e30 is uniform and T² overflows
    hidden_weight: float = Field(ge=0)
    hidden_loss: Literal["mse", "cosine"]
    cache_teacher: bool


class Config(schema.CheckpointStageConfig):
    """conf/distill.yaml, checked before the stage runs (core/schema.py)."""

    teacher: str
    task: Literal["classification", "ner", "sft", "clm"] | None = None
    student: Student | str
    distill: Distill


def run(cfg) -> float | None:
    with stage_run.start("distill", cfg, default_name=stage_run.name_from(cfg.teacher)) as run:
        # ---- the teacher, its task and data ----
        source = resolve_source(run.store, cfg.teacher, what="teacher")
        kind = source_kind(source)
        if kind not in KINDS:
            raise LlmctlError(
                f"teacher={cfg.teacher} is a {kind} checkpoint; distill takes a teacher of kind {', '.join(KINDS)} "
                f"(fine-tune it first, or pretrain a causal LM)"
            )
        if not isinstance(cfg.student, str):  # the student's shape is checked before anything loads
            config = AutoConfig.from_pretrained(str(source.path))
            student_config(config, num_layers=cfg.student.num_layers, width=_width_settings(cfg, config))
        on = load_on_task(run, cfg, source, what="teacher", stage="distill", task=cfg.task)
        teacher, task, data, prepared, length = on.loaded, on.task, on.data, on.prepared, on.length
        teacher.model.eval().requires_grad_(False)
        tok = teacher.tokenizer
        run.print(f"teacher {type(teacher.model).__name__} from {source.ref} · {task} · {data.summary()}")

        # ---- the student ----
        student, kept, init = _student(run, cfg, teacher, prepared, kind)
        run.parents.append(teacher.parent("teacher"))
        model, projection = _with_projection(student, teacher.model, cfg)
        run.print(f"student {init} · {_shape(student)} (teacher {_shape(teacher.model)})")

        # ---- train ----
        train_task = prepared
        uses_teacher = float(cfg.distill.alpha) > 0 or float(cfg.distill.hidden_weight) > 0  # 0: no-teacher baseline
        if cfg.distill.cache_teacher and kind == "seq-cls" and uses_teacher:
            cached = cache_teacher_logits(
                teacher.model,
                prepared.splits["train"],
                prepared.collate,
                batch_size=int(cfg.train.batch_size),
                device=run.rt.device,
                autocast=run.rt.autocast,
            )
            train_task = dataclasses.replace(prepared, splits={**prepared.splits, "train": cached})
            run.print(f"[dim]teacher logits cached for {len(cached)} training examples[/]")
        d = cfg.distill
        loss_fn = DistillLoss(
            teacher.model,
            kind=kind,
            alpha=float(d.alpha),
            temperature=float(d.temperature),
            hidden_weight=float(d.hidden_weight),
            hidden_loss=str(d.hidden_loss),
            projection=projection,
        )
        select = stage_run.resolve_objective(cfg, OBJECTIVE[task])
        stage_run.open_run_dir(
            run,
            {
                "stage": "distill",
                "task": task,
                "data_fingerprint": data.fingerprint,
                "world_size": run.rt.world_size,
                "model": f"{teacher.sha256}:{init}",
                "tokenizer": tokenizer_hash(tok),
            },
        )
        result = finetune(
            model, tok, train_task, cfg.train, run, select=select, patience=int(cfg.patience), loss_fn=loss_fn
        )
        student = result.model.student if projection is not None else result.model

        # ---- judge both, publish the student (rank 0: the others are done) ----
        if not run.rt.is_main:
            return None
        judged = BeforeAfter.of(on, teacher.model, run, cfg, names=("teacher", "student"))
        metrics = {
            **result.metrics,
            **{f"teacher/{on.split}/{k}": v for k, v in judged.before["metrics"].items() if isinstance(v, float)},
        }
        settings = {"teacher": source.ref, "init": init, "kept_layers": kept, **{k: d[k] for k in d}}
        published = judged.publish(
            run,
            student,
            tok,
            title="llmctl distill · teacher → student",
            kind=kind,
            metrics=metrics,
            objective=select,
            data=data,
            task=task_record(prepared, data, max_seq_len=length, objective=select, stage="distill", method="distill"),
            extra={"distill": settings},
        )
        return stage_run.result(published)


def objective(cfg) -> tuple[str, str]:
    """What a sweep of this stage optimises: the teacher's task's objective (the student's), or objective_metric."""
    return checkpoint_objective(cfg, "teacher", task=cfg.get("task"))


def _student(run, cfg, teacher, prepared, kind: str):
    """(student model, teacher layers it was made from, how it was made)."""
    if isinstance(cfg.student, str):
        src = resolve_source(run.store, cfg.student, what="student")
        require_float_weights(src, what="student", stage="distill")
        loaded = load_checkpoint(run.store, src, kind=kind, head=prepared.head or None, what="student")
        family, theirs = loaded.model.config.model_type, teacher.model.config.model_type
        if family != theirs:
            raise LlmctlError(
                f"student={cfg.student} is a {family} model and the teacher a {theirs}; a student must be of the "
                "teacher's family"
            )
        mine, theirs = loaded.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
        if mine != theirs:
            how = (
                f"{len(mine)} vs {len(theirs)} tokens"
                if len(mine) != len(theirs)
                else f"both {len(mine)} tokens, {sum(mine.get(t) != i for t, i in theirs.items())} of them different"
            )
            raise LlmctlError(
                f"student={cfg.student} has another vocabulary than the teacher ({how}); distillation compares "
                "logits token by token, so both need one tokenizer"
            )
        run.parents.append(loaded.parent("init"))
        return loaded.model, None, f"from {src.ref}"
    s = cfg.student
    student, kept = student_from_teacher(
        teacher.model,
        num_layers=s.num_layers,
        init=str(s.init),
        width=_width_settings(cfg, teacher.model.config),
        seed=int(cfg.seed),
    )
    how = f"from teacher layers {kept}" if kept else "random init"
    return student, kept or None, how


def _width_settings(cfg, teacher_config) -> dict:
    """student.hidden_size / num_heads / intermediate_size under the teacher family's config keys."""
    s = cfg.student
    return dict(zip(WIDTH_KEYS[layout(teacher_config, "distill")], (s.hidden_size, s.num_heads, s.intermediate_size)))


def _with_projection(student, teacher, cfg):
    """The student alone, or (with a hidden-state loss across widths) wrapped with a learned projection."""
    import torch

    ws, wt = _width(student), _width(teacher)
    if float(cfg.distill.hidden_weight) <= 0 or ws == wt:
        return student, None

    class WithProjection(torch.nn.Module):  # trained together; only the student is published
        def __init__(self):
            super().__init__()
            self.student, self.projection = student, torch.nn.Linear(ws, wt)
            self.config = student.config

        def forward(self, **kwargs):
            return self.student(**kwargs)

    wrapper = WithProjection()
    return wrapper, wrapper.projection


def _width(model) -> int:
    c = model.config
    return int(getattr(c, "hidden_size", None) or c.n_embd)


def _shape(model) -> str:
    millions = count_parameters(model)[0] / 1e6
    return f"{len(transformer_layers(model))} layers × {_width(model)} · {millions:.2f} M parameters"
