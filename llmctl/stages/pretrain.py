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
sentence pairs, 50 % next / 50 % random), `clm`. The tokenizer comes from tokenizer.from,
init_from or model.pretrained, else is trained on the corpus (WordPiece / byte-level BPE).
Validation loss and perplexity are logged during training and recorded in the manifest, next to
a unigram baseline on the same tokens.
"""

from __future__ import annotations

from llmctl.core.errors import LlmctlError

KIND = {"mlm": "mlm", "mlm+nsp": "pretraining", "clm": "causal-lm"}
FAMILIES = {"mlm": ("bert",), "mlm+nsp": ("bert",), "clm": ("gpt2", "llama")}


def run(cfg) -> float | None:
    from llmctl.core import run as stage_run

    run = stage_run.start("pretrain", cfg)
    objective = str(cfg.objective)
    if objective not in KIND:
        raise LlmctlError(f"objective={objective!r} is not one of {', '.join(KIND)}")
    init = run.store.resolve(cfg.init_from, what="init_from") if cfg.init_from else None
    family = _family(cfg, init, objective)

    data, tokenizer, packed, data_fp = _setup_data(run, cfg, init, family, objective)
    model = _setup_model(run, cfg, init, family, objective, tokenizer)
    collate, evaluate, baseline = _setup_objective(run, cfg, tokenizer, packed, objective)

    from llmctl.core.objectives import SparseMLM, sparse_mlm_loss
    from llmctl.core.run import open_run_dir
    from llmctl.core.train import Trainer, default_loss

    open_run_dir(run)
    trained, loss_fn = model, default_loss
    if objective != "clm" and cfg.mlm_sparse_head:
        trained, loss_fn = SparseMLM(model), sparse_mlm_loss  # same loss, vocabulary projection on masked tokens only
    trainer = Trainer(trained, train_data=packed["train"], collate=collate, cfg=cfg.train, rt=run.rt, run_dir=run.run_dir,
                      seed=int(cfg.seed), evaluate=evaluate, loss_fn=loss_fn, console=run.console)
    metrics = trainer.fit(run.resume_state)
    metrics["baseline/unigram_loss"] = baseline

    from llmctl.core.data import describe_splits
    from llmctl.core.run import publish

    result = publish(run, model, tokenizer, kind=KIND[objective], metrics=metrics, objective=("eval/loss", "min"),
                     data={**describe_splits(data, cfg.data, data_fp),
                           "packed_sequences": {k: len(v) for k, v in packed.items()}},
                     task={"stage": "pretrain", "objective": objective, "max_seq_len": int(cfg.data.max_seq_len)})
    if result is not None:
        run.print(f"[green]wrote[/] {result.ref} → {result.path}\n"
                  f"  eval loss {metrics.get('eval/loss', float('nan')):.4f} · perplexity {metrics.get('eval/perplexity', float('nan')):.2f}"
                  f" · unigram baseline loss {baseline:.4f} · {metrics['train/tokens_per_s']:,.0f} tokens/s")
        return result.manifest["objective"]["value"]
    return None


def _family(cfg, init, objective: str) -> str:
    family = cfg.model.family
    if init is not None:
        import json

        family = json.loads((init.path / "config.json").read_text()).get("model_type", family)
    if family not in FAMILIES[objective]:
        raise LlmctlError(f"objective={objective} needs a {' or '.join(FAMILIES[objective])} model, but the model is {family}; "
                          f"use conf={'gpt-tiny' if objective == 'clm' else 'bert-tiny'} or objective={'clm' if family != 'bert' else 'mlm'}")
    return family


def _setup_data(run, cfg, init, family: str, objective: str):
    """Corpus → tokenizer (reused or trained) → packed sequences; rank 0 builds the caches first."""
    from pathlib import Path

    from llmctl.core.data import fingerprint, load_splits, pack_for_lm
    from llmctl.core.device import barrier
    from llmctl.core.models import resolve_model
    from llmctl.core.tokenizer import load_tokenizer, train_tokenizer

    data = load_splits(cfg.data)
    data_fp = fingerprint(data)
    cache = Path(cfg.output_root) / ".cache"
    max_len = int(cfg.data.max_seq_len)
    result = None
    for turn in ("main", "others"):
        if (turn == "main") == run.rt.is_main:
            source = cfg.tokenizer.get("from") or (init.path if init else None) or cfg.model.get("pretrained")
            if source:
                tok = load_tokenizer(resolve_model(run.store, str(source), what="tokenizer.from").path)
            else:
                tok = train_tokenizer(data["train"]["text"], family=family, vocab_size=int(cfg.tokenizer.vocab_size),
                                      lowercase=bool(cfg.tokenizer.lowercase), max_len=max_len, cache_root=cache, data_fp=data_fp)
            packed = pack_for_lm(data, tok, objective=objective, max_seq_len=max_len, seed=int(cfg.seed), cache_root=cache, data_fp=data_fp)
            result = (data, tok, packed.with_format("torch"), data_fp)
        barrier(run.rt)
    run.print(f"data {data_fp[:12]} · {len(data['train'])} train / {len(data['validation'])} validation documents → "
              f"{len(result[2]['train'])} / {len(result[2]['validation'])} sequences of ≤{max_len} tokens · vocab {len(result[1])}")
    return result


def _setup_model(run, cfg, init, family: str, objective: str, tokenizer):
    from llmctl.core.models import build_model, count_parameters, load_model, resolve_model
    from llmctl.core.store import parent_entry

    if init is not None:
        model = load_model(init.path, KIND[objective])
        run.parents.append(parent_entry(init, "init"))
    elif cfg.model.get("pretrained"):
        source = resolve_model(run.store, str(cfg.model.pretrained), what="model.pretrained")
        model = load_model(source.path, KIND[objective])
        run.parents.append(parent_entry(source, "init"))
    else:
        model = build_model(family, cfg.model.config, KIND[objective], tokenizer)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise LlmctlError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.get_input_embeddings().num_embeddings} embeddings; use the model's own tokenizer")
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions and int(cfg.data.max_seq_len) > positions:
        raise LlmctlError(f"data.max_seq_len={cfg.data.max_seq_len} exceeds the model's {positions} positions; lower data.max_seq_len")
    total, _ = count_parameters(model)
    run.print(f"model {type(model).__name__} · {total / 1e6:.2f} M parameters · {'from ' + run.parents[0]['ref'] if run.parents else 'random init'}")
    return model


def _setup_objective(run, cfg, tokenizer, packed, objective: str):
    """The collator (masking), the evaluation function, and the unigram baseline loss."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    from llmctl.core.data import unigram_loss
    from llmctl.core.metrics import lm_metrics

    causal = objective == "clm"
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=not causal, mlm_probability=float(cfg.mlm_probability))
    eval_loader = DataLoader(packed["validation"], batch_size=int(cfg.train.batch_size), collate_fn=collate)
    max_batches = cfg.train.get("eval_batches")

    def evaluate(trained) -> dict:  # `trained` may be a training wrapper (SparseMLM): evaluate the HF model itself
        from llmctl.core.objectives import SparseMLM

        return lm_metrics(trained.model if isinstance(trained, SparseMLM) else trained, eval_loader, run.rt.device, causal=causal, max_batches=max_batches)

    n_eval = len(packed["validation"]) if max_batches is None else min(len(packed["validation"]), int(max_batches) * int(cfg.train.batch_size))
    ignore = set() if causal else set(tokenizer.all_special_ids)
    def rows(split, n):
        return packed[split].select(range(min(n, len(packed[split])))).with_format(None)["input_ids"][:]

    baseline = unigram_loss(rows("train", 20000), rows("validation", n_eval), len(tokenizer), ignore)
    return collate, evaluate, baseline
