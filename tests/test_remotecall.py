"""Remote calls: the four kinds, to workers and to myid(), with every kind of callable."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from testkit import Unloadable

import pydist as pd


def mul(a, b=1):
    return a * b


def fail(kind=KeyError, text="nope"):
    raise kind(text)


def test_remotecall_and_fetch(cluster):
    a, _ = cluster
    f = pd.remotecall(mul, a, 6, b=7)
    assert isinstance(f, pd.Future) and f.where == a
    assert f.fetch(timeout=10) == 42 and pd.fetch(f) == 42 and f.isready()


def test_remotecall_fetch_kinds_of_callables(cluster):
    a, b = cluster
    k = 5
    assert pd.remotecall_fetch(lambda x: x + 1, a, 41) == 42
    assert pd.remotecall_fetch(lambda: k * 2, b) == 10                 # a closure
    assert pd.remotecall_fetch(os.getpid, a) != os.getpid()            # a builtin by reference
    assert pd.remotecall_fetch(mul, b, 3, b=4) == 12                   # a test-module function
    assert pd.remotecall_fetch(sorted, a, [3, 1, 2], reverse=True) == [3, 2, 1]


def test_numpy_arrays_round_trip(cluster):
    a, _ = cluster
    arr = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    back = pd.remotecall_fetch(lambda x: x * 2, a, arr)
    assert back.shape == arr.shape and np.array_equal(back, arr * 2)


def test_remotecall_wait_returns_after_the_call(cluster):
    a, _ = cluster
    t0 = time.monotonic()
    f = pd.remotecall_wait(time.sleep, a, 0.3)
    assert time.monotonic() - t0 >= 0.29
    assert f.isready() and f.fetch() is None


def test_remote_do_runs_for_effect(cluster):
    a, _ = cluster
    box = pd.Future()
    assert pd.remote_do(lambda fut: fut.put(pd.myid()), a, box) is None
    assert box.fetch(timeout=10) == a


def test_remote_do_errors_stay_there(cluster):
    a, _ = cluster
    pd.remote_do(fail, a)
    assert pd.remotecall_fetch(pd.myid, a) == a      # the worker carries on


def test_calls_to_myid_run_here():
    me = pd.myid()
    assert pd.remotecall_fetch(os.getpid, me) == os.getpid()
    assert pd.remotecall(mul, me, 2, b=21).fetch(timeout=10) == 42
    assert pd.remotecall_wait(mul, me, 1).fetch() == 1
    box = pd.Future()
    pd.remote_do(box.put, me, "done")
    assert box.fetch(timeout=10) == "done"
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(fail, me)
    assert info.value.pid == me and isinstance(info.value.captured.ex, KeyError)
    with pytest.raises(pd.RemoteException):
        pd.remotecall(fail, me).fetch(timeout=10)


def test_remote_exception_carries_everything(cluster):
    a, _ = cluster
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(fail, a, ValueError, "bad value")
    e = info.value
    assert e.pid == a
    assert isinstance(e.captured.ex, ValueError) and str(e.captured.ex) == "bad value"
    assert "fail" in e.captured.traceback and "Traceback" in e.captured.traceback
    assert e.__cause__ is e.captured.ex
    assert f"worker {a}" in str(e) and "bad value" in str(e)


def test_remote_exception_is_not_wrapped_twice(cluster):
    a, b = cluster
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(lambda: pd.remotecall_fetch(fail, b), a)
    assert info.value.pid == b and isinstance(info.value.captured.ex, KeyError)


def test_remotecall_wait_raises_the_failure(cluster):
    a, _ = cluster
    with pytest.raises(pd.RemoteException):
        pd.remotecall_wait(fail, a)
    f = pd.remotecall(fail, a)
    with pytest.raises(pd.RemoteException):
        f.wait(timeout=10)
    with pytest.raises(pd.RemoteException):
        f.fetch(timeout=10)


def test_argument_that_fails_to_unpickle_is_answered(cluster):
    a, _ = cluster
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(lambda x: x, a, Unloadable())
    assert isinstance(info.value.captured.ex, ImportError)
    with pytest.raises(pd.RemoteException):
        pd.remotecall(lambda x: x, a, Unloadable()).fetch(timeout=10)
    assert pd.remotecall_fetch(pd.myid, a) == a


def test_result_that_fails_to_pickle_is_answered(cluster):
    a, _ = cluster
    import threading
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(threading.Lock, a)
    assert "pickle" in str(info.value).lower()


def test_unpicklable_argument_raises_at_the_call(cluster):
    a, _ = cluster
    import threading
    with pytest.raises(TypeError, match="pickle"):
        pd.remotecall_fetch(lambda x: x, a, threading.Lock())
    assert pd.remotecall_fetch(pd.myid, a) == a


def test_bad_call_arguments(cluster):
    a, _ = cluster
    with pytest.raises(TypeError, match="callable"):
        pd.remotecall_fetch(42, a)
    with pytest.raises(ValueError, match="9999"):
        pd.remotecall(mul, 9999, 1)


def test_worker_to_worker_and_to_master(cluster):
    a, b = cluster
    assert pd.remotecall_fetch(lambda: pd.remotecall_fetch(pd.myid, 1), a) == 1
    assert pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), a, b) == b
    assert pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), b, a) == a


def test_many_calls_in_flight(cluster):
    a, b = cluster
    futures = [pd.remotecall(mul, (a, b)[i % 2], i, b=2) for i in range(2000)]
    assert [f.fetch(timeout=30) for f in futures] == [i * 2 for i in range(2000)]


def test_blocked_call_does_not_block_the_worker(cluster):
    a, _ = cluster
    gate = pd.Future()
    waiting = pd.remotecall(lambda g: g.fetch() + 1, a, gate)   # blocks on the worker
    assert pd.remotecall_fetch(pd.myid, a) == a                   # ... which still serves
    gate.put(41)
    assert waiting.fetch(timeout=10) == 42
