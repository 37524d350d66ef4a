"""`llmctl serve` on a tiny chat GPT, started as a real process on a free port and spoken to by the `openai` client:
chat and completions (streamed and not) agree with transformers' own greedy decoding, concurrent clients share
batches and are all answered, bad requests are 4xx in OpenAI's error shape, the API key, a full queue, SIGTERM
finishing what is in flight, and lm-evaluation-harness scoring through HTTP as it does in process."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_gpt(bases, tmp_path_factory):
    """The tiny GPT with a chat template (a chat model)."""
    folder = tmp_path_factory.mktemp("serve") / "gpt"
    shutil.copytree(bases["gpt"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


class Server:
    def __init__(self, proc, url: str, out, err):
        self.proc, self.url, self.out, self.err = proc, url, out, err

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url.removesuffix("/v1") + "/health").json()

    def log(self) -> str:
        return self.err.read_text()


@contextlib.contextmanager
def serving(ckpt, tmp_path, *extra, env=None):
    """`llmctl serve ckpt=... port=0` in a subprocess; yields once it listens (the port it printed)."""
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", f"ckpt={ckpt}", "port=0", "precision=fp32", *extra],
            stdout=o,
            stderr=e,
            cwd=REPO,
            env={**__import__("os").environ, **(env or {})},
        )
    try:
        deadline = time.time() + 120
        while not (found := re.search(r"http://127\.0\.0\.1:(\d+)/v1", out.read_text())):
            assert proc.poll() is None, f"serve exited {proc.returncode}: {err.read_text()[-2000:]}"
            assert time.time() < deadline, "serve did not start"
            time.sleep(0.2)
        yield Server(proc, found.group(0), out, err)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def server(chat_gpt, tmp_path_factory):
    with serving(chat_gpt, tmp_path_factory.mktemp("srv"), "max_tokens=64", "max_batch=8", "wait_ms=50") as s:
        yield s


def _greedy(folder, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_completions_and_chat_through_the_openai_client_match_transformers_greedy(server, chat_gpt):
    client, name = server.client(), str(chat_gpt)
    assert [m.id for m in client.models.list().data] == [name]
    tok = AutoTokenizer.from_pretrained(chat_gpt)

    prompt = "The central bank raised"
    done = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
    expected = _greedy(chat_gpt, tok(prompt)["input_ids"], 12)
    assert done.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert done.usage.prompt_tokens == len(tok(prompt)["input_ids"]) and done.usage.completion_tokens == 12
    assert done.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model=name, prompt=prompt, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who scored twice?"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = _greedy(chat_gpt, chat_ids["input_ids"], 10)
    assert chat.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens == chat.usage.prompt_tokens + 10
    pieces = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0, stream=True)
    deltas = [c.choices[0].delta.content or "" for c in pieces if c.choices]
    assert "".join(deltas) == chat.choices[0].message.content and len([d for d in deltas if d]) > 1


def test_seeds_stops_and_echoed_logprobs(server, chat_gpt):
    client, name = server.client(), str(chat_gpt)
    sampled = [
        client.completions.create(model=name, prompt="The film", max_tokens=16, seed=s).choices[0].text
        for s in (7, 7, 8)
    ]  # the API's default temperature is 1: sampled, repeatable with a seed
    assert sampled[0] == sampled[1] != sampled[2]
    free = client.completions.create(model=name, prompt="The film", max_tokens=16, temperature=0).choices[0].text
    stop = free.strip()[:3]
    cut = client.completions.create(model=name, prompt="The film", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    scored = client.completions.create(model=name, prompt="The film took", max_tokens=1, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    prompt_tokens = scored.usage.prompt_tokens
    assert len(lp.token_logprobs) == prompt_tokens + 1 and lp.token_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and scored.choices[0].text.startswith("The film took")
    assert all(max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs[1:prompt_tokens], lp.token_logprobs[1:]))


def test_concurrent_clients_are_all_answered_sharing_batches(server, chat_gpt):
    client, name = server.client(), str(chat_gpt)
    prompts = [f"The {w} said" for w in ("bank", "coach", "singer", "minister", "analyst", "engineer", "voter", "team")]
    alone = [
        client.completions.create(model=name, prompt=p, max_tokens=20, temperature=0).choices[0].text for p in prompts
    ]
    before = server.health()["batches"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(
            pool.map(
                lambda p: client.completions.create(model=name, prompt=p, max_tokens=20, temperature=0),
                prompts * 3,
            )
        )
    assert [r.choices[0].text for r in together] == alone * 3  # nothing lost, nothing mixed up between rows
    health = server.health()
    assert health["largest_batch"] > 1 and health["batches"] - before < len(prompts) * 3


def test_bad_requests_are_4xx_in_openais_error_shape(server, chat_gpt):
    client, name = server.client(), str(chat_gpt)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="finetune/nope", prompt="hi")
    assert e.value.body["code"] == "model_not_found" and name in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="hi", max_tokens=65)
    assert e.value.body["code"] == "max_tokens_exceeded" and "64" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt=[5] * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt=[5] * 500, max_tokens=20)
    assert e.value.body["param"] == "max_tokens" and "12 or fewer" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], temperature=3)
    assert e.value.body["param"] == "temperature"
    base = server.url
    raw = httpx.post(f"{base}/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(f"{base}/chat/completions", json={"model": name, "messages": []})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"
    raw = httpx.post(f"{base}/embeddings", json={"model": name, "input": "x"})
    assert raw.status_code == 404 and "/v1/chat/completions" in raw.json()["error"]["message"]
    assert re.search(r"POST /v1/completions 404 [\d.]+s", server.log())  # one line per request


def test_the_port_listens_before_its_url_is_printed():
    """The URL is printed before uvicorn starts (the model is still being set up): a client that connects at once must
    wait in the backlog, not be refused (CI saw `Connection refused` from the openai client)."""
    import socket

    from llmctl.stages.serve import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=5):
            pass
    finally:
        sock.close()


def test_an_encoder_or_a_busy_port_is_one_line(bases, tmp_path, server):
    from conftest import run_cli

    port = server.url.rsplit(":", 1)[1].split("/")[0]
    busy = run_cli("serve", f"ckpt={bases['gpt']}", f"port={port}", timeout=120)
    assert busy.returncode == 2 and f"port={port}" in busy.stderr and "in use" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    encoder = run_cli("serve", f"ckpt={bases['enc']}", "port=0", timeout=120)
    assert encoder.returncode == 2 and "serve takes causal LMs" in encoder.stderr


def test_an_api_key_a_full_queue_and_sigterm_finishing_in_flight_requests(chat_gpt, tmp_path):
    extra = ("max_batch=1", "queue_size=1", "max_tokens=400", "wait_ms=0")
    with serving(chat_gpt, tmp_path, *extra, env={"LLMCTL_API_KEY": "sesame"}) as s:
        name = str(chat_gpt)
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()
        client = s.client(api_key="sesame")
        assert client.models.list().data[0].id == name
        assert s.health()["status"] == "ok"  # /health needs no key (load balancers)

        # one request decoding, one waiting, the rest turned away with 429 + Retry-After
        headers = {"Authorization": "Bearer sesame"}
        body = {"model": name, "prompt": "The bank", "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(
                    lambda _: httpx.post(f"{s.url}/completions", json=body, headers=headers, timeout=120), range(6)
                )
            )
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        busy = next(a for a in answers if a.status_code == 429)
        assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "rate_limit_error"

        # SIGTERM while one request streams and another waits: both finish in full, then the process exits 0
        results = {}

        def stream(key):
            chunks = client.completions.create(
                model=name, prompt="The coach", max_tokens=400, temperature=0, stream=True
            )
            results[key] = [c.choices[0] for c in chunks if c.choices]

        before = s.health()["batches"]
        first = threading.Thread(target=stream, args=("streamed",))
        first.start()
        while s.health()["batches"] == before:  # the stream's batch has started
            time.sleep(0.01)
        second = threading.Thread(
            target=lambda: results.setdefault(
                "queued", client.completions.create(model=name, prompt="The team", max_tokens=400, temperature=0)
            )
        )
        second.start()
        while s.health()["waiting"] < 1:
            time.sleep(0.01)
        s.proc.send_signal(signal.SIGTERM)
        first.join(120)
        second.join(120)
        assert s.proc.wait(60) == 0
        assert results["streamed"][-1].finish_reason == "length" and len(results["streamed"]) > 2
        assert results["queued"].usage.completion_tokens == 400
        assert "shutting down" in s.out.read_text()
        with pytest.raises(openai.APIConnectionError):
            client.models.list()


def test_lm_eval_scores_through_http_as_it_does_in_process(server, chat_gpt, corpus):
    pytest.importorskip("lm_eval")
    from llmctl.core import harness
    from llmctl.core.device import setup_runtime

    documents = [p.read_text() for p in sorted(corpus.iterdir())[:6]]
    tok = AutoTokenizer.from_pretrained(chat_gpt)
    model = AutoModelForCausalLM.from_pretrained(chat_gpt).eval()
    here = harness.run_tasks(
        harness.hf_lm(model, tok, rt=setup_runtime("cpu", "fp32")), [harness.PERPLEXITY_TASK], documents=documents
    )[harness.PERPLEXITY_TASK]
    served = harness.served_lm(server.url, str(chat_gpt), tokenizer=str(chat_gpt), max_length=512)
    there = harness.run_tasks(served, [harness.PERPLEXITY_TASK], documents=documents)[harness.PERPLEXITY_TASK]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):  # fp32 on both sides: equal to 1e-4
        assert there[metric] == pytest.approx(here[metric], rel=1e-4), (metric, here, there)
    assert json.dumps(here)  # plain numbers
