"""``Pool``: the whole ``multiprocessing.pool.Pool`` interface on pydist workers.

Migrating is one changed import. The pool runs on the executor's machinery (see
``executor.py``): a task is one ``apply`` or one chunk of a map; chunks are cut by the
standard library's rule; a function pickled by value is shipped to each worker once; tiny
tasks travel several to a message. What differs, on purpose (compat_tests/DIVERGENCES.md):

* a task lost to a worker that died raises ``ProcessExitedException`` (a
  ``BrokenProcessPool``) instead of hanging forever, and the worker is replaced;
* a failing initializer fails the pool's tasks with ``BrokenProcessPool`` instead of
  starting worker after worker forever;
* ``terminate`` fails the tasks it cuts short instead of leaving their results unset;
* ``imap``/``imap_unordered`` read their input a bounded window ahead of the results taken
  (the standard library reads it all, in a thread of its own).
"""
from __future__ import annotations

import builtins
import collections
import itertools
import multiprocessing
import os
import threading
import time
import traceback
import warnings
import weakref
from multiprocessing.pool import RemoteTraceback
from typing import Any, Callable, Iterable, Iterator

from .executor import (CALL, CHUNK, STARCHUNK, WorkerProcess, _Core, _Feed, _Task, _NO_KWARGS,
                       pump_for)

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator"]

INIT, RUN, CLOSE, TERMINATE = "INIT", "RUN", "CLOSE", "TERMINATE"
TimeoutError = multiprocessing.TimeoutError


