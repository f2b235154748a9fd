"""``concurrent.futures.ProcessPoolExecutor`` and ``pydist.ProcessPoolExecutor``, scenario by
scenario: the same results, exception types and messages, and ordering.

Each test runs once per implementation (``impl``/``shared_executor`` are parametrized);
the expected values are what the standard library does, so its run proves them.
"""
from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import threading
import time
import traceback
import weakref

import _tasks as T
import pytest
from _compat import make_executor, outcome, run_script

WAIT = 60     # the bound on every wait for a result


# -- submit and results --------------------------------------------------------------------------
def test_submit_returns_concurrent_futures_future(shared_executor):
    f = shared_executor.submit(T.sq, 12)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=WAIT) == 144
    assert f.done() and not f.running() and not f.cancelled()


def test_submit_passes_args_and_kwargs(shared_executor):
    f = shared_executor.submit(T.capture, 1, 2, self=3, fn=4)
    assert f.result(timeout=WAIT) == ((1, 2), {"self": 3, "fn": 4})


def test_submit_needs_the_function_positionally(shared_executor):
    for call in (lambda: shared_executor.submit(fn=T.capture, arg=1),
                 lambda: shared_executor.submit()):
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'fn'"):
            call()


def test_exception_is_the_original_with_remote_traceback(shared_executor):
    f = shared_executor.submit(T.raise_runtime_error)
    with pytest.raises(RuntimeError) as info:
        f.result(timeout=WAIT)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    cause = exc.__cause__
    assert type(cause) is cf.process._RemoteTraceback
    assert "raise RuntimeError(123)  # the line the remote traceback must show" in cause.tb
    printed = "".join(traceback.format_exception(exc))
    assert "the line the remote traceback must show" in printed
    assert f.exception(timeout=WAIT) is exc


@pytest.mark.parametrize("exc_type,args", [(ValueError, ("v",)), (KeyError, ("k",)),
                                            (ZeroDivisionError, ()), (OSError, (2, "gone"))])
def test_exception_types_and_messages(shared_executor, exc_type, args):
    f = shared_executor.submit(T.fail, exc_type, *args)
    assert outcome(f.result, timeout=WAIT) == outcome(T.fail, exc_type, *args)


def test_system_exit_in_a_task_is_its_error(shared_executor):
    f = shared_executor.submit(T.system_exit)
    assert isinstance(f.exception(timeout=WAIT), SystemExit)
    assert f.exception().code == 3
    assert shared_executor.submit(T.sq, 3).result(timeout=WAIT) == 9   # the pool goes on


def test_result_timeout(shared_executor):
    f = shared_executor.submit(T.sleep_then, 1.0, "late")
    with pytest.raises(TimeoutError):
        f.result(timeout=0.05)
    assert f.result(timeout=WAIT) == "late"


def test_done_callbacks_run_once_with_the_future(shared_executor):
    seen = []
    done = threading.Event()
    f = shared_executor.submit(T.sq, 5)
    f.add_done_callback(lambda fut: (seen.append(fut.result()), done.set()))
    assert done.wait(WAIT)
    f.add_done_callback(lambda fut: seen.append("late"))   # runs at once
    assert seen == [25, "late"]


# -- unpicklable arguments and results -----------------------------------------------------------
def test_unpicklable_argument_fails_its_future_not_submit(shared_executor):
    f = shared_executor.submit(T.identity, threading.Lock())     # must not raise here
    assert outcome(f.result, timeout=WAIT) == ("raised", "TypeError", "cannot pickle '_thread.lock' object")
    g = shared_executor.submit(T.identity, T.Unpicklable())
    assert outcome(g.result, timeout=WAIT) == ("raised", "RuntimeError", "cannot pickle")
    assert shared_executor.submit(T.sq, 4).result(timeout=WAIT) == 16


def test_unpicklable_result_fails_its_future(shared_executor):
    f = shared_executor.submit(T.make_lock)
    assert outcome(f.result, timeout=WAIT) == ("raised", "TypeError", "cannot pickle '_thread.lock' object")
    assert shared_executor.submit(T.sq, 4).result(timeout=WAIT) == 16


# -- map ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunksize", [1, 3, 50])
def test_map_results_in_order(shared_executor, chunksize):
    got = list(shared_executor.map(pow, range(40), range(40), chunksize=chunksize))
    assert got == list(map(pow, range(40), range(40)))


