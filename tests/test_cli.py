"""The ``pydist`` command: ``info``, ``bench`` and ``worker``, run as a user runs them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def pydist(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pydist", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_info_reports_version_transports_shm_cpus_and_a_working_worker():
    out = pydist("info")
    assert out.returncode == 0, out.stdout + out.stderr
    import pydist as pd
    lines = dict(line.split(None, 1) if not line.startswith(("transport", "dependency", "install"))
                 else (" ".join(line.split()[:2]), line.split(None, 2)[2])
                 for line in out.stdout.splitlines())
    assert lines["pydist"].startswith(pd.__version__)
    assert lines["transport shm"] == "ok" and lines["transport tcp"] == "ok"
    assert "GiB free" in lines["/dev/shm"]
    assert lines["CPUs"].startswith(f"{len(os.sched_getaffinity(0))} usable")
    assert lines["install check"].startswith("ok (a worker started")


def test_bench_prints_a_table_beside_the_standard_library():
    out = pydist("bench", "--workers", "1", "-n", "500")
    assert out.returncode == 0, out.stdout + out.stderr
    header = next(line for line in out.stdout.splitlines() if line.startswith("case"))
    assert header.split() == ["case", "stdlib", "pydist", "speedup"]
    assert "Pool.map, 500 tiny items" in out.stdout
    assert out.stdout.count("ms ") >= 10     # both columns of five cases


@pytest.mark.parametrize("args, message", [
    (["bench", "--workers", "0"], "expected a positive integer, got '0'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_are_named(args, message):
    out = pydist(*args)
    assert out.returncode == 2 and message in out.stderr


def test_worker_is_pydist_worker():
    out = pydist("worker", "--help")
    assert out.returncode == 0
    assert "usage: pydist-worker" in out.stdout and "--lifeline" in out.stdout
