"""Functions the scenarios run in worker processes (importable there, by both the standard
library's workers and pydist's)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pydist

INITIALIZED = "no"


def sq(x):
    return x * x


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def identity(x):
    return x


def pid(_=None):
    return os.getpid()


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def sleep_and_print(seconds, text):
    time.sleep(seconds)
    print(text, flush=True)


def fail(exc_type, *args):
    raise exc_type(*args)


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x * x


def raise_runtime_error():
    raise RuntimeError(123)  # the line the remote traceback must show


def system_exit():
    raise SystemExit(3)


def die(_=None):
    """End this worker process abruptly."""
    os.kill(os.getpid(), signal.SIGKILL)


def die_on(x, bad):
    if x == bad:
        die()
    return x * x


def make_lock():
    return threading.Lock()


def init(value):
    global INITIALIZED
    INITIALIZED = value


def init_fail(*_):
    raise ValueError("error in initializer")


def get_init(_=None):
    return INITIALIZED


class Unpicklable:
    """Fails to pickle with a RuntimeError (as CPython's tests' ``A`` does)."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def counting(n, seen):
    """Yield 0..n-1, recording in ``seen`` how many were taken."""
    for i in range(n):
        seen.append(i)
        yield i


def failing_input(n, at):
    for i in range(n):
        if i == at:
            raise KeyError("input failed")
        yield i


class Box:
    """A result that can be watched with a weak reference."""

    def __init__(self, value):
        self.value = value


def unpicklable_result_of_the_stdlib():
    """What CPython's Pool tests return as a result that cannot be sent back."""
    return lambda: 42


def _refuse():
    import pickle
    raise pickle.UnpicklingError("refuses to load")


class BrokenOnLoad:
    """Pickles fine; fails when unpickled."""

    def __reduce__(self):
        return (_refuse, ())



def nested_executor_kind():
    """Inside a task: what pydist.ProcessPoolExecutor gives, and a map on it."""
    with pydist.ProcessPoolExecutor(1) as inner:
        kind = f"{type(inner).__module__}.{type(inner).__qualname__}"
        return kind, list(inner.map(sq, range(3)))


_shared = {}


def init_counter(lock, counter):
    """The classic initializer: keep a lock and a shared counter for the tasks."""
    _shared["lock"], _shared["counter"] = lock, counter


def count_up(n):
    for _ in range(n):
        with _shared["lock"]:
            _shared["counter"].value += 1
    return n
