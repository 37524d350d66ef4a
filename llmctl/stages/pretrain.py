"""llmctl pretrain — pre-train a BERT (masked LM, optionally with next-sentence prediction) or a GPT
(causal LM) and write it as pretrain/<name>/vNNN.

    llmctl pretrain                                          # bert-tiny, MLM, BBC News (embedded defaults)
    llmctl pretrain conf=gpt-tiny data=kjv train.max_steps=300 name=kjv-gpt
    llmctl pretrain conf=bert-base objective=mlm+nsp         # BERT-base shapes, MLM + NSP
    llmctl pretrain conf=bert-tiny init_from=pretrain/bert-tiny train.lr=3e-4   # new run from those weights
    llmctl pretrain conf=bert-tiny resume=auto              # continue an interrupted run
    llmctl pretrain -m conf=gpt-tiny train.lr=3e-4,1e-3 [hydra/launcher=joblib]
    torchrun --nproc-per-node 2 -m llmctl pretrain conf=gpt-tiny   # DDP (gloo on CPU, nccl on GPU)

Objectives: `mlm` (15 % of tokens selected; 80 % [MASK], 10 % random, 10 % kept), `mlm+nsp` (real
sentence pairs, 50 % next / 50 % random), `clm` (every token is a target, end-of-text included,
so the model learns where documents end). The tokenizer comes from tokenizer.from, init_from or
model.pretrained, else is trained on the corpus (WordPiece / byte-level BPE). Validation loss and
perplexity are logged during training and recorded in the manifest, next to a unigram baseline
on the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmctl.core import run as stage_run
from llmctl.core import schema
from llmctl.core.data import examples_in, load_data, unigram_loss
from llmctl.core.device import barrier
from llmctl.core.errors import LlmctlError
from llmctl.core.families import max_positions
from llmctl.core.loading import load_checkpoint, resolve_source
from llmctl.core.models import build_model, count_parameters
from llmctl.core.objectives import ChunkedCausalLM, LossModule, SparseMLM, chunked_loss_supported, module_loss
from llmctl.core.tasks import KIND, OBJECTIVE, evaluated_rows, prepare, task_record
from llmctl.core.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer
from llmctl.core.train import Trainer, default_loss

FAMILIES = {"mlm": ("bert",), "mlm+nsp": ("bert",), "clm": ("gpt2", "llama")}


class Tokenizer(schema.Section):
    from_: str | None = Field(default=None, alias="from")
    vocab_size: int = Field(ge=64)
    lowercase: bool


class Config(schema.TrainingStageConfig):
    """conf/pretrain.yaml, checked before the stage runs (core/schema.py)."""

    objective: Literal["mlm", "mlm+nsp", "clm"]
    mlm_probability: float = Field(gt=0, lt=1)
    mlm_sparse_head: bool
    clm_chunked_loss: bool
    tokenizer: Tokenizer


def run(cfg) -> float | None:
    objective = str(cfg.objective)  # one of PACKED: the schema (Config) checked it
    with stage_run.start("pretrain", cfg) as run:
        source = _source(run, cfg)
        family = _family(cfg, source, objective)
        data, tokenizer, prepared = _setup_data(run, cfg, source, family, objective)
        model = _setup_model(run, cfg, source, family, objective, tokenizer)
        baseline = _unigram_baseline(prepared, tokenizer, objective, cfg)

        stage_run.open_run_dir(
            run,
            {
                "stage": "pretrain",
                "task": objective,
                "data_fingerprint": data.fingerprint,
                "world_size": run.rt.world_size,
                "tokenizer": tokenizer_hash(tokenizer),
                "model": run.parents[0]["weights_sha256"] if run.parents else _config_hash(model),
            },
        )
        run.print(_describe_model(run, model))
        trained, loss_fn = model, default_loss
        wrap = not run.rt.sharded  # FSDP shards the HF model's own forward; the loss wrappers reach around it
        if wrap and objective != "clm" and cfg.mlm_sparse_head:
            trained, loss_fn = SparseMLM(model), module_loss  # same loss, vocabulary projection on masked tokens only
        elif wrap and objective == "clm" and cfg.clm_chunked_loss and chunked_loss_supported(model):
            trained, loss_fn = ChunkedCausalLM(model), module_loss  # same loss, logits never held whole
        trainer = Trainer(
            trained,
            train_data=prepared.splits["train"],
            collate=prepared.collate,
            cfg=cfg.train,
            rt=run.rt,
            run_dir=run.run_dir,
            state_dir=run.state_dir,
            seed=int(cfg.seed),
            loss_fn=loss_fn,
            console=run.console,
            evaluate=lambda m: prepared.evaluate(m.model if isinstance(m, LossModule) else m),
            identity=run.identity,
        )
        metrics = trainer.fit(run.resume_state)
        metrics["baseline/unigram_loss"] = baseline

        result = stage_run.publish(
            run,
            model,
            tokenizer,
            kind=KIND[objective],
            metrics=metrics,
            objective=OBJECTIVE[objective],
            data=data,
            task=task_record(
                prepared,
                data,
                max_seq_len=int(cfg.data.max_seq_len),
                objective=stage_run.resolve_objective(cfg, OBJECTIVE[objective]),
                stage="pretrain",
                packed_sequences={k: examples_in(v) for k, v in prepared.splits.items()},
                loss=getattr(trained, "name", LossModule.name),
            ),
        )
        if result is None:
            return None
        run.print(
            f"[green]wrote[/] {result.ref} → {result.path}\n"
            f"  eval loss {metrics.get('eval/loss', float('nan')):.4f} · perplexity "
            f"{metrics.get('eval/perplexity', float('nan')):.2f}"
            f" · unigram baseline loss {baseline:.4f} · {metrics['train/tokens_per_s']:,.0f} tokens/s"
        )
        return stage_run.result(result)


def objective(cfg) -> tuple[str, str]:
    """What a sweep of this stage optimises: the objective's validation loss, or objective_metric / _mode."""
    return stage_run.resolve_objective(cfg, OBJECTIVE[str(cfg.objective)])


