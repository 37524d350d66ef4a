"""llmctl generate — text from any causal-LM checkpoint: one prompt streamed to the terminal, a
file of prompts in batches into jsonl, or an interactive chat.

    llmctl generate ckpt=finetune/smollm2-chat prompt="Write a haiku about autumn." chat=true
    llmctl generate ckpt=pretrain/kjv-gpt prompt="In the beginning" sample.temperature=0.8 seed=3
    llmctl generate ckpt=pretrain/kjv-gpt prompts_file=prompts.txt out=gen.jsonl sample.top_p=0.9
    llmctl generate ckpt=finetune/smollm2-chat chat=true system_prompt="Be brief." interactive=true

Decoding: greedy, sampling (temperature, top-k, top-p, repetition penalty; `seed` makes it
repeatable) or beam search (`sample.strategy=beam`), with the KV cache; generation stops at
end-of-text (and at `<|im_end|>` for chat models) or after `max_new_tokens`. `chat=true` applies
the tokenizer's chat template (a plain `### user:` format when it has none). Every run reports
time to first token and tokens/s; `out=` writes one jsonl line per prompt, atomically. The
checkpoint is loaded through the manifest (`core.loading`), so fine-tuned, LoRA-merged and the
coming distilled / pruned / quantized artifacts all work; nothing is written to the store.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmctl.core import run as stage_run
from llmctl.core import schema
from llmctl.core.chat import check_chat, prompt_ids
from llmctl.core.data import check_text_file
from llmctl.core.errors import LlmctlError
from llmctl.core.files import check_writable_file, write_text
from llmctl.core.generation import Sampling, check_length, encode, greedy, hf_settings, plain_greedy, stop_ids
from llmctl.core.loading import load_checkpoint, resolve_source, source_kind
from llmctl.core.tokenizer import load_tokenizer


class Sample(schema.Section):
    strategy: Literal["auto", "greedy", "sample", "beam"]
    temperature: float = Field(gt=0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float = Field(gt=0, le=1)
    repetition_penalty: float = Field(gt=0)
    num_beams: int = Field(ge=1)


class Config(schema.StageConfig):
    """conf/generate.yaml, checked before the stage runs (core/schema.py)."""

    ckpt: str
    prompt: str | None = None
    prompts_file: str | None = None
    out: str | None = None
    chat: bool
    system_prompt: str | None = None
    interactive: bool
    stream: bool
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    sample: Sample


def run(cfg) -> None:
    prompts = _prompts(cfg)
    out = check_writable_file(cfg.out, "out") if cfg.out else None  # before any work: nothing generated for nothing
    with stage_run.start("generate", cfg, default_name="generate", publishes=False, stderr=True) as run:
        source = resolve_source(run.store, cfg.ckpt, what="ckpt")
        if source_kind(source) != "causal-lm":
            raise LlmctlError(
                f"ckpt={cfg.ckpt} is a {source_kind(source)} checkpoint; generate needs a causal LM "
                f"(a pretrain/... clm, an SFT fine-tune, model folders like SmolLM2)"
            )
        if cfg.chat or cfg.interactive or any(isinstance(p, list) for p in prompts):
            check_chat(load_tokenizer(source.path), source, "ckpt")
        loaded = load_checkpoint(run.store, source, kind="causal-lm", what="ckpt")
        model, tok = loaded.on(run.rt.device).eval(), loaded.tokenizer
        run.run_model(model)  # precision=auto: fp32 around quantized kernels
        sampling, beams = _sampling(cfg)
        fast = plain_greedy(sampling, beams)  # generation.greedy: the same tokens as model.generate, less per token
        stops = stop_ids(tok, chat=bool(cfg.chat) or any(isinstance(p, list) for p in prompts))
        settings = hf_settings(sampling, stops, tok, max_new_tokens=int(cfg.max_new_tokens), beams=beams)
        encoded = [encode(tok, p, chat=bool(cfg.chat), system_prompt=cfg.system_prompt) for p in prompts]
        check_length(model, encoded, int(cfg.max_new_tokens))
        run.announce()
        run.print(f"model {type(model).__name__} from {source.ref} · {_describe(sampling, beams)}")
        if getattr(model, "llmctl_kernels", None):  # a quantized model: which kernels this machine runs it with
            run.print(f"[dim]kernels: {model.llmctl_kernels}[/]")
        if cfg.interactive:
            return _interactive(run, model, tok, settings, cfg.system_prompt, fast=fast)
        results = []
        if len(prompts) == 1 and cfg.stream and settings.get("num_beams", 1) == 1:
            results.append(_one(run, model, tok, encoded[0], prompts[0], settings, stream=True, fast=fast))
        else:
            size = int(cfg.batch_size)
            for i in range(0, len(prompts), size):
                results += _batch(run, model, tok, encoded[i : i + size], prompts[i : i + size], settings)
        if out is not None:
            _write_jsonl(out, results)
            run.print(f"[green]wrote[/] {len(results)} generation(s) to {out}")
    return None


# ---------------------------------------------------------------------------------------------
# Prompts and decoding settings
# ---------------------------------------------------------------------------------------------
def _prompts(cfg) -> list:
    """The prompts (strings, or chat message lists from jsonl), checked before any model is loaded."""
    if cfg.interactive:
        return []
    if bool(cfg.prompt) == bool(cfg.prompts_file):
        raise LlmctlError(
            'generate needs exactly one of prompt="..." or prompts_file=<.txt or .jsonl> (or interactive=true)'
        )
    if cfg.prompt:
        return [str(cfg.prompt)]
    path = Path(str(cfg.prompts_file)).expanduser()
    if not path.is_file():
        raise LlmctlError(f"prompts_file={cfg.prompts_file}: no such file (relative to {Path.cwd()})")
    check_text_file(str(path), "prompts_file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise LlmctlError(
            f"prompts_file={path} holds no prompts; write one per line (.txt) or one JSON object per line (.jsonl)"
        )
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise LlmctlError(
                f'prompts_file={path}:{n} is not JSON; write one object per line with a "prompt" or "messages" field'
            ) from None
        prompt = record.get("messages") or record.get("prompt") if isinstance(record, dict) else None
        if not prompt:
            raise LlmctlError(f'prompts_file={path}:{n} has no "prompt" or "messages" field')
        prompts.append(prompt)
    return prompts


def _sampling(cfg) -> tuple[Sampling, int]:
    """The config's decoding settings: (sampling, number of beams)."""
    sample = cfg.sample
    strategy = str(sample.strategy)
    sampling = Sampling(
        temperature=float(sample.temperature),
        top_p=float(sample.top_p),
        top_k=sample.top_k,
        repetition_penalty=float(sample.repetition_penalty),
        greedy={"greedy": True, "sample": False}.get(strategy),
    )
    return sampling, int(sample.num_beams) if strategy == "beam" else 1


