"""Benchmark: causal-LM training step with the HF forward's loss (logits for every position, then
log-softmax / NLL and their backward) vs llmctl's ChunkedCausalLM (projection + cross-entropy a chunk
at a time, gradients formed in place), same model, same batch, same run, timed round-robin.
Prints step times, the ratio, peak extra memory of the loss, and both losses (they must agree).

    python benchmarks/clm_chunked_loss.py                                   # gpt-tiny shapes: 2 × 128, vocab 8,000
    python benchmarks/clm_chunked_loss.py --hidden 256 --layers 4 --vocab 8192 --batch 16
    python benchmarks/clm_chunked_loss.py --hidden 576 --layers 2 --vocab 49152 --batch 4 --seq 512 \
        --rounds 3 --steps 2   # SmolLM2's head
"""

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llmctl.core.objectives import ChunkedCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (
        ("hidden", 128),
        ("layers", 2),
        ("vocab", 8000),
        ("seq", 128),
        ("batch", 32),
        ("rounds", 5),
        ("steps", 4),
    ):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--chunk", type=int, default=None, help="positions per chunk (default: llmctl's, 1024)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with native bf16)")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=a.vocab,
        n_embd=a.hidden,
        n_layer=a.layers,
        n_head=max(a.hidden // 64, 1),
        n_positions=max(a.seq, 128),
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    batch = {"input_ids": ids, "labels": ids}
    chunked = ChunkedCausalLM(model, chunk=a.chunk)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.bf16 else torch.enable_grad
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    losses = {"hf": lambda: model(**batch).loss, "chunked": lambda: chunked(**batch)}

    def step(fn):
        with ctx():
            loss = fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.eval()  # no dropout for the equality check
    with torch.no_grad():
        same = {name: float(fn()) for name, fn in losses.items()}
    model.train()
    for fn in losses.values():  # warm-up
        step(fn)
    times = {name: [] for name in losses}
    for _ in range(a.rounds):  # round-robin: a noisy minute hits both alike
        for name, fn in losses.items():
            t = time.perf_counter()
            for _ in range(a.steps):
                step(fn)
            times[name].append((time.perf_counter() - t) / a.steps)
    hf, ch = statistics.median(times["hf"]), statistics.median(times["chunked"])
    tokens = a.batch * a.seq
    logits_mib = tokens * a.vocab * 4 / 2**20
    print(
        f"model: GPT-2 hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; batch {a.batch} × {a.seq} tokens; "
        f"{'bf16 autocast' if a.bf16 else 'fp32'}; {torch.get_num_threads()} threads"
    )
    print(f"loss (same weights, same batch): hf {same['hf']:.6f} · chunked {same['chunked']:.6f}")
    print(
        f"step time (median of {a.rounds} rounds): hf {hf * 1e3:.1f} ms ({tokens / hf:,.0f} tok/s) · chunked "
        f"{ch * 1e3:.1f} ms ({tokens / ch:,.0f} tok/s)"
    )
    print(
        f"speed-up: {hf / ch:.2f}× · full logits the HF loss holds: {logits_mib:,.0f} MiB (and as much again for "
        "their log-softmax and gradient)"
    )


if __name__ == "__main__":
    main()
