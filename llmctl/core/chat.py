"""Chat formatting shared by SFT training, `generate` and `serve`: conversations, prompt ids, end-of-turn tokens.

A tokenizer's chat template formats a conversation where it has one. Without one, llmctl's SFT trains on a plain
`### role:` format (`prompt_ids`), so a model fine-tuned that way is prompted the same way; any other model
without a template has no chat format at all, and asking it to chat is refused (`check_chat`) rather than
answered with whatever an unknown format produces.
"""

from __future__ import annotations

from llmctl.core.errors import LlmctlError
from llmctl.core.manifest import task_record

PLAIN_FORMAT = "### <role>:\n<content>\n\n (llmctl's SFT format for tokenizers without a chat template)"


def can_chat(tokenizer, source) -> bool:
    """A model can chat when its tokenizer has a chat template, or when llmctl fine-tuned it on conversations
    (task=sft) in the plain format (so it is prompted with that format)."""
    return bool(tokenizer.chat_template) or (task_record(source.manifest) or {}).get("name") == "sft"


def check_chat(tokenizer, source, key: str = "ckpt") -> None:
    """`can_chat`, else one line saying how to prompt the model instead."""
    if can_chat(tokenizer, source):
        return
    raise LlmctlError(
        f"{key}={source.ref} has no chat template (its tokenizer defines none) and was not fine-tuned on "
        f"conversations; drop chat=true to continue plain text, or fine-tune it first (llmctl finetune "
        f"task=sft init_from={source.ref}), which trains it on llmctl's plain chat format"
    )


def conversation(example, system_prompt: str | None) -> list[dict]:
    messages = example.get("messages") or [
        {"role": "user", "content": example["prompt"]},
        {"role": "assistant", "content": example["response"]},
    ]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if messages[-1]["role"] != "assistant":
        raise LlmctlError("data: every SFT conversation must end with an assistant message (the response to learn)")
    return messages


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to where the assistant's answer starts (the chat template, or a
    plain `### role:` format for tokenizers without one)."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"### {m['role']}:\n{m['content']}\n\n" for m in messages) + "### assistant:\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """What ends an assistant turn: ChatML's <|im_end|> where the vocabulary has it, else end-of-text."""
    if "<|im_end|>" in tokenizer.get_vocab():
        return [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if tokenizer.eos_token_id is None:
        raise LlmctlError("task=sft needs a tokenizer with an end-of-text token (eos_token) to end each answer")
    return [tokenizer.eos_token_id]
