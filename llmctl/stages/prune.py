"""llmctl prune — make a checkpoint smaller and write prune/<name>/vNNN.

    llmctl prune init_from=finetune/bbc method=magnitude amount=0.5 recover=true
    llmctl prune init_from=finetune/bbc method=structured amount=0.3 recover=true
    llmctl prune init_from=finetune/smollm2-chat method=structured prune.heads=0.25 prune.ffn=0.3
    llmctl prune init_from=finetune/bbc method=layers prune.keep_layers=[0,2,4]

Methods (core/pruning.py):
- `magnitude`: unstructured L1 over the transformer layers' weight matrices, global or per matrix;
  made permanent (no masks left) and the real sparsity reported per matrix. The file stays dense
  and dense CPU kernels do not skip zeros: it saves no time or disk by itself (it is the input to
  sparse formats and to compression), which the before / after table shows.
- `structured`: the least important attention heads and FFN neurons (L1 magnitude, or first-order
  Taylor scores on calibration batches of the checkpoint's own data) are removed, the same number
  in every layer, shrinking the matrices and config.json. Llama heads go in whole key-value groups;
  BERT heads are recorded per layer in the artifact record (config.json cannot say them).
- `layers`: drop whole layers (`prune.keep_layers`, or `prune.num_layers` evenly spaced).

`recover=true` fine-tunes the pruned model on the checkpoint's own task and data, read from its
manifest, with the shared fine-tuning function (magnitude masks stay on during it, so zeros stay
zero). Before and after (parameters, size on disk, batch-1 latency, throughput, the task metric)
are measured by eval's code, recorded in the manifest and printed as one table.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmctl.core import pruning, schema
from llmctl.core import run as stage_run
from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.judging import BeforeAfter, task_metrics
from llmctl.core.families import transformer_layers
from llmctl.core.finetuning import finetune
from llmctl.core.loading import resolve_source
from llmctl.core.tasks import OBJECTIVE, task_record
from llmctl.core.tasks.checkpoint import checkpoint_objective, load_on_task
from llmctl.core.tokenizer import tokenizer_hash


class Method(schema.Section):
    name: Literal["magnitude", "structured", "layers"]


class Prune(schema.Section):
    scope: Literal["global", "layer"]
    heads: float | None = Field(default=None, ge=0)
    ffn: float | None = Field(default=None, ge=0, lt=1)
    importance: Literal["magnitude", "taylor"]
    calibration_batches: int = Field(ge=1)
    keep_layers: list[int] | None = None
    num_layers: int | None = Field(default=None, ge=1)


class Config(schema.CheckpointStageConfig):
    """conf/prune.yaml, checked before the stage runs (core/schema.py)."""

    method: Method
    amount: float = Field(gt=0, lt=1)
    recover: bool
    prune: Prune


def run(cfg) -> float | None:
    method = str(cfg.method.name)
    if not cfg.init_from:
        raise LlmctlError(
            "prune needs the checkpoint to prune: init_from=<reference or HF folder>, e.g. init_from=finetune/bbc"
        )
    with stage_run.start("prune", cfg, default_name=stage_run.name_from(cfg.init_from)) as run:
        # ---- the checkpoint, its task and data ----
        source = resolve_source(run.store, cfg.init_from, what="init_from")
        on = load_on_task(run, cfg, source, what="init_from", stage="prune")
        loaded, kind, task, data, prepared = on.loaded, on.kind, on.task, on.data, on.prepared
        model, tok = loaded.model, loaded.tokenizer
        run.parents.append(loaded.parent("init"))
        run.print(f"{type(model).__name__} from {source.ref} · {task} · {data.summary()} · {_shape(model)}")

        # ---- prune (a bad cut fails here, before the slow judging); the original is judged as "before" ----
        judged = BeforeAfter.of(on, model, run, cfg) if method == "magnitude" else None  # masks in place: judge first
        report = _prune(run, cfg, method, model, prepared)
        judged = judged or BeforeAfter.of(on, model, run, cfg)  # structured and layer cuts leave this model as it was
        model = report.pop("model")
        run.print(f"pruned ({method}): {_shape(model)}" + (f" · {report['summary']}" if report.get("summary") else ""))

        # ---- recover, judge, publish ----
        select = stage_run.resolve_objective(cfg, OBJECTIVE[task])
        stage_run.open_run_dir(
            run,
            {
                "stage": "prune",
                "task": task,
                "data_fingerprint": data.fingerprint,
                "world_size": run.rt.world_size,
                "model": loaded.sha256,
                "tokenizer": tokenizer_hash(tok),
            },
        )
        if cfg.recover:
            metrics = finetune(model, tok, prepared, cfg.train, run, select=select, patience=int(cfg.patience)).metrics
        else:
            metrics = task_metrics(model, prepared, run.rt, int(cfg.seed))
        if not run.rt.is_main:  # rank 0 judges and publishes
            return None
        if method == "magnitude":
            report["sparsity"] = pruning.finalize_magnitude(model)
            shares = list(report["sparsity"].values())
            run.print(
                f"sparsity per matrix: {min(shares):.1%} – {max(shares):.1%} (mean {sum(shares) / len(shares):.1%})"
            )
        settings = {
            "method": method,
            "amount": float(cfg.amount),
            "recover": bool(cfg.recover),
            **{k: cfg.prune[k] for k in cfg.prune},
            "cut": report,
        }  # what was removed: heads / FFN before and after, kept layers, sparsity per matrix
        published = judged.publish(
            run,
            model,
            tok,
            title=f"llmctl prune · {method}",
            kind=kind,
            metrics=metrics,
            objective=select,
            data=data,
            task=task_record(prepared, data, max_seq_len=on.length, objective=select, stage="prune", method=method),
            extra={"prune": settings},
        )
        return stage_run.result(published)


def objective(cfg) -> tuple[str, str]:
    """What a sweep of this stage optimises: the checkpoint's task's objective, or objective_metric / _mode."""
    return checkpoint_objective(cfg, "init_from")


def _prune(run, cfg, method: str, model, prepared) -> dict:
    """Cut the model; returns {"model": the pruned model, ...what the manifest records about the cut}."""
    p = cfg.prune
    if method == "magnitude":
        pruning.magnitude(model, amount=float(cfg.amount), scope=str(p.scope))
        return {"model": model}
    if method == "structured":
        heads = float(cfg.amount) if p.heads is None else float(p.heads)
        ffn = float(cfg.amount) if p.ffn is None else float(p.ffn)
        scores = None
        if p.importance == "taylor":
            batches = prepared.batches("train", int(cfg.train.batch_size), int(p.calibration_batches))
            scores = pruning.taylor_scores(model, batches, run.rt.device)
        new, report = pruning.structured(model, heads=heads, ffn=ffn, importance=str(p.importance), scores=scores)
        h, f = report["heads"], report["ffn"]
        return {
            "model": new,
            **report,
            "summary": f"heads {h['before']} → {h['after']} per layer, FFN {f['before']} → {f['after']}",
        }
    depth = len(transformer_layers(model))
    if p.keep_layers is not None:
        keep = [int(i) for i in p.keep_layers]
    elif p.num_layers is not None:
        keep = pruning.keep_evenly(depth, int(p.num_layers))
    else:
        raise LlmctlError("method=layers needs prune.keep_layers=[0,2,4] or prune.num_layers=<how many to keep>")
    return {
        "model": pruning.drop_layers(model, keep=keep),
        "kept_layers": keep,
        "summary": f"kept layers {keep} of {depth}",
    }


def _shape(model) -> str:
    from llmctl.core.models import count_parameters

    return f"{len(transformer_layers(model))} layers · {count_parameters(model)[0] / 1e6:.2f} M parameters"