def _source(run, cfg):
    """The checkpoint whose weights this run starts from (init_from, else model.pretrained), or None."""
    if cfg.init_from:
        return resolve_source(run.store, cfg.init_from, what="init_from")
    if cfg.model.get("pretrained"):
        return resolve_source(run.store, cfg.model.pretrained, what="model.pretrained")
    return None


def _family(cfg, source, objective: str) -> str:
    family = cfg.model.family
    if source is not None:
        family = json.loads((source.path / "config.json").read_text()).get("model_type", family)
    if family not in FAMILIES[objective]:
        raise LlmctlError(
            f"objective={objective} needs a {' or '.join(FAMILIES[objective])} model, but the model is {family}; "
            f"use conf={'gpt-tiny' if objective == 'clm' else 'bert-tiny'} or "
            f"objective={'clm' if family != 'bert' else 'mlm'}"
        )
    return family


def _setup_data(run, cfg, source, family: str, objective: str):
    """Corpus → tokenizer (reused or trained) → packed sequences; rank 0 builds the caches first."""
    data = load_data(cfg.data, task="text", cache_dir=Path(cfg.output_root) / ".cache" / "datasets")
    cache = Path(cfg.output_root) / ".cache"
    max_len = int(cfg.data.max_seq_len)
    result = None
    for turn in ("main", "others"):
        if (turn == "main") == run.rt.is_main:
            if cfg.tokenizer.get("from"):
                tok = load_tokenizer(_tokenizer_folder(run, str(cfg.tokenizer["from"])))
            elif source is not None:
                tok = load_tokenizer(source.path)
            else:
                tok = train_tokenizer(
                    _tokenizer_texts(data, cfg),
                    family=family,
                    vocab_size=int(cfg.tokenizer.vocab_size),
                    lowercase=bool(cfg.tokenizer.lowercase),
                    max_len=max_len,
                    cache_root=cache,
                    data_fp=data.fingerprint,
                    say=run.print,
                )
            prepared = prepare(
                objective,
                data,
                tok,
                max_seq_len=max_len,
                batch_size=int(cfg.train.batch_size),
                seed=int(cfg.seed),
                cache_root=cache,
                eval_batches=cfg.train.get("eval_batches"),
                mlm_probability=float(cfg.mlm_probability),
            )
            result = (data, tok, prepared)
        barrier(run.rt)
    run.print(
        f"{data.summary()} → "
        + " / ".join(f"{examples_in(v)} {k}" for k, v in result[2].splits.items())
        + f" sequences of ≤{max_len} tokens · vocab {len(result[1])}"
    )
    return result


def _tokenizer_folder(run, spec: str) -> Path:
    """tokenizer.from: a checkpoint reference, an HF model folder, or a folder holding only a tokenizer."""
    folder = Path(spec).expanduser()
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return folder
    return resolve_source(run.store, spec, what="tokenizer.from").path


def _setup_model(run, cfg, source, family: str, objective: str, tokenizer):
    if source is not None:
        loaded = load_checkpoint(
            run.store, source, kind=KIND[objective], what="init_from" if cfg.init_from else "model.pretrained"
        )
        model = loaded.model
        run.parents.append(loaded.parent("init"))
    else:
        model = build_model(family, cfg.model.config, KIND[objective], tokenizer)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise LlmctlError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings; use the model's own tokenizer"
        )
    positions = max_positions(model.config)
    if positions and int(cfg.data.max_seq_len) > positions:
        raise LlmctlError(
            f"data.max_seq_len={cfg.data.max_seq_len} exceeds the model's {positions} positions; lower data.max_seq_len"
        )
    return model


def _describe_model(run, model) -> str:
    """The model line, once the run folder is chosen: where its weights come from (a resumed run's state holds
    them, whatever the model was built from)."""
    if run.resumed:  # (rank 0 checked the interrupted run; the other ranks print nothing)
        origin = f"weights from the interrupted run's state ({run.resumed['run']}, step {run.resumed['from_step']})"
    else:
        origin = f"from {run.parents[0]['ref']}" if run.parents else "random init"
    return f"model {type(model).__name__} · {count_parameters(model)[0] / 1e6:.2f} M parameters · {origin}"


def _tokenizer_texts(data, cfg):
    """The texts a new tokenizer learns from: the train split, or (data.streaming) its first data.streaming_sample
    documents."""
    if not data.streamed:
        return data["train"]["text"]
    return [row["text"] for row in data["train"].take(int(cfg.data.streaming_sample))]


def _unigram_baseline(prepared, tokenizer, objective: str, cfg) -> float:
    """Loss of an add-one unigram model fit on the training tokens (at most 20,000 sequences; a stream's first
    ones), on the evaluated validation tokens."""
    train = prepared.splits["train"]
    scored = evaluated_rows(prepared.splits["validation"], cfg.train.get("eval_batches"), int(cfg.train.batch_size))
    ignore = set() if objective == "clm" else set(tokenizer.all_special_ids)
    if not hasattr(train, "__len__"):  # data.streaming
        fitted = [row["input_ids"].tolist() for row in train.take(20000)]
    else:
        fitted = train.select(range(min(20000, len(train)))).with_format(None)["input_ids"][:]
    return unigram_loss(
        fitted,
        scored.with_format(None)["input_ids"][:],
        len(tokenizer),
        ignore,
    )


def _config_hash(model) -> str:
    import hashlib

    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()
