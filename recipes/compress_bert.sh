#!/usr/bin/env bash
# MiniLM-L6 on BBC News, made small and fast: fine-tune → distill (6 → 3 layers) → structured prune with
# recovery → int8 → one eval report (table, charts, per-class tables). Every stage by reference.
# ~25 min on 2 CPU cores (fine-tuning and distilling MiniLM are most of it). The report: outputs/reports/compress_bert/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/llmctl ] || bash recipes/install.sh
. .venv/bin/activate
llmctl finetune name=bbc data.max_seq_len=128 train.max_steps=150   # packaged MiniLM-L6 (model=minilm-l6) on the BBC News topics → finetune/bbc
llmctl distill teacher=finetune/bbc student.num_layers=3 distill.cache_teacher=true        # → distill/bbc
llmctl prune init_from=distill/bbc method=structured amount=0.3 recover=true train.max_steps=200   # → prune/bbc
llmctl quantize init_from=prune/bbc method=int8-dynamic               # → quantize/bbc: int8 weights and activations, int8 embedding rows
llmctl quantize init_from=finetune/bbc method=int8-dynamic name=bbc-int8       # the fine-tune alone at each width, to compare
llmctl quantize init_from=finetune/bbc method=int4-weight name=bbc-int4
llmctl eval 'ckpt=[finetune/bbc,distill/bbc,prune/bbc,quantize/bbc,quantize/bbc-int8,quantize/bbc-int4]' report=outputs/reports/compress_bert
