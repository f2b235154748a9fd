"""pmap: order, errors, retries, batches, local runs, progress, throughput, and workers
dying mid-map — on real workers, on every transport."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from testkit import Unloadable, wait_until

import pydist as pd
from pydist.pools.pmap import pmap
from pydist.pools.workerpool import CachingPool, WorkerPool, default_worker_pool

# -- helpers that travel to workers by reference ----------------------------------------------------
SEEN: dict[str, set] = {}
CALLS: dict[str, int] = {}
UNPICKLED: dict[str, int] = {}


def square(x):
    return x * x


def fail_on_3(x):
    if x % 10 == 3:
        raise ValueError(f"bad {x}")
    return x


def fails_first_time(tag, x):
    """Fails the first time this process sees (tag, x); succeeds afterwards."""
    seen = SEEN.setdefault(tag, set())
    if x not in seen:
        seen.add(x)
        raise RuntimeError(f"first try of {x}")
    return x * 10


def always_fails(tag, x):
    CALLS[tag] = CALLS.get(tag, 0) + 1
    raise RuntimeError(f"no {x}")


def calls(tag):
    return CALLS.get(tag, 0)


class Counted:
    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return (_rebuild_counted, (self.key,))


def _rebuild_counted(key):
    UNPICKLED[key] = UNPICKLED.get(key, 0) + 1
    return Counted(key)


def unpickled(key):
    return UNPICKLED.get(key, 0)


def all_idle(pool, n, timeout=10.0):
    def check():
        got = pool.take_some(n)
        for p in got:
            pool.put_back(p)
        return len(got) == n
    return wait_until(check, timeout)


# -- results ----------------------------------------------------------------------------------------
def test_results_in_input_order(cluster):
    assert pmap(square, range(1000)) == [x * x for x in range(1000)]
    assert pmap(lambda x: x + 1, (i for i in range(50))) == list(range(1, 51))
    assert pmap(lambda a, b: a * b, [1, 2, 3], [4, 5, 6, 7]) == [4, 10, 18]   # zip: shortest
    assert pmap(str.upper, ["a", "b"]) == ["A", "B"]
    assert pmap(square, []) == []


def test_elements_run_on_the_workers(cluster):
    pids = pmap(lambda x: (time.sleep(0.02), pd.myid())[1], range(40))
    assert set(pids) == set(cluster)


def test_keeps_every_worker_busy(cluster):
    t0 = time.monotonic()
    out = pmap(lambda x: (time.sleep(0.05), x)[1], range(20))
    elapsed = time.monotonic() - t0
    assert out == list(range(20))
    assert elapsed < 0.9, f"20 × 50 ms on 2 workers took {elapsed:.2f} s"   # ~0.5 s when balanced


def test_many_small_elements_are_fast(cluster):
    """Several calls in flight per worker, not one round trip per element."""
    pmap(square, range(1000))                          # warm up
    t0 = time.monotonic()
    out = pmap(lambda x: x * x, range(100_000))
    elapsed = time.monotonic() - t0
    assert out == [x * x for x in range(100_000)]
    assert elapsed < 3.0, f"100,000 tiny elements took {elapsed:.2f} s"


def test_function_is_shipped_once_per_worker(cluster):
    key = "pmap-ship"
    c = Counted(key)
    out = pmap(lambda x: (c.key, x)[1], range(10_000))
    assert out == list(range(10_000))
    counts = [pd.remotecall_fetch(unpickled, w, key) for w in cluster]
    assert all(n <= 1 for n in counts) and sum(counts) >= 1, counts


def test_caching_pool_keeps_the_function(cluster):
    key = "pmap-caching"
    c = Counted(key)
    f = lambda x: (c.key, x * 2)[1]                          # noqa: E731
    cp = CachingPool(cluster)
    assert pmap(f, range(2000), pool=cp) == [x * 2 for x in range(2000)]
    assert pmap(f, range(2000), pool=cp) == [x * 2 for x in range(2000)]
    counts = [pd.remotecall_fetch(unpickled, w, key) for w in cluster]
    assert all(n <= 1 for n in counts), counts
    assert all(cp._worker_cache_info(w)[1] <= 1 for w in cluster)


def test_workers_go_back_to_the_pool(cluster):
    p = WorkerPool(cluster)
    assert pmap(square, range(500), pool=p) == [x * x for x in range(500)]
    assert all_idle(p, 2)
    with pytest.raises(pd.RemoteException):
        pmap(fail_on_3, range(500), pool=p)
    assert all_idle(p, 2)


def test_a_long_map_shares_its_pool(cluster):
    """Calls and other maps on the same pool get a worker before a long map ends."""
    p = WorkerPool(cluster)
    ends = {}

    def long_map():
        pmap(lambda x: time.sleep(0.01), range(150), pool=p)      # ~0.75 s on 2 workers
        ends["long"] = time.monotonic()
    t0 = time.monotonic()
    t = threading.Thread(target=long_map)
    t.start()
    time.sleep(0.15)
    assert pd.remotecall_fetch(pd.myid, p) in cluster
    ends["call"] = time.monotonic()
    assert pmap(lambda x: x, range(20), pool=p) == list(range(20))
    ends["short"] = time.monotonic()
    t.join(30)
    # served within a poll or two (~0.2 s), not once the long map is over (~0.8 s)
    assert ends["short"] - t0 < 0.5 and ends["short"] < ends["long"] - 0.2, \
        {k: round(v - t0, 3) for k, v in ends.items()}
    assert all_idle(p, 2)


# -- errors -----------------------------------------------------------------------------------------
def test_first_failure_is_raised(cluster):
    with pytest.raises(pd.RemoteException) as info:
        pmap(fail_on_3, range(100))
    e = info.value
    assert e.pid in cluster and isinstance(e.captured.ex, ValueError) and "bad" in str(e.captured.ex)


def test_on_error_replaces_failed_elements(cluster):
    got = []

    def handler(exc):
        got.append(exc)
        return ("failed", str(exc.captured.ex))
    out = pmap(fail_on_3, range(100), on_error=handler)
    assert out == [("failed", f"bad {x}") if x % 10 == 3 else x for x in range(100)]
    assert len(got) == 10 and all(isinstance(e, pd.RemoteException) for e in got)


def test_unpicklable_result_fails_only_its_element(cluster):
    out = pmap(lambda x: threading.Lock() if x == 5 else x, range(20), on_error=lambda e: "lock")
    assert out == ["lock" if x == 5 else x for x in range(20)]


def test_element_that_cannot_be_read_there_fails_alone(cluster):
    items = [1, 2, Unloadable(), 4, 5] * 3
    out = pmap(lambda x: x if isinstance(x, int) else "?", items, on_error=lambda e: type(e.captured.ex).__name__)
    assert out == [x if isinstance(x, int) else "ImportError" for x in items]


def test_unpicklable_element_raises_at_once(cluster):
    with pytest.raises(TypeError, match="pickle"):
        pmap(lambda x: 1, [threading.Lock()])


def test_errors_in_on_error_and_retry_check_propagate(cluster):
    with pytest.raises(ZeroDivisionError):
        pmap(fail_on_3, range(10), on_error=lambda e: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pmap(fail_on_3, range(10), retry_delays=[0], retry_check=lambda s, e: 1 / 0)


# -- retries ----------------------------------------------------------------------------------------
def test_retry_delays_retry_each_failed_element(cluster):
    a, _ = cluster
    t0 = time.monotonic()
    out = pmap(lambda x: fails_first_time("retry-1", x), range(30), pool=WorkerPool([a]),
               retry_delays=[0.2])
    assert out == [x * 10 for x in range(30)]
    assert time.monotonic() - t0 >= 0.2


def test_retries_run_out(cluster):
    a, _ = cluster
    with pytest.raises(pd.RemoteException):
        pmap(lambda x: always_fails("out-1", x), [1], pool=WorkerPool([a]), retry_delays=[0, 0, 0])
    assert pd.remotecall_fetch(calls, a, "out-1") == 4              # the first try and 3 retries
    out = pmap(lambda x: always_fails("out-2", x), [1, 2], pool=WorkerPool([a]),
               retry_delays=[0.01], on_error=lambda e: "gave up")
    assert out == ["gave up", "gave up"] and pd.remotecall_fetch(calls, a, "out-2") == 4


def test_retry_check_sees_state_and_can_stop(cluster):
    a, _ = cluster
    states = []

    def check(state, exc):
        states.append(state)
        assert isinstance(exc, pd.RemoteException)
        return state, state < 2
    with pytest.raises(pd.RemoteException):
        pmap(lambda x: always_fails("check-1", x), [7], pool=WorkerPool([a]),
             retry_delays=[0, 0, 0, 0], retry_check=check)
    assert states == [1, 2]                                   # Julia's iteration state
    assert pd.remotecall_fetch(calls, a, "check-1") == 2
    # a bare bool is an answer too; and a state it returns picks the next delay
    out = pmap(lambda x: fails_first_time("check-2", x), range(5), pool=WorkerPool([a]),
               retry_delays=[0], retry_check=lambda s, e: True)
    assert out == [x * 10 for x in range(5)]
    with pytest.raises(pd.RemoteException):
        pmap(lambda x: always_fails("check-3", x), [1], pool=WorkerPool([a]),
             retry_delays=[0, 0, 0], retry_check=lambda s, e: (3, True))  # skip to the end
    assert pd.remotecall_fetch(calls, a, "check-3") == 2


def test_retry_goes_to_another_worker_when_one_dies(fresh):
    victim, other = fresh(2)

    def f(x):
        if pd.myid() == victim:
            os._exit(1)                  # whatever it gets, the victim dies on
        time.sleep(0.01)
        return pd.myid()
    out = pmap(f, range(20), pool=WorkerPool([victim, other]), retry_delays=[0.1])
    assert out == [other] * 20
    assert wait_until(lambda: victim not in default_worker_pool().workers(), 10)


def test_dead_worker_without_retries_raises(fresh):
    victim, = fresh(1)

    def f(x):
        if x == 3:
            os._exit(1)
        return x
    with pytest.raises(pd.ProcessExitedException):
        pmap(f, range(10), pool=WorkerPool([victim]))


def test_chaos_worker_killed_mid_map(fresh):
    """10,000 elements on 3 workers; one is killed partway; every result comes back."""
    ws = fresh(3)
    victim = ws[1]
    ospid = pd.remotecall_fetch(os.getpid, victim)
    pool = WorkerPool(ws)
    started = threading.Event()

    def f(x):
        time.sleep(0.0002)
        return x * x + 1
    killer = threading.Timer(0.3, lambda: (os.kill(ospid, signal.SIGKILL), started.set()))
    killer.start()
    t0 = time.monotonic()
    out = pmap(f, range(10_000), pool=pool, retry_delays=[0.1])
    elapsed = time.monotonic() - t0
    killer.join(5)
    assert started.is_set() and elapsed > 0.3, f"the map ended ({elapsed:.2f} s) before the kill"
    assert out == [x * x + 1 for x in range(10_000)]
    assert victim not in pool.workers()


# -- batches ----------------------------------------------------------------------------------------
def test_batch_sizes(cluster):
    for bs in (1, 2, 7, 100, 5000, "auto"):
        assert pmap(square, range(333), batch_size=bs) == [x * x for x in range(333)], bs
    out = pmap(fail_on_3, range(50), batch_size=8, on_error=lambda e: None)
    assert out == [None if x % 10 == 3 else x for x in range(50)]


def test_batch_elements_retry_one_by_one(cluster):
    a, _ = cluster
    out = pmap(lambda x: fails_first_time("batch-retry", x), range(40), pool=WorkerPool([a]),
               batch_size=10, retry_delays=[0])
    assert out == [x * 10 for x in range(40)]


def test_auto_batch_size():
    from pydist.pools.mapper import _auto_batch
    assert _auto_batch(10, 2) == 1 and _auto_batch(600, 2) == 100 and _auto_batch(60, 2) == 10


# -- local runs, progress, and pmap called on a worker ----------------------------------------------------
def test_distributed_false_runs_here(cluster):
    out = pmap(lambda x: (os.getpid(), x), range(10), distributed=False)
    assert out == [(os.getpid(), x) for x in range(10)]
    with pytest.raises(pd.RemoteException) as info:
        pmap(fail_on_3, range(10), distributed=False)
    assert info.value.pid == pd.myid()
    out = pmap(lambda x: fails_first_time("local", x), range(5), distributed=False, retry_delays=[0])
    assert out == [x * 10 for x in range(5)]
    assert pmap(fail_on_3, range(5), distributed=False, on_error=lambda e: -1) == [0, 1, 2, -1, 4]


def test_progress_bar(cluster, capsys):
    assert pmap(square, range(200), progress=True) == [x * x for x in range(200)]
    err = capsys.readouterr().err
    assert "pmap" in err and "200/200" in err


def test_pmap_on_a_worker_uses_every_worker(cluster):
    a, _ = cluster

    def inner():
        return sorted(set(pmap(lambda x: (time.sleep(0.02), pd.myid())[1], range(40))))
    assert pd.remotecall_fetch(inner, a) == sorted(cluster)


def test_pool_holding_the_caller(cluster):
    a, _ = cluster
    out = pmap(lambda x: (time.sleep(0.01), pd.myid())[1], range(30), pool=WorkerPool([1, a]))
    assert set(out) <= {1, a} and len(out) == 30
    assert pmap(lambda x: pd.myid(), range(3), pool=WorkerPool([1])) == [1, 1, 1]


def test_bad_arguments(cluster):
    with pytest.raises(TypeError):
        pmap(42, range(3))
    with pytest.raises(TypeError):
        pmap(square)
    with pytest.raises(TypeError):
        pmap(square, range(3), pool=[2, 3])
    with pytest.raises(ValueError):
        pmap(square, range(3), batch_size=0)
    with pytest.raises(TypeError):
        pmap(square, range(3), batch_size="big")
    with pytest.raises(ValueError):
        pmap(square, range(3), retry_delays=[-1])
    with pytest.raises(TypeError):
        pmap(square, range(3), on_error=3)


def test_pmap_raises_when_every_worker_of_its_pool_dies(fresh):
    import itertools
    pids = fresh(2)
    ospids = [pd.remotecall_fetch(os.getpid, p) for p in pids]
    started = pd.RemoteChannel(lambda: pd.Channel(100_000))

    def slow(x, ch=started):
        ch.put(x)
        time.sleep(0.05)
        return x
    out: list = []

    def run():
        try:   # retried without end: only the pool running dry can stop it
            out.append(pmap(slow, range(1000), pool=WorkerPool(pids),
                            retry_delays=itertools.repeat(0.01)))
        except BaseException as e:   # noqa: BLE001 -- judged below
            out.append(e)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    started.take(timeout=30)
    for q in ospids:
        os.kill(q, signal.SIGKILL)
    th.join(30)
    assert out and isinstance(out[0], pd.ProcessExitedException), out
    assert "no worker of the pool is left" in str(out[0])
