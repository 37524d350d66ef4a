#!/usr/bin/env bash
# Two Optuna sweeps over MiniLM-L6 on BBC News, each resumable and read back with `llmctl ckpt sweep`:
# 1. a fine-tune's learning rate (12 trials, log scale): the study maximises validation macro F1, as finetune does;
# 2. a structured prune of the best of them, amount against accuracy and batch-1 latency: a Pareto front
#    (front.yaml, front.png). Latency trials run one at a time.
# Steps are cut so it fits in ~25 min on 2 CPU cores; rerunning the same command continues an unfinished sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/llmctl ] || bash recipes/install.sh
. .venv/bin/activate
start=$SECONDS
llmctl finetune -m name=bbc-sweep data.max_seq_len=64 train.max_steps=40 train.eval_every=20 \
  hydra/sweeper=optuna hydra.sweeper.n_trials=12 'train.lr=tag(log,interval(1e-5,1e-3))'   # → finetune/bbc-sweep v001..v012
llmctl ckpt sweep finetune/bbc-sweep                                    # the trials table and the best (★)
llmctl prune -m init_from=finetune/bbc-sweep@best name=bbc-front method=structured recover=true \
  train.max_steps=30 train.eval_every=0 max_seq_len=64 \
  hydra/sweeper=optuna hydra.sweeper.n_trials=8 'amount=interval(0.1,0.6)' \
  'objectives=[eval/accuracy,cost/latency_ms_p50]'                     # → prune/bbc-front v001..v008
llmctl ckpt sweep prune/bbc-front                                       # the trials, the Pareto front, front.png
echo "sweep: both sweeps ran in $((SECONDS - start)) s"
