"""llmctl export — write a checkpoint as an artifact other runtimes load, checked against its source, as
export/<name>/vNNN.

    llmctl export ckpt=finetune/bbc format=onnx                          # an encoder → ONNX (ONNX Runtime)
    llmctl export ckpt=quantize/bbc format=onnx                          # int8-dynamic: its float parent → ORT int8
    llmctl export ckpt=finetune/smollm2-chat format=gguf gguf.type=q8_0  # a Llama / GPT-2 causal LM → GGUF
    llmctl export ckpt=quantize/smollm2-chat-int4 format=gguf            # int4 groups of 32 → their own Q4_1 blocks
    llmctl eval 'ckpt=[finetune/bbc,quantize/bbc,export/bbc]'            # an export judged like any checkpoint

`format=onnx` takes encoders (classification, NER, the base encoder; a head-pruned BERT too) through transformers'
own exporter (`torch.onnx` dynamo) with dynamic batch and sequence axes; a checkpoint quantized int8 is exported
from its float parent and quantized with ONNX Runtime's dynamic int8. `format=gguf` takes Llama-layout and GPT-2
causal LMs through the `gguf` package's writer (f32, f16, bf16, q8_0, q4_0, q4_1; an int4-weight checkpoint in
groups of 32 maps onto Q4_1 blocks (min–max groups) or Q4_0 ones (symmetric) without re-quantizing), tokenizer,
special tokens and chat template included. Every export is checked on the checkpoint's own evaluation split at
shapes it was not traced at: max |Δlogit| (ONNX) or the perplexity delta after reloading the file with transformers'
GGUF reader (GGUF), and the task metric and cost of source and export side by side, recorded in the manifest and
printed as one table. The export is a version like any other: `ckpt list / show / lineage` show it and `eval` judges
it by reference.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmctl.core import run as stage_run
from llmctl.core import schema
from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.cost import cost_settings, parameter_counts
from llmctl.core.evaluation.judging import BeforeAfter, task_metrics
from llmctl.core.export import gguf, onnx
from llmctl.core.families import LAYOUT
from llmctl.core.loading import EXPORT_FORMATS, load_checkpoint, resolve_source, source_kind
from llmctl.core.store import parent_entry
from llmctl.core.tasks import OBJECTIVE, task_record
from llmctl.core.tasks.checkpoint import load_on_task
from llmctl.core.tokenizer import tokenizer_hash


class Onnx(schema.Section):
    int8: Literal["auto", True, False]
    opset: int | None = Field(default=None, ge=14)


class Gguf(schema.Section):
    type: Literal["auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]


class Config(schema.StageConfig):
    """conf/export.yaml, checked before the stage runs (core/schema.py)."""

    ckpt: str
    format: Literal["onnx", "gguf"]
    onnx: Onnx
    gguf: Gguf
    data: schema.Data | None = None
    max_seq_len: int | None = Field(default=None, ge=8)
    batch_size: int = Field(ge=1)
    cost: schema.Cost


def run(cfg) -> float | None:
    fmt = str(cfg.format)
    with stage_run.start("export", cfg, default_name=stage_run.name_from(cfg.ckpt)) as run:
        # ---- what is exported, from which floating-point weights (all checked before anything loads) ----
        source = resolve_source(run.store, cfg.ckpt, what="ckpt")
        stored = (source.manifest or {}).get("artifact") or {}
        if stored.get("format") in EXPORT_FORMATS:
            parent = next((p["ref"] for p in (source.manifest or {}).get("parents") or []), "its source")
            raise LlmctlError(f"ckpt={source.ref} is already an export ({stored['format']}); export {parent} instead")
        kind, quantization = source_kind(source), stored.get("quantization")
        float_source = _float_source(run, source, quantization, fmt)
        _check_kind(cfg, source, kind, fmt)

        # ---- the checkpoint on its own task (its float weights), and what the export is judged against ----
        on = load_on_task(run, cfg, float_source, what="ckpt", stage="export")
        reference = (
            load_checkpoint(run.store, source, what="ckpt").model if float_source is not source else on.loaded.model
        )
        tok, prepared = on.loaded.tokenizer, on.prepared
        run.parents.append(parent_entry(source, "export"))
        stage_run.open_run_dir(
            run,
            {
                "stage": "export",
                "task": on.task,
                "data_fingerprint": on.data.fingerprint,
                "world_size": 1,
                "model": run.parents[0]["weights_sha256"],
                "tokenizer": tokenizer_hash(tok),
                "format": fmt,
            },
        )
        judged = BeforeAfter(
            reference.eval(),
            prepared,
            on.split,
            ref=source.ref,
            folder=source.path,
            rt=run.rt,
            seed=int(cfg.seed),
            cost=cost_settings(cfg.cost),
            names=("source", "export"),
        )

        # ---- export into the run folder, then check it ----
        if fmt == "onnx":
            int8 = bool(quantization) if cfg.onnx.int8 == "auto" else bool(cfg.onnx.int8)
            record = onnx.export_onnx(on.loaded.model, tok, run.run_dir, int8=int8, opset=cfg.onnx.opset)
            exported = onnx.OnnxModel(run.run_dir, kind, {**record, "parameters": parameter_counts(on.loaded.model)})
            parity = {"max_abs_logit_diff": onnx.max_logit_gap(reference, exported, prepared, on.split)}
            if float_source is not source:  # an int8 source: also against the float weights the graph came from
                parity["max_abs_logit_diff_vs_float"] = onnx.max_logit_gap(
                    on.loaded.model, exported, prepared, on.split
                )
            artifact = {"format": "onnx", "dtype": "int8" if int8 else "float32", **record}
        else:
            gtype = gguf.choose_type(str(cfg.gguf.type), quantization)
            int4 = reference if quantization and gtype in gguf.INT4 else None
            record = gguf.export_gguf(on.loaded.model, tok, run.run_dir, gtype, int4_model=int4)
            exported = gguf.load(run.run_dir, record["file"])
            parity = {}
            artifact = {"format": "gguf", "dtype": gtype, **record}
        metrics = task_metrics(exported, prepared, run.rt, int(cfg.seed))
        if fmt == "gguf":
            before = task_metrics(reference, prepared, run.rt, int(cfg.seed))
            parity = {
                "perplexity": metrics.get("eval/perplexity"),
                "source_perplexity": before.get("eval/perplexity"),
                "perplexity_delta": metrics.get("eval/perplexity", 0.0) - before.get("eval/perplexity", 0.0),
            }
        run.print(
            "parity on the "
            + on.split
            + " split: "
            + " · ".join(f"{k} {v:.4g}" for k, v in parity.items() if isinstance(v, float))
        )
        select = stage_run.resolve_objective(cfg, OBJECTIVE[on.task])
        published = judged.publish(
            run,
            exported,
            tok,
            title=f"llmctl export · {fmt}",
            kind=kind,
            metrics={**metrics, **_prefixed(parity)},
            objective=select,
            data=on.data,
            artifact=artifact,
            save_weights=lambda folder, dtype: None,
            task=task_record(prepared, on.data, max_seq_len=on.length, objective=select, stage="export", method=fmt),
            extra={
                "export": {
                    "format": fmt,
                    **record,
                    "parity": parity,
                    "parameters": list(exported.stored_parameters())
                    if hasattr(exported, "stored_parameters")
                    else list(parameter_counts(exported)),
                    "traced_from": float_source.ref,
                }
            },
        )
        return stage_run.result(published)


def _float_source(run, source, quantization, fmt: str):
    """The floating-point checkpoint the export is made from: the checkpoint, or for a quantized one its parent
    (ONNX Runtime quantizes it into its own int8 operators; GGUF writes its own blocks)."""
    if not quantization:
        return source
    scheme = (quantization.get("scheme") or quantization.get("method")) if isinstance(quantization, dict) else None
    parents = [p for p in (source.manifest or {}).get("parents") or [] if p.get("role") == "init"]
    if fmt == "onnx" and scheme not in ("int8-dynamic", "int8-weight"):
        raise LlmctlError(
            f"ckpt={source.ref} is quantized {scheme}; ONNX export takes int8 (ONNX Runtime's dynamic "
            f"int8) — export its parent {parents[0]['ref'] if parents else ''} instead".rstrip()
        )
    if fmt == "gguf" and scheme != "int4-weight":
        raise LlmctlError(
            f"ckpt={source.ref} is quantized {scheme}; GGUF takes an int4-weight checkpoint (as Q4_0) "
            f"or a floating-point one: export its parent with gguf.type=q8_0 for 8 bits"
        )
    if not parents:
        raise LlmctlError(f"ckpt={source.ref} is quantized and records no parent to export from")
    return resolve_source(run.store, parents[0].get("path") or parents[0]["ref"], what="ckpt")


def _check_kind(cfg, source, kind: str, fmt: str) -> None:
    if fmt == "onnx" and kind not in onnx.ENCODER_KINDS:
        hint = "export causal LMs with format=gguf" if kind == "causal-lm" else "export a single-head encoder"
        raise LlmctlError(
            f"ckpt={source.ref} is a {kind} checkpoint; format=onnx takes encoders "
            f"({', '.join(onnx.ENCODER_KINDS)}): {hint}"
        )
    if fmt == "gguf":
        family = gguf.family_of(source.path)
        if kind != "causal-lm" or LAYOUT.get(family) not in ("llama", "gpt2"):
            raise LlmctlError(
                f"ckpt={source.ref} is a {family} {kind} checkpoint; format=gguf takes Llama-layout and "
                f"GPT-2 causal LMs (llama.cpp has no encoders): export it with format=onnx"
            )


def _prefixed(parity: dict) -> dict:
    return {f"parity/{k}": v for k, v in parity.items() if isinstance(v, (int, float))}
