#!/usr/bin/env bash
# The pipeline on its embedded defaults, each stage addressed by reference only.
# Grows as stages land: today pretrain (BERT MLM and GPT causal LM on BBC News), finetune, and the store.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/llmctl ] || bash recipes/install.sh
. .venv/bin/activate
llmctl pretrain                       # conf=bert-tiny: 2-layer BERT, MLM, BBC News (~6 min on 2 cores with bf16, 13 in fp32)
llmctl pretrain conf=gpt-tiny         # 2-layer GPT-2, causal LM, BBC News (~4 min; 6 in fp32)
llmctl finetune init_from=pretrain/bert-tiny task=classification data=bbc-news \
  data.max_seq_len=128 train.batch_size=32 train.lr=1e-3 train.max_steps=300   # the chain (~1 min)
llmctl finetune train.max_steps=60 data.max_seq_len=128   # packaged MiniLM-L6 on BBC News topics (~2 min)
llmctl ckpt list
llmctl ckpt lineage finetune/bert-tiny-classification
