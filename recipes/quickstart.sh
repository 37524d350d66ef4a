#!/usr/bin/env bash
# The whole pipeline on the embedded defaults (BBC News and the KJV-free presets: nothing to download),
# every stage addressed by reference only: pretrain → finetune → distill → prune → quantize → eval → generate.
# Step counts are cut so the chain fits in ~10 minutes on 2 CPU cores; drop the train.max_steps overrides
# for the presets' full runs. Ends with the comparison table and its charts (outputs/reports/quickstart/).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/llmctl ] || bash recipes/install.sh
. .venv/bin/activate
start=$SECONDS
# 1. pretrain: a 2-layer BERT (masked LM) and a 2-layer GPT-2 (causal LM) on BBC News, each with its own tokenizer
llmctl pretrain train.max_steps=400 train.lr=1e-3                     # conf=bert-tiny → pretrain/bert-tiny (the preset's 3e-3 suits its 3,000 steps)
llmctl pretrain conf=gpt-tiny train.max_steps=200                     # → pretrain/gpt-tiny
# 2. finetune the BERT on the BBC News topics (5 classes)
llmctl finetune init_from=pretrain/bert-tiny task=classification data=bbc-news data.max_seq_len=128 \
  train.batch_size=32 train.lr=1e-3 train.max_steps=400               # → finetune/bert-tiny-classification
# 3. distill it into a 1-layer student (its teacher's every other layer), 4. cut half its heads and FFN, recover,
# 5. store it in int8 (weights and activations), and the GPT too
llmctl distill teacher=finetune/bert-tiny-classification train.lr=1e-3 train.max_steps=200        # → distill/bert-tiny-classification
llmctl prune init_from=distill/bert-tiny-classification method=structured amount=0.5 recover=true \
  train.lr=1e-3 train.max_steps=100                                   # → prune/bert-tiny-classification
llmctl quantize init_from=prune/bert-tiny-classification method=int8-dynamic                      # → quantize/bert-tiny-classification
llmctl quantize init_from=pretrain/gpt-tiny method=int8-dynamic                                   # → quantize/gpt-tiny
# 6. one table: accuracy, size, latency and throughput of each step of the chain (+ report.md and two charts)
llmctl eval 'ckpt=[finetune/bert-tiny-classification,distill/bert-tiny-classification,prune/bert-tiny-classification,quantize/bert-tiny-classification]' \
  report=outputs/reports/quickstart
# 7. generate from the int8 GPT
llmctl generate ckpt=quantize/gpt-tiny prompt="The government said" max_new_tokens=40 sample.temperature=0.8 sample.top_p=0.9 seed=1
llmctl ckpt lineage quantize/bert-tiny-classification
echo "quickstart: the chain ran in $((SECONDS - start)) s; report: outputs/reports/quickstart/report.md"
