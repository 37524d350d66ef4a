"""Fine-tuning as one function, for every stage that adapts weights to a task.

    result = finetune(model, tokenizer, prepared, cfg.train, run, method=cfg.method, select=("eval/macro_f1", "max"))
    result.model, result.metrics          # a plain HF model (LoRA merged), validation + test metrics

`llmctl finetune` is a thin wrapper around it; prune's recovery fine-tune and distill call it
with their own model (and, for distill, their own `loss_fn`). In: a model, its tokenizer, a task
prepared by core.tasks, the `train` config, and the StageRun (runtime, run folder, resumable
state, console). Out: the trained model — best evaluation restored, adapters merged — and its
metrics, with the test split's when the data has one.

Methods: `full` (every weight), `freeze` (embeddings and the bottom k layers frozen), `lora`
(peft adapters, merged into the base weights at the end; the adapter is kept in `adapter/`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmctl.core.errors import LlmctlError
from llmctl.core.families import LORA_TARGETS, layout, transformer_layers
from llmctl.core.models import count_parameters
from llmctl.core.tasks import Prepared, sample_generations
from llmctl.core.train import LossFn, Trainer, default_loss, evaluate_model

LORA_TASK = {"classification": "SEQ_CLS", "ner": "TOKEN_CLS", "sft": "CAUSAL_LM", "clm": "CAUSAL_LM"}


@dataclass
class Finetuned:
    model: object  # a plain HF model: the best evaluation's weights, adapters merged
    metrics: dict
    samples: list[dict] = field(default_factory=list)  # SFT: generations before / after training


def finetune(
    model,
    tokenizer,
    task: Prepared,
    train_cfg,
    run,
    *,
    method=None,
    select: tuple[str, str] | None = None,
    patience: int = 0,
    loss_fn: LossFn = default_loss,
    samples: int = 0,
    max_new_tokens: int = 40,
    system_prompt: str | None = None,
) -> Finetuned:
    """Train `model` on `task` with the shared loop; see the module docstring. `method` is the
    `method` config group (None = full); `samples` > 0 writes that many SFT generations, before and
    after training, to samples.jsonl in the run folder."""
    rt, seed = run.rt, int(run.cfg.seed)
    model = model.to(rt.device)  # before anything runs on it: the sample generations below, the loop, the test pass
    model = apply_method(method, model, task.task)
    total, trainable = count_parameters(model)
    sft_samples = samples if task.task == "sft" and rt.is_main else 0
    before = _samples(model, tokenizer, task, sft_samples, max_new_tokens, system_prompt)
    trainer = Trainer(
        model,
        train_data=task.splits["train"],
        collate=task.collate,
        cfg=train_cfg,
        rt=rt,
        run_dir=run.run_dir,
        state_dir=run.state_dir,
        seed=seed,
        evaluate=lambda m: task.evaluate(m, "validation", "eval"),
        loss_fn=loss_fn,
        console=run.console,
        select=select,
        patience=patience,
        lr=method.get("lr") if method is not None else None,
        identity=run.identity,
    )
    metrics = trainer.fit(run.resume_state)
    metrics.update(
        {"parameters/trainable": trainable, "parameters/total": total, "parameters/trainable_share": trainable / total}
    )
    if "test" in task.splits and rt.is_main:
        metrics.update(evaluate_model(model, lambda m: task.evaluate(m, "test", "test", capped=False), rt, seed))
    after = _samples(model, tokenizer, task, sft_samples, max_new_tokens, system_prompt)
    pairs = [
        {"prompt": b["prompt"], "reference": b["reference"], "before": b["output"], "after": a["output"]}
        for b, a in zip(before, after)
    ]
    if pairs:
        with open(run.run_dir / "samples.jsonl", "w") as fh:
            fh.writelines(json.dumps(p) + "\n" for p in pairs)
        for p in pairs:
            run.print(f"  [dim]{p['prompt']!r}[/] → {p['after']!r}")
    return Finetuned(model=finish_method(method, model, run), metrics=metrics, samples=pairs)


def _samples(model, tokenizer, task: Prepared, n: int, max_new_tokens: int, system_prompt) -> list[dict]:
    if not n:
        return []
    return sample_generations(
        model, tokenizer, task.data["validation"], system_prompt=system_prompt, num=n, max_new_tokens=max_new_tokens
    )


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def apply_method(method, model, task: str):
    """Make the weights `method` trains trainable (and only those); LoRA wraps the model with peft."""
    name = "full" if method is None else method.name
    if name == "full":
        return model
    if name == "freeze":
        try:
            layers = transformer_layers(model)
        except LlmctlError as e:
            raise LlmctlError(f"method=freeze: {e}; use method=full or method=lora") from None
        k = int(method.freeze_layers)
        if not 0 <= k <= len(layers):
            raise LlmctlError(f"method.freeze_layers={k}: the model has {len(layers)} layers; choose 0..{len(layers)}")
        embeddings = getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()
        for module in [embeddings, *layers[:k]]:
            for p in module.parameters():
                p.requires_grad_(False)
        return model
    if name == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        family = getattr(model.config, "model_type", "")
        if method.get("target_modules"):
            targets = list(method.target_modules)
        else:
            try:
                targets = LORA_TARGETS[layout(model)]
            except LlmctlError as e:
                raise LlmctlError(f"method.target_modules: {e}; name the modules to adapt") from None
        if task not in LORA_TASK:
            raise LlmctlError(f"method=lora is not available for task={task}; use method=full")
        config = LoraConfig(
            r=int(method.r),
            lora_alpha=int(method.alpha),
            lora_dropout=float(method.dropout),
            target_modules=targets,
            task_type=getattr(TaskType, LORA_TASK[task]),
            fan_in_fan_out=family == "gpt2",
        )  # GPT-2's Conv1D stores (in, out); peft would switch it with a warning
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise LlmctlError(f"method=lora: {str(e).splitlines()[0][:200]}") from None
    raise LlmctlError(f"method={name!r} is not one of full, freeze, lora")


def finish_method(method, model, run):
    """LoRA: keep the adapter in adapter/ and merge it, so later stages receive a plain HF model."""
    if method is None or method.name != "lora":
        return model
    if run.rt.is_main:
        model.save_pretrained(str(run.run_dir / "adapter"))
    return model.merge_and_unload()
