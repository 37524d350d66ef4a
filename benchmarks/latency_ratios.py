"""Batch-1 latency of several checkpoints against the first, interleaved so machine noise hits all alike.

    python benchmarks/latency_ratios.py finetune/minilm-l6-classification distill/bbc-3l-teacher-layers \
        prune/bbc-structured

`llmctl eval` times each checkpoint in turn (median / p90 of warm runs); on a shared or throttling
machine a slow minute lands on whichever model is being timed. Here every round times each model
for a few passes in turn (round robin), for many rounds, and the ratios are of the medians over all
rounds: the figure to quote for "N× faster". Models load through llmctl's loader (any reference,
including pruned formats), run in eval mode under torch.inference_mode on the CPU, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmctl.core.loading import load_checkpoint
from llmctl.core.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("refs", nargs="+", help="checkpoint references; the first is the baseline")
    ap.add_argument("--output-root", default="outputs")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per model per round")
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()

    store = Store(args.output_root, must_exist=True)
    models = [load_checkpoint(store, ref, what="ref").model.eval() for ref in args.refs]
    gen = torch.Generator().manual_seed(0)
    vocab = min(int(m.config.vocab_size) for m in models)
    ids = torch.randint(5, vocab, (1, args.seq_len), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(args.warmup):
                m(**inputs)
        for _ in range(args.rounds):
            for i, m in enumerate(models):
                for _ in range(args.passes):
                    start = time.perf_counter()
                    m(**inputs)
                    times[i].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    print(
        f"batch 1 · {args.seq_len} tokens · {torch.get_num_threads()} threads · {args.rounds} rounds × "
        f"{args.passes} passes, interleaved"
    )
    print(f"{'checkpoint':<48} {'median ms':>10} {'p90 ms':>8} {'speed-up':>9}")
    for ref, t in zip(args.refs, times):
        med = statistics.median(t)
        p90 = sorted(t)[int(0.9 * len(t)) - 1]
        print(f"{ref:<48} {1000 * med:>10.2f} {1000 * p90:>8.2f} {base / med:>8.2f}×")


if __name__ == "__main__":
    main()
