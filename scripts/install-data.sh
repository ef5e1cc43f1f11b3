#!/usr/bin/env bash
# Installs the Debian data packages exitguard's full-size runs read (needs root):
#   dataset-fashion-mnist  the 70k Fashion-MNIST images under /usr/share/datasets/fashion-mnist/
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "run as root (or with sudo): apt-get install needs it" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq dataset-fashion-mnist
echo "Fashion-MNIST installed under /usr/share/datasets/fashion-mnist/"
