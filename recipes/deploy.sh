#!/usr/bin/env bash
# Artifacts that leave llmctl, and a server. MiniLM-L6 on BBC News → int8 → ONNX (fp32) and ONNX Runtime int8, judged
# side by side; SmolLM2 chat (LoRA SFT) → int4 → GGUF f16 / q8_0 / Q4_0, a chat answer from a GGUF reload; then
# `llmctl serve` under load (1 / 4 / 8 clients, batched vs one at a time) and lm-eval over HTTP vs in process.
# ~50 min on 2 CPU cores (fine-tuning the two models is most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/llmctl ] || bash recipes/install.sh
. .venv/bin/activate
# ---- an encoder to ONNX Runtime
llmctl finetune name=bbc                                                        # packaged MiniLM-L6 on BBC News topics
llmctl quantize init_from=finetune/bbc method=int8-dynamic name=bbc             # → quantize/bbc (int8 weights × int8 activations)
llmctl export ckpt=finetune/bbc format=onnx name=bbc                            # → export/bbc (ONNX fp32)
llmctl export ckpt=quantize/bbc format=onnx name=bbc-int8                       # its float parent → ONNX Runtime int8
llmctl eval 'ckpt=[finetune/bbc,quantize/bbc,export/bbc,export/bbc-int8]' precision=fp32 report=outputs/reports/deploy_bbc
python benchmarks/latency_ratios.py finetune/bbc quantize/bbc export/bbc export/bbc-int8   # batch 1, round-robin
# ---- a chat model to llama.cpp / Ollama
llmctl finetune model=smollm2-135m task=sft method=lora data=tiny-instruct train.max_steps=60 train.batch_size=8 \
  name=smollm2-chat
llmctl quantize init_from=finetune/smollm2-chat method=int4-weight quantize.group_size=32 name=smollm2-chat-int4
for t in f16 q8_0; do llmctl export ckpt=finetune/smollm2-chat format=gguf gguf.type=$t name=smollm2-chat-$t; done
llmctl export ckpt=quantize/smollm2-chat-int4 format=gguf name=smollm2-chat-q4   # int4 groups of 32 → Q4_1 blocks
llmctl generate ckpt=export/smollm2-chat-q8_0 prompt="Give me three tips for sleeping well." chat=true max_new_tokens=80
# ---- an OpenAI-compatible server
python benchmarks/serve_load.py --ckpt finetune/smollm2-chat
