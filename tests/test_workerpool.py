"""Worker pools: WorkerPool, CachingPool, default_worker_pool, remote, and the pool
variants of the remote calls — on real workers, on every transport."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from testkit import subprocess_env, wait_until

import pydist as pd
from pydist.cluster.group import PGRP
from pydist.pools.funccache import FunctionCache
from pydist.pools.workerpool import AbstractWorkerPool, CachingPool, WorkerPool, clear, default_worker_pool, remote

# -- helpers that travel to workers by reference ----------------------------------------------------
UNPICKLED: dict[str, int] = {}


class Counted:
    """A payload that counts, in each process, how often it is unpickled there."""

    def __init__(self, key: str, payload: bytes) -> None:
        self.key, self.payload = key, payload

    def __reduce__(self):
        return (_rebuild_counted, (self.key, self.payload))


def _rebuild_counted(key: str, payload: bytes) -> Counted:
    UNPICKLED[key] = UNPICKLED.get(key, 0) + 1
    return Counted(key, payload)


def unpickled(key: str) -> int:
    return UNPICKLED.get(key, 0)


def fail(text="nope"):
    raise KeyError(text)


def wait_idle(pool, n, timeout=10.0):
    """Wait until ``n`` workers of ``pool`` are idle; take them and put them back."""
    def all_idle():
        got = pool.take_some(n)
        for p in got:
            pool.put_back(p)
        return len(got) == n
    return wait_until(all_idle, timeout)


# -- the pool operations ----------------------------------------------------------------------------
def test_abstract_pool_is_abstract():
    with pytest.raises(TypeError):
        AbstractWorkerPool()
    assert issubclass(WorkerPool, AbstractWorkerPool) and issubclass(CachingPool, WorkerPool)


def test_pool_operations(cluster):
    a, b = cluster
    p = WorkerPool([a])
    assert len(p) == 1 and p.workers() == [a] and a in p and b not in p and p.isready()
    assert p.push(b) is p and p.workers() == [a, b] and len(p) == 2
    p.push(b)                                    # already a member: nothing changes
    assert p.workers() == [a, b]
    got = {p.take(timeout=5), p.take(timeout=5)}
    assert got == {a, b} and not p.isready()
    with pytest.raises(TimeoutError):
        p.take(timeout=0.1)
    with pytest.raises(TimeoutError):
        p.wait(timeout=0.1)
    assert p.put_back(a) == a and p.isready() and p.wait(timeout=1) is p
    p.put_back(a)                                # not taken: ignored, never handed out twice
    assert p.take(timeout=5) == a
    with pytest.raises(TimeoutError):
        p.take(timeout=0.05)
    p.put_back(a)
    p.put_back(b)


def test_take_waits_for_put_back_and_push(cluster):
    a, b = cluster
    p = WorkerPool([a])
    assert p.take(timeout=5) == a
    threading.Timer(0.2, p.put_back, args=(a,)).start()
    t0 = time.monotonic()
    assert p.take(timeout=10) == a and time.monotonic() - t0 >= 0.15
    threading.Timer(0.2, p.push, args=(b,)).start()
    assert p.take(timeout=10) == b
    assert not p.isready()
    threading.Timer(0.2, p.put_back, args=(a,)).start()
    assert p.wait(timeout=10) is p and p.isready()


def test_take_some_and_poll_tell_a_scheduler_who_waits(cluster):
    """What pmap and the drop-ins use to hold several workers: idle ones without waiting,
    and how many takers wait (asked here, on the owner, and from another process)."""
    a, b = cluster
    p = WorkerPool([a, b])
    assert p.poll(0) == ([], 0)
    assert sorted(p.take_some(5)) == [a, b] and p.take_some(1) == []
    got: list[int] = []
    taker = threading.Thread(target=lambda: got.append(p.take(timeout=10)))
    taker.start()
    assert wait_until(lambda: p.poll(0) == ([], 1), 5)
    assert pd.remotecall_fetch(lambda q: q.poll(1), a, p) == ([], 1)     # through the owner
    p.put_back(a)
    taker.join(10)
    assert got == [a] and p.poll(1) == ([], 0)
    p.put_back(a)
    p.put_back(b)
    taken, waiting = pd.remotecall_fetch(lambda q: q.poll(2), a, p)
    assert sorted(taken) == [a, b] and waiting == 0 and not p.isready()
    for pid in taken:
        p.put_back(pid)
    assert wait_idle(p, 2)


def test_a_caching_pool_shows_its_function_cache(cluster):
    cp = CachingPool(cluster)
    f = lambda x: x + 1          # noqa: E731 - a closure, by value
    assert [pd.remotecall_fetch(f, cp, i) for i in range(4)] == [1, 2, 3, 4]
    assert wait_idle(cp, 2)
    assert cp.function_cache.shipped_to() == set(cluster) and not cp.function_cache.weak

    class WeakPool(CachingPool):
        def make_function_cache(self, key):
            return FunctionCache(key, weak=True)
    wp = WeakPool(cluster)
    assert wp.function_cache.weak and pd.remotecall_fetch(f, wp, 1) == 2


def test_bad_pool_input(cluster):
    with pytest.raises(ValueError, match="9999"):
        WorkerPool([9999])
    with pytest.raises(TypeError):
        WorkerPool(["2"])
    p = WorkerPool()
    with pytest.raises(ValueError, match="9999"):
        p.push(9999)
    with pytest.raises(TypeError):
        clear(p)
    with pytest.raises(TypeError):
        remote(42)


def test_empty_pool_take_waits():
    p = WorkerPool()
    assert len(p) == 0 and p.workers() == [] and not p.isready()
    with pytest.raises(TimeoutError):
        p.take(timeout=0.1)


# -- remote calls through a pool --------------------------------------------------------------------
def test_the_four_calls_through_a_pool(cluster):
    a, b = cluster
    p = WorkerPool(cluster)
    assert pd.remotecall_fetch(pd.myid, p) in cluster
    f = pd.remotecall(lambda x: (pd.myid(), x * 2), p, 21)
    assert isinstance(f, pd.Future) and f.where in cluster and f.fetch(timeout=10) == (f.where, 42)
    w = pd.remotecall_wait(pd.myid, p)
    assert w.isready() and w.fetch(timeout=10) in cluster
    box = pd.Future()
    assert pd.remote_do(lambda fut: fut.put(pd.myid()), p, box) is None
    assert box.fetch(timeout=10) in cluster
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(fail, p, "x")
    assert info.value.pid in cluster and isinstance(info.value.captured.ex, KeyError)
    with pytest.raises(pd.RemoteException):
        pd.remotecall_wait(fail, p)
    assert wait_idle(p, 2)


def test_worker_stays_busy_until_the_call_completes(cluster):
    a, _ = cluster
    p = WorkerPool([a])
    f = pd.remotecall(time.sleep, p, 0.4)
    assert not p.isready()                       # busy while the call runs
    assert wait_until(p.isready, 10)             # back once it finished, never fetched
    assert f.isready()
    pd.remote_do(time.sleep, p, 0.4)
    assert not p.isready()
    assert wait_until(p.isready, 10)


def test_remotecall_fetch_spreads_over_the_pool(cluster):
    p = WorkerPool(cluster)
    seen = {pd.remotecall_fetch(pd.myid, p) for _ in range(10)}
    assert seen == set(cluster)


def test_remote(cluster):
    p = WorkerPool(cluster)
    double = remote(lambda x: (pd.myid(), 2 * x), p)
    pid, v = double(21)
    assert v == 42 and pid in cluster
    anywhere = remote(pd.myid)
    assert anywhere() in cluster
    assert pd.remotecall_fetch(lambda r: r(), cluster[0], anywhere) in cluster   # it travels


def test_a_user_defined_pool_works_with_calls(cluster):
    class QueuePool(AbstractWorkerPool):
        def __init__(self, pids):
            self.members, self.free = list(pids), queue.Queue()
            for pid in pids:
                self.free.put(pid)

        def push(self, pid):
            self.members.append(pid)
            self.free.put(pid)
            return self

        def put_back(self, pid):
            self.free.put(pid)
            return pid

        def take(self, timeout=None):
            return self.free.get(timeout=timeout)

        def __len__(self):
            return len(self.members)

        def isready(self):
            return not self.free.empty()

        def wait(self, timeout=None):
            return self

        def workers(self):
            return sorted(self.members)

    p = QueuePool(cluster)
    assert pd.remotecall_fetch(pd.myid, p) in cluster
    assert p.free.qsize() == 2 and cluster[0] in p
    from pydist.pools.pmap import pmap
    assert pmap(lambda x: x + 1, range(100), pool=p) == list(range(1, 101))


# -- pools in other processes -------------------------------------------------------------------------
def test_pool_passed_to_a_worker_is_used_there(cluster):
    a, b = cluster
    p = WorkerPool([b])
    assert pd.remotecall_fetch(lambda q: (len(q), q.workers(), b in q), a, p) == (1, [b], True)
    # a takes b through the master's pool: the state lives here, so the master sees it busy
    assert pd.remotecall_fetch(lambda q: q.take(timeout=5), a, p) == b
    assert not p.isready()
    with pytest.raises(pd.RemoteException) as info:
        pd.remotecall_fetch(lambda q: q.take(timeout=0.1), a, p)
    assert isinstance(info.value.captured.ex, TimeoutError)
    pd.remotecall_fetch(lambda q: q.put_back(b), a, p)
    assert wait_until(p.isready, 5)
    # and calls through it, made on a worker, run on the pool's workers
    assert pd.remotecall_fetch(lambda q: [pd.remotecall_fetch(pd.myid, q) for _ in range(3)], a, p) == [b] * 3
    assert wait_idle(p, 1)


def test_pool_made_on_a_worker_lives_there(cluster):
    a, b = cluster
    p = pd.remotecall_fetch(lambda w: WorkerPool([w]), a, b)
    assert p.owner == a and p.workers() == [b]
    assert pd.remotecall_fetch(pd.myid, p) == b
    assert p.take(timeout=5) == b
    assert not pd.remotecall_fetch(lambda q: q.isready(), a, p)    # the owner agrees
    p.put_back(b)
    assert wait_until(p.isready, 5)


def test_pool_state_is_freed_when_no_process_holds_it(cluster):
    a, _ = cluster
    p = WorkerPool([a])
    rrid = p._ref.rrid
    holder = pd.remotecall(lambda q: q, a, p)         # the worker keeps the pool in a Future
    assert holder.wait(timeout=10).isready()
    del p
    import gc
    gc.collect()
    assert rrid in PGRP.refs                           # the worker still holds it
    q = holder.fetch(timeout=10)                      # back here as a new handle
    assert q.workers() == [a] and q._ref.rrid == rrid
    del holder, q
    gc.collect()
    # A worker's runner keeps its last call (and that call's arguments) referenced until
    # it runs the next one; one more call lets go of the pool there.
    pd.remotecall_fetch(pd.myid, a)
    assert wait_until(lambda: rrid not in PGRP.refs, 10)


# -- the default pool -------------------------------------------------------------------------------
def test_default_pool_holds_every_worker(cluster):
    dp = default_worker_pool()
    assert dp is default_worker_pool() and isinstance(dp, WorkerPool)
    assert set(cluster) <= set(dp.workers()) and len(dp) == len(dp.workers())
    assert pd.remotecall_fetch(pd.myid, dp) in cluster


def test_default_pool_on_a_worker_is_the_masters(cluster):
    a, _ = cluster
    dp = default_worker_pool()
    assert pd.remotecall_fetch(lambda: (default_worker_pool().owner, default_worker_pool().workers()), a) \
        == (1, dp.workers())
    back = pd.remotecall_fetch(lambda: default_worker_pool(), a)
    assert back is dp
    assert pd.remotecall_fetch(lambda: pd.remotecall_fetch(pd.myid, default_worker_pool()), a) in dp.workers()


def test_default_pool_follows_addprocs_and_rmprocs(fresh):
    dp = default_worker_pool()
    (w,) = fresh(1)
    assert w in dp.workers()
    pd.rmprocs(w, waitfor=30)
    assert wait_until(lambda: w not in dp.workers(), 10)


def test_dead_worker_leaves_every_pool(fresh):
    w, other = fresh(2)
    p = WorkerPool([w, other])
    os.kill(_ospid(w), signal.SIGKILL)
    assert wait_until(lambda: w not in p.workers() and w not in default_worker_pool().workers(), 15)
    assert {p.take(timeout=5)} == {other}
    with pytest.raises(TimeoutError):
        p.take(timeout=0.1)
    p.put_back(other)


def test_workers_lent_to_a_dead_process_come_back(fresh):
    taker, lent = fresh(2)
    p = WorkerPool([lent])
    assert pd.remotecall_fetch(lambda q: q.take(timeout=5), taker, p) == lent
    assert not p.isready()
    os.kill(_ospid(taker), signal.SIGKILL)
    assert wait_until(p.isready, 15)
    assert p.take(timeout=5) == lent


def _ospid(pid):
    return pd.remotecall_fetch(os.getpid, pid)


def test_empty_default_pool_lends_process_1(transport):
    """In a master of its own (the shared cluster must keep its workers): the default pool
    lends process 1 when it has no worker, before any worker and after the last one left."""
    script = textwrap.dedent(f"""
        import os, pydist as pd
        from pydist.pools.workerpool import default_worker_pool, remote
        from pydist.pools.pmap import pmap
        def check():
            dp = default_worker_pool()
            assert len(dp) == 0 and dp.workers() == [] and dp.isready(), dp.workers()
            assert dp.take(timeout=1) == 1
            assert pd.remotecall_fetch(os.getpid, dp) == os.getpid()
            assert pd.remotecall(pd.myid, dp).fetch(timeout=10) == 1
            assert pd.remotecall_wait(pd.myid, dp).fetch(timeout=10) == 1
            assert remote(pd.myid)() == 1
            assert pmap(lambda x: (x * x, os.getpid()), range(50)) == [(x * x, os.getpid()) for x in range(50)]
        check()
        (w,) = pd.addprocs(1, transport={transport!r})
        dp = default_worker_pool()
        assert dp.workers() == [w] and pd.remotecall_fetch(pd.myid, dp) == w
        busy = pd.remotecall(__import__("time").sleep, dp, 30)     # w is taken ...
        pd.rmprocs(w, waitfor=30)                                   # ... and removed
        check()
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_interrupted_take_gives_the_worker_back(transport):
    """Ctrl-C while ``take`` waits: a worker handed over afterwards returns to the pool
    (local pool, and a pool owned by a worker). In a master of its own: it gets SIGINT."""
    script = textwrap.dedent(f"""
        import os, signal, threading, time, pydist as pd
        from pydist.pools.workerpool import WorkerPool
        a, b = pd.addprocs(2, transport={transport!r})
        def interrupted(pool):
            threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT)).start()
            try:
                pool.take(timeout=20)
            except KeyboardInterrupt:
                return True
        for pool in (WorkerPool([a]), pd.remotecall_fetch(lambda w: WorkerPool([w]), b, a)):
            assert pool.take(timeout=5) == a
            assert interrupted(pool)
            pool.put_back(a)
            assert pool.take(timeout=5) == a      # not lost to the abandoned take
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# -- CachingPool ----------------------------------------------------------------------------------------
def test_caching_pool_ships_a_big_closure_once_per_worker(cluster):
    key = "big-closure"
    payload = Counted(key, os.urandom(1024) * 10240)          # 10 MiB
    f = lambda i: len(payload.payload) + i                   # noqa: E731 - a closure, by value
    cp = CachingPool(cluster)
    t0 = time.monotonic()
    for i in range(1000):
        assert pd.remotecall_fetch(f, cp, i) == 10 * 2**20 + i
    elapsed = time.monotonic() - t0
    counts = {w: pd.remotecall_fetch(unpickled, w, key) for w in cluster}
    assert counts == {w: 1 for w in cluster}, counts        # counted on each worker
    assert {w: cp._worker_cache_info(w) for w in cluster} == {w: (1, 1) for w in cluster}
    assert elapsed < 30, f"1000 cached calls took {elapsed:.1f} s"
    # the other call kinds use the same cache
    assert pd.remotecall(f, cp, 1).fetch(timeout=10) == 10 * 2**20 + 1
    assert pd.remotecall_wait(f, cp, 1).fetch(timeout=10) == 10 * 2**20 + 1
    assert remote(f, cp)(2) == 10 * 2**20 + 2
    assert wait_idle(cp, 2)
    assert {w: pd.remotecall_fetch(unpickled, w, key) for w in cluster} == counts


def test_clear_drops_the_caches(cluster):
    key = "cleared"
    payload = Counted(key, b"x" * 1000)
    f = lambda: len(payload.payload)                          # noqa: E731
    cp = CachingPool(cluster)
    for _ in range(6):
        assert pd.remotecall_fetch(f, cp) == 1000
    assert all(cp._worker_cache_info(w) == (1, 1) for w in cluster)
    assert clear(cp) is cp
    assert all(cp._worker_cache_info(w)[1] == 0 for w in cluster)
    for _ in range(6):
        assert pd.remotecall_fetch(f, cp) == 1000
    assert all(pd.remotecall_fetch(unpickled, w, key) == 2 for w in cluster)   # shipped again


KEPT: dict[str, tuple] = {}


def keep_on_worker(pool):
    k = 7
    KEPT["use"] = (pool, lambda: k * 6)


def use_kept():
    pool, g = KEPT["use"]
    return [pd.remotecall_fetch(g, pool) for _ in range(3)]


def test_caching_pool_used_on_a_worker_survives_a_clear_from_elsewhere(cluster):
    a, b = cluster
    cp = CachingPool([b])
    pd.remotecall_fetch(keep_on_worker, a, cp)
    assert pd.remotecall_fetch(use_kept, a) == [42] * 3
    assert cp._worker_cache_info(b) == (1, 1)                # shipped by worker a, once
    clear(cp)                                               # dropped by the master
    assert cp._worker_cache_info(b) == (1, 0)
    assert pd.remotecall_fetch(use_kept, a) == [42] * 3       # a still refers to it: told, ships again
    assert cp._worker_cache_info(b) == (2, 1)


def test_caching_pool_travels(cluster):
    a, b = cluster
    cp = CachingPool([b])
    back = pd.remotecall_fetch(lambda p: p, a, cp)
    assert back is cp and type(back) is CachingPool
    there = pd.remotecall_fetch(lambda p: type(p).__name__, a, cp)
    assert there == "CachingPool"
