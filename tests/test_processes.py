"""Process management: ids, queries, addprocs/rmprocs and their argument checks."""
from __future__ import annotations

import os

import pytest
from testkit import live_children, wait_until

import pydist as pd


def test_ids_and_queries(cluster):
    a, b = cluster
    assert pd.myid() == 1
    assert a >= 2 and b == a + 1
    assert pd.workers() == [a, b]
    assert pd.procs() == [1, a, b]
    assert pd.nprocs() == 3 and pd.nworkers() == 2
    assert pd.procs(a) == [1, a, b]            # every local worker shares the master's host
    assert pd.remotecall_fetch(pd.myid, a) == a
    assert pd.remotecall_fetch(pd.workers, b) == [a, b]
    assert pd.remotecall_fetch(pd.procs, a) == [1, a, b]


def test_no_workers_means_master_only():
    if pd.workers() != [1]:
        pytest.skip("a module-scoped cluster is running")
    assert pd.workers() == [1] and pd.procs() == [1] and pd.nworkers() == 1 and pd.nprocs() == 1


def test_ids_are_never_reused(fresh):
    (old,) = fresh(1)
    pd.rmprocs(old, waitfor=10)
    assert old not in pd.workers()
    (new,) = fresh(1)
    assert new > old
    with pytest.raises(pd.ProcessExitedException) as info:
        pd.remotecall_fetch(pd.myid, old)
    assert info.value.worker_id == old


def getenv(name):
    return os.environ.get(name)


def test_workers_start_in_cwd_with_env(fresh, tmp_path, transport):
    (p,) = pd.addprocs(1, transport=transport, dir=str(tmp_path), env={"PYDIST_TEST_VAR": "x1"})
    try:
        assert pd.remotecall_fetch(os.getcwd, p) == str(tmp_path)
        assert pd.remotecall_fetch(getenv, p, "PYDIST_TEST_VAR") == "x1"
        assert pd.remotecall_fetch(getenv, p, "PATH") == os.environ["PATH"]
    finally:
        pd.rmprocs(p, waitfor=10)
    (q,) = fresh(1)
    assert pd.remotecall_fetch(os.getcwd, q) == os.getcwd()


def test_transport_is_recorded(fresh, transport):
    (p,) = fresh(1)
    from pydist.cluster.group import PGRP
    assert PGRP.workers[p].config.transport == transport


@pytest.mark.parametrize("bad, exc, words", [
    (0, ValueError, "positive"),
    (-1, ValueError, "positive"),
    ("two", TypeError, "str"),
])
def test_addprocs_bad_count(bad, exc, words):
    with pytest.raises(exc, match=words):
        pd.addprocs(bad)


def test_addprocs_bad_keywords():
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        pd.addprocs(1, transport="carrier-pigeon")
    with pytest.raises(TypeError, match="'colour'"):
        pd.addprocs(1, colour="red")
    with pytest.raises(ValueError, match="topology"):
        pd.addprocs(1, topology="ring")


def test_rmprocs_bad_pids(cluster):
    with pytest.raises(ValueError, match="process 1 is the master"):
        pd.rmprocs(1)
    with pytest.raises(ValueError, match="12345"):
        pd.rmprocs(12345)
    with pytest.raises(ValueError, match="12345"):
        pd.interrupt(12345)
    with pytest.raises(ValueError, match="12345"):
        pd.remotecall_fetch(pd.myid, 12345)


def test_only_master_changes_the_cluster(cluster):
    a = cluster[0]
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(pd.addprocs, a, 1)
    assert isinstance(info.value.captured.ex, RuntimeError)
    assert "only process 1" in str(info.value.captured.ex)
    with pytest.raises(pd.RemoteException):
        pd.remotecall_fetch(pd.rmprocs, a, cluster[1])


def test_cookie():
    c = pd.cluster_cookie()
    assert isinstance(c, str) and len(c) >= 16
    assert pd.cluster_cookie() == c
    with pytest.raises(TypeError, match="str"):
        pd.cluster_cookie(b"bytes")
    with pytest.raises(TypeError, match="str"):
        pd.cluster_cookie(1234)


def test_rmprocs_leaves_no_process(fresh):
    pids = fresh(2)
    ospids = [pd.remotecall_fetch(os.getpid, p) for p in pids]
    pd.rmprocs(*pids, waitfor=10)
    assert wait_until(lambda: all(q not in {c.pid for c in live_children()} for q in ospids), 5)
    assert pd.workers() == [1] or not set(pids) & set(pd.workers())


def test_rmprocs_waitfor_zero_does_not_hang(fresh):
    (p,) = fresh(1)
    try:
        pd.rmprocs(p, waitfor=0)
    except TimeoutError as e:
        assert str(p) in str(e)
    assert wait_until(lambda: p not in pd.workers(), 10)


def test_default_addprocs_params():
    params = pd.default_addprocs_params()
    assert params["topology"] == "all_to_all" and params["lazy"] is True
    for key in ("dir", "exename", "exeflags", "enable_threaded_blas"):
        assert key in params
