"""Benchmark: MLM training step with logits on every position (HF forward) vs on masked positions only
(llmctl's SparseMLM), same model, same batches, same run. Prints step times, the ratio, and the
loss of both (they must agree).

    python benchmarks/mlm_sparse_head.py [--hidden 128 --layers 2 --vocab 8000 --seq 128 --batch 32 --steps 20]
"""

import argparse
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from llmctl.core.objectives import SparseMLM


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("hidden", 128), ("layers", 2), ("vocab", 8000), ("seq", 128), ("batch", 32), ("steps", 20)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with native bf16)")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=max(a.hidden // 64, 1),
        intermediate_size=4 * a.hidden,
        max_position_embeddings=max(512, a.seq),
    )
    model = BertForMaskedLM(cfg)
    ids = torch.randint(5, a.vocab, (a.batch, a.seq))
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape) < 0.15
    labels[picked] = ids[picked]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.bf16 else torch.enable_grad

    def timed(fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(3):  # warm-up
            with ctx():
                fn().backward()
            opt.zero_grad()
        t = time.perf_counter()
        for _ in range(a.steps):
            with ctx():
                loss = fn()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t) / a.steps

    model.eval()  # no dropout for the equality check
    with torch.no_grad():
        dense_loss, sparse_loss = float(model(**batch).loss), float(SparseMLM(model)(**batch))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = timed(lambda: model(**batch).loss)
    model.load_state_dict(state)
    sparse = timed(lambda: SparseMLM(model)(**batch))
    tokens = a.batch * a.seq
    print(
        f"model: BERT hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; batch {a.batch} × {a.seq} tokens; "
        f"{'bf16 autocast' if a.bf16 else 'fp32'}; {torch.get_num_threads()} threads"
    )
    print(f"loss (same weights, same batch): dense {dense_loss:.6f} · sparse {sparse_loss:.6f}")
    print(
        f"step time: dense {dense * 1e3:.1f} ms ({tokens / dense:,.0f} tok/s) · sparse {sparse * 1e3:.1f} ms "
        f"({tokens / sparse:,.0f} tok/s)"
    )
    print(f"speed-up: {dense / sparse:.2f}×")


if __name__ == "__main__":
    main()
