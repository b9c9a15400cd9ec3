#!/usr/bin/env bash
# The local OpenAI-compatible server (llama.cpp + SmolLM2-135M) that the autointerp tests run against.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! .venv/bin/python -c "import llama_cpp.server" 2>/dev/null; then
  bash scripts/install_llm_server.sh .venv
fi
