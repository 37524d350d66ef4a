"""`llmctl generate` on a tiny GPT: deterministic decoding, streaming = non-streaming, batches = single
prompts, seeded sampling, beam search, chat formatting and the interactive loop."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_inprocess
from transformers import AutoTokenizer
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.store import Store

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_gpt(bases, tmp_path_factory):
    """The tiny GPT with a chat template in its tokenizer (a chat model)."""
    folder = tmp_path_factory.mktemp("chat") / "gpt"
    shutil.copytree(bases["gpt"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def _generate(tmp_path, bases, *extra, input=None):
    ckpt = [] if any(e.startswith("ckpt=") for e in extra) else [f"ckpt={bases['gpt']}"]
    result = CliRunner().invoke(
        app,
        [
            "generate",
            *ckpt,
            "precision=fp32",
            "max_new_tokens=12",
            f"output_root={tmp_path / 'store'}",
            *extra,
        ],
        input=input,
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _records(tmp_path, bases, name, *extra):
    out = tmp_path / f"{name}.jsonl"
    _generate(tmp_path, bases, f"out={out}", *extra)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_streaming_prints_the_same_text_as_a_plain_generation_and_reports_timings(tmp_path, bases):
    streamed = _records(tmp_path, bases, "s", "prompt=The bank said", "stream=true")[0]
    plain = _records(tmp_path, bases, "p", "prompt=The bank said", "stream=false")[0]
    assert streamed["completion"] == plain["completion"] and streamed["completion"].strip()
    assert 0 < streamed["new_tokens"] <= 12 and streamed["tokens_per_s"] > 0
    assert 0 < streamed["time_to_first_token_s"] <= streamed["seconds"]
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("v*"))  # generate publishes nothing


def test_a_batch_from_a_file_gives_what_each_prompt_gives_alone(tmp_path, bases):
    prompts = ["The striker scored", "Shares in the telecom group", "Engineers say the new chip uses half"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    batched = _records(tmp_path, bases, "b", f"prompts_file={tmp_path / 'prompts.txt'}", "batch_size=2")
    assert [r["prompt"] for r in batched] == prompts
    for prompt, record in zip(prompts, batched):  # left padding and the attention mask leave greedy decoding unchanged
        alone = _records(tmp_path, bases, "a", f"prompt={prompt}", "stream=false")[0]
        assert record["completion"] == alone["completion"]


def test_sampling_repeats_with_a_seed_and_varies_without_it(tmp_path, bases):
    runs = {
        seed: _records(
            tmp_path,
            bases,
            f"s{seed}",
            "prompt=The coach said",
            "sample.temperature=1.5",
            "max_new_tokens=20",
            f"seed={seed}",
        )[0]["completion"]
        for seed in (1, 2)
    }
    again = _records(
        tmp_path, bases, "again", "prompt=The coach said", "sample.temperature=1.5", "max_new_tokens=20", "seed=1"
    )
    assert again[0]["completion"] == runs[1]
    assert runs[1] != runs[2]


def test_beam_search_and_chat_prompts_from_jsonl(tmp_path, bases, chat_gpt):
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "Who scored?"}]})
        + "\n"
        + json.dumps({"prompt": "The film took"})
        + "\n"
    )
    records = _records(
        tmp_path,
        bases,
        "beam",
        f"ckpt={chat_gpt}",
        f"prompts_file={tmp_path / 'chat.jsonl'}",
        "sample.strategy=beam",
        "sample.num_beams=3",
    )
    assert len(records) == 2 and records[0]["prompt"][0]["content"] == "Who scored?"
    assert all(r["new_tokens"] > 0 for r in records)


def test_interactive_chat_keeps_the_conversation(tmp_path, bases, chat_gpt, monkeypatch):
    seen = []
    import llmctl.stages.generate as generate

    real = generate.prompt_ids

    def spy(tok, messages):
        seen.append([m["content"] for m in messages])
        return real(tok, messages)

    monkeypatch.setattr(generate, "prompt_ids", spy)
    result = _generate(
        tmp_path,
        bases,
        f"ckpt={chat_gpt}",
        "interactive=true",
        "system_prompt=Be brief.",
        input="Who won?\nAnd then?\n\n",
    )
    assert result.output.count("model> ") == 2
    assert seen[0] == ["Be brief.", "Who won?"]
    assert (
        seen[1][:2] == ["Be brief.", "Who won?"] and seen[1][-1] == "And then?" and len(seen[1]) == 4
    )  # the answer in between


def test_an_interactive_conversation_longer_than_the_model_ends_in_one_line(tmp_path, chat_gpt):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            f"ckpt={chat_gpt}",
            "precision=fp32",
            "max_new_tokens=40",
            "interactive=true",
            f"output_root={tmp_path}",
        ],
        input="The bank said " * 400 + "\n",
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmctl: error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "positions" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # the conversation ends on it


def test_only_the_generated_text_goes_to_stdout(tmp_path, bases):
    """`llmctl generate ... > answer.txt` captures the answer alone; the header and timings go to stderr."""
    for extra in (["prompt=The bank said"], ["prompt=The bank said", "stream=false"]):
        shown = subprocess.run(
            [
                sys.executable,
                "-m",
                "llmctl",
                "generate",
                f"ckpt={bases['gpt']}",
                "precision=fp32",
                "max_new_tokens=8",
                f"output_root={tmp_path}",
                f"out={tmp_path / 'g.jsonl'}",
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        completion = json.loads((tmp_path / "g.jsonl").read_text())["completion"]
        assert shown.stdout == completion + "\n", extra
        assert "llmctl generate" in shown.stderr and "tokens/s" in shown.stderr


def test_chat_needs_a_template_or_llmctls_own_chat_fine_tune(tmp_path, bases):
    """A model without a chat template chats only when llmctl fine-tuned it on conversations (its plain format);
    a pretrained one is refused in one line (it printed blank lines before)."""
    code, err = run_inprocess("generate", f"ckpt={bases['gpt']}", "prompt=hi", "chat=true", f"output_root={tmp_path}")
    assert code == 2 and "no chat template" in err and "drop chat=true" in err
    args = [
        "task=sft",
        "data=tiny-instruct",
        f"init_from={bases['gpt']}",
        "name=sft",
        "train.max_steps=20",
        "train.batch_size=8",
        "train.eval_every=20",
        "sft.num_samples=0",
        "precision=fp32",
        f"output_root={tmp_path}",
    ]
    assert run_inprocess("finetune", *args)[0] == 0
    sft = Store(tmp_path).resolve("finetune/sft").path
    assert not AutoTokenizer.from_pretrained(sft).chat_template
    result = _generate(tmp_path, bases, f"ckpt={sft}", "prompt=What is the capital of France?", "chat=true")
    assert result.stdout.strip() or "generated no text" in result.stderr


def test_a_prompt_with_an_apostrophe_works_as_a_user_types_it(tmp_path, bases):
    """prompt="What's up?" reaches llmctl as prompt=What's up? (the shell ate the quotes): Hydra's override
    grammar cannot read it, so llmctl passes it on as the quoted string it is."""
    records = _records(tmp_path, bases, "q", "prompt=What's up? It's 'fine'", "stream=false")
    assert records[0]["prompt"] == "What's up? It's 'fine'" and records[0]["new_tokens"] > 0
