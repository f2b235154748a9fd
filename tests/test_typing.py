"""The public calls are typed: a ``Future`` knows its value's type, so ``fetch`` of a
``remotecall`` is typed by the function called. mypy checks tests/typecheck/check_future.py
(``assert_type`` lines) with the settings of pyproject.toml."""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

import pydist

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKED = "tests/typecheck/check_future.py"


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed here (it comes with pip install -e '.[lint]')")
def test_fetch_is_typed_by_the_function_called(tmp_path: pathlib.Path) -> None:
    run = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary",
                          "--cache-dir", str(tmp_path), CHECKED],    # (a cache trusts mtimes)
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 1), f"mypy failed to run:\n{run.stdout}\n{run.stderr}"
    # Only the checked file's own lines count here; the package's are scripts/lint.sh's.
    errors = [line for line in run.stdout.splitlines() if line.startswith(CHECKED)]
    assert not errors, "\n".join(errors)


def test_future_takes_its_value_type_at_run_time() -> None:
    alias = pydist.Future[int]
    assert alias.__origin__ is pydist.Future and alias.__args__ == (int,)
