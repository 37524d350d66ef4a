"""llmctl finetune — adapt a pretrained model to a task and write finetune/<name>/vNNN.

    llmctl finetune                                                   # MiniLM-L6 on BBC News topics (embedded defaults)
    llmctl finetune init_from=pretrain/bert-tiny task=classification data=bbc-news
    llmctl finetune task=ner data=conll-fixture                       # or data=files data.train=train.conll ...
    llmctl finetune model=smollm2-135m task=sft method=lora data=tiny-instruct
    llmctl finetune method=freeze method.freeze_layers=4
    llmctl finetune data=files data.train=reviews.csv data.text_column=review data.label_column=sentiment

Tasks: `classification` (text or text pair → label; accuracy, macro and per-class P/R/F1,
confusion matrix; the label map lives in config.json's id2label/label2id), `ner` (CoNLL files or
HF `tokens`/`ner_tags` data; labels on each word's first sub-word; seqeval entity-level report),
`sft` (prompt/response or chat `messages` jsonl, formatted with the model's chat template; loss on
the response tokens only; validation perplexity; sample generations before and after training
written to samples.jsonl). Methods: `full`, `freeze` (embeddings + bottom k layers), `lora`
(peft; merged into the base weights on save, the adapter kept in adapter/). The best evaluation
(selection metric) is kept, with early stopping; test metrics go into the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from llmctl.core import run as stage_run
from llmctl.core import schema
from llmctl.core.data import load_data
from llmctl.core.errors import LlmctlError
from llmctl.core.families import max_positions
from llmctl.core.finetuning import finetune
from llmctl.core.loading import load_checkpoint, require_float_weights, resolve_source, source_kind
from llmctl.core.tasks import DATA_TASK, KIND, OBJECTIVE, PACKED, prepare, task_record
from llmctl.core.tasks.labelled import class_weights, weighted_loss
from llmctl.core.tokenizer import load_tokenizer, tokenizer_hash
from llmctl.core.train import default_loss


class Sft(schema.Section):
    system_prompt: str | None = None
    num_samples: int = Field(ge=0)
    max_new_tokens: int = Field(ge=1)


class Config(schema.TrainingStageConfig):
    """conf/finetune.yaml, checked before the stage runs (core/schema.py)."""

    task: Literal["classification", "ner", "sft"]
    patience: int = Field(ge=0)
    class_weights: Literal["none", "balanced", "sqrt"]
    sft: Sft
    method: schema.Method

    @field_validator("task", mode="before")
    @classmethod
    def _not_pretraining(cls, task):
        if task in PACKED:
            raise ValueError(
                "is a pretraining objective; finetune takes classification, ner or sft "
                "(continue pretraining with llmctl pretrain init_from=...)"
            )
        return task


def run(cfg) -> float | None:
    task = str(cfg.task)  # classification | ner | sft: the schema (Config) checked it
    name = (
        f"{stage_run.name_from(cfg.init_from or cfg.model.get('pretrained'))}-{task}"  # e.g. minilm-l6-classification
    )
    with stage_run.start("finetune", cfg, default_name=name) as run:
        source, where = _source(run, cfg, task)
        tokenizer = load_tokenizer(source.path)
        _check_length(cfg, source)
        data = load_data(cfg.data, task=DATA_TASK[task], cache_dir=Path(cfg.output_root) / ".cache" / "datasets")
        prepared = prepare(
            task,
            data,
            tokenizer,
            max_seq_len=int(cfg.data.max_seq_len),
            batch_size=int(cfg.train.batch_size),
            eval_batches=cfg.train.get("eval_batches"),  # validation during training; the test split is whole
            seed=int(cfg.seed),
            system_prompt=cfg.sft.get("system_prompt"),
        )
        run.print(f"{data.summary()} · {_summary(prepared.info)}")

        loaded = load_checkpoint(run.store, source, kind=KIND[task], head=prepared.head or None, what=where)
        run.parents.append(loaded.parent("init"))
        if loaded.new_tensors:
            run.print(
                f"[dim]initialised fresh (not in {source.ref}): {', '.join(loaded.new_tensors[:6])}"
                f"{' …' if len(loaded.new_tensors) > 6 else ''}[/]"
            )
        run.print(f"model {type(loaded.model).__name__} from {source.ref} · method {cfg.method.name}")

        select = stage_run.resolve_objective(cfg, OBJECTIVE[task])
        stage_run.open_run_dir(
            run,
            {
                "stage": "finetune",
                "task": task,
                "data_fingerprint": data.fingerprint,
                "world_size": run.rt.world_size,
                "model": loaded.sha256,
                "tokenizer": tokenizer_hash(tokenizer),
            },
        )
        result = finetune(
            loaded.model,
            tokenizer,
            prepared,
            cfg.train,
            run,
            method=cfg.method,
            select=select,
            patience=int(cfg.patience),
            loss_fn=_loss(run, cfg, prepared),
            samples=int(cfg.sft.num_samples),
            max_new_tokens=int(cfg.sft.max_new_tokens),
            system_prompt=cfg.sft.get("system_prompt"),
        )
        metrics = result.metrics
        share = metrics["parameters/trainable_share"]
        run.print(
            f"trained {metrics['parameters/trainable']:,} of {metrics['parameters/total']:,} parameters "
            f"({100 * share:.2f} %)"
        )

        published = stage_run.publish(
            run,
            result.model,
            tokenizer,
            kind=KIND[task],
            metrics=metrics,
            objective=select,
            data=data,
            task=task_record(
                prepared,
                data,
                max_seq_len=int(cfg.data.max_seq_len),
                objective=select,
                stage="finetune",
                method=cfg.method.name,
            ),
        )
        if published is None:
            return None
        shown = {
            k: v
            for k, v in metrics.items()
            if k.count("/") == 1 and isinstance(v, float) and k.split("/")[0] in ("eval", "test")
        }
        run.print(
            f"[green]wrote[/] {published.ref} → {published.path}\n  "
            + " · ".join(f"{k} {v:.4f}" for k, v in shown.items())
        )
        if task == "ner" and "test/f1" in metrics:
            from llmctl.core.metrics import format_ner_table

            run.print(format_ner_table(metrics, "test"))
        return stage_run.result(published)


def _loss(run, cfg, prepared):
    """The training loss: the model's own, or with class_weights a cross-entropy weighted per label."""
    weights = class_weights(prepared, str(cfg.class_weights)) if prepared.task in ("classification", "ner") else None
    if weights is None:
        return default_loss
    shown = ", ".join(f"{n} {w:.2f}" for n, w in zip(prepared.info["labels"], weights.tolist()))
    run.print(f"class weights ({cfg.class_weights}): {shown}")
    return weighted_loss(weights)


