"""The cluster cookie never leaves its channel, and ``exeflags`` is read as Julia users write it."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from testkit import subprocess_env

import pydist as pd

HERE = os.path.dirname(os.path.abspath(__file__))
PLANTED = "planted-cookie-5b1e0c7d"


def test_no_error_path_carries_the_cookie(transport):
    out = subprocess.run([sys.executable, os.path.join(HERE, "cookie_master.py"), transport],
                         input=PLANTED + "\n", capture_output=True, text=True, timeout=120, env=subprocess_env())
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "DONE" in out.stdout, text
    assert PLANTED not in text
    assert "<cluster cookie>" in text            # the echoing launcher's output, blanked
    assert "remote failure 3" in text            # the relayed log line was seen


@pytest.mark.parametrize("flags, expected", [
    ("-O  -X dev", (1, True)),                     # a string: split as a shell would
    (["-OO", "-X", "dev"], (2, True)),             # a list: taken as is
])
def test_exeflags_reach_the_interpreter(flags, expected, leak_oracle):
    (w,) = pd.addprocs(1, exeflags=flags)
    try:
        assert pd.remotecall_fetch(lambda: (sys.flags.optimize, sys.flags.dev_mode), w) == expected
    finally:
        pd.rmprocs(w, waitfor=30)


@pytest.mark.parametrize("flags", ["-", "-O -", ["-W", "error", "-"]])
def test_flags_that_would_not_run_the_worker_are_refused(flags, leak_oracle):
    before = pd.workers()
    with pytest.raises(ValueError, match="exeflags"):
        pd.addprocs(1, exeflags=flags)
    assert pd.workers() == before


@pytest.mark.parametrize("flags", [3, [b"-O"], ["-O", None]])
def test_exeflags_of_a_wrong_type(flags):
    with pytest.raises(TypeError, match="exeflags"):
        pd.addprocs(1, exeflags=flags)


def test_a_worker_that_cannot_start_says_why_at_once(leak_oracle):
    # "At once": when the worker exits, not after the join timeout (60 s); the bound leaves
    # room for a loaded machine. The worker may be gone before its cookie is written.
    t0 = time.monotonic()
    with pytest.raises(pd.LaunchError, match="frozen_modules"):
        pd.addprocs(1, exeflags="-X frozen_modules=bogus")
    assert time.monotonic() - t0 < 20.0
