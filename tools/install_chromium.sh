#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/browser/) when it is missing.
#
# The tests drive /usr/bin/chromium through the Python `playwright` package with
# executable_path=/usr/bin/chromium; Playwright's own browser download (`playwright install`)
# is never used, because it cannot reach its servers from a closed network.
# Idempotent: does nothing when /usr/bin/chromium already exists. Uses sudo only when not root.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    echo "install_chromium: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM") already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: apt-get not found; install Chromium so that $CHROMIUM exists" >&2
    exit 1
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        echo "install_chromium: not root and no sudo; cannot install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_chromium: installing Debian's chromium with apt-get"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null

if [[ ! -x "$CHROMIUM" ]]; then
    echo "install_chromium: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
echo "install_chromium: $("$CHROMIUM" --version 2>/dev/null || echo installed)"
