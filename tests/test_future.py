"""Futures: put/fetch/isready/wait, write-once, timeouts, caching and reference counting."""
from __future__ import annotations

import concurrent.futures
import time

import pytest
from testkit import wait_until

import pydist as pd


def count_refs() -> int:
    from pydist.cluster.group import PGRP
    return len(PGRP.refs)


def owned_refs(pid: int) -> int:
    return pd.remotecall_fetch(count_refs, pid)


def held_refs(rrids: list) -> int:
    from pydist.cluster.group import PGRP
    return sum(1 for r in rrids if r in PGRP.refs)


def test_local_future():
    f = pd.Future()
    assert f.where == pd.myid() and not f.isready() and not pd.isready(f)
    assert pd.put(f, 5) is f
    assert f.isready() and f.fetch() == 5 and pd.fetch(f) == 5 and f.wait() is f


def test_future_is_write_once(cluster):
    for where in (None, cluster[0]):
        f = pd.Future(where)
        f.put(1)
        with pytest.raises(pd.InvalidStateException):
            f.put(2)
        assert issubclass(pd.InvalidStateException, concurrent.futures.InvalidStateError)
        assert f.fetch() == 1


def test_remote_future_set_elsewhere(cluster):
    a, b = cluster
    f = pd.Future(a)
    assert not f.isready()
    pd.remotecall_wait(lambda fut: fut.put("hi"), b, f)
    assert f.isready() and f.fetch(timeout=10) == "hi"
    g = pd.Future(a)
    pd.remotecall_wait(lambda fut: fut.put(7), a, g)
    with pytest.raises(pd.InvalidStateException):
        g.put(8)                                            # the owner's error, unwrapped
    with pytest.raises(pd.RemoteException) as info:         # ... and so inside user code
        pd.remotecall_fetch(lambda fut: fut.put(8), b, g)
    assert isinstance(info.value.captured.ex, pd.InvalidStateException)


def test_fetch_and_wait_time_out_without_losing_the_value(cluster):
    for where in (None, cluster[0]):
        f = pd.Future(where)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            f.fetch(timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 5
        with pytest.raises(TimeoutError):
            pd.wait(f, timeout=0.1)
        f.put(3)
        assert f.fetch(timeout=10) == 3


def test_take_on_a_future_is_a_type_error():
    with pytest.raises(TypeError):
        pd.take(pd.Future())


def test_fetch_of_anything_else_is_itself():
    assert pd.fetch(3) == 3 and pd.fetch("x") == "x"


def test_futures_travel_and_stay_valid(cluster):
    a, b = cluster
    f = pd.remotecall(lambda: [1, 2, 3], a)
    assert pd.remotecall_fetch(lambda fut: sum(fut.fetch()), b, f) == 6
    assert f.fetch(timeout=10) == [1, 2, 3]
    g = pd.remotecall_fetch(lambda: pd.remotecall(lambda: "made on a worker", 1), b)
    assert isinstance(g, pd.Future) and g.fetch(timeout=10) == "made on a worker"


def _same(fut):
    return fut


def test_a_future_sent_out_and_back_is_the_same_handle(cluster):
    a, b = cluster
    f = pd.remotecall(time.sleep, a, 0.2)             # sent before its value is here
    assert pd.remotecall_fetch(_same, b, f) is f
    assert f.fetch(timeout=10) is None
    g = pd.remotecall(_same, a, 7)
    assert g.fetch(timeout=10) == 7 and pd.remotecall_fetch(_same, b, g) is g


def test_failed_future_raises_also_when_local():
    f = pd.remotecall(lambda: 1 / 0, pd.myid())
    with pytest.raises(pd.RemoteException) as info:
        f.fetch(timeout=10)
    assert isinstance(info.value.captured.ex, ZeroDivisionError)
    with pytest.raises(pd.RemoteException):
        f.wait(timeout=10)


def test_fetch_caches_and_releases_the_owner_copy(cluster):
    a, _ = cluster
    base = owned_refs(a)
    futures = [pd.remotecall(lambda i=i: i, a) for i in range(50)]
    assert wait_until(lambda: owned_refs(a) >= 50, 10)   # (base may still fall: notices batch)
    assert [f.fetch(timeout=10) for f in futures] == list(range(50))
    assert wait_until(lambda: owned_refs(a) <= base, 10)
    assert [f.fetch() for f in futures] == list(range(50))      # served from the cache


def test_dropped_futures_free_the_owner(cluster):
    a, _ = cluster
    base = owned_refs(a)
    futures = [pd.remotecall(bytes, a, 1000) for _ in range(100)]
    futures[-1].wait(timeout=10)
    # Counted by id: the owner's total may still fall meanwhile (earlier notices batch).
    rrids = [f.rrid for f in futures]
    assert pd.remotecall_fetch(held_refs, a, rrids) == 100
    del futures
    assert wait_until(lambda: pd.remotecall_fetch(held_refs, a, rrids) == 0, 10)
    assert wait_until(lambda: owned_refs(a) <= base, 10)


def test_a_passed_reference_keeps_the_value_alive(cluster):
    a, b = cluster
    f = pd.Future(a)
    f.put("kept")
    keeper = pd.remotecall_fetch(_stash, b, f)          # b now holds a reference too
    del f
    import gc
    gc.collect()
    time.sleep(0.2)
    assert pd.remotecall_fetch(_unstash, b, keeper) == "kept"




def _stash(fut):
    import worker_box  # noqa: F401  (the box lives in a module on the worker)
    key = len(worker_box.box)
    worker_box.box[key] = fut
    return key


def _unstash(key):
    import worker_box
    return worker_box.box.pop(key).fetch(timeout=10)


def megabyte() -> bytes:
    return bytes(1_000_000)


def rss() -> int:
    """This process's resident memory, once the C allocator has handed back what it holds
    free (glibc keeps freed 1 MB blocks in its arenas for reuse; a leak stays resident)."""
    import ctypes
    import ctypes.util

    import psutil
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: what is held free stays counted
        pass
    return psutil.Process().memory_info().rss


def test_ten_thousand_dropped_megabyte_futures_leave_memory_flat(cluster):
    a, _ = cluster
    for _ in range(50):                      # warm up the allocator and the tables
        pd.remotecall(megabyte, a).wait(timeout=10)
    import gc
    gc.collect()
    before = pd.remotecall_fetch(rss, a)
    for i in range(10_000):
        f = pd.remotecall(megabyte, a)
        if i % 50 == 0:
            f.wait(timeout=30)               # keep the worker from running far behind
        del f
    assert wait_until(lambda: owned_refs(a) < 10, 20)
    grown = pd.remotecall_fetch(rss, a) - before
    assert grown < 50 * 2**20, f"the owner grew by {grown / 2**20:.0f} MiB"