def _describe(sampling: Sampling, beams: int) -> str:
    return f"beam search ({beams} beams)" if beams > 1 else sampling.describe()


# ---------------------------------------------------------------------------------------------
# Generating: one prompt streamed, a batch, a conversation
# ---------------------------------------------------------------------------------------------
def _one(run, model, tok, encoded: list[int], prompt, settings: dict, *, stream: bool, fast: bool) -> dict:
    """One prompt; with `stream`, tokens are printed as they come; `fast`: plain greedy decoding through
    `generation.greedy` rather than `model.generate`. Returns the jsonl record."""
    import torch
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        first: float | None = None

        def put(self, value):
            if not self.next_tokens_are_prompt and self.first is None:
                self.first = time.perf_counter()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            sys.stdout.write(text + ("\n" if stream_end else ""))
            sys.stdout.flush()

    ids = torch.tensor([encoded], device=run.rt.device)
    streamer = Streamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    start = time.perf_counter()
    with run.rt.inference():
        if fast:
            stops = settings["eos_token_id"] or []
            out = greedy(model, ids, max_new_tokens=settings["max_new_tokens"], stops=stops, streamer=streamer)
        else:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **settings)
    elapsed = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    record = _record(
        prompt,
        tok.decode(new, skip_special_tokens=True),
        len(new),
        elapsed,
        (streamer.first - start) if streamer is not None and streamer.first else None,
    )
    if not stream:
        print(record["completion"], flush=True)  # plain text: generated brackets are not rich markup
    _note_if_empty(run, record)
    _report(run, record)
    return record


