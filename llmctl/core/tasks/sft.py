"""SFT: chat-formatted conversations, loss on the response only; sample answers for reports."""

from __future__ import annotations

from llmctl.core.chat import conversation, end_of_turn_ids, prompt_ids
from llmctl.core.errors import LlmctlError
from llmctl.core.tasks.base import Prepared, _device, _loader


def prepare_sft(data, tokenizer, *, max_seq_len, batch_size, system_prompt) -> Prepared:
    from transformers import DataCollatorForSeq2Seq

    from llmctl.core.metrics import lm_metrics

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by attention and by label -100, never by id
    end = end_of_turn_ids(tokenizer)

    def encode(example):
        messages = conversation(example, system_prompt)
        prompt = prompt_ids(tokenizer, messages[:-1])
        answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        ids = (prompt + answer + end)[:max_seq_len]
        labels = ([-100] * len(prompt) + answer + end)[:max_seq_len]  # loss on the response tokens only
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    splits = {k: v.map(encode, remove_columns=v.column_names) for k, v in data.splits.items()}
    for name, split in splits.items():  # a split whose every response is cut off would train / score nothing
        if not any(any(t != -100 for t in labels) for labels in split["labels"]):
            raise LlmctlError(
                f"data: every conversation of the {name} split reaches max_seq_len={max_seq_len} tokens before its "
                f"response starts, so nothing would be learned or scored; set a max_seq_len longer than the prompts "
                f"(data.max_seq_len, or max_seq_len= in eval / distill / prune / quantize)"
            )
    splits = {k: v.with_format("torch") for k, v in splits.items()}
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def evaluate(model, rows, prefix):
        metrics = lm_metrics(
            model, _loader(rows, collate, batch_size), _device(model), causal=True, tokenizer=tokenizer
        )
        return {k.replace("eval/", f"{prefix}/", 1): v for k, v in metrics.items()}

    return Prepared(
        "sft",
        splits,
        collate,
        evaluate,
        {},
        {"chat_template": bool(tokenizer.chat_template), "system_prompt": system_prompt},
    )


def sample_generations(
    model, tokenizer, examples, *, system_prompt: str | None, num: int, max_new_tokens: int
) -> list[dict]:
    """Greedy answers to the first `num` prompts of `examples`, on whatever device the model is on."""
    import torch

    out = []
    device = _device(model)
    was_training = model.training
    model.eval()
    for example in examples.select(range(min(int(num), len(examples)))):
        messages = conversation(example, system_prompt)
        ids = torch.tensor([prompt_ids(tokenizer, messages[:-1])], device=device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=end_of_turn_ids(tokenizer),
            )
        out.append(
            {
                "prompt": messages[-2]["content"],
                "reference": messages[-1]["content"],
                "output": tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip(),
            }
        )
    model.train(was_training)
    return out
