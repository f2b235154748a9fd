#!/usr/bin/env bash
# The demonstration: a CPU-bound workload run serially, then on local workers.
PYDIST_EXTRAS=bench
. "$(dirname "$0")/_venv.sh"
exec python bench/demo.py "$@"
