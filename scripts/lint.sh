#!/usr/bin/env bash
# Lint: ruff, then mypy --strict, both with the rules of pyproject.toml ([tool.ruff],
# [tool.mypy]: the package and tests/typecheck/). Any finding fails, except as said below.
# Arguments go to ruff (for example --fix).
PYDIST_EXTRAS=lint
. "$(dirname "$0")/_venv.sh"
ruff check pydist "$@"

# TEMPORARY: the type errors in pydist/pools/ and pydist/dropin/ are printed but do not
# fail, while those two folders are being restructured and typed. Once they are clean,
# replace everything from here to the end with `exec mypy`.
LENIENT='^pydist/(pools|dropin)/'
status=0
out="$(mypy 2>&1)" || status=$?
printf '%s\n' "$out"
if [ "$status" -gt 1 ]; then
    exit "$status"     # mypy itself failed (bad configuration, a crash): no verdict
fi
strict_errors="$(printf '%s\n' "$out" | grep -E '^[^:]+:[0-9]+(:[0-9]+)?: error:' | grep -vcE "$LENIENT" || true)"
if [ "$strict_errors" -gt 0 ]; then
    echo "lint: $strict_errors type error(s) outside pydist/pools/ and pydist/dropin/" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "lint: the type errors above are all in pydist/pools/ or pydist/dropin/: not failing, for now" >&2
fi
