"""Julia's semantics that are easy to get subtly wrong: owner-side bookkeeping that never
waits behind user code, and remote types the master cannot import."""
from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest

import pydist as pd


def _spin_until(path: str) -> str:
    """Busy a worker's call (not in a blocking section) until ``path`` exists."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


def test_a_remote_channel_is_made_at_once_on_a_busy_worker(cluster):
    w = cluster[0]
    got: list = []

    def make():
        rc = pd.RemoteChannel(pid=w)
        got.append(time.monotonic())
        return rc
    with tempfile.TemporaryDirectory() as d:
        flag = os.path.join(d, "go")
        busy = pd.remotecall(_spin_until, w, flag)
        th = threading.Thread(target=make, daemon=True)
        th.start()
        th.join(20)
        made_while_busy = bool(got)
        open(flag, "w").close()
        assert busy.fetch(timeout=60) == "released"
        th.join(60)
    assert made_while_busy


def test_julia_shape_remote_channel_of_a_pid(cluster):
    w = cluster[1]
    rc = pd.RemoteChannel(w)
    assert rc.where == w
    rc.put(5)
    assert rc.take(timeout=30) == 5


# -- types only a worker can import ----------------------------------------------------------
WORKER_ONLY = '''
class Oddity(Exception):
    pass

class Thing:
    def __init__(self, n):
        self.n = n
'''


def _use_worker_only(where: str, what: str):
    """On a worker: import a module the master cannot, then raise or return one of its types."""
    import sys
    if where not in sys.path:
        sys.path.insert(0, where)
    import pydist_worker_only_mod as m
    if what == "raise":
        raise m.Oddity("odd 42")
    if what == "return":
        return m.Thing(7)
    return [m.Thing(1), m.Oddity("inside")]


@pytest.fixture(scope="module")
def worker_only_dir():
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pydist_worker_only_mod.py"), "w") as f:
            f.write(WORKER_ONLY)
        yield d


def test_an_exception_the_master_cannot_import_keeps_its_name_message_and_traceback(
        cluster, worker_only_dir):
    w = cluster[0]
    for call in (lambda: pd.remotecall_fetch(_use_worker_only, w, worker_only_dir, "raise"),
                 lambda: pd.remotecall(_use_worker_only, w, worker_only_dir, "raise").fetch(30)):
        with pytest.raises(pd.RemoteException) as info:
            call()
        text = str(info.value)
        assert "pydist_worker_only_mod.Oddity: odd 42" in text
        assert "in _use_worker_only" in text              # the remote traceback
        assert info.value.captured.ex.type_name == "pydist_worker_only_mod.Oddity"
    assert pd.remotecall_fetch(pd.myid, w) == w         # the connection stays usable


@pytest.mark.parametrize("what", ["return", "nested"])
def test_a_result_the_master_cannot_rebuild_names_its_type(cluster, worker_only_dir, what):
    w = cluster[1]
    with pytest.raises(pd.RemoteException, match=r"pydist_worker_only_mod\.Thing"):
        pd.remotecall_fetch(_use_worker_only, w, worker_only_dir, what)
    with pytest.raises(pd.RemoteException, match=r"pydist_worker_only_mod\.Thing"):
        pd.remotecall(_use_worker_only, w, worker_only_dir, what).fetch(30)
    assert pd.remotecall_fetch(pd.myid, w) == w


# -- a client that dies is forgotten by every owner ------------------------------------------
_kept: list = []


def _keep(*refs) -> int:
    _kept.extend(refs)
    return os.getpid()


def _owned() -> int:
    import gc
    gc.collect()
    return len(pd.cluster.group.PGRP.refs)


def test_a_dead_client_is_forgotten_by_every_owner(fresh):
    import gc
    import signal

    from testkit import wait_until
    a, b = fresh(2)
    gc.collect()
    mine, theirs = _owned(), pd.remotecall_fetch(_owned, b)
    f, rc = pd.Future(), pd.RemoteChannel(b)
    ospid = pd.remotecall_fetch(_keep, a, f, rc)   # worker a holds both, then dies
    del f, rc
    os.kill(ospid, signal.SIGKILL)
    assert wait_until(lambda: a not in pd.workers(), 10)
    assert wait_until(lambda: _owned() == mine, 10), (_owned(), mine)
    assert wait_until(lambda: pd.remotecall_fetch(_owned, b) == theirs, 10)


def _take_from(rc):
    return rc.take(timeout=30)


def test_passing_a_reference_whose_owner_died_raises_process_exited(fresh):
    import signal

    from testkit import wait_until
    a, b = fresh(2)
    rc = pd.RemoteChannel(a)
    os.kill(pd.remotecall_fetch(os.getpid, a), signal.SIGKILL)
    assert wait_until(lambda: a not in pd.workers(), 10)
    with pytest.raises(pd.ProcessExitedException) as info:
        pd.remotecall_fetch(_take_from, b, rc)
    assert info.value.worker_id == a
