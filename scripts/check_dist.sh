#!/usr/bin/env bash
# The documentation site, built strictly, and the wheel and sdist, built and smoke-tested:
# the packaging half of CI (.ci/run), runnable by hand.
PYDIST_EXTRAS=docs
. "$(dirname "$0")/_venv.sh"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== docs: mkdocs build --strict"
# (not --quiet: with it, MkDocs 1.6 no longer counts its own warnings for --strict)
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$tmp/site" > "$tmp/mkdocs.log" 2>&1 \
    || { grep -v "^INFO" "$tmp/mkdocs.log"; exit 1; }
echo "   $(find "$tmp/site" -name index.html | wc -l) pages"

echo "== packages: python -m build"
python -m pip install --quiet build
python -m build --outdir "$tmp/dist" . > "$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
if grep -iE "deprecat|SetuptoolsWarning" "$tmp/build.log"; then
    echo "the build printed the warnings above"; exit 1
fi
ls "$tmp/dist"
# (listings kept in variables: `grep -q` in a pipe would end it early, failing under pipefail)
sdist_files="$(tar -tzf "$tmp"/dist/pydist-*.tar.gz)"
wheel_files="$(python -m zipfile -l "$tmp"/dist/pydist-*.whl)"
grep -q "/LICENSE$" <<<"$sdist_files" || { echo "the sdist has no LICENSE"; exit 1; }
grep -q "pydist/py.typed" <<<"$wheel_files" || { echo "the wheel has no py.typed"; exit 1; }
grep -q "licenses/LICENSE" <<<"$wheel_files" || { echo "the wheel has no LICENSE"; exit 1; }

echo "== the wheel in a fresh virtual environment"
python3 -m venv "$tmp/smoke"
"$tmp/smoke/bin/python" -m pip install --quiet "$tmp"/dist/pydist-*.whl
cd "$tmp"           # away from the checkout: the installed copy is the one imported
"$tmp/smoke/bin/python" - <<'PY'
import pydist as pd
assert "site-packages" in pd.__file__, pd.__file__
w = pd.addprocs(2)
assert pd.pmap(lambda x: x * x, range(100)) == [x * x for x in range(100)]
with pd.ProcessPoolExecutor(2) as ex:
    assert list(ex.map(abs, [-1, -2])) == [1, 2]
pd.rmprocs(*w)
try:
    pd.pmap(abs, [1], progress=True)       # tqdm is an extra, not installed here
except ImportError as e:
    assert "pydist[progress]" in str(e)
else:
    raise AssertionError("progress=True worked without tqdm")
print("wheel smoke test: ok")
PY
"$tmp/smoke/bin/pydist" info
