#!/usr/bin/env bash
# Lint: ruff, then mypy --strict, both with the rules of pyproject.toml ([tool.ruff],
# [tool.mypy]: the package and tests/typecheck/). Any finding fails.
# Arguments go to ruff (for example --fix).
PYDIST_EXTRAS=lint
. "$(dirname "$0")/_venv.sh"
ruff check . "$@"       # the package, its tests, benchmarks, examples and scripts

exec mypy
