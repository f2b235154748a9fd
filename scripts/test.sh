#!/usr/bin/env bash
# The whole test suite, in the project's own virtual environment.
PYDIST_EXTRAS=test
. "$(dirname "$0")/_venv.sh"
exec python -m pytest "$@"
