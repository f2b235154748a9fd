"""Where pydist's drop-ins differ from the standard library on purpose: pydist's behaviour,
one test per entry of DIVERGENCES.md (the entry's number is in the test's name)."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import pickle
import time

import _tasks as T
import pytest
from _compat import wait_until

import pydist

WAIT = 60


@pytest.fixture
def ex():
    executor = pydist.ProcessPoolExecutor(2)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def pool():
    p = pydist.Pool(2)
    yield p
    p.terminate()
    p.join()


# 1 -----------------------------------------------------------------------------------------------
def test_1_executor_worker_death_fails_only_its_task(ex):
    futures = [ex.submit(T.sleep_then, 0.05, i) for i in range(10)]
    doomed = ex.submit(T.die)
    futures += [ex.submit(T.sleep_then, 0.05, i) for i in range(10, 20)]
    with pytest.raises(pydist.ProcessExitedException) as info:
        doomed.result(timeout=WAIT)
    assert isinstance(info.value, cf.process.BrokenProcessPool)
    assert str(info.value).startswith("worker ")     # which worker, and how it ended
    assert [f.result(timeout=WAIT) for f in futures] == list(range(20))
    assert not ex._broken
    assert ex.submit(T.sq, 3).result(timeout=WAIT) == 9


# 2 -----------------------------------------------------------------------------------------------
def test_2_pool_task_lost_to_a_dead_worker_raises(pool):
    with pytest.raises(pydist.ProcessExitedException):
        pool.apply(T.die)
    assert pool.map(T.sq, range(10)) == [x * x for x in range(10)]
    assert wait_until(lambda: len(pool._pool) == 2 and all(p.is_alive() for p in pool._pool), WAIT)


# 3 -----------------------------------------------------------------------------------------------
def test_3_map_reads_its_input_lazily(ex):
    seen: list[int] = []
    results = ex.map(T.sq, T.counting(100_000, seen))
    first_window = len(seen)
    assert 0 < first_window < 10_000
    assert [next(results) for _ in range(10)] == [x * x for x in range(10)]
    assert len(seen) < 10 + 20_000
    results.close()
    taken = len(seen)
    time.sleep(0.2)
    assert len(seen) == taken


def test_3_map_input_is_read_to_the_end_at_shutdown():
    seen: list[int] = []
    with pydist.ProcessPoolExecutor(2) as executor:
        results = executor.map(T.sq, T.counting(3000, seen))
    assert len(seen) == 3000
    assert list(results) == [x * x for x in range(3000)]


def test_3_pool_imap_reads_its_input_lazily(pool):
    seen: list[int] = []
    it = pool.imap(T.sq, T.counting(100_000, seen))
    assert next(it) == 0
    assert len(seen) < 20_000
    seen2: list[int] = []
    it2 = pool.imap_unordered(T.sq, T.counting(100_000, seen2))
    next(it2)
    assert len(seen2) < 20_000


# 4 -----------------------------------------------------------------------------------------------
def test_4_map_input_failing_late_raises_in_place(ex):
    results = ex.map(T.sq, T.failing_input(5000, 4000))
    got = [next(results) for _ in range(4000)]
    assert got == [x * x for x in range(4000)]
    with pytest.raises(KeyError):
        next(results)


# 5 -----------------------------------------------------------------------------------------------
def test_5_lambdas_and_closures_travel(ex, pool):
    k = 3
    assert ex.submit(lambda x: x * k, 5).result(timeout=WAIT) == 15
    assert list(ex.map(lambda x: x + k, range(3))) == [3, 4, 5]
    assert ex.submit(T.identity, lambda: 42).result(timeout=WAIT)() == 42
    assert pool.map(lambda x: -x, range(4)) == [0, -1, -2, -3]
    assert pool.apply(T.unpicklable_result_of_the_stdlib)() == 42


# 6 -----------------------------------------------------------------------------------------------
def test_6_unpickling_errors_are_the_tasks_own(ex):
    f = ex.submit(T.identity, T.BrokenOnLoad())
    with pytest.raises(pickle.UnpicklingError, match="refuses to load"):
        f.result(timeout=WAIT)
    g = ex.submit(T.BrokenOnLoad)
    with pytest.raises(pickle.UnpicklingError, match="refuses to load"):
        g.result(timeout=WAIT)
    assert ex.submit(T.sq, 2).result(timeout=WAIT) == 4 and not ex._broken


# 7 -----------------------------------------------------------------------------------------------
def test_7_failing_initializer_names_its_cause():
    executor = pydist.ProcessPoolExecutor(2, initializer=T.init_fail)
    try:
        f = executor.submit(T.sq, 2)
        with pytest.raises(cf.process.BrokenProcessPool) as info:
            f.result(timeout=WAIT)
        assert "initializer failed" in str(info.value)
        cause = info.value.__cause__
        assert isinstance(cause, ValueError) and str(cause) == "error in initializer"
        assert "init_fail" in cause.__cause__.tb
        with pytest.raises(cf.process.BrokenProcessPool, match="initializer failed"):
            executor.submit(T.sq, 2)
    finally:
        executor.shutdown()


# 8 -----------------------------------------------------------------------------------------------
def test_8_pool_failing_initializer_fails_its_tasks():
    p = pydist.Pool(2, initializer=T.init_fail)
    try:
        with pytest.raises(cf.process.BrokenProcessPool):
            p.apply(T.sq, (2,))
        with pytest.raises(cf.process.BrokenProcessPool):
            p.map(T.sq, range(4))
    finally:
        p.terminate()
        p.join()


# 9 -----------------------------------------------------------------------------------------------
def test_9_terminate_fails_unfinished_results():
    p = pydist.Pool(2)
    r = p.apply_async(T.sleep_then, (60,))
    m = p.map_async(T.sleep_then, [60] * 10, 1)
    time.sleep(0.3)
    p.terminate()
    p.join()
    for result in (r, m):
        with pytest.raises(cf.process.BrokenProcessPool, match="terminated"):
            result.get(timeout=WAIT)


# 10 ----------------------------------------------------------------------------------------------
def test_10_pool_map_of_a_sized_input_failing_midway_raises(pool):
    class Failing:
        def __len__(self):
            return 3

        def __iter__(self):
            return T.failing_input(3, 1)
    with pytest.raises(KeyError):
        pool.map(T.sq, Failing(), 1)


# 11 ----------------------------------------------------------------------------------------------
def test_11_start_method_is_accepted_and_ignored():
    executor = pydist.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                          max_tasks_per_child=2)
    try:
        assert executor.submit(T.sq, 3).result(timeout=WAIT) == 9
        assert executor._mp_context.get_start_method() == "fork"
    finally:
        executor.shutdown()
    p = pydist.Pool(1, context=multiprocessing.get_context("spawn"))
    try:
        assert p.apply(T.sq, (4,)) == 16
    finally:
        p.terminate()
        p.join()


# 12 ----------------------------------------------------------------------------------------------
def test_12_tasks_batched_with_a_crash_run_again_alone(ex):
    list(ex.map(T.sq, range(2000)))                 # tiny tasks: batches from now on
    assert ex._core.cap() > 100
    results = ex.map(T.die_on, range(3000), [1500] * 3000)
    got = []
    with pytest.raises(pydist.ProcessExitedException):
        for r in results:
            got.append(r)
    assert got == [x * x for x in range(1500)]
    assert list(ex.map(T.die_on, range(100), [-1] * 100)) == [x * x for x in range(100)]


# 13 ----------------------------------------------------------------------------------------------
def test_13_processes_are_worker_handles(ex, pool):
    ex.submit(T.sq, 1).result(timeout=WAIT)
    procs = list(ex._processes.values())
    assert procs and all(isinstance(p, pydist.dropin.executor.WorkerProcess) for p in procs)
    assert ex.submit(T.pid).result(timeout=WAIT) in ex._processes
    assert set(pool.map(T.pid, range(40), 1)) <= {p.pid for p in pool._pool}
    assert all(p.is_alive() for p in pool._pool)


# 14 ----------------------------------------------------------------------------------------------
def test_14_workers_are_cluster_members(ex):
    os_pid = ex.submit(T.pid).result(timeout=WAIT)
    worker_ids = [p.worker_id for p in ex._processes.values() if p.pid == os_pid]
    assert worker_ids and worker_ids[0] in pydist.workers()


# 15 ----------------------------------------------------------------------------------------------
def test_15_an_executor_made_inside_a_task_is_the_standard_librarys(ex):
    kind, results = ex.submit(T.nested_executor_kind).result(timeout=WAIT)
    assert kind == "concurrent.futures.process.ProcessPoolExecutor" and results == [0, 1, 4]


# 16 ----------------------------------------------------------------------------------------------
def test_16_task_output_goes_to_sys_stdout_before_the_result(ex):
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        ex.submit(print, "to stdout").result(timeout=WAIT)
        ex.submit(T.sleep_and_print, 0, "again").result(timeout=WAIT)
        ex.submit(print, "to stderr", file=_Stderr()).result(timeout=WAIT)
        got = out.getvalue(), err.getvalue()
    assert got == ("to stdout\nagain\n", "to stderr\n")


class _Stderr:
    """Pickles as the receiving process's ``sys.stderr``."""

    def __reduce__(self):
        return (getattr, (__import__("sys"), "stderr"))


# 17 ----------------------------------------------------------------------------------------------
def test_17_remote_traceback_starts_in_the_users_code(ex):
    with pytest.raises(ValueError) as info:
        ex.submit(T.fail, ValueError, "bad").result(timeout=WAIT)
    remote = str(info.value.__cause__)
    first = remote.split("Traceback (most recent call last):\n", 1)[1].splitlines()[0]
    assert "_tasks.py" in first and "in fail" in first, remote
    assert "pydist" not in remote
