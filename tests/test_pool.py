"""pydist.Pool beyond the standard library's behaviour (that is compared in compat_tests/):
many tasks in flight, worker death mid-map, replacement, maxtasksperchild, initializer
failure, laziness, cleanup — on real workers, on every transport."""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
import warnings
from concurrent.futures.process import BrokenProcessPool

import pytest
from testkit import live_children, wait_until

import pydist as pd
from pydist.dropin.pool import _default_chunksize

WAIT = 60


def sq(x):
    return x * x


def ospid(_=None):
    return os.getpid()


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def die_on(x, bad):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def init_fail():
    raise OSError("no start")


def counting(n, seen):
    for i in range(n):
        seen.append(i)
        yield i


@pytest.fixture
def pool(transport):
    p = pd.Pool(2, transport=transport)
    yield p
    p.terminate()
    p.join()


def worker_ospids() -> set[int]:
    return {p.pid for p in live_children()}


# -- throughput ------------------------------------------------------------------------------------
def test_many_tiny_tasks(pool):
    assert pool.map(sq, range(200_000)) == [x * x for x in range(200_000)]
    assert list(pool.imap(sq, range(20_000))) == [x * x for x in range(20_000)]
    assert sorted(pool.imap_unordered(sq, range(20_000))) == [x * x for x in range(20_000)]
    results = [pool.apply_async(sq, (i,)) for i in range(3000)]
    assert [r.get(timeout=WAIT) for r in results] == [i * i for i in range(3000)]


@pytest.mark.parametrize("n,processes", [(0, 2), (1, 2), (7, 2), (8, 2), (9, 2), (1000, 4), (10**6, 3)])
def test_default_chunksize_is_the_standard_librarys(n, processes):
    chunksize, extra = divmod(n, processes * 4)
    assert _default_chunksize(n, processes) == chunksize + bool(extra)


def test_map_cuts_chunks_by_the_default_rule(pool):
    r = pool.map_async(sq, range(1000))
    assert r._chunksize == _default_chunksize(1000, 2) == 125
    assert r.get(timeout=WAIT) == [x * x for x in range(1000)]


# -- worker death and replacement ------------------------------------------------------------------
def test_worker_death_mid_map_raises_instead_of_hanging(pool):
    with pytest.raises(pd.ProcessExitedException) as info:
        pool.starmap(die_on, [(i, 50) for i in range(100)], 1)
    assert isinstance(info.value, BrokenProcessPool)
    assert pool.map(sq, range(100)) == [x * x for x in range(100)]


def test_dead_worker_is_replaced(pool):
    before = {p.pid: p for p in pool._pool}
    assert len(before) == 2
    victim = next(iter(before.values()))
    victim.kill()
    assert wait_until(lambda: len(pool._pool) == 2 and victim.pid not in {p.pid for p in pool._pool}
                      and all(p.is_alive() for p in pool._pool), WAIT)
    assert pool.map(sq, range(10)) == [x * x for x in range(10)]


def test_imap_survives_a_death(pool):
    it = pool.imap(_die_on_ten, range(30))
    got = []
    for _ in range(30):
        try:
            got.append(next(it))
        except pd.ProcessExitedException:
            got.append("lost")
    assert got == [x * x if x != 10 else "lost" for x in range(30)]


def _die_on_ten(x):
    return die_on(x, 10)


# -- maxtasksperchild --------------------------------------------------------------------------------
def test_maxtasksperchild_recycles(transport):
    with pd.Pool(2, maxtasksperchild=5, transport=transport) as p:
        pids = [r.get(timeout=WAIT) for r in [p.apply_async(ospid) for _ in range(40)]]
        assert len(set(pids)) >= 8
        assert all(pids.count(x) <= 5 for x in set(pids))
        p._repopulate_pool()
        assert len(p._pool) == 2


def test_maxtasksperchild_counts_chunks(transport):
    with pd.Pool(1, maxtasksperchild=2, transport=transport) as p:
        assert p.map(sq, range(40), 10) == [x * x for x in range(40)]     # 4 chunks, 2 workers


# -- initializer ----------------------------------------------------------------------------------------
def test_initializer_failure_fails_tasks_instead_of_hanging(transport):
    p = pd.Pool(2, initializer=init_fail, transport=transport)
    try:
        r = p.apply_async(sq, (3,))
        with pytest.raises(BrokenProcessPool) as info:
            r.get(timeout=WAIT)
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(BrokenProcessPool):
            p.map(sq, range(10))
    finally:
        p.terminate()
        p.join()


def _later_workers_wait(counter, gate):
    """An initializer: the first worker to run it goes on; the later ones wait for ``gate``."""
    with counter.get_lock():
        counter.value += 1
        first = counter.value == 1
    if not first:
        gate.wait(WAIT)


def test_the_first_task_does_not_wait_for_the_other_workers_to_start(transport):
    counter, gate = multiprocessing.Value("i", 0), multiprocessing.Event()
    p = pd.Pool(2, initializer=_later_workers_wait, initargs=(counter, gate), transport=transport)
    try:
        assert p.apply_async(sq, (3,)).get(timeout=10) == 9   # the second worker still waits
        gate.set()
        assert len(p._pool) == 2
    finally:
        gate.set()
        p.terminate()
        p.join()


# -- laziness and close -------------------------------------------------------------------------------
def test_imap_input_is_read_a_window_ahead(pool):
    seen: list[int] = []
    it = pool.imap(sq, counting(10**6, seen))
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert len(seen) < 20_000


def test_close_and_join_finish_an_unread_imap(pool):
    seen: list[int] = []
    results = pool.imap(sq, counting(5000, seen))
    pool.close()
    pool.join()
    assert len(seen) == 5000
    assert list(results) == [x * x for x in range(5000)]


def test_callbacks_run_and_errors_reach_error_callback(pool):
    got = []
    r = pool.map_async(sq, range(5), callback=got.append)
    r.wait(WAIT)
    assert got == [[0, 1, 4, 9, 16]]
    errors = []
    r = pool.apply_async(sleep_then, ("not a number",), error_callback=errors.append)
    r.wait(WAIT)
    assert r.ready() and not r.successful() and isinstance(errors[0], TypeError)


def test_get_timeout_is_multiprocessing_timeout_error(pool):
    r = pool.apply_async(sleep_then, (1.0, "x"))
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.05)
    assert r.get(timeout=WAIT) == "x"


# -- cleanup --------------------------------------------------------------------------------------------
def test_no_worker_left_after_close_and_join(transport):
    p = pd.Pool(3, transport=transport)
    assert p.map(sq, range(30), 1) == [x * x for x in range(30)]
    ours = {w.pid for w in p._pool}
    assert len(ours) == 3 and ours <= worker_ospids()
    p.close()
    p.join()
    assert not (ours & worker_ospids())


def test_terminate_kills_busy_workers_at_once(transport):
    p = pd.Pool(2, transport=transport)
    p.map_async(sleep_then, [60] * 10, 1)
    time.sleep(0.3)
    ours = {w.pid for w in p._pool}
    t0 = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - t0 < 10
    assert not (ours & worker_ospids())


def test_garbage_collected_pool_warns_and_cleans_up(transport):
    p = pd.Pool(2, transport=transport)
    assert p.apply(sq, (3,)) == 9
    ours = {w.pid for w in p._pool}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del p
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    del caught          # the warning's source is the pool: let it go
    gc.collect()
    assert wait_until(lambda: not (ours & worker_ospids()), 15)
