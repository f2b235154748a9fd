#!/usr/bin/env bash
# CPython's own tests of ProcessPoolExecutor and multiprocessing.Pool
# (compat_tests/test_cpython_suites.py) under every CPython 3.11-3.13 that pyenv holds on
# this machine (never downloaded). Each interpreter gets a cached virtual environment,
# .venv-X.Y/, with pydist installed in editable mode. Fails if no interpreter found ships
# test_concurrent_futures. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYENV_ROOT="${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}"
found=()
for py in "$PYENV_ROOT"/versions/3.1[1-3]*/bin/python3; do
    [ -x "$py" ] && found+=("$py")
done
if [ ${#found[@]} -eq 0 ]; then
    echo "cpython suites: no CPython 3.11-3.13 under $PYENV_ROOT/versions" >&2
    exit 1
fi
with_cf=0
status=0
for py in "${found[@]}"; do
    ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    full="$("$py" -c 'import sys; print(sys.version.split()[0])')"
    if "$py" -c 'import test.test_concurrent_futures' >/dev/null 2>&1; then
        ships="test_concurrent_futures and _test_multiprocessing"
        with_cf=$((with_cf + 1))
    else
        ships="_test_multiprocessing only (this build lacks test_concurrent_futures)"
    fi
    echo "== CPython $full ($py): $ships"
    venv=".venv-$ver"
    if [ ! -x "$venv/bin/python" ]; then
        "$py" -m venv "$venv"
    fi
    if ! "$venv/bin/python" -m pip install --quiet -e ".[test]" >"$venv/pip.log" 2>&1; then
        cat "$venv/pip.log" >&2
        exit 1
    fi
    "$venv/bin/python" -m pytest -p no:cacheprovider -q compat_tests/test_cpython_suites.py "$@" \
        || status=1
done
if [ "$with_cf" -eq 0 ]; then
    echo "cpython suites: no interpreter here ships test.test_concurrent_futures" >&2
    exit 1
fi
exit "$status"
