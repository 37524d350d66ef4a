"""core.generation on a tiny GPT: a left-padded batch of rows decodes exactly what each prompt gives alone through
transformers' own `generate`, seeded sampling repeats, stops and budgets end rows, and prompt scoring matches the
model's own log-softmax."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmctl.core.generation import Row, Sampling, decode, encode, prompt_logprobs

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
