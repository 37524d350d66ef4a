"""core.generation on a tiny GPT: a left-padded batch of rows decodes exactly what each prompt gives alone through
transformers' own `generate`, seeded sampling repeats, stops and budgets end rows, and prompt scoring matches the
model's own log-softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmctl.core.generation import Row, Sampling, decode, encode, greedy, plain_greedy, prompt_logprobs

PROMPTS = ["The bank said", "Shares in the telecom group fell sharply after", "The"]


@pytest.fixture(scope="module")
def gpt(bases):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(bases["gpt"]).eval(), AutoTokenizer.from_pretrained(bases["gpt"])


def _run(model, rows, pad=0):
    out = {i: [] for i in range(len(rows))}
    for step in decode(model, rows, pad=pad, device="cpu"):
        for i, (token, logprob, finished) in step.items():
            out[i].append((token, logprob, finished))
    return out


def test_a_mixed_length_batch_decodes_what_hf_generate_gives_each_prompt_alone(gpt):
    model, tok = gpt
    ids = [encode(tok, p, chat=False) for p in PROMPTS]
    rows = [Row(ids=i, max_new_tokens=10, stops=[], sampling=Sampling(temperature=0)) for i in ids]
    batched = _run(model, rows)
    for i, prompt_ids in enumerate(ids):
        x = torch.tensor([prompt_ids])
        alone = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert [t for t, _, _ in batched[i]] == alone[0, len(prompt_ids) :].tolist()
        assert [f for _, _, f in batched[i]] == [False] * 9 + [True]


def test_the_output_layer_runs_for_the_last_position_only(gpt):
    """Only the last position's logits are sampled: the prompt's other positions must not go through the output
    layer (a vocabulary-wide matmul per prompt token at prefill)."""
    model, tok = gpt
    rows_seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[1]))
    try:
        ids = [encode(tok, p, chat=False) for p in PROMPTS]
        _run(model, [Row(ids=i, max_new_tokens=4, stops=[]) for i in ids])
    finally:
        hook.remove()
    assert rows_seen == [1] * 4  # the prefill and three decode steps, one position each


def test_greedy_gives_hf_generates_tokens_stops_after_a_stop_token_and_streams_them(gpt):
    """The fast greedy loop (generate's and eval's decode path) computes model.generate's tokens, the output layer
    at one position per step, ends at (and keeps) a stop token, and streams what it returns."""
    model, tok = gpt
    for prompt in PROMPTS:
        x = torch.tensor([encode(tok, prompt, chat=False)])
        hf = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert greedy(model, x, max_new_tokens=12).tolist() == hf.tolist()
    x = torch.tensor([encode(tok, PROMPTS[1], chat=False)])
    free = greedy(model, x, max_new_tokens=12)[0, x.shape[1] :].tolist()
    stop = free[4]

    class Streamer:
        def __init__(self):
            self.put_calls, self.ended = [], False

        def put(self, value):
            self.put_calls.append(value.tolist())

        def end(self):
            self.ended = True

    rows_seen, streamer = [], Streamer()
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[1]))
    try:
        out = greedy(model, x, max_new_tokens=12, stops=[stop], streamer=streamer)[0, x.shape[1] :].tolist()
    finally:
        hook.remove()
    assert out == free[: free.index(stop) + 1] and out[-1] == stop
    assert rows_seen == [1] * len(out)
    assert streamer.put_calls == [x.tolist()] + [[t] for t in out] and streamer.ended


def test_under_bf16_autocast_each_weight_is_cast_once_per_generation_not_once_per_token(gpt):
    """Decoding runs under no_grad, where autocast caches its weight casts; under inference_mode it re-cast every
    weight at every step (SmolLM2 on an AMX CPU: 2.6× slower than fp32)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, tok = gpt
    weights = {p.data_ptr() for p in model.parameters()}

    class WeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                self.casts[args[0].data_ptr()] = self.casts.get(args[0].data_ptr(), 0) + 1
            return func(*args, **(kwargs or {}))

    x = torch.tensor([encode(tok, PROMPTS[1], chat=False)])
    row = Row(ids=x[0].tolist(), max_new_tokens=6, stops=[], sampling=Sampling(temperature=0))
    for run in (lambda: greedy(model, x, max_new_tokens=6), lambda: _run(model, [row])):
        with torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts() as seen:
            run()
        assert seen.casts and max(seen.casts.values()) == 1


