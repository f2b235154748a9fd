"""``Pool``: the whole ``multiprocessing.pool.Pool`` interface on pydist workers.

Migrating is one changed import. Tasks run through an ``Executor`` (which ships each
function to each worker once and keeps several calls in flight per worker); ``map`` and
friends cut their input into chunks by the standard library's rule. A task lost to a
worker that died raises ``ProcessExitedException`` (a ``BrokenProcessPool``) instead of
hanging forever, and the worker is replaced.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import multiprocessing
import threading
from typing import Any, Callable, Iterable, Iterator

from .executor import Executor

__all__ = ["Pool", "AsyncResult", "MapResult"]

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


def _run_chunk(func: Callable[..., Any], chunk: list, star: bool) -> list:
    """On a worker: one chunk of a map."""
    if star:
        return [func(*args) for args in chunk]
    return [func(x) for x in chunk]


def _default_chunksize(n: int, processes: int) -> int:
    """The standard library's rule: about four chunks per process."""
    chunksize, extra = divmod(n, processes * 4)
    return chunksize + 1 if extra else chunksize


class AsyncResult:
    """The result of ``apply_async`` (``get``, ``wait``, ``ready``, ``successful``)."""

    def __init__(self, callback: Callable[[Any], None] | None = None,
                 error_callback: Callable[[BaseException], None] | None = None) -> None:
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._callback, self._error_callback = callback, error_callback

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._error is not None:
            raise self._error
        return self._value

    def _set(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        try:
            if error is None and self._callback is not None:
                self._callback(value)
            elif error is not None and self._error_callback is not None:
                self._error_callback(error)
        finally:
            self._event.set()


ApplyResult = AsyncResult


class MapResult(AsyncResult):
    """The result of ``map_async``/``starmap_async``: the list, once every chunk is in."""

    def __init__(self, futures: list[cf.Future], callback: Any, error_callback: Any) -> None:
        super().__init__(callback, error_callback)
        self._futures = futures
        self._left = len(futures)
        self._lock = threading.Lock()
        if not futures:
            self._set([])
        for f in futures:
            f.add_done_callback(self._chunk_done)

    def _chunk_done(self, f: cf.Future) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._left -= 1
            error = f.exception()
            last = self._left == 0
        if error is not None:
            self._set(error=error)
        elif last:
            self._set([x for g in self._futures for x in g.result()])


class Pool:
    """A pool of pydist worker processes with ``multiprocessing.pool.Pool``'s interface."""

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: Any = None, *, transport: str = "auto") -> None:
        import os
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._state = _RUN
        self._executor = Executor(processes, initializer=initializer, initargs=tuple(initargs),
                                  max_tasks_per_child=maxtasksperchild, transport=transport)
        self._executor._ensure_started()

    # -- state --------------------------------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def __repr__(self) -> str:
        return f"<pydist.Pool state={self._state} pool_size={self._processes}>"

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def close(self) -> None:
        """No more tasks; workers exit once the submitted ones are done (see ``join``)."""
        if self._state == _RUN:
            self._state = _CLOSE

    def terminate(self) -> None:
        """Stop the workers now; unfinished tasks are cancelled."""
        if self._state == _TERMINATE:
            return
        self._state = _TERMINATE
        self._executor.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        """Wait for the workers to exit (after ``close`` or ``terminate``)."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        self._executor.shutdown(wait=True)

    # -- single calls -------------------------------------------------------------------------------
    def apply(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None,
                    callback: Any = None, error_callback: Any = None) -> AsyncResult:
        self._check_running()
        result = AsyncResult(callback, error_callback)
        fut = self._executor.submit(func, *args, **(kwds or {}))
        fut.add_done_callback(lambda f: result._set(error=f.exception()) if f.exception()
                              else result._set(f.result()))
        return result

    # -- maps ----------------------------------------------------------------------------------------
    def _chunks(self, iterable: Iterable[Any], chunksize: int | None) -> list[list]:
        items = list(iterable)
        if chunksize is None:
            chunksize = _default_chunksize(len(items), self._processes)
        chunksize = max(1, chunksize)
        return [items[i:i + chunksize] for i in range(0, len(items), chunksize)]

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None,
                   star: bool, callback: Any, error_callback: Any) -> MapResult:
        self._check_running()
        futures = [self._executor.submit(_run_chunk, func, chunk, star)
                   for chunk in self._chunks(iterable, chunksize)]
        return MapResult(futures, callback, error_callback)

    def map(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None) -> list:
        return self._map_async(func, iterable, chunksize, False, None, None).get()

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Any = None, error_callback: Any = None) -> MapResult:
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list:
        return self._map_async(func, iterable, chunksize, True, None, None).get()

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Any = None,
                      error_callback: Any = None) -> MapResult:
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Results in order, as they come; the input is consumed a bounded window ahead."""
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> Iterator[Any]:
        """Results in the order they finish."""
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int,
              ordered: bool) -> Iterator[Any]:
        it = iter(iterable)
        ahead = max(64, 8 * self._processes)
        chunks = iter(lambda: list(itertools.islice(it, chunksize)), [])
        window: collections.deque[cf.Future] = collections.deque(
            self._executor.submit(_run_chunk, func, c, False) for c in itertools.islice(chunks, ahead))
        if ordered:
            while window:
                yield from window.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    window.append(self._executor.submit(_run_chunk, func, nxt, False))
            return
        pending = set(window)
        while pending:
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in done:
                yield from f.result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.add(self._executor.submit(_run_chunk, func, nxt, False))
