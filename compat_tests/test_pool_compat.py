"""``multiprocessing.pool.Pool`` and ``pydist.Pool``, scenario by scenario: the same results,
exception types and messages, and ordering.

Each test runs once per implementation; the expected values are what the standard library
does, so its run proves them.
"""
from __future__ import annotations

import gc
import itertools
import multiprocessing
import multiprocessing.pool
import pickle
import threading
import time

import _tasks as T
import pytest
from _compat import MP_CONTEXT, make_pool, outcome, run_script

WAIT = 60


# -- single calls ----------------------------------------------------------------------------------
def test_apply(shared_pool):
    assert shared_pool.apply(T.sq, (5,)) == 25
    assert shared_pool.apply(T.sq, (), {"x": 3}) == 9
    assert shared_pool.apply(T.capture, (1,), {"k": 2}) == ((1,), {"k": 2})


def test_apply_async_result(shared_pool):
    r = shared_pool.apply_async(T.sleep_then, (0.3, "v"))
    assert outcome(r.successful)[:2] == ("raised", "ValueError")
    assert outcome(r.successful)[2].endswith(" not ready")
    assert not r.ready()
    assert outcome(r.get, timeout=0.01) == ("raised", "TimeoutError", "")
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.01)
    r.wait(timeout=0.01)
    assert r.get(timeout=WAIT) == "v"
    assert r.ready() and r.successful()
    r.wait()


def test_apply_async_callbacks(shared_pool):
    got, done = [], threading.Event()
    r = shared_pool.apply_async(T.sq, (4,), callback=lambda v: (got.append(("ok", v)), done.set()),
                                error_callback=lambda e: got.append(("err", e)))
    assert r.get(timeout=WAIT) == 16
    assert done.wait(WAIT) and got == [("ok", 16)]
    got.clear()
    r = shared_pool.apply_async(T.fail, (KeyError, "k"), callback=got.append,
                                error_callback=lambda e: got.append(("err", type(e), e.args)))
    assert outcome(r.get, timeout=WAIT) == ("raised", "KeyError", "'k'")
    assert not r.successful()
    assert got == [("err", KeyError, ("k",))]


def test_exception_is_the_original_with_remote_traceback(shared_pool):
    with pytest.raises(RuntimeError) as info:
        shared_pool.apply(T.raise_runtime_error)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is multiprocessing.pool.RemoteTraceback
    assert "raise RuntimeError(123)  # the line the remote traceback must show" in exc.__cause__.tb


# -- maps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunksize", [None, 1, 7, 1000])
def test_map_and_starmap(shared_pool, chunksize):
    assert shared_pool.map(T.sq, range(100), chunksize) == [x * x for x in range(100)]
    pairs = list(zip(range(50), range(50, 0, -1)))
    assert shared_pool.starmap(T.mul, pairs, chunksize) == list(itertools.starmap(T.mul, pairs))


def test_map_of_a_generator_and_of_nothing(shared_pool):
    assert shared_pool.map(T.sq, (x for x in range(10))) == [x * x for x in range(10)]
    assert shared_pool.map(T.sq, []) == []
    assert shared_pool.starmap(T.mul, []) == []


def test_map_error_is_the_first_in_order(shared_pool):
    assert outcome(shared_pool.map, _fail_on_seven, range(20), 1) == ("raised", "ValueError", "bad item 7")
    assert outcome(shared_pool.starmap, T.fail_on, [(i, 7) for i in range(20)], 3) == \
        ("raised", "ValueError", "bad item 7")


def _fail_on_seven(x):
    return T.fail_on(x, 7)


def test_map_input_failing(shared_pool):
    assert outcome(shared_pool.map, T.sq, T.failing_input(10, 3)) == \
        ("raised", "KeyError", "'input failed'")

    class Failing:       # has a length, fails at the first item
        def __len__(self):
            return 1

        def __iter__(self):
            return T.failing_input(3, 0)
    exc = None
    try:
        shared_pool.map(T.sq, Failing(), 1)
    except KeyError as e:
        exc = e
    assert exc is not None and exc.__cause__ is None