def test_decoding_runs_in_inference_mode_unless_autocast_needs_no_grad_to_cache_its_casts(gpt):
    """inference_mode does the least work per op (SmolLM2 int4 on 2 cores: 6 % faster decode than no_grad), but
    bf16 autocast keeps its weight casts only outside it: both loops pick by whether autocast is on."""
    model, tok = gpt
    x = torch.tensor([encode(tok, PROMPTS[0], chat=False)])
    row = Row(ids=x[0].tolist(), max_new_tokens=3, stops=[], sampling=Sampling(temperature=0))
    modes = []
    hook = model.register_forward_pre_hook(
        lambda m, a: modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
    )
    try:
        for run in (lambda: greedy(model, x, max_new_tokens=3), lambda: _run(model, [row])):
            modes.clear()
            run()
            assert modes and set(modes) == {(True, False)}
            modes.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                run()
            assert modes and set(modes) == {(False, False)}
    finally:
        hook.remove()


def test_only_plain_greedy_settings_take_the_fast_loop():
    assert plain_greedy(Sampling(temperature=0)) and plain_greedy(Sampling(greedy=True))
    assert not plain_greedy(Sampling(temperature=0.7))
    assert not plain_greedy(Sampling(temperature=0, repetition_penalty=1.2))  # the penalty is model.generate's
    assert not plain_greedy(Sampling(temperature=0), beams=4)


def test_rows_end_at_their_own_stop_token_and_budget(gpt):
    model, tok = gpt
    ids = encode(tok, PROMPTS[0], chat=False)
    free = _run(model, [Row(ids=ids, max_new_tokens=6, stops=[])])[0]
    stop_at = free[2][0]  # the third token made becomes a stop token: the row ends there, the other goes on
    out = _run(model, [Row(ids=ids, max_new_tokens=6, stops=[stop_at]), Row(ids=ids, max_new_tokens=3, stops=[])])
    assert [t for t, _, _ in out[0]] == [t for t, _, _ in free[: [t for t, _, _ in free].index(stop_at) + 1]]
    assert out[0][-1][2] and len(out[1]) == 3 and out[1][-1][2]


def test_seeded_sampling_repeats_and_different_seeds_differ(gpt):
    model, tok = gpt
    ids = encode(tok, PROMPTS[1], chat=False)

    def sample(seed):
        row = Row(ids=ids, max_new_tokens=20, stops=[], sampling=Sampling(temperature=1.5, top_p=0.95, seed=seed))
        return [t for t, _, _ in _run(model, [row])[0]]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_logprobs_of_new_tokens_and_of_a_prompt_are_the_models_log_softmax(gpt):
    model, tok = gpt
    ids = encode(tok, PROMPTS[1], chat=False)
    made = _run(model, [Row(ids=ids, max_new_tokens=1, stops=[], logprobs=True)])[0][0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    assert made[0] == int(expected.argmax()) and made[1] == pytest.approx(float(expected.max()), abs=1e-5)
    chosen, alternatives = prompt_logprobs(model, ids, top=2, device="cpu")
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    assert chosen[0] is None and len(chosen) == len(ids)
    assert chosen[1:] == pytest.approx([float(full[i, ids[i + 1]]) for i in range(len(ids) - 1)], abs=1e-5)
    assert all(len(a) == 2 and max(a.values()) >= chosen[k + 1] - 1e-6 for k, a in enumerate(alternatives[1:]))