def test_map_stops_at_the_shortest_input(shared_executor):
    assert list(shared_executor.map(T.mul, [1, 2, 3], [4, 5])) == [4, 10]


def test_map_of_nothing(shared_executor):
    assert list(shared_executor.map(T.sq, [])) == []


def test_map_returns_a_generator(shared_executor):
    it = shared_executor.map(T.sq, range(3))
    assert iter(it) is it and next(it) == 0


def test_map_raises_at_the_failing_item(shared_executor):
    it = shared_executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    assert outcome(next, it) == outcome(divmod, 1, 0)
    assert outcome(next, it) == ("raised", "StopIteration", "")


def test_map_chunked_raises_for_the_whole_chunk(shared_executor):
    it = shared_executor.map(T.fail_on, range(10), [5] * 10, chunksize=4)
    got = [next(it) for _ in range(4)]
    assert got == [0, 1, 4, 9]
    assert outcome(next, it) == ("raised", "ValueError", "bad item 5")


def test_map_chunksize_must_be_positive(shared_executor):
    assert outcome(shared_executor.map, T.sq, range(3), chunksize=0) == \
        ("raised", "ValueError", "chunksize must be >= 1.")


def test_map_timeout(shared_executor):
    results = []
    with pytest.raises(TimeoutError):
        for r in shared_executor.map(T.sleep_then, [0, 0, 2], timeout=1):
            results.append(r)
    assert results == [None, None]


def test_map_input_failing_at_once_raises_from_map(shared_executor):
    assert outcome(shared_executor.map, T.sq, T.failing_input(5, 2)) == \
        ("raised", "KeyError", "'input failed'")


def test_map_does_not_keep_results(shared_executor):
    for obj in shared_executor.map(T.Box, range(5)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


# -- waiting on several --------------------------------------------------------------------------
def test_as_completed_and_wait(impl, executors):
    ex = executors(impl, 3)
    slow = ex.submit(T.sleep_then, 0.6, "slow")
    fast = ex.submit(T.sq, 7)
    order = [f.result() for f in cf.as_completed([slow, fast], timeout=WAIT)]
    assert order == [49, "slow"]
    a = ex.submit(T.sq, 2)
    b = ex.submit(T.sleep_then, 0.6)
    done, not_done = cf.wait([a, b], timeout=WAIT, return_when=cf.FIRST_COMPLETED)
    assert done == {a} and not_done == {b}
    c = ex.submit(divmod, 1, 0)
    d = ex.submit(T.sleep_then, 0.6)
    done, not_done = cf.wait([c, d], timeout=WAIT, return_when=cf.FIRST_EXCEPTION)
    assert done == {c} and not_done == {d}
    done, not_done = cf.wait([a, b, c, d], timeout=WAIT)
    assert done == {a, b, c, d} and not not_done


# -- construction --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,expected", [
    ({"max_workers": 0}, ("raised", "ValueError", "max_workers must be greater than 0")),
    ({"max_workers": -1}, ("raised", "ValueError", "max_workers must be greater than 0")),
    ({"max_workers": 1, "initializer": 5}, ("raised", "TypeError", "initializer must be a callable")),
    ({"max_workers": 1, "max_tasks_per_child": "3"},
     ("raised", "TypeError", "max_tasks_per_child must be an integer")),
    ({"max_workers": 1, "max_tasks_per_child": 0},
     ("raised", "ValueError", "max_tasks_per_child must be >= 1")),
])
def test_constructor_checks(impl, kwargs, expected):
    assert outcome(make_executor, impl, **kwargs) == expected


def test_default_max_workers_is_the_cpu_count(impl, executors):
    assert executors(impl)._max_workers == (os.cpu_count() or 1)


def test_initializer_runs_in_every_worker(impl, executors):
    ex = executors(impl, 2, initializer=T.init, initargs=("yes",))
    futures = [ex.submit(T.get_init) for _ in range(6)]
    assert [f.result(timeout=WAIT) for f in futures] == ["yes"] * 6


