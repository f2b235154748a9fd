"""The iterators ``Pool.imap`` and ``Pool.imap_unordered`` return.

Both read their input a bounded window ahead of the results taken (the standard library
reads it all, in a thread of its own). ``IMapIterator`` keeps results in order through
the executor's map window (``mapfeed._Feed``); ``IMapUnorderedIterator`` queues them as
they land (each task's sink is an ``_Arrival``). While a pool holds an input not read to
the end (``Pool._feeds``), closing the pool submits the rest.
"""
from __future__ import annotations

import builtins
import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from .mapfeed import _Feed
from .records import _NO_KWARGS, _Task
from .results import TimeoutError
from .worker_side import CALL, CHUNK


class _PoolParts(Protocol):
    """What an iterator uses of the ``Pool`` that made it."""

    _core: Any          # the pool's executor core (core.py)
    _processes: int
    _feeds: Any         # the feeds the pool's close submits to the end


class IMapIterator:
    """The iterator ``imap`` returns: results in order; ``next(timeout)`` raises
    ``multiprocessing.TimeoutError``; the input is read a bounded window ahead."""

    def __init__(self, pool: _PoolParts, func: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: int) -> None:
        self._pool = pool
        self._chunked = chunksize > 1
        source = zip(iterable) if chunksize == 1 else _chunks(iterable, chunksize)
        self._feed = _Feed(pool._core, func, source, CALL if chunksize == 1 else CHUNK,
                           max(16, 8 * pool._processes), keep=pool._feeds)
        self._items: collections.deque[Any] = collections.deque()
        self._done = False
        self._feed.top_up(first=True)

    def __iter__(self) -> IMapIterator:
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

    def __init__(self, it: IMapUnorderedIterator) -> None:
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

    def __init__(self, pool: _PoolParts, func: Callable[..., Any], iterable: Iterable[Any],
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
        self._arrived: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._items: collections.deque[Any] = collections.deque()
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
                self._core.dispatcher.enqueue(tasks, check=first)
            if self._source is None:
                self._keep.discard(self)

    def at_shutdown(self, cancel_futures: bool) -> None:
        """The pool closes: the rest of the input is submitted now."""
        self._top_up(drain=True)

    def _arrive(self, success: bool, value: Any) -> None:
        with self._cond:
            self._arrived.append((success, value))
            self._cond.notify()

    def __iter__(self) -> IMapUnorderedIterator:
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


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk
