"""llmctl finetune — adapt a pretrained model to a task and write finetune/<name>/vNNN.

    llmctl finetune                                                   # MiniLM-L6 on BBC News topics (embedded defaults)
    llmctl finetune init_from=pretrain/bert-tiny task=classification data=bbc-news
    llmctl finetune task=ner data=conll-fixture                       # or data=files data.train=train.conll data.validation=dev.conll
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

import json
from dataclasses import dataclass
from typing import Callable

from llmctl.core.errors import LlmctlError

TASK_KIND = {"classification": "seq-cls", "ner": "token-cls", "sft": "causal-lm"}
SELECT = {"classification": ("eval/accuracy", "max"), "ner": ("eval/f1", "max"), "sft": ("eval/loss", "min")}
LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@dataclass
class Prepared:
    """A task's data made ready for the loop: tokenized splits, collator, model kwargs, evaluation."""

    splits: dict  # split name → tokenized dataset
    collate: Callable
    model_kwargs: dict
    evaluate: Callable  # (model, split, prefix) → metrics
    info: dict  # what the manifest records about labels / formatting


def run(cfg) -> float | None:
    from llmctl.core import run as stage_run

    task = str(cfg.task)
    if task not in TASK_KIND:
        raise LlmctlError(f"task={task!r} is not one of {', '.join(TASK_KIND)}")
    run = stage_run.start("finetune", cfg, default_name=_default_name(cfg, task))
    source = _source(run, cfg, task)

    from llmctl.core.data import describe_splits, fingerprint, load_splits
    from llmctl.core.models import count_parameters, load_model
    from llmctl.core.store import parent_entry
    from llmctl.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source.path)
    data = load_splits(cfg.data, task=task)
    data_fp = fingerprint(data)
    prep = {"classification": prepare_classification, "ner": prepare_ner, "sft": prepare_sft}[task](cfg, data, tokenizer, run)
    run.print(f"data {data_fp[:12]} · " + " / ".join(f"{len(v)} {k}" for k, v in prep.splits.items()) + f" · {_summary(prep.info)}")

    model = load_model(source.path, TASK_KIND[task], **prep.model_kwargs)
    run.parents.append(parent_entry(source, "init"))
    model = apply_method(cfg.method, model, task)
    total, trainable = count_parameters(model)
    run.print(f"model {type(model).__name__} from {source.ref} · method {cfg.method.name} · "
              f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f} %)")
    before = sample_generations(model, tokenizer, data["validation"], cfg, run) if task == "sft" else None

    from llmctl.core.run import open_run_dir, publish
    from llmctl.core.train import Trainer

    select = stage_run.resolve_objective(cfg, SELECT[task])
    open_run_dir(run)
    trainer = Trainer(model, train_data=prep.splits["train"], collate=prep.collate, cfg=cfg.train, rt=run.rt, run_dir=run.run_dir,
                      seed=int(cfg.seed), evaluate=lambda m: prep.evaluate(m, "validation", "eval"), console=run.console,
                      select=select, patience=int(cfg.patience), lr=cfg.method.get("lr"))
    metrics = trainer.fit(run.resume_state)
    metrics.update({"parameters/trainable": trainable, "parameters/total": total, "parameters/trainable_share": trainable / total})
    if "test" in prep.splits and run.rt.is_main:
        metrics.update(_evaluate_now(model, prep, "test", run))
    if task == "sft" and run.rt.is_main:
        after = sample_generations(model, tokenizer, data["validation"], cfg, run)
        with open(run.run_dir / "samples.jsonl", "w") as fh:
            for b, a in zip(before, after):
                fh.write(json.dumps({"prompt": b["prompt"], "reference": b["reference"], "before": b["output"], "after": a["output"]}) + "\n")
    model = finish_method(cfg.method, model, run)

    result = publish(run, model, tokenizer, kind=TASK_KIND[task], metrics=metrics, objective=select,
                     data=describe_splits(data, cfg.data, data_fp),
                     task={"stage": "finetune", "task": task, "method": cfg.method.name, **prep.info})
    if result is None:
        return None
    shown = {k: v for k, v in metrics.items() if k.count("/") == 1 and isinstance(v, float) and k.split("/")[0] in ("eval", "test")}
    run.print(f"[green]wrote[/] {result.ref} → {result.path}\n  " + " · ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    if task == "ner" and "test/f1" in metrics:
        from llmctl.core.metrics import format_ner_table

        run.print(format_ner_table(metrics, "test"))
    return result.manifest["objective"]["value"]


def _default_name(cfg, task: str) -> str:
    """`<source>-<task>`: bert-tiny-classification for init_from=pretrain/bert-tiny, minilm-l6-ner for model=minilm-l6."""
    import re
    from pathlib import Path

    from llmctl.core.store import parse_ref

    if cfg.init_from:
        text = str(cfg.init_from)
        ref = parse_ref(text)
        source = ref[1] if ref else Path(text).name
    else:
        source = str(cfg.model.get("pretrained") or "model").split(":")[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{source}-{task}")


# ---------------------------------------------------------------------------------------------
# Input model
# ---------------------------------------------------------------------------------------------
def _source(run, cfg, task: str):
    """init_from (any reference / HF folder) or the model preset; refuse a kind that cannot work."""
    from llmctl.core.models import is_causal_folder, resolve_model

    if cfg.init_from:
        source, where = resolve_model(run.store, str(cfg.init_from), what="init_from"), f"init_from={cfg.init_from}"
    elif cfg.model.get("pretrained"):
        source, where = resolve_model(run.store, str(cfg.model.pretrained), what="model.pretrained"), f"model={cfg.model.pretrained}"
    else:
        raise LlmctlError("finetune needs weights: set init_from=<reference or HF folder> or a model preset (model=minilm-l6, model=smollm2-135m)")
    kind = source.kind or ("causal-lm" if is_causal_folder(source.path) else "encoder")
    if task == "sft" and kind != "causal-lm":
        raise LlmctlError(f"{where} is a {kind} checkpoint; task=sft needs a causal LM (e.g. model=smollm2-135m or a pretrain/... causal-lm)")
    if task != "sft" and kind == "causal-lm":
        raise LlmctlError(f"{where} is a causal-lm checkpoint; task={task} needs an encoder (a BERT-family mlm / pretraining / "
                          f"seq-cls / token-cls checkpoint or HF folder, e.g. model=minilm-l6)")
    return source


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------
def _labels(data, column: str, where: str) -> tuple[list[str], Callable[[list], list[int]]]:
    """(label names, raw values → label ids). Names come from a ClassLabel feature (whose values are
    already ids), else the sorted values seen in training; labels unseen in training are an error."""
    feature = data["train"].features[column]
    inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for NER
    if type(inner).__name__ == "ClassLabel":
        return list(inner.names), list
    flat = lambda values: [v for row in values for v in row] if column == "ner_tags" else list(values)  # noqa: E731
    seen = sorted({str(v) for v in flat(data["train"][column][:])})
    if column == "ner_tags" and "O" in seen:
        seen = ["O", *[s for s in seen if s != "O"]]
    for split in data:
        unseen = sorted({str(v) for v in flat(data[split][column][:])} - set(seen))
        if unseen:
            raise LlmctlError(f"{where}: label {unseen[0]!r} in the {split} split never appears in training; "
                              f"add training examples for it or drop it ({len(unseen)} unseen)")
    index = {n: i for i, n in enumerate(seen)}
    return seen, lambda values: [index[str(v)] for v in values]


def _label_kwargs(names: list[str]) -> dict:
    """from_pretrained kwargs that give the model a fresh head with this label map in its config."""
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
            "ignore_mismatched_sizes": True}


def _predict(model, ds, collate, cfg, device) -> tuple[float, list, list]:
    """Mean loss over the examples of `ds`, and each batch's logits and labels (float, on the CPU)."""
    loss_sum, n, logits, labels = 0.0, 0, [], []
    for batch in _loader(ds, collate, cfg):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        loss_sum, n = loss_sum + float(out.loss) * len(batch["labels"]), n + len(batch["labels"])
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    return loss_sum / max(n, 1), logits, labels


def prepare_classification(cfg, data, tokenizer, run) -> Prepared:
    import torch
    from transformers import DataCollatorWithPadding

    from llmctl.core.metrics import classification_metrics

    names, to_ids = _labels(data, "label", "data.label_column")
    max_len = int(cfg.data.max_seq_len)

    def encode(batch):
        pair = batch.get("text_pair")
        enc = tokenizer(batch["text"], pair, truncation=True, max_length=max_len)
        enc["labels"] = to_ids(batch["label"])
        return enc

    splits = {k: v.map(encode, batched=True, remove_columns=v.column_names) for k, v in data.items()}
    collate = DataCollatorWithPadding(tokenizer)

    def evaluate(model, split, prefix):
        loss, logits, labels = _predict(model, splits[split], collate, cfg, run.rt.device)
        return {f"{prefix}/loss": loss, **classification_metrics(torch.cat(logits), torch.cat(labels), names, prefix)}

    return Prepared(splits, collate, _label_kwargs(names), evaluate, {"labels": names})


def prepare_ner(cfg, data, tokenizer, run) -> Prepared:
    from transformers import DataCollatorForTokenClassification

    from llmctl.core.metrics import ner_metrics

    if not getattr(tokenizer, "is_fast", False):
        raise LlmctlError("task=ner needs a fast tokenizer (tokenizer.json) to align sub-words with words")
    names, to_ids = _labels(data, "ner_tags", "data (ner_tags)")
    max_len = int(cfg.data.max_seq_len)

    def encode(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_len)
        labels = []
        for i, tags in enumerate(batch["ner_tags"]):
            ids = to_ids(tags)
            previous, row = None, []
            for word in enc.word_ids(i):
                row.append(-100 if word is None or word == previous else ids[word])  # first sub-word only
                previous = word
            labels.append(row)
        enc["labels"] = labels
        return enc

    splits = {k: v.map(encode, batched=True, remove_columns=v.column_names) for k, v in data.items()}
    collate = DataCollatorForTokenClassification(tokenizer)

    def evaluate(model, split, prefix):
        loss, logits, labels = _predict(model, splits[split], collate, cfg, run.rt.device)
        true, pred = [], []
        for batch_logits, batch_labels in zip(logits, labels):  # batches are padded to different lengths
            for p_row, l_row in zip(batch_logits.argmax(-1).tolist(), batch_labels.tolist()):
                keep = [(p, t) for p, t in zip(p_row, l_row) if t != -100]
                true.append([names[t] for _, t in keep])
                pred.append([names[p] for p, _ in keep])
        return {f"{prefix}/loss": loss, **ner_metrics(true, pred, prefix)}

    return Prepared(splits, collate, _label_kwargs(names), evaluate, {"labels": names})


def conversation(example, system_prompt: str | None) -> list[dict]:
    messages = example.get("messages") or [{"role": "user", "content": example["prompt"]},
                                            {"role": "assistant", "content": example["response"]}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if messages[-1]["role"] != "assistant":
        raise LlmctlError("data: every SFT conversation must end with an assistant message (the response to learn)")
    return messages


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to where the assistant's answer starts."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"### {m['role']}:\n{m['content']}\n\n" for m in messages) + "### assistant:\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare_sft(cfg, data, tokenizer, run) -> Prepared:
    from transformers import DataCollatorForSeq2Seq

    from llmctl.core.metrics import lm_metrics

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len, system = int(cfg.data.max_seq_len), cfg.sft.get("system_prompt")
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tokenizer.get_vocab() else [tokenizer.eos_token_id]

    def encode(example):
        messages = conversation(example, system)
        prompt = prompt_ids(tokenizer, messages[:-1])
        answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        ids = (prompt + answer + end)[:max_len]
        labels = ([-100] * len(prompt) + answer + end)[:max_len]  # loss on the response tokens only
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    splits = {k: v.map(encode, remove_columns=v.column_names) for k, v in data.items()}
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def evaluate(model, split, prefix):
        metrics = lm_metrics(model, _loader(splits[split], collate, cfg), run.rt.device, causal=True)
        return {k.replace("eval/", f"{prefix}/"): v for k, v in metrics.items()}

    return Prepared(splits, collate, {}, evaluate, {"chat_template": bool(tokenizer.chat_template), "system_prompt": system})


def sample_generations(model, tokenizer, examples, cfg, run) -> list[dict]:
    """Greedy answers to the first few validation prompts (before / after training)."""
    import torch

    out = []
    model.eval()
    for example in examples.select(range(min(int(cfg.sft.num_samples), len(examples)))):
        messages = conversation(example, cfg.sft.get("system_prompt"))
        ids = torch.tensor([prompt_ids(tokenizer, messages[:-1])], device=run.rt.device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(cfg.sft.max_new_tokens),
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append({"prompt": messages[-2]["content"], "reference": messages[-1]["content"],
                    "output": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()})
    for s in out:
        run.print(f"  [dim]{s['prompt']!r}[/] → {s['output']!r}")
    return out


def _loader(ds, collate, cfg):
    from torch.utils.data import DataLoader

    return DataLoader(ds.with_format("torch"), batch_size=int(cfg.train.batch_size), collate_fn=collate)


def _evaluate_now(model, prep: Prepared, split: str, run) -> dict:
    from llmctl.core.train import evaluate_model

    return evaluate_model(model, lambda m: prep.evaluate(m, split, split), run.rt, int(run.cfg.seed))


def _summary(info: dict) -> str:
    if "labels" in info:
        return f"{len(info['labels'])} labels: {', '.join(info['labels'][:9])}{' …' if len(info['labels']) > 9 else ''}"
    return "chat template" if info.get("chat_template") else "plain prompt format"


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def transformer_layers(model):
    """The model's stack of transformer blocks (BERT encoder.layer, GPT-2 h, Llama layers)."""
    import torch

    base = model.base_model
    for path in ("encoder.layer", "h", "layers", "model.layers"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise LlmctlError(f"cannot find the transformer layers of {type(model).__name__}; use method=full or method=lora")


def apply_method(method, model, task: str):
    if method.name == "full":
        return model
    if method.name == "freeze":
        layers = transformer_layers(model)
        k = int(method.freeze_layers)
        if not 0 <= k <= len(layers):
            raise LlmctlError(f"method.freeze_layers={k}: the model has {len(layers)} layers; choose 0..{len(layers)}")
        embeddings = getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()
        for module in [embeddings, *layers[:k]]:
            for p in module.parameters():
                p.requires_grad_(False)
        return model
    if method.name == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        family = getattr(model.config, "model_type", "")
        targets = list(method.target_modules) if method.get("target_modules") else LORA_TARGETS.get(family)
        if not targets:
            raise LlmctlError(f"method.target_modules: no default LoRA targets for {family}; name the modules to adapt")
        task_type = {"classification": TaskType.SEQ_CLS, "ner": TaskType.TOKEN_CLS, "sft": TaskType.CAUSAL_LM}[task]
        config = LoraConfig(r=int(method.r), lora_alpha=int(method.alpha), lora_dropout=float(method.dropout),
                            target_modules=targets, task_type=task_type)
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise LlmctlError(f"method=lora: {str(e).splitlines()[0][:200]}") from None
    raise LlmctlError(f"method={method.name!r} is not one of full, freeze, lora")


def finish_method(method, model, run):
    """LoRA: keep the adapter in adapter/ and merge it, so later stages receive a plain HF model."""
    if method.name != "lora":
        return model
    if run.rt.is_main:
        model.save_pretrained(str(run.run_dir / "adapter"))
    return model.merge_and_unload()
