#!/usr/bin/env bash
# Finds working interpreters for the Python versions named (default: 3.12 3.13), beyond the 3.11 of .venv.
#
#   tools/find_pythons.sh [3.12 3.13 ...]   prints "VERSION PATH" for each version found, one a line
#   tools/find_pythons.sh --path 3.12       prints the path alone (exit 1 when none runs)
#
# A candidate counts only when it runs and is that version: a pyenv shim on PATH whose version is not
# selected exists but fails ("pyenv: python3.12: command not found"), so every candidate is executed.
# Order: pythonX.Y on PATH, pyenv's versions (newest patch first), then the usual system places
# (Debian 13 ships /usr/bin/python3.13). What was found or skipped goes to stderr.
set -uo pipefail

only_path=0
if [ "${1-}" = --path ]; then
    only_path=1
    shift
fi
[ $# -gt 0 ] || set -- 3.12 3.13

works() {  # works PYTHON VERSION: it runs, is VERSION, and can make a virtual environment
    "$1" -c "import sys, venv; sys.exit(sys.version_info[:2] != tuple(map(int, '$2'.split('.'))))" \
        >/dev/null 2>&1
}

candidates() {  # candidates VERSION: possible interpreters, best first (may not exist or run)
    local v=$1 root
    command -v "python$v" 2>/dev/null
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    # newest patch release first: 3.12.10 before 3.12.9
    ls -d "$root/versions/$v".*/bin/"python$v" 2>/dev/null | sort -Vr
    ls -d "$root/versions/$v"/bin/"python$v" 2>/dev/null
    for dir in /usr/local/bin /usr/bin /opt/python/bin "/opt/python$v/bin"; do
        echo "$dir/python$v"
    done
}

status=0
for v in "$@"; do
    found=
    while IFS= read -r cand; do
        [ -n "$cand" ] && [ -e "$cand" ] || continue
        if works "$cand" "$v"; then
            found=$cand
            break
        fi
        echo "find_pythons: $cand does not run as Python $v: skipped" >&2
    done < <(candidates "$v" | awk '!seen[$0]++')
    if [ -z "$found" ]; then
        echo "find_pythons: Python $v: none found" >&2
        status=1
        continue
    fi
    if [ "$only_path" = 1 ]; then
        echo "$found"
    else
        echo "find_pythons: Python $v: $found ($("$found" -c 'import platform; print(platform.python_version())'))" >&2
        echo "$v $found"
    fi
done
[ "$only_path" = 1 ] && exit "$status"
exit 0
