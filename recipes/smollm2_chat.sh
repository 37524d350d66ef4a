#!/usr/bin/env bash
# SmolLM2-135M-Instruct (packaged) as a chat model: LoRA SFT (merged into the weights when saved) → int8 and
# int4 → a chat answer from each. Every stage by reference. ~15 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/llmctl ] || bash recipes/install.sh
. .venv/bin/activate
PROMPT=${PROMPT:-"Give me three tips for sleeping well."}  # (Hydra needs quotes escaped: prompt=\'it\'s\')
llmctl finetune model=smollm2-135m task=sft method=lora data=tiny-instruct train.max_steps=60 train.batch_size=8 \
  name=smollm2-chat                                                    # → finetune/smollm2-chat (LoRA merged; adapter/ kept beside)
llmctl quantize init_from=finetune/smollm2-chat method=int8-dynamic name=smollm2-chat-int8   # lm_head (tied to the embeddings) stays fp32
llmctl quantize init_from=finetune/smollm2-chat method=int4-weight quantize.group_size=32 name=smollm2-chat-int4
for ckpt in finetune/smollm2-chat quantize/smollm2-chat-int8 quantize/smollm2-chat-int4; do
  echo "== $ckpt"
  llmctl generate ckpt=$ckpt prompt="$PROMPT" chat=true max_new_tokens=80
done
llmctl eval 'ckpt=[finetune/smollm2-chat,quantize/smollm2-chat-int8,quantize/smollm2-chat-int4]' report=outputs/reports/smollm2_chat
