"""Julia's ``addprocs`` rules: a fixed topology and laziness, ``env`` as pairs, keywords
that belong to another manager, and the worker timeout."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from testkit import subprocess_env

import pydist as pd


@pytest.mark.parametrize("key, value", [("topology", "master_worker"), ("lazy", False)])
def test_topology_and_lazy_are_fixed_while_workers_exist(fresh, key, value):
    fresh(1)
    before = pd.workers()
    current = {"topology": "all_to_all", "lazy": True}[key]
    with pytest.raises(ValueError) as info:
        pd.addprocs(1, **{key: value})
    text = str(info.value)
    assert f"{key}={value!r}" in text and f"{key}={current!r}" in text
    assert pd.workers() == before


def test_a_later_addprocs_follows_the_first_ones_topology(transport, leak_oracle):
    pids = pd.addprocs(1, transport=transport, topology="master_worker")
    try:
        pids += pd.addprocs(1, transport=transport)
        with pytest.raises(pd.RemoteException, match="master_worker"):
            pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), pids[1], pids[0])
    finally:
        pd.rmprocs(*pids, waitfor=30)
    # with every worker gone, a new addprocs may choose again
    (w,) = pd.addprocs(1, transport=transport, lazy=False)
    pd.rmprocs(w, waitfor=30)


@pytest.mark.parametrize("env", [{"PYDIST_T_A": "1", "PYDIST_T_B": 2},
                                 [("PYDIST_T_A", "1"), ("PYDIST_T_B", "2")]])
def test_env_as_a_dict_or_as_julia_pairs(transport, leak_oracle, env):
    (w,) = pd.addprocs(1, transport=transport, env=env)
    try:
        got = pd.remotecall_fetch(lambda: (os.environ.get("PYDIST_T_A"), os.environ.get("PYDIST_T_B")), w)
        assert got == ("1", "2")
    finally:
        pd.rmprocs(w, waitfor=30)


@pytest.mark.parametrize("env", ["A=1", [("A",)], [("A=B", "1")], {"A": None}])
def test_bad_env_is_refused_before_anything_starts(env, leak_oracle):
    before = pd.workers()
    with pytest.raises((TypeError, ValueError), match="env"):
        pd.addprocs(1, env=env)
    assert pd.workers() == before


@pytest.mark.parametrize("key, value", [("tunnel", True), ("multiplex", True), ("sshflags", "-v"),
                                        ("shell", "posix"), ("launch_timeout", 5)])
def test_ssh_only_keywords_to_local_workers(key, value, leak_oracle):
    before = pd.workers()
    with pytest.raises(TypeError, match=repr(key)):
        pd.addprocs(1, **{key: value})
    assert pd.workers() == before


@pytest.mark.parametrize("value", [0, -1, "5", float("nan"), True])
def test_bad_worker_timeout(value):
    with pytest.raises(ValueError, match="worker_timeout"):
        pd.addprocs(1, worker_timeout=value)


STALL = """
import sys, time, pydist as pd
try:
    pd.addprocs(1, exename="/bin/sh", exeflags=["-c", "echo starting; exec sleep 60", "sh"], **KW)
except pd.LaunchError as e:
    print("LAUNCH ERROR", e)
"""


@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_worker_timeout_bounds_a_stalled_start(how):
    env = subprocess_env()
    kw = "{'worker_timeout': 2}" if how == "keyword" else "{}"
    if how == "environment":
        env["PYDIST_WORKER_TIMEOUT"] = "2"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", STALL.replace("**KW", f"**{kw}")], env=env,
                         capture_output=True, text=True, timeout=50)
    assert "LAUNCH ERROR" in out.stdout and "within 2 s" in out.stdout, out.stdout + out.stderr
    assert "starting" in out.stdout        # what the worker printed is quoted
    assert time.monotonic() - t0 < 40      # far below the default 60 s
