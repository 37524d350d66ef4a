"""Response-token perplexity of onnxruntime-genai folders on an SFT validation set, scored exactly as llmctl scores
an SFT checkpoint (its own tokenization: chat template, loss on the response and end-of-turn tokens only), beside
the llmctl checkpoint the folders were built from: the quality side of `benchmarks/decode.py`'s speed reference.

    python -m onnxruntime_genai.models.builder -i outputs/finetune/defs/v001 -o og/int4 -p int4 -e cpu
    python benchmarks/ort_sft_quality.py finetune/defs --ort-genai fp32=og/fp32,int4=og/int4 \
        [--ckpt quantize/d-int4-weight ...]

The validation split is the one the checkpoint's manifest records (its data config, loaded and deduplicated as
every stage does). Each example is run alone (no padding) through the folder's model.onnx with an empty KV cache;
the perplexity is exp of the mean loss over every scored token of the split, as `llmctl eval` computes it.
"""

from __future__ import annotations

import argparse
import math

import torch
from decode import ort_logits, torch_logits  # benchmarks/decode.py, beside this script

from llmctl.core.data import load_data
from llmctl.core.loading import load_checkpoint
from llmctl.core.store import Store
from llmctl.core.tasks.base import record_data_config
from llmctl.core.tasks.sft import prepare_sft


def perplexity(logits_of, rows) -> float:
    total, count = 0.0, 0
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        logits = logits_of(ids)[:-1]
        target = labels[1:]
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the llmctl SFT checkpoint the folders were built from (its tokenizer and task)")
    ap.add_argument("--ort-genai", default="", help="label=folder,... onnxruntime-genai folders")
    ap.add_argument("--ckpt", nargs="*", default=[], help="more llmctl checkpoints to score the same way")
    ap.add_argument("--output-root", default="outputs")
    args = ap.parse_args()

    store = Store(args.output_root)
    loaded = load_checkpoint(store, args.base, what="base")
    record = loaded.task or {}
    data = load_data(record_data_config(record, args.base), task="sft")
    max_len, system_prompt = int(record.get("max_seq_len") or 512), record.get("system_prompt")
    prepared = prepare_sft(data, loaded.tokenizer, max_seq_len=max_len, batch_size=1, system_prompt=system_prompt)
    rows = prepared.splits["validation"]
    scored = {args.base: torch_logits(loaded.model.float().eval())}
    for ref in args.ckpt:
        scored[ref] = torch_logits(load_checkpoint(store, ref, what="ckpt").model.eval())
    for item in filter(None, args.ort_genai.split(",")):
        label, folder = item.split("=", 1)
        scored[f"ort-genai {label}"] = ort_logits(folder)
    base = None
    print(f"{len(rows)} validation examples · response-token perplexity, each model in fp32 precision")
    for name, logits_of in scored.items():
        ppl = perplexity(logits_of, rows)
        base = base or ppl
        print(f"{name:<32}{ppl:>10.3f}{100 * (ppl / base - 1):>+9.1f} %")


if __name__ == "__main__":
    main()