def objective(cfg) -> tuple[str, str]:
    """What a sweep of this stage optimises: the task's selection metric, or objective_metric / _mode."""
    return stage_run.resolve_objective(cfg, OBJECTIVE[str(cfg.task)])


def _source(run, cfg, task: str):
    """init_from (any reference / HF folder) or the model preset; refuse a kind that cannot work."""
    if cfg.init_from:
        source, where = resolve_source(run.store, cfg.init_from, what="init_from"), f"init_from={cfg.init_from}"
    elif cfg.model.get("pretrained"):
        source, where = (
            resolve_source(run.store, cfg.model.pretrained, what="model.pretrained"),
            f"model={cfg.model.pretrained}",
        )
    else:
        raise LlmctlError(
            "finetune needs weights: set init_from=<reference or HF folder> or a model preset (model=minilm-l6, "
            "model=smollm2-135m)"
        )
    require_float_weights(source, what=where.split("=", 1)[0], stage="finetune")
    kind = source_kind(source)
    if task == "sft" and kind != "causal-lm":
        raise LlmctlError(
            f"{where} is a {kind} checkpoint; task=sft needs a causal LM (e.g. model=smollm2-135m or a pretrain/... "
            "causal-lm)"
        )
    if task != "sft" and kind == "causal-lm":
        raise LlmctlError(
            f"{where} is a causal-lm checkpoint; task={task} needs an encoder (a BERT-family mlm / pretraining / "
            f"seq-cls / token-cls checkpoint or HF folder, e.g. model=minilm-l6)"
        )
    return source, where


def _check_length(cfg, source) -> None:
    """data.max_seq_len must fit the model's positions (checked before anything is tokenized or trained)."""
    from transformers import AutoConfig

    positions = max_positions(AutoConfig.from_pretrained(str(source.path)))
    if positions and int(cfg.data.max_seq_len) > positions:
        raise LlmctlError(
            f"data.max_seq_len={cfg.data.max_seq_len} exceeds the {positions} positions of {source.ref}; "
            f"set data.max_seq_len={positions} or lower"
        )


def _summary(info: dict) -> str:
    if info.get("labels"):
        labels = info["labels"]
        return f"{len(labels)} labels: {', '.join(labels[:9])}{' …' if len(labels) > 9 else ''}"
    return "chat template" if info.get("chat_template") else "plain prompt format"
