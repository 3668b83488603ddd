#!/usr/bin/env bash
# System packages the test suite needs beyond pip: iproute2 (ip netns, for the multi-host
# tests), util-linux (unshare, nsenter), and chromium (the browser tests drive JupyterLab
# in it with Playwright, which cannot download a browser of its own here). Installed with
# apt when missing and when we can (root on Debian/Ubuntu); otherwise the tests that need
# them skip with the reason.
set -euo pipefail
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v mount >/dev/null 2>&1 || missing+=(mount)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "note: ${missing[*]} missing and cannot be installed here; the tests that need them will skip" >&2
fi
