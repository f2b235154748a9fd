"""pydist.ProcessPoolExecutor beyond the standard library's behaviour (that is compared in
compat_tests/): many tasks in flight, worker death, replacement, recycling, load balance,
function shipping, cleanup — on real workers, on every transport."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest
from testkit import live_children, subprocess_env, wait_until

import pydist as pd
from pydist.dropin.records import WorkerProcess
from pydist.pools.funccache import _cache

WAIT = 60


# -- functions the workers run (by reference) --------------------------------------------------------
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
    raise ZeroDivisionError("no start")


def shipped_count():
    return sum(len(fns) for fns in _cache.values())


def stamped(seconds, value):
    """``value`` squared, with where and when it ran: (OS pid, start, end, result)."""
    t0 = time.monotonic()
    time.sleep(seconds)
    return os.getpid(), t0, time.monotonic(), value * value


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture
def executor(transport):
    ex = pd.ProcessPoolExecutor(2, transport=transport)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def worker_ospids() -> set[int]:
    out = set()
    for p in live_children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


# -- throughput and batching ----------------------------------------------------------------------------
def test_many_tiny_tasks_in_flight(executor):
    assert list(executor.map(sq, range(30_000))) == [x * x for x in range(30_000)]
    assert executor._core.cap() > 100     # tiny tasks: many in flight per worker
    futures = [executor.submit(sq, i) for i in range(3000)]
    assert [f.result(timeout=WAIT) for f in futures] == [i * i for i in range(3000)]


def test_submit_from_many_threads(executor):
    out: dict[int, list[int]] = {}

    def submitter(k: int) -> None:
        fs = [executor.submit(sq, k * 1000 + i) for i in range(300)]
        out[k] = [f.result(timeout=WAIT) for f in fs]
    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert all(out[k] == [(k * 1000 + i) ** 2 for i in range(300)] for k in range(6))


def test_done_callback_may_submit_more(executor):
    done = threading.Event()
    results = []

    def chain(f):
        results.append(f.result())
        if len(results) < 20:
            executor.submit(sq, len(results)).add_done_callback(chain)
        else:
            done.set()
    executor.submit(sq, 0).add_done_callback(chain)
    assert done.wait(WAIT)
    assert results == [i * i for i in range(20)]


# -- load balance -----------------------------------------------------------------------------------------
def test_idle_worker_takes_work_queued_behind_a_long_task(executor):
    list(executor.map(sq, range(5000)))             # tiny tasks: deep queues from now on
    long = executor.submit(sleep_then, 3.0, "long")
    short = [executor.submit(sleep_then, 0.01, i) for i in range(40)]
    t0 = time.monotonic()
    assert [f.result(timeout=WAIT) for f in short] == list(range(40))
    assert time.monotonic() - t0 < 2.0, "short tasks waited behind the long one"
    assert not long.done()
    assert long.result(timeout=WAIT) == "long"


def test_long_tasks_are_not_queued_behind_each_other(executor):
    warm = [executor.submit(sleep_then, 0.2) for _ in range(4)]
    [f.result(timeout=WAIT) for f in warm]           # measured: tasks are long
    assert executor._core.cap() == 1
    t0 = time.monotonic()
    fs = [executor.submit(sleep_then, 0.3, i) for i in range(4)]
    assert [f.result(timeout=WAIT) for f in fs] == [0, 1, 2, 3]
    assert time.monotonic() - t0 < 1.2


# -- worker death and replacement ---------------------------------------------------------------------------
def test_worker_death_mid_map_fails_only_that_task(executor):
    results = executor.map(die_on, range(200), [100] * 200)
    got = []
    with pytest.raises(pd.ProcessExitedException) as info:
        for r in results:
            got.append(r)
    assert got == [x * x for x in range(100)]
    assert str(info.value).startswith("worker ")
    assert list(executor.map(sq, range(50))) == [x * x for x in range(50)]
    assert not executor._broken


def test_killed_worker_is_replaced(executor):
    [f.result(timeout=WAIT) for f in [executor.submit(sleep_then, 0.2) for _ in range(2)]]
    before = executor._processes
    assert len(before) == 2
    victim = next(iter(before.values()))
    victim.kill()
    assert wait_until(lambda: not victim.is_alive(), 10)
    fs = [executor.submit(sleep_then, 0.2, i) for i in range(4)]
    assert [f.result(timeout=WAIT) for f in fs] == [0, 1, 2, 3]
    after = executor._processes
    assert len(after) == 2 and victim.pid not in after
    assert all(p.is_alive() for p in after.values())


def test_death_of_a_long_task_leaves_queued_tasks_alone(executor):
    [f.result(timeout=WAIT) for f in [executor.submit(sleep_then, 0.2) for _ in range(2)]]
    doomed = executor.submit(sleep_then, 30)
    others = [executor.submit(sleep_then, 0.05, i) for i in range(10)]
    assert wait_until(doomed.running, WAIT)
    for p in executor._processes.values():
        if p.pid == _running_pid(executor, doomed):
            p.terminate()
    with pytest.raises(pd.ProcessExitedException):
        doomed.result(timeout=WAIT)
    assert [f.result(timeout=WAIT) for f in others] == list(range(10))


def exit_after(seconds):
    time.sleep(seconds)
    os._exit(0)


@pytest.mark.parametrize("sender", ["main", "reader"])
def test_answers_read_after_a_failed_send_are_not_taken_for_the_crash(transport, sender):
    """The worker answers two tasks and dies in the third before the master has read the
    answers (a done-callback holds the reader), and a submit's send is the first to fail,
    from another thread or from the reader itself (the callback submits): the two keep
    their results, only the third fails, the later tasks run on a new worker."""
    with pd.ProcessPoolExecutor(1, transport=transport) as ex:
        list(ex.map(sq, range(3000)))              # measured: many tasks in flight from now on
        ospid = ex.submit(os.getpid).result(timeout=WAIT)
        later: list = []

        def exited() -> bool:
            try:
                return psutil.Process(ospid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        def submit_later() -> None:
            time.sleep(0.05)
            for i in range(5):                     # over TCP the first send may still be taken
                later.append(ex.submit(sq, i))
                time.sleep(0.02)

        def hold(_f) -> None:                      # on the thread reading the connection
            wait_until(exited, 10)
            if sender == "reader":
                submit_later()
            else:
                time.sleep(0.25)                   # the main thread submits meanwhile
        ex.submit(sleep_then, 0.1).add_done_callback(hold)
        answered = [ex.submit(sleep_then, 0.05, i) for i in range(2)]
        killer = ex.submit(exit_after, 0.05)
        assert wait_until(exited, 10)
        if sender == "main":
            submit_later()
        assert wait_until(lambda: len(later) == 5, 10)
        assert [f.result(timeout=WAIT) for f in answered] == [0, 1]
        with pytest.raises(pd.ProcessExitedException):
            killer.result(timeout=WAIT)
        assert [f.result(timeout=WAIT) for f in later] == [i * i for i in range(5)]


def _running_pid(executor, future) -> int | None:
    wid = future.pid
    for p in executor._processes.values():
        if p.worker_id == wid:
            return p.pid
    return None


# -- max_tasks_per_child -----------------------------------------------------------------------------------
def test_max_tasks_per_child_recycles(transport):
    with pd.ProcessPoolExecutor(2, max_tasks_per_child=3, transport=transport) as ex:
        pids = [f.result(timeout=WAIT) for f in [ex.submit(ospid) for _ in range(30)]]
        assert len(set(pids)) >= 10
        assert all(pids.count(p) <= 3 for p in set(pids))
        assert len(ex._processes) <= 2


def test_max_tasks_per_child_one_completes_with_few_processes(transport):
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(worker_ospids()))
            time.sleep(0.02)
    before = len(worker_ospids())
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with pd.ProcessPoolExecutor(2, max_tasks_per_child=1, transport=transport) as ex:
            assert list(ex.map(sq, range(40))) == [x * x for x in range(40)]
    finally:
        stop.set()
        watcher.join(5)
    per_worker = (time.monotonic() - t0) / 40 * 2
    print(f"recycle cost: {per_worker * 1000:.0f} ms per worker ({transport})")
    # a successor starts while its predecessor finishes: never more than twice max_workers
    assert peak[0] - before <= 4


# -- initializer ------------------------------------------------------------------------------------------
def test_initializer_failure_breaks_the_executor(transport):
    ex = pd.ProcessPoolExecutor(2, initializer=init_fail, transport=transport)
    try:
        fs = [ex.submit(sq, i) for i in range(5)]
        for f in fs:
            with pytest.raises(BrokenProcessPool) as info:
                f.result(timeout=WAIT)
            assert isinstance(info.value.__cause__, ZeroDivisionError)
        assert ex._broken
        with pytest.raises(BrokenProcessPool) as later:
            ex.submit(sq, 1)
        assert isinstance(later.value.__cause__, ZeroDivisionError)   # what broke it, still
    finally:
        ex.shutdown()
    assert wait_until(lambda: not ex._processes, 10)


# -- using a given pool -------------------------------------------------------------------------------------
def test_executor_on_given_workers(fresh):
    from pydist.pools.workerpool import WorkerPool
    pids = fresh(2)
    pool = WorkerPool(pids)
    given = {WorkerProcess(p).pid for p in pids}
    ex = pd.ProcessPoolExecutor(pool=pool)
    assert ex._max_workers == 2
    used = {f.result(timeout=WAIT) for f in [ex.submit(ospid) for _ in range(20)]}
    assert used <= given
    ex.shutdown()
    assert all(p in pd.workers() for p in pids)      # not ours to remove


def test_executor_takes_workers_from_its_pool(fresh):
    pool = pd.WorkerPool(fresh(2))
    ex = pd.ProcessPoolExecutor(pool=pool)
    try:
        futures = [ex.submit(sleep_then, 1.0, i) for i in range(2)]
        assert wait_until(lambda: all(f.running() for f in futures), WAIT)
        with pytest.raises(TimeoutError):
            pool.take(timeout=0.3)        # both are lent to the executor
        assert [f.result(timeout=WAIT) for f in futures] == [0, 1]
        pid = pool.take(timeout=WAIT)     # given back once idle, without a shutdown
        pool.put_back(pid)
    finally:
        ex.shutdown()


def test_executor_and_pmap_share_a_pool(fresh):
    pool = pd.WorkerPool(fresh(2))
    ex = pd.ProcessPoolExecutor(pool=pool)
    try:
        futures = [ex.submit(stamped, 0.05, i) for i in range(40)]     # about 1 s on 2 workers
        assert wait_until(lambda: any(f.running() for f in futures), WAIT)
        mapped = pd.pmap(stamped, [0.01] * 10, range(10), pool=pool)
        assert [m[3] for m in mapped] == [i * i for i in range(10)]
        assert not all(f.done() for f in futures)     # the executor let one worker go
        ran = [f.result(timeout=WAIT) for f in futures]
        assert [r[3] for r in ran] == [i * i for i in range(40)]
    finally:
        ex.shutdown()
    # Each worker ran one user's work at a time: its timeline switches between the
    # executor and pmap at most twice (lent to pmap, then taken back).
    timeline = sorted([(r[1], r[0], "ex") for r in ran] + [(m[1], m[0], "pmap") for m in mapped])
    for ospid_ in {t[1] for t in timeline}:
        users = [u for _, p, u in timeline if p == ospid_]
        assert sum(a != b for a, b in zip(users, users[1:])) <= 2, users


# -- shipping functions --------------------------------------------------------------------------------------
def test_lambda_is_shipped_once_and_let_go(executor):
    k = 7
    fn = lambda x: x + k   # noqa: E731
    assert [f.result(timeout=WAIT) for f in [executor.submit(fn, i) for i in range(50)]] == \
        [i + 7 for i in range(50)]
    wids = [p.worker_id for p in executor._processes.values()]
    counts = [pd.remotecall_fetch(shipped_count, w) for w in wids]
    assert sum(counts) >= 1 and all(c <= 1 for c in counts)
    del fn
    gc.collect()
    executor.submit(sq, 1).result(timeout=WAIT)     # the drop goes out with the next dispatch
    assert wait_until(lambda: all(pd.remotecall_fetch(shipped_count, w) == 0 for w in wids), 10)


def test_workers_use_the_transport_asked_for(executor, transport):
    from pydist.cluster.group import PGRP
    executor.submit(sq, 1).result(timeout=WAIT)
    for p in executor._processes.values():
        assert PGRP.workers[p.worker_id].config.transport == transport


# -- cleanup --------------------------------------------------------------------------------------------------
def test_no_worker_left_after_shutdown(transport):
    before = worker_ospids()
    ex = pd.ProcessPoolExecutor(3, transport=transport)
    [f.result(timeout=WAIT) for f in [ex.submit(sleep_then, 0.1) for _ in range(6)]]
    ours = set(ex._processes)
    assert len(ours) == 3 and ours <= worker_ospids()
    ex.shutdown(wait=True)
    assert not (ours & worker_ospids())
    assert worker_ospids() <= before


def test_a_shut_down_executor_kept_alive_holds_no_reference(transport):
    # Its worker set (a pool whose state is a reference owned here) is let go at shutdown,
    # not when the executor object is collected: a program may keep the object long after.
    from pydist.cluster.group import PGRP
    gc.collect()
    before = len(PGRP.refs)
    ex = pd.ProcessPoolExecutor(1, transport=transport)
    assert ex.submit(abs, -3).result(timeout=WAIT) == 3
    assert len(PGRP.refs) > before
    ex.shutdown(wait=True)
    assert wait_until(lambda: gc.collect() >= 0 and len(PGRP.refs) <= before, 10), len(PGRP.refs)
    del ex


def test_shutdown_without_wait_cleans_up_later(transport):
    ex = pd.ProcessPoolExecutor(2, transport=transport)
    fs = [ex.submit(sleep_then, 0.3, i) for i in range(4)]
    ours = set(ex._processes)
    t0 = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - t0 < 0.2
    assert [f.result(timeout=WAIT) for f in fs] == [0, 1, 2, 3]
    assert wait_until(lambda: not (ours & worker_ospids()), 15)


def test_garbage_collected_executor_cleans_up(transport):
    ex = pd.ProcessPoolExecutor(2, transport=transport)
    f = ex.submit(sleep_then, 0.3, "done")
    ours = set(ex._processes)
    del ex
    gc.collect()
    assert f.result(timeout=WAIT) == "done"
    assert wait_until(lambda: not (ours & worker_ospids()), 15)


def test_interpreter_exit_without_shutdown_leaves_nothing(transport):
    script = textwrap.dedent(f"""
        import pydist as pd
        ex = pd.ProcessPoolExecutor(2, transport={transport!r})
        fs = [ex.submit(pow, 2, i) for i in range(4)]
        print([f.result() for f in fs])
        print("PIDS", *ex._processes)
        ex.submit(__import__("time").sleep, 0.3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=WAIT, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "[1, 2, 4, 8]" in done.stdout
    pids = [int(p) for line in done.stdout.splitlines() if line.startswith("PIDS")
            for p in line.split()[1:]]
    assert len(pids) == 2

    def gone() -> bool:
        return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in pids)
    assert wait_until(gone, 15)
