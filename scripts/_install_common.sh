# Shared by the install scripts (sourced by them, not run on its own): the Python to install
# into, Debian packages, and the project's extras on the CPU build of torch.

# Sets PYTHON: the one named (the install script's argument), else .venv/bin/python, else
# python3.
choose_python() {
    PYTHON="${1:-}"
    if [[ -z "${PYTHON}" ]]; then
        if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
    fi
}

# Installs Debian packages (through sudo unless run as root).
apt_install() {
    local sudo=""
    if [[ "$(id -u)" != "0" ]]; then sudo="sudo"; fi
    ${sudo} apt-get update
    ${sudo} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# Installs the project, editable, with the extras named ("lm,data") into PYTHON; the CPU
# build of torch first where none is installed, so that the extras do not pull a CUDA build.
install_project() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    "${PYTHON}" -c "import torch" 2>/dev/null || "${PYTHON}" -m pip install "torch==2.13.0"
    "${PYTHON}" -m pip install -e "${root}[$1]"
}
