#!/usr/bin/env bash
# Real datasets for CI where they can be had, never required.
#
# * Debian's `dataset-fashion-mnist` installs the complete Fashion-MNIST (gzipped IDX) in
#   /usr/share/datasets/fashion-mnist, one of fa_study's known data roots. Installed with apt
#   when apt is there and we may use it; a failure only prints.
# * ../shared/datasets (the complete MNIST, read-only) is printed for the caller to put on the
#   data search path (FA_STUDY_DATA); see .ci/run.
set -uo pipefail

if [[ -d /usr/share/datasets/fashion-mnist ]]; then
    echo "install_datasets: Fashion-MNIST already in /usr/share/datasets/fashion-mnist"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else SUDO=(false); fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    if "${SUDO[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 && \
             "${SUDO[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
        echo "install_datasets: installed dataset-fashion-mnist"
    else
        echo "install_datasets: could not install dataset-fashion-mnist; notebooks use its stand-in"
    fi
else
    echo "install_datasets: no apt-get; Fashion-MNIST notebooks use its stand-in"
fi
exit 0