def test_map_async(shared_pool):
    got, done = [], threading.Event()
    r = shared_pool.map_async(T.sq, range(10), callback=lambda v: (got.append(v), done.set()))
    assert r.get(timeout=WAIT) == [x * x for x in range(10)]
    assert done.wait(WAIT) and got == [[x * x for x in range(10)]]
    errs = []
    r = shared_pool.map_async(int, ["1", "a", "2"], 1, error_callback=errs.append)
    assert outcome(r.get, timeout=WAIT) == ("raised", "ValueError", "invalid literal for int() with base 10: 'a'")
    assert len(errs) == 1 and isinstance(errs[0], ValueError) and r.ready() and not r.successful()
    called = []
    r = shared_pool.map_async(T.sq, [], callback=called.append)
    assert r.get(timeout=WAIT) == [] and called == []


def test_starmap_async(shared_pool):
    r = shared_pool.starmap_async(T.mul, [(1, 2), (3, 4)])
    assert r.get(timeout=WAIT) == [2, 12]


def test_map_of_unpicklable_items_raises(shared_pool):
    assert outcome(shared_pool.map, T.sq, [T.Unpicklable()] * 10) == \
        ("raised", "RuntimeError", "cannot pickle")
    assert shared_pool.map(T.sq, [3]) == [9]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap(shared_pool, chunksize):
    it = shared_pool.imap(T.sq, range(20), chunksize)
    assert iter(it) is it
    assert [next(it) for _ in range(20)] == [x * x for x in range(20)]
    assert outcome(next, it) == ("raised", "StopIteration", "")
    assert list(shared_pool.imap(T.sq, [], chunksize)) == []


def test_imap_next_timeout(shared_pool):
    it = shared_pool.imap(T.sleep_then, [0.5])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.01)
    assert it.next(timeout=WAIT) is None


def test_imap_failing_task_then_the_rest(shared_pool):
    it = shared_pool.imap(_fail_on_two, [0, 1, 2, 3])
    assert [outcome(next, it) for _ in range(5)] == [
        ("ok", 0), ("ok", 1), ("raised", "ValueError", "bad item 2"), ("ok", 9),
        ("raised", "StopIteration", "")]


def test_imap_chunked_ends_at_an_error(shared_pool):
    it = shared_pool.imap(_fail_on_two, [0, 1, 2, 3, 4, 5], 2)
    assert [outcome(next, it) for _ in range(4)] == [
        ("ok", 0), ("ok", 1), ("raised", "ValueError", "bad item 2"),
        ("raised", "StopIteration", "")]


def _fail_on_two(x):
    return T.fail_on(x, 2)


@pytest.mark.parametrize("chunksize,taken", [(1, 3), (2, 2), (4, 0)])
def test_imap_input_failing(shared_pool, chunksize, taken):
    it = shared_pool.imap(T.sq, T.failing_input(10, 3), chunksize)
    assert [next(it) for _ in range(taken)] == [x * x for x in range(taken)]
    assert outcome(next, it) == ("raised", "KeyError", "'input failed'")


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_unordered(shared_pool, chunksize):
    assert sorted(shared_pool.imap_unordered(T.sq, range(30), chunksize)) == [x * x for x in range(30)]
    assert list(shared_pool.imap_unordered(T.sq, [], chunksize)) == []


def test_imap_unordered_yields_in_finishing_order(impl, pools):
    pool = pools(impl, 2)
    pool.map(T.sq, range(4), 1)        # both workers up
    assert list(pool.imap_unordered(_sleep_back, [0.8, 0.0])) == [0.0, 0.8]


def _sleep_back(seconds):
    time.sleep(seconds)
    return seconds


def test_imap_unordered_input_failing(shared_pool):
    it = shared_pool.imap_unordered(T.sq, T.failing_input(10, 3), 1)
    seen = []
    with pytest.raises(KeyError):
        for _ in range(10):
            seen.append(next(it))
    assert set(seen) <= {0, 1, 4}


@pytest.mark.parametrize("chunksize", [0, -1])
def test_imap_chunksize_checked(shared_pool, chunksize):
    for call in (shared_pool.imap, shared_pool.imap_unordered):
        assert outcome(call, T.sq, [1], chunksize) == \
            ("raised", "ValueError", f"Chunksize must be 1+, not {chunksize}")


