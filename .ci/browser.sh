#!/usr/bin/env bash
# Debian's Chromium for the browser tests of `omni serve`'s page (tests/serve/test_page_browser.py), driven by
# Playwright through executable_path: Playwright's own browser download is not reachable from CI.
# Installed only when missing (safe to run again).
set -euo pipefail

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi

if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "install ok installed"; then
    echo "browser.sh: installing chromium"
    install=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)
    if ! "${install[@]}" >/dev/null; then
        "${as_root[@]}" apt-get update -q >/dev/null
        "${install[@]}" >/dev/null
    fi
fi
command -v chromium >/dev/null || { echo "browser.sh: chromium still missing after install" >&2; exit 1; }
