"""llmctl quantize — store a checkpoint's weights in int8 / int4 and write quantize/<name>/vNNN.

    llmctl quantize init_from=finetune/bbc method=int8-dynamic
    llmctl quantize init_from=finetune/bbc method=int8-weight
    llmctl quantize init_from=finetune/smollm2-chat method=int4-weight quantize.group_size=32
    llmctl quantize init_from=finetune/bbc method=qat train.max_steps=200
    llmctl quantize init_from=finetune/smollm2-chat method=auto quantize.goal=size
    llmctl eval 'ckpt=[finetune/bbc,quantize/bbc]'

Methods (core/quantization.py, one adapter over the kernels measured fastest on CPU):
- `int8-dynamic`: int8 weights per output channel × int8 activations quantized per token on the fly
  (`aten._int_mm`, CPU kernels): smaller and faster. Linears whose inputs peak above
  `quantize.outlier_ratio` × their RMS on `quantize.calibration_batches` batches of the checkpoint's
  own data stay in fp32 (a few loud channels take a token's whole int8 range: SmolLM2's down_proj).
- `int8-weight` / `int4-weight`: weight-only, stored in torchao's portable layout; decoding runs torch's packed
  int8 / int4 kernels built at load (core/quantization/kernels.py): smaller and faster at batch 1.
  `quantize.group_size` sets the int4 groups (default 32); each spans its own min–max range (a float zero point,
  `quantize.zero_point`), and a layer whose rounding error is low-rank (a fine-tune merged onto a 4-bit base) gets
  a rank-`quantize.error_rank` float correction fitted on calibration batches (core/quantization/lowrank.py).
- `auto`: quantize a copy with each method the device runs (and, for a decoder, each weight-only one with an
  int8 output layer), judge them all like the original on validation, print the table, and publish the one
  `quantize.goal` picks: `speed` (decode tokens/s, or batch-1 latency) or `size` among those within
  `quantize.max_drop` of the original's primary metric, or `quality`. The manifest keeps the table and why.
- `qat`: fake-quantize toward `method.base` (int4-weight by default), train on the checkpoint's own
  task and data with the shared loop (`train.*`), convert: the result loads like a PTQ artifact.
Embedding tables are stored as int8 rows too (`quantize.embeddings`); the task head and
`quantize.skip` patterns stay in floating point, except a causal LM's output layer with `quantize.head_int8=true`
(int8 weight-only beside a weight-only scheme: SmolLM2's tied 49k × 576 table is a fifth of its fp32 bytes and
most of what an int4 decode step reads).

The result is a version like any other, in safetensors (no pickle): its manifest's artifact record
names the method and every quantized module, and the loader rebuilds them, so eval and generate take
it by reference. Before and after (size on disk, batch-1 latency, throughput, the task metric) are
measured by eval's code, recorded in the manifest and printed as one table. Fine-tuning, distilling,
pruning or quantizing a quantized checkpoint is refused (quantize its parent instead).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmctl.core import quantization, schema
from llmctl.core import run as stage_run
from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.cost import cost_settings
from llmctl.core.evaluation.judging import BeforeAfter, task_metrics
from llmctl.core.finetuning import finetune
from llmctl.core.loading import artifact_record, resolve_source
from llmctl.core.quantization import choice
from llmctl.core.tasks import OBJECTIVE, task_record
from llmctl.core.tasks.checkpoint import checkpoint_objective, load_on_task
from llmctl.core.tokenizer import tokenizer_hash


class Method(schema.Section):
    name: Literal["int8-dynamic", "int8-weight", "int4-weight", "qat", "auto"]
    base: Literal["int4-weight", "int8-weight"] | None = None


class Quantize(schema.Section):
    group_size: int | None = Field(default=None, ge=2)
    skip: list[str] = []
    keep_head: bool
    head_int8: bool = False
    embeddings: bool
    calibration_batches: int = Field(ge=0)
    outlier_ratio: float = Field(gt=1)
    zero_point: bool = True
    error_rank: int = Field(default=16, ge=0)
    goal: Literal["speed", "size", "quality"] = "speed"
    max_drop: float = Field(default=0.05, ge=0)


class Config(schema.CheckpointStageConfig):
    """conf/quantize.yaml, checked before the stage runs (core/schema.py)."""

    method: Method
    quantize: Quantize


def run(cfg) -> float | None:
    method = str(cfg.method.name)
    if not cfg.init_from:
        raise LlmctlError(
            "quantize needs the checkpoint to quantize: init_from=<reference or HF folder>, e.g. init_from=finetune/bbc"
        )
    q = cfg.quantize
    settings = {
        "group_size": None if q.group_size is None else int(q.group_size),
        "skip": [str(s) for s in q.skip],
        "keep_head": bool(q.keep_head),
        "embeddings": bool(q.embeddings),
        "head_int8": bool(q.head_int8),
    }
    int4 = {"zero_point": bool(q.zero_point), "error_rank": int(q.error_rank)}  # PTQ (QAT trains symmetric groups)
    with stage_run.start("quantize", cfg, default_name=stage_run.name_from(cfg.init_from)) as run:
        # ---- what and how: every unsupported combination is refused before anything loads ----
        # method=auto: measure the candidates, pick by quantize.goal (core/quantization/choice.py)
        auto, picked = method == "auto", None
        if auto:
            choice.check_goal(str(q.goal), cost_settings(cfg.get("cost")))
        scheme = (
            method
            if auto
            else quantization.check(
                method,
                device=run.rt.device,
                group_size=settings["group_size"],
                base=cfg.method.get("base"),
                head_int8=settings["head_int8"],
            )
        )
        if run.rt.distributed and method != "qat":
            raise LlmctlError(
                f"quantize method={method} runs in one process (only method=qat trains); drop the multi-process "
                f"setting (torchrun, device=[0,1])"
            )
        source = resolve_source(run.store, cfg.init_from, what="init_from")
        on = load_on_task(run, cfg, source, what="init_from", stage="quantize")
        loaded, kind, task, data, prepared = on.loaded, on.kind, on.task, on.data, on.prepared
        model, tok = loaded.model, loaded.tokenizer
        run.parents.append(loaded.parent("init"))
        what = f"goal={q.goal}" if auto else quantization.SCHEMES[scheme]["what"]
        run.print(f"{type(model).__name__} from {source.ref} · {task} · {data.summary()} · {scheme} ({what})")
        # a bad skip pattern or nothing to quantize fails here, before the slow judging and the run folder
        group = settings["group_size"] if settings["group_size"] is not None else quantization.DEFAULT_GROUP.get(scheme)
        chosen = quantization.targets(
            model,
            skip=settings["skip"],
            keep_head=settings["keep_head"],
            embeddings=settings["embeddings"],
            group_size=group,
            head_int8=settings["head_int8"],
        )

        # ---- judge the original, quantize (QAT: fake-quantize, train, convert), judge, publish ----
        judged = BeforeAfter.of(on, model, run, cfg)
        select = stage_run.resolve_objective(cfg, OBJECTIVE[task])
        stage_run.open_run_dir(
            run,
            {
                "stage": "quantize",
                "task": task,
                "data_fingerprint": data.fingerprint,
                "world_size": run.rt.world_size,
                "model": loaded.sha256,
                "tokenizer": tokenizer_hash(tok),
                "method": method,
            },
        )
        if method == "qat":
            qrecord = quantization.prepare_qat(model, scheme, **settings)
            trained = finetune(model, tok, prepared, cfg.train, run, select=select, patience=int(cfg.patience)).metrics
            qrecord = quantization.finish_qat(model, qrecord)
            if not run.rt.is_main:  # rank 0 judges and publishes
                return None
        else:

            def calibration():  # the first training batches
                return prepared.batches("train", int(cfg.train.batch_size), int(q.calibration_batches))

            def outliers(m):  # int8-dynamic: Linears whose inputs are too peaked for int8 activations stay fp32
                if not q.calibration_batches:
                    return None
                ratio = float(q.outlier_ratio)
                return quantization.activation_outliers(m, calibration(), chosen["linear"], ratio=ratio)

            def input_scales(m):  # int4 error correction: each Linear's input RMS per channel on the same batches
                if not (q.error_rank and q.calibration_batches):
                    return None
                return quantization.input_rms(m, calibration(), chosen["linear"])

            trained = {}
            if auto:
                qrecord, picked = choice.auto(
                    model,
                    on,
                    run,
                    settings={**settings, **int4},
                    goal=str(q.goal),
                    max_drop=float(q.max_drop),
                    cost=cost_settings(cfg.get("cost")),
                    seed=int(cfg.seed),
                    outliers=outliers,
                    input_scales=input_scales,
                )
                method = qrecord["method"]
                settings.update(group_size=qrecord["group_size"], head_int8=bool(qrecord.get("head_int8")))
            else:
                found = outliers(model) if scheme == "int8-dynamic" else None
                scales = input_scales(model) if scheme == "int4-weight" else None
                qrecord = quantization.quantize(
                    model, scheme, method=method, outliers=found, input_scales=scales, **settings, **int4
                )
        metrics = {**trained, **task_metrics(model, prepared, run.rt, int(cfg.seed))}  # the published weights' own
        run.print(
            f"quantized ({method}): {len(qrecord['linear'])} linear layers → {qrecord['bits']}-bit"
            + (f" in groups of {qrecord['group_size']}" if qrecord.get("group_size") else "")
            + (", symmetric" if qrecord.get("zero_point") is False else "")
            + (
                f", {len(qrecord['lowrank'])} of them with a rank-{qrecord['lowrank_rank']} error correction"
                if qrecord.get("lowrank")
                else ""
            )
            + (f", {len(qrecord['embeddings'])} embedding tables → int8 rows" if qrecord["embeddings"] else "")
            + (f", output layer {', '.join(qrecord['head_int8'])} → int8" if qrecord.get("head_int8") else "")
            + (f"; kept in floating point: {', '.join(qrecord['kept'])}" if qrecord["kept"] else "")
            + (
                f" (inputs peaking at {', '.join(f'{v:.0f}' for v in qrecord['outliers'].values())}× their RMS)"
                if qrecord.get("outliers")
                else ""
            )
        )
        published = judged.publish(
            run,
            model,
            tok,
            title=f"llmctl quantize · {method}",
            kind=kind,
            metrics=metrics,
            objective=select,
            data=data,
            task=task_record(prepared, data, max_seq_len=on.length, objective=select, stage="quantize", method=method),
            extra={
                "quantize": {
                    "method": method,
                    **settings,
                    **({} if method == "qat" else int4),  # what QAT did not apply is not recorded as its setting
                    "base": cfg.method.get("base"),
                    "calibration_batches": int(q.calibration_batches),
                    "outlier_ratio": float(q.outlier_ratio),
                    **({"auto": picked} if picked else {}),
                }
            },
            artifact=artifact_record(model, qrecord),
            save_weights=lambda folder, dtype: quantization.save(model, qrecord, folder, dtype=dtype),
        )
        return stage_run.result(published)


def objective(cfg) -> tuple[str, str]:
    """What a sweep of this stage optimises: the checkpoint's task's objective, or objective_metric / _mode."""
    return checkpoint_objective(cfg, "init_from")