# -- results -------------------------------------------------------------------------------------
class ApplyResult:
    """The result of ``apply_async``: ``get``, ``wait``, ``ready``, ``successful``.

    It is also where the executor delivers the task (``set_result``/``set_exception``);
    callbacks run on the thread that delivers, before ``ready()`` turns true.
    """

    def __init__(self, callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None) -> None:
        self._event = threading.Event()
        self._callback, self._error_callback = callback, error_callback
        self._success = True
        self._value: Any = None
        self._cancelled = False
        self.pid: int | None = None       # the worker running it (set by the executor)

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError("{0!r} not ready".format(self))
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        if timeout is None and not self._event.is_set():
            pump_for(self, self._event.is_set)
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    __class_getitem__ = classmethod(lambda cls, item: cls)

    # -- the executor's side -------------------------------------------------------------------
    def set_running_or_notify_cancel(self) -> bool:
        return not self._cancelled

    def cancel(self) -> bool:
        self._cancelled = True
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def set_result(self, value: Any) -> None:
        self._finish(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self._finish(False, exc)

    def _finish(self, success: bool, value: Any) -> None:
        if self._event.is_set():
            return
        self._success, self._value = success, value
        try:
            if success and self._callback is not None:
                self._callback(value)
            elif not success and self._error_callback is not None:
                self._error_callback(value)
        except BaseException:
            traceback.print_exc()
        finally:
            self._event.set()


AsyncResult = ApplyResult


class _ChunkSink:
    """Where one chunk of a ``map_async`` lands."""

    __slots__ = ("result", "index", "pid")

    def __init__(self, result: "MapResult", index: int) -> None:
        self.result, self.index = result, index
        self.pid: int | None = None

    def set_running_or_notify_cancel(self) -> bool:
        return not self.result._cancelled

    def cancel(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return self.result._cancelled

    def set_result(self, value: list) -> None:
        self.result._chunk(self.index, True, value)

    def set_exception(self, exc: BaseException) -> None:
        self.result._chunk(self.index, False, exc)


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: ready once every chunk is in; then
    the list, or the first error (``error_callback`` gets it)."""

    def __init__(self, chunksize: int, length: int, callback: Any, error_callback: Any) -> None:
        super().__init__(callback, error_callback)
        self._lock = threading.Lock()
        self._value = [None] * length
        self._chunksize = chunksize
        self._number_left = 0 if chunksize <= 0 else length // chunksize + bool(length % chunksize)
        if self._number_left == 0:
            self._event.set()

    def _expect(self, n: int) -> None:
        """Only ``n`` chunks will report (the input ended early with an error)."""
        with self._lock:
            self._number_left = n

    def _chunk(self, i: int, success: bool, value: Any) -> None:
        with self._lock:
            self._number_left -= 1
            if success and self._success:
                c = self._chunksize
                self._value[i * c:(i + 1) * c] = value
            elif not success and self._success:
                self._success, self._value = False, value
            last = self._number_left == 0
        if last:
            self._finish(self._success, self._value)


# -- imap ------------------------------------------------------------------------------------------
class IMapIterator:
    """The iterator ``imap`` returns: results in order; ``next(timeout)`` raises
    ``multiprocessing.TimeoutError``; the input is read a bounded window ahead."""

    def __init__(self, pool: "Pool", func: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: int) -> None:
        self._pool = pool
        self._chunked = chunksize > 1
        source = zip(iterable) if chunksize == 1 else _chunks(iterable, chunksize)
        self._feed = _Feed(pool._core, func, source, CALL if chunksize == 1 else CHUNK,
                           max(16, 8 * pool._processes), keep=pool._feeds)
        self._items: collections.deque = collections.deque()
        self._done = False
        self._feed.top_up(first=True)

    def __iter__(self) -> "IMapIterator":
        return self

    def next(self, timeout: float | None = None) -> Any:
        if self._items:
            return self._items.popleft()
        if self._done:
            raise StopIteration
        feed = self._feed
        feed.top_up()
        if not feed.window:
            self._done = True
            feed.close()
            if feed.error is not None:
                err, feed.error = feed.error, None
                raise err
            raise StopIteration
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            value = feed.pop(deadline)
        except builtins.TimeoutError:
            raise TimeoutError from None
        except BaseException:
            if self._chunked:     # the standard library's chunked imap is a generator: it ends
                self._done = True
                feed.close()
            raise
        if not self._chunked:
            return value
        self._items.extend(value)
        return self.next(timeout)

    __next__ = next


class _Arrival:
    """A task of ``imap_unordered``: queues its result for the iterator when it lands."""

    __slots__ = ("it", "state", "pid")

    def __init__(self, it: "IMapUnorderedIterator") -> None:
        self.it = it
        self.state = 0
        self.pid: int | None = None

    def set_running_or_notify_cancel(self) -> bool:
        return self.state != 3

    def cancel(self) -> bool:
        if self.state == 0:
            self.state = 3
        return self.state == 3

    def cancelled(self) -> bool:
        return self.state == 3

    def set_result(self, value: Any) -> None:
        self.state = 2
        self.it._arrive(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self.state = 2
        self.it._arrive(False, exc)


class IMapUnorderedIterator:
    """The iterator ``imap_unordered`` returns: results as they come."""

    def __init__(self, pool: "Pool", func: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: int) -> None:
        self._core = pool._core
        self._func = func
        self._chunked = chunksize > 1
        self._kind = CALL if chunksize == 1 else CHUNK
        self._source: Iterator[Any] | None = iter(zip(iterable) if chunksize == 1
                                                  else _chunks(iterable, chunksize))
        self._error: BaseException | None = None
        self._window = max(16, 8 * pool._processes)
        self._out = 0                       # tasks submitted, result not yet taken
        self._arrived: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._keep = pool._feeds
        self._keep.add(self)
        self._core.feeds.add(self)
        self._top_up(first=True)

    def _top_up(self, first: bool = False, drain: bool = False) -> None:
        with self._lock:
            if self._source is None:
                return
            target = self._window
            if self._kind == CALL:
                target = max(target, min(8192, self._core.cap() * 2 * self._core.max_workers))
            if not (first or drain) and self._out > target * 3 // 4:
                return
            want = None if drain else target - self._out
            tasks = []
            try:
                for item in (self._source if want is None else itertools.islice(self._source, want)):
                    tasks.append(_Task(self._func, item, _NO_KWARGS, self._kind, _Arrival(self)))
                if want is None or len(tasks) < want:
                    self._source = None
            except BaseException as e:
                self._source = None
                self._error = e
            if tasks:
                self._out += len(tasks)
                self._core.enqueue(tasks, check=first)
            if self._source is None:
                self._keep.discard(self)

    def at_shutdown(self, cancel_futures: bool) -> None:
        """The pool closes: the rest of the input is submitted now."""
        self._top_up(drain=True)

    def _arrive(self, success: bool, value: Any) -> None:
        with self._cond:
            self._arrived.append((success, value))
            self._cond.notify()

    def __iter__(self) -> "IMapUnorderedIterator":
        return self

    def next(self, timeout: float | None = None) -> Any:
        if self._items:
            return self._items.popleft()
        self._top_up()
        if self._out == 0:
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            raise StopIteration
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._arrived:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                self._cond.wait(left)
            success, value = self._arrived.popleft()
        self._out -= 1
        if not success:
            raise value
        if not self._chunked:
            return value
        self._items.extend(value)
        return self.next(timeout)

    __next__ = next


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list]:
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _default_chunksize(n: int, processes: int) -> int:
    """The standard library's rule: about four chunks per process."""
    chunksize, extra = divmod(n, processes * 4)
    return chunksize + 1 if extra else chunksize


def _terminate_core(core: _Core) -> None:
    core.terminate("the pool was terminated before this task finished")


# -- the pool --------------------------------------------------------------------------------------
class Pool:
    """A pool of pydist worker processes with ``multiprocessing.pool.Pool``'s interface.

    ``context`` is accepted and ignored (workers are fresh interpreters, never forks);
    ``transport`` (beyond the standard library) picks how to talk to the workers.
    """

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: Any = None, *, transport: str = "auto") -> None:
        self._state = INIT
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')
        self._processes = processes
        self._maxtasksperchild = maxtasksperchild
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._ctx = context
        self._core = _Core(processes, initializer, tuple(initargs), maxtasksperchild, transport,
                           None, eager=True, pool_mode=True, tb_class=RemoteTraceback)
        self._feeds: set[Any] = set()       # imap inputs not read to the end yet
        self._terminator = weakref.finalize(self, _terminate_core, self._core)
        self._terminator.atexit = False     # executor._at_exit terminates it
        self._state = RUN
        with self._core.lock:
            self._core._grow()

    # -- state -------------------------------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def __repr__(self) -> str:
        return f"<pydist.Pool state={self._state} pool_size={self._processes}>"

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def close(self) -> None:
        """No more tasks; the workers leave once the submitted ones are done (``join``)."""
        if self._state == RUN:
            self._state = CLOSE
            self._core.shutdown_(wait=False, cancel_futures=False)

    def terminate(self) -> None:
        """Stop the workers now; tasks not finished fail (``BrokenProcessPool``)."""
        self._state = TERMINATE
        self._terminator()

    def join(self) -> None:
        """Wait for the workers to leave (after ``close`` or ``terminate``)."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._core.stop()

    # -- what the standard library's object also shows ------------------------------------------
    @property
    def _pool(self) -> list[WorkerProcess]:
        """The worker processes (as the standard library's ``_pool``)."""
        return list(self._core.processes().values())

    def _repopulate_pool(self) -> None:
        """Start workers to replace those that left (the pool does so by itself)."""
        core = self._core
        with core.lock:
            core._grow()
        core.processes()

    # -- single calls ------------------------------------------------------------------------------
    def apply(self, func: Callable[..., Any], args: tuple = (), kwds: dict = {}) -> Any:
        """``func(*args, **kwds)`` on a worker; waits for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: tuple = (), kwds: dict = {},
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None) -> ApplyResult:
        """``func(*args, **kwds)`` on a worker; an ``AsyncResult`` for it."""
        self._check_running()
        result = ApplyResult(callback, error_callback)
        self._core.enqueue([_Task(func, tuple(args), dict(kwds) or _NO_KWARGS, CALL, result)])
        return result

    # -- maps ----------------------------------------------------------------------------------------
    def map(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None) -> list:
        """``list(map(func, iterable))``, in chunks on the workers."""
        return self._map_async(func, iterable, CHUNK, chunksize).get()

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list:
        """``list(itertools.starmap(func, iterable))``, in chunks on the workers."""
        return self._map_async(func, iterable, STARCHUNK, chunksize).get()

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Any = None, error_callback: Any = None) -> MapResult:
        return self._map_async(func, iterable, CHUNK, chunksize, callback, error_callback)

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Any = None,
                      error_callback: Any = None) -> MapResult:
        return self._map_async(func, iterable, STARCHUNK, chunksize, callback, error_callback)

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], kind: int,
                   chunksize: int | None, callback: Any = None, error_callback: Any = None) -> MapResult:
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        n = len(iterable)   # type: ignore[arg-type]
        if chunksize is None:
            chunksize = _default_chunksize(n, self._processes)
        if n == 0:
            chunksize = 0
        result = MapResult(chunksize, n, callback, error_callback)
        if chunksize <= 0:
            return result
        tasks: list[_Task] = []
        it = iter(iterable)
        try:
            while True:
                chunk = list(itertools.islice(it, chunksize))
                if not chunk:
                    break
                if kind == STARCHUNK:
                    chunk = [tuple(a) for a in chunk]
                tasks.append(_Task(func, chunk, _NO_KWARGS, kind, _ChunkSink(result, len(tasks))))
        except Exception as e:
            # The input failed: that chunk fails with the input's error (no remote traceback).
            result._expect(len(tasks) + 1)
            self._core.enqueue(tasks)
            result._chunk(len(tasks), False, e)
            return result
        self._core.enqueue(tasks)
        return result

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        """Results in order, as they come; the input is read a bounded window ahead."""
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        return IMapIterator(self, func, iterable, chunksize)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> IMapUnorderedIterator:
        """Results in the order they finish."""
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        return IMapUnorderedIterator(self, func, iterable, chunksize)
