#!/usr/bin/env bash
# The local OpenAI-compatible server (llama.cpp + SmolLM2-135M) that the autointerp tests run against.
# Installed when missing, and rebuilt when the installed llama.cpp was compiled with AMX kernels
# (a native build on an AMX CPU: see scripts/install_llm_server.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! .venv/bin/python -c "
import llama_cpp, llama_cpp.server
assert b'AMX' not in llama_cpp.llama_print_system_info(), 'built with AMX kernels'
" 2>/dev/null; then
  bash scripts/install_llm_server.sh .venv
fi