def _batch(run, model, tok, encoded: list[list[int]], prompts: list, settings: dict) -> list[dict]:
    """Several prompts in one left-padded generate() call."""
    import torch

    width = max(map(len, encoded))
    pad = settings["pad_token_id"]
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=run.rt.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=run.rt.device)
    start = time.perf_counter()
    with run.rt.inference():
        out = model.generate(input_ids=ids, attention_mask=mask, **settings)
    elapsed = time.perf_counter() - start
    records = []
    stops = set(settings["eos_token_id"] or [])
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))  # up to and including the first stop token
        records.append(_record(prompt, tok.decode(row[:n], skip_special_tokens=True), n, elapsed, None))
        run.print(f"[dim]> {_show_prompt(prompt)}[/]")  # the prompt to stderr, the text alone to stdout
        print(records[-1]["completion"], flush=True)
        _note_if_empty(run, records[-1])
    total = sum(r["new_tokens"] for r in records)
    run.print(f"[dim]batch of {len(prompts)}: {total} tokens in {elapsed:.2f} s · {total / elapsed:,.1f} tokens/s[/]")
    return records


def _interactive(run, model, tok, settings: dict, system_prompt: str | None, *, fast: bool) -> None:
    """A chat loop: every turn sees the whole conversation so far."""
    messages = [{"role": "system", "content": str(system_prompt)}] if system_prompt else []
    stop = stop_ids(tok, chat=True)
    run.print("[dim]interactive chat: an empty line or Ctrl-D ends it[/]")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        ids = prompt_ids(tok, messages)
        check_length(model, [ids], settings["max_new_tokens"])  # a long conversation: one line, not an IndexError
        record = _one(run, model, tok, ids, messages, {**settings, "eos_token_id": stop}, stream=True, fast=fast)
        messages.append({"role": "assistant", "content": record["completion"].strip()})


def _note_if_empty(run, record: dict) -> None:
    """Say why nothing was printed, rather than leave a blank line unexplained."""
    if not record["completion"].strip():
        why = "it ended its answer at once" if record["new_tokens"] <= 1 else "it produced only special tokens"
        run.print(f"[yellow]the model generated no text ({why}, {record['new_tokens']} token(s))[/]")


def _record(prompt, completion: str, new_tokens: int, elapsed: float, first: float | None) -> dict:
    return {
        "prompt": prompt,
        "completion": completion,
        "new_tokens": int(new_tokens),
        "seconds": round(elapsed, 4),
        "tokens_per_s": round(new_tokens / elapsed, 2) if elapsed > 0 else None,
        "time_to_first_token_s": round(first, 4) if first is not None else None,
    }


def _report(run, record: dict) -> None:
    first = record["time_to_first_token_s"]
    run.print(
        f"[dim]{record['new_tokens']} tokens in {record['seconds']:.2f} s · {record['tokens_per_s'] or 0:,.1f} tokens/s"
        + (f" · first token after {first:.2f} s" if first is not None else "")
        + "[/]"
    )


def _show_prompt(prompt) -> str:
    text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
    return text if len(text) <= 80 else text[:77] + "…"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """All lines or none: written beside the target, then renamed over it."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