def test_failing_initializer_breaks_the_executor(impl, executors):
    ex = executors(impl, 2, initializer=T.init_fail)
    try:
        f = ex.submit(T.sq, 2)
    except cf.process.BrokenProcessPool:
        pass
    else:
        with pytest.raises(cf.process.BrokenProcessPool):
            f.result(timeout=WAIT)
    assert wait_for(lambda: ex._broken, WAIT)
    with pytest.raises(cf.process.BrokenProcessPool):
        ex.submit(T.sq, 2)


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_max_tasks_per_child_recycles_workers(impl, executors):
    ex = executors(impl, 1, max_tasks_per_child=2)
    pids = [ex.submit(T.pid).result(timeout=WAIT) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_max_tasks_per_child_shutdown_does_not_deadlock(impl, executors):
    ex = executors(impl, 3, max_tasks_per_child=1)
    futures = [ex.submit(T.mul, i, i) for i in range(6)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=WAIT) for f in futures] == [i * i for i in range(6)]


def test_workers_start_on_demand(impl, executors):
    ex = executors(impl, 4)
    for i in range(3):
        assert ex.submit(T.mul, i, 2).result(timeout=WAIT) == 2 * i
    assert len(ex._processes) == 1


# -- shutdown ------------------------------------------------------------------------------------
def test_shutdown_refuses_new_work_and_is_idempotent(impl, executors):
    ex = executors(impl, 1)
    ex.submit(T.sq, 1).result(timeout=WAIT)
    ex.shutdown()
    ex.shutdown()
    assert outcome(ex.submit, T.sq, 2) == \
        ("raised", "RuntimeError", "cannot schedule new futures after shutdown")
    assert outcome(ex.map, T.sq, [1]) == \
        ("raised", "RuntimeError", "cannot schedule new futures after shutdown")


def test_shutdown_waits_for_submitted_work(impl, executors):
    ex = executors(impl, 2)
    futures = [ex.submit(T.sleep_then, 0.05, i) for i in range(12)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(12))


def test_shutdown_without_wait_still_finishes_work(impl, executors):
    ex = executors(impl, 2)
    futures = [ex.submit(T.sleep_then, 0.05, i) for i in range(6)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=WAIT) for f in futures] == list(range(6))


def test_shutdown_cancel_futures(impl, executors):
    ex = executors(impl, 1)
    first = ex.submit(T.sleep_then, 0.5, "first")
    assert wait_for(first.running, WAIT)
    rest = [ex.submit(T.sleep_then, 0.1) for _ in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result() == "first"
    cancelled = [f for f in rest if f.cancelled()]
    assert len(cancelled) >= 15
    assert all(f.done() and f.exception() is None for f in rest if not f.cancelled())


def test_context_manager(impl):
    with make_executor(impl, 2) as ex:
        assert list(ex.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert outcome(ex.submit, T.sq, 1)[1] == "RuntimeError"


def test_results_of_a_map_taken_after_shutdown(impl):
    with make_executor(impl, 2) as ex:
        results = ex.map(T.sq, range(500))
    assert list(results) == [x * x for x in range(500)]


def test_interpreter_exit_waits_for_submitted_work(impl):
    done = run_script(impl, "import _tasks\n"
                            "if __name__ == '__main__':\n"
                            "    ex = Executor(2)\n"
                            "    ex.submit(_tasks.sleep_and_print, 0.5, 'apple')\n")
    assert done.returncode == 0, done.stderr
    assert "apple" in done.stdout


def test_submit_after_interpreter_shutdown(impl):
    done = run_script(impl, "import atexit, _tasks\n"
                            "@atexit.register\n"
                            "def last():\n"
                            "    try:\n"
                            "        ex.submit(id, None)\n"
                            "    except RuntimeError as e:\n"
                            "        print('refused:', e)\n"
                            "if __name__ == '__main__':\n"
                            "    ex = Executor(2)\n"
                            "    ex.submit(id, 42).result()\n")
    assert done.returncode == 0, done.stderr
    assert "refused: cannot schedule new futures after shutdown" in done.stdout


def test_executor_garbage_collected_without_shutdown_finishes(impl):
    done = run_script(impl, "import gc, _tasks\n"
                            "if __name__ == '__main__':\n"
                            "    ex = Executor(2)\n"
                            "    results = ex.map(_tasks.sq, range(10))\n"
                            "    del ex\n"
                            "    gc.collect()\n"
                            "    print(list(results))\n")
    assert done.returncode == 0, done.stderr
    assert str([x * x for x in range(10)]) in done.stdout


def test_the_class_is_a_concurrent_futures_executor(impl, executors):
    assert isinstance(executors(impl, 1), cf.Executor)
