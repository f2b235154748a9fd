# Sourced by the other scripts: make (once) and enter the project's virtual environment,
# with pydist installed in editable mode plus the extras named in $PYDIST_EXTRAS.
# The install is skipped while it is up to date: a stamp in .venv/ records the hash of
# pyproject.toml and the Python used for each set of extras installed (the editable install
# follows the source by itself; only the metadata and dependencies can go stale).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
_stamp=".venv/.pydist-installed-${PYDIST_EXTRAS:-none}"
_want="$( (sha256sum pyproject.toml; python -VV) | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e ".[${PYDIST_EXTRAS}]"
    echo "$_want" > "$_stamp"
fi