# -- construction and life cycle -------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,expected", [
    ((0,), {}, ("raised", "ValueError", "Number of processes must be at least 1")),
    ((-1,), {}, ("raised", "ValueError", "Number of processes must be at least 1")),
    ((1,), {"maxtasksperchild": 0}, ("raised", "ValueError", "maxtasksperchild must be a positive int or None")),
    ((1,), {"maxtasksperchild": 0.5}, ("raised", "ValueError", "maxtasksperchild must be a positive int or None")),
    ((1,), {"maxtasksperchild": "2"}, ("raised", "ValueError", "maxtasksperchild must be a positive int or None")),
    ((1,), {"initializer": 1}, ("raised", "TypeError", "initializer must be a callable")),
])
def test_constructor_checks(impl, args, kwargs, expected):
    assert outcome(make_pool, impl, *args, **kwargs) == expected


def test_close_join_terminate_states(impl, pools):
    pool = pools(impl, 2)
    assert outcome(pool.join) == ("raised", "ValueError", "Pool is still running")
    r = pool.apply_async(T.sleep_then, (0.2, "done"))
    pool.close()
    for call in (lambda: pool.apply(T.sq, (1,)), lambda: pool.map(T.sq, [1]),
                 lambda: pool.imap(T.sq, [1]), lambda: pool.imap_unordered(T.sq, [1]),
                 lambda: pool.starmap_async(T.mul, [(1, 2)]), lambda: pool.__enter__()):
        assert outcome(call) == ("raised", "ValueError", "Pool not running")
    pool.join()
    assert r.get(timeout=0) == "done"
    pool.terminate()
    pool.join()


def test_context_manager_terminates(impl):
    with make_pool(impl, 2) as pool:
        r = pool.map_async(T.sq, range(10))
        assert r.get(timeout=WAIT) == [x * x for x in range(10)]
    pool.join()
    assert outcome(pool.map_async, T.sq, [1]) == ("raised", "ValueError", "Pool not running")
    with pytest.raises(ValueError):
        with pool:
            pass


def test_terminate_with_long_tasks_is_quick(impl):
    pool = make_pool(impl, 2)
    pool.map_async(time.sleep, [60] * 1000, chunksize=1)
    time.sleep(0.3)
    t0 = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - t0 < 15


def test_initializer(impl, pools):
    pool = pools(impl, 2, T.init, ("set",))
    assert pool.map(T.get_init, range(8), 1) == ["set"] * 8


def test_maxtasksperchild(impl, pools):
    pool = pools(impl, 1, maxtasksperchild=2)
    pids = [pool.apply(T.pid) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_maxtasksperchild_early_close(impl, pools):
    pool = pools(impl, 3, maxtasksperchild=1)
    results = [pool.apply_async(T.sleep_then, (0.1, i)) for i in range(6)]
    pool.close()
    pool.join()
    assert [r.get(timeout=0) for r in results] == list(range(6))


def test_pool_cannot_be_pickled(impl, pools):
    assert outcome(pickle.dumps, pools(impl, 1)) == \
        ("raised", "NotImplementedError", "pool objects cannot be passed between processes or pickled")


def test_unclosed_pool_warns_when_collected(impl):
    import gc
    import warnings
    pool = make_pool(impl, 1)
    pool.terminate()
    pool.join()
    pool._state = "RUN"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pool
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "unclosed running multiprocessing pool"
               in str(w.message) for w in caught)


def test_interpreter_exit_with_an_open_pool(impl):
    done = run_script(impl, "import _tasks\n"
                            "class A:\n"
                            "    def __init__(self):\n"
                            "        self.pool = Pool(processes=1)\n"
                            "if __name__ == '__main__':\n"
                            "    a = A()\n"
                            "    print(a.pool.map(float, tuple(range(4))))\n")
    assert done.returncode == 0, done.stderr
    assert "[0.0, 1.0, 2.0, 3.0]" in done.stdout
    assert "Traceback" not in done.stderr


def test_initializer_with_lock_and_shared_counter(impl):
    """``Pool(initializer=init, initargs=(lock, counter))``: every increment counted.
    (The objects come from the context the standard library's pool starts with, which
    can hand them to its children; pydist takes any.)"""
    lock, counter = MP_CONTEXT.Lock(), MP_CONTEXT.Value("i", 0)
    with make_pool(impl, 2, initializer=T.init_counter, initargs=(lock, counter)) as pool:
        assert pool.map(T.count_up, [25] * 8, chunksize=1) == [25] * 8
        pool.close()
        pool.join()
    assert counter.value == 200
    del pool, lock, counter
    gc.collect()     # the semaphore's name goes now, before the module stops the tracker
