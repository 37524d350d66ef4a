"""Generating text, one implementation for `llmctl generate` and `llmctl serve`.

    ids = encode(tok, "Who scored?", chat=True, system_prompt=None)    # plain text, or the chat template
    stops = stop_ids(tok, chat=True)                                   # end-of-text, and end-of-turn in a chat
    check_length(model, [ids], 64)                                     # prompt + new tokens fit the positions
    kwargs = hf_settings(Sampling(...), stops, tok, max_new_tokens=64)  # model.generate (greedy, sampling, beams)
    for step in decode(model, requests, device=...):                   # a batch, each row its own settings
        ...                                                            # step: {row: (token id, logprob)}

`generate` drives `model.generate` (beam search included) with `hf_settings`. `serve` batches concurrent
requests through `decode`: one forward pass per token for every row of a left-padded batch with a shared KV cache,
each row sampling with its own temperature, top-p, top-k, random stream (a seeded request repeats), stop tokens
and token budget, yielding each new token as soon as it exists (streaming). `prompt_logprobs` scores a prompt's
own tokens (the OpenAI completions API's `echo` + `logprobs`, which lm-evaluation-harness's `local-completions`
uses for loglikelihoods).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from llmctl.core.chat import end_of_turn_ids, prompt_ids
from llmctl.core.device import inference_grad_mode
from llmctl.core.errors import LlmctlError
from llmctl.core.families import max_positions


@dataclass
class Sampling:
    """How the next token is chosen: greedy (temperature 0, or 1 with no top-p / top-k), or sampled."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    greedy: bool | None = None  # None: greedy unless temperature / top-p / top-k ask for sampling

    @property
    def sampled(self) -> bool:
        if self.greedy is not None:
            return not self.greedy
        if self.temperature == 0:
            return False
        return self.temperature != 1.0 or self.top_p < 1.0 or self.top_k is not None

    def describe(self) -> str:
        if not self.sampled:
            return "greedy"
        return f"sampling (temperature {self.temperature}, top-k {self.top_k or 'off'}, top-p {self.top_p})"


def stop_ids(tok, *, chat: bool) -> list[int]:
    """Token ids that end a generation: end-of-text, and in a chat also the end-of-turn token."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return list(dict.fromkeys([*end_of_turn_ids(tok), *eos])) if chat else eos


def encode(tok, prompt, *, chat: bool, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt: plain text, or (chat, or a list of chat messages) the chat template."""
    if chat or isinstance(prompt, list):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": str(system_prompt)}, *messages]
        return prompt_ids(tok, messages)
    ids = tok(prompt)["input_ids"]
    return ids if ids else [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]


def room(model, prompt_tokens: int) -> int | None:
    """How many new tokens fit after a prompt (None: the model states no limit)."""
    positions = max_positions(model.config)
    return None if not positions else positions - prompt_tokens


def check_length(model, encoded: list[list[int]], max_new_tokens: int, key: str = "max_new_tokens") -> None:
    """Prompt + new tokens must fit the model's positions (learned position embeddings have no more)."""
    positions = max_positions(model.config)
    longest = max(map(len, encoded), default=0)
    if positions and longest + max_new_tokens > positions:
        raise LlmctlError(
            f"{key}={max_new_tokens} after a prompt of {longest} tokens exceeds the model's {positions} positions; "
            f"set {key}={max(positions - longest, 0)} or less, or shorten the prompt"
        )


def pad_id(tok, stops: list[int]) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0]


def hf_settings(sampling: Sampling, stops: list[int], tok, *, max_new_tokens: int, beams: int = 1) -> dict:
    """Keyword arguments for `model.generate`: greedy, sampling or (beams > 1) beam search, with the KV cache."""
    settings = {
        "max_new_tokens": int(max_new_tokens),
        "use_cache": True,
        "eos_token_id": stops or None,
        "pad_token_id": pad_id(tok, stops),
        "repetition_penalty": float(sampling.repetition_penalty),
        "do_sample": sampling.sampled and beams == 1,
    }
    if sampling.sampled and beams == 1:
        settings.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=sampling.top_k or 0)
    if beams > 1:
        settings.update(num_beams=int(beams), early_stopping=True)
    return settings


def plain_greedy(sampling: Sampling, beams: int = 1) -> bool:
    """Whether `greedy` computes what `model.generate` would: greedy, one beam, no repetition penalty."""
    return not sampling.sampled and beams == 1 and sampling.repetition_penalty == 1.0


