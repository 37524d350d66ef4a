#!/usr/bin/env bash
# The pipeline on its embedded defaults, each stage addressed by reference only.
# Grows as stages land: today pretrain (BERT MLM and GPT causal LM on BBC News) and the store.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/llmctl ] || bash recipes/install.sh
. .venv/bin/activate
llmctl pretrain                       # conf=bert-tiny: 2-layer BERT, MLM, BBC News (~3 min on 2 cores)
llmctl pretrain conf=gpt-tiny         # 2-layer GPT-2, causal LM, BBC News (~3 min)
llmctl ckpt list
llmctl ckpt show pretrain/gpt-tiny
