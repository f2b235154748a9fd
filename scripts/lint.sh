#!/usr/bin/env bash
# Lint: ruff over the package, with the rules of pyproject.toml ([tool.ruff]).
PYDIST_EXTRAS=lint
. "$(dirname "$0")/_venv.sh"
exec ruff check pydist "$@"