def greedy(model, ids: torch.Tensor, *, max_new_tokens: int, stops: list[int] = (), streamer=None) -> torch.Tensor:
    """Batch-1 greedy decoding with the KV cache and nothing else per token: a forward pass of the new token, the
    output layer for the last position only, the argmax. Returns the prompt + new tokens (as `model.generate`
    does, the stop token included); `streamer` gets `put` / `end` calls as with `model.generate`.

    `model.generate` computes the same tokens, and per token also builds an attention mask and position ids,
    runs its logits processors and stopping criteria on tensors and grows the sequence by concatenation: 2–15 % of
    a quantized SmolLM2-135M's decode step on 2 CPU cores, by machine."""
    last = _last_position_only(model)
    stops = set(stops)
    if streamer is not None:
        streamer.put(ids.cpu())
    new, cache, step = [], None, ids
    with inference_grad_mode(ids.device.type):
        for _ in range(int(max_new_tokens)):
            out = model(input_ids=step, past_key_values=cache, use_cache=True, **last)
            cache = out.past_key_values
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            token = int(step)
            new.append(token)
            if streamer is not None:
                streamer.put(step.cpu()[0])
            if token in stops:
                break
    if streamer is not None:
        streamer.end()
    return torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], dim=1)


def _last_position_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it: the output layer for the last position only (the prompt's other
    positions are never sampled; SmolLM2: a 49152-wide matmul per prompt token saved at prefill)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


# ---------------------------------------------------------------------------------------------
# A batch of requests, each with its own settings, decoded together (serve)
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One request in a decoding batch: its prompt, budget, stops and sampling."""

    ids: list[int]
    max_new_tokens: int
    stops: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    logprobs: bool = False  # return each new token's log-probability
    generator: torch.Generator | None = None


def decode(model, rows: list[Row], *, pad: int, device):
    """Generate for every row of a left-padded batch at once; yields, after each forward pass, {row index:
    (token id, its log-probability or None, finished)} for the rows still going. Rows stop at a stop token or their
    budget; the batch ends when every row has."""
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=device)
    for r in rows:
        if r.sampling.seed is not None and r.generator is None:
            r.generator = torch.Generator(device="cpu").manual_seed(int(r.sampling.seed))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = [r.max_new_tokens <= 0 for r in rows]
    produced = [0] * len(rows)
    seen = [list(r.ids) for r in rows]
    cache = None
    last = _last_position_only(model)
    with inference_grad_mode(torch.device(device).type):
        while not all(done):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **last,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            step, chosen = {}, []
            for i, r in enumerate(rows):
                if done[i]:
                    chosen.append(pad)
                    continue
                token, logprob = _choose(logits[i], r, seen[i])
                seen[i].append(token)
                produced[i] += 1
                done[i] = token in r.stops or produced[i] >= r.max_new_tokens
                step[i] = (token, logprob, done[i])
                chosen.append(token)
            yield step
            ids = torch.tensor(chosen, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1


def _choose(logits: torch.Tensor, row: Row, seen: list[int]) -> tuple[int, float | None]:
    """The next token for one row: repetition penalty, then greedy or temperature / top-k / top-p sampling."""
    s = row.sampling
    if s.repetition_penalty != 1.0 and seen:
        prior = torch.tensor(sorted(set(seen)), device=logits.device)
        values = logits[prior]
        logits = logits.clone()
        logits[prior] = torch.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
    logprobs = torch.log_softmax(logits, dim=-1) if row.logprobs else None
    if not s.sampled:
        token = int(logits.argmax())
    else:
        scaled = logits / max(float(s.temperature), 1e-6)
        if s.top_k:
            kth = torch.topk(scaled, min(int(s.top_k), scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < float(s.top_p)  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        token = int(torch.multinomial(probs.cpu(), 1, generator=row.generator))
    return token, (float(logprobs[token]) if logprobs is not None else None)


def prompt_logprobs(model, ids: list[int], *, top: int = 0, device) -> tuple[list[float | None], list[dict]]:
    """Each prompt token's log-probability given the tokens before it (None for the first), and its `top` most
    likely alternatives ({token id: logprob}) — what the completions API returns for echo=true, logprobs=N."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    alternatives = [{}]
    if top:
        values, indices = logprobs.topk(top, dim=-1)
        alternatives += [dict(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    else:
        alternatives += [{} for _ in chosen]
    return [None, *chosen], alternatives
