"""``Pool``: the whole ``multiprocessing.pool.Pool`` interface on pydist workers.

Migrating is one changed import. The pool runs on the executor's machinery (see
``executor.py`` and ``dropin/``): a task is one ``apply`` or one chunk of a map; chunks are
cut by the standard library's rule; a function pickled by value is shipped to each worker
once; tiny tasks travel several to a message. What differs, on purpose
(compat_tests/DIVERGENCES.md):

* a task lost to a worker that died raises ``ProcessExitedException`` (a
  ``BrokenProcessPool``) instead of hanging forever, and the worker is replaced;
* a failing initializer fails the pool's tasks with ``BrokenProcessPool`` instead of
  starting worker after worker forever;
* ``terminate`` fails the tasks it cuts short instead of leaving their results unset;
* ``imap``/``imap_unordered`` read their input a bounded window ahead of the results taken
  (the standard library reads it all, in a thread of its own).
"""
from __future__ import annotations

import itertools
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Sized
from multiprocessing.pool import RemoteTraceback  # type: ignore[attr-defined]  # not in typeshed
from typing import Any, NoReturn

from ..pools.progress import ProgressIterator, check_progress
from . import nested as _nested
from .core import _Core
from .imap import IMapIterator, IMapUnorderedIterator
from .records import _NO_KWARGS, WorkerProcess, _Task
from .results import ApplyResult, AsyncResult, MapResult, _ChunkSink
from .staffing import check_max_memory
from .worker_side import CALL, CHUNK, STARCHUNK

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator"]

INIT, RUN, CLOSE, TERMINATE = "INIT", "RUN", "CLOSE", "TERMINATE"


def _default_chunksize(n: int, processes: int) -> int:
    """The standard library's rule: about four chunks per process."""
    chunksize, extra = divmod(n, processes * 4)
    return chunksize + 1 if extra else chunksize


def _terminate_core(core: _Core) -> None:
    core.closer.terminate("the pool was terminated before this task finished")


# -- the pool --------------------------------------------------------------------------------------
class Pool:
    """A pool of pydist worker processes with ``multiprocessing.pool.Pool``'s interface.

    ``context`` is accepted and ignored (workers are fresh interpreters, never forks);
    ``transport`` (beyond the standard library) picks how to talk to the workers, and
    ``max_memory_per_child`` (bytes; Linux) replaces a worker whose resident memory is over
    it after a task: it takes no more tasks and a fresh worker takes its place.
    """

    def __new__(cls, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                context: Any = None, *, transport: str = "auto",
                max_memory_per_child: int | None = None) -> Any:
        if _nested.in_task():
            # Inside a task: the standard library's pool on private children
            # (dropin/nested.py); only process 1 adds cluster workers.
            return _nested.nested_pool(processes, initializer, initargs, maxtasksperchild)
        return super().__new__(cls)

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: Any = None, *, transport: str = "auto",
                 max_memory_per_child: int | None = None) -> None:
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
        max_memory = check_max_memory(max_memory_per_child, None)
        self._processes = processes
        self._maxtasksperchild = maxtasksperchild
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._ctx = context
        self._core = _Core(processes, initializer, tuple(initargs), maxtasksperchild, transport,
                           None, eager=True, pool_mode=True, tb_class=RemoteTraceback,
                           max_memory=max_memory)
        self._feeds: set[Any] = set()       # imap inputs not read to the end yet
        self._terminator = weakref.finalize(self, _terminate_core, self._core)
        self._terminator.atexit = False     # executor._at_exit terminates it
        self._state = RUN
        with self._core.lock:
            self._core.staff.grow()

    # -- state -------------------------------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def __repr__(self) -> str:
        return f"<pydist.Pool state={self._state} pool_size={self._processes}>"

    def __reduce__(self) -> NoReturn:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __enter__(self) -> Pool:
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
            self._core.closer.shutdown(wait=False, cancel_futures=False)

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
        self._core.closer.stop()

    # -- what the standard library's object also shows ------------------------------------------
    @property
    def _pool(self) -> list[WorkerProcess]:
        """The worker processes (as the standard library's ``_pool``)."""
        return list(self._core.staff.processes().values())

    def _repopulate_pool(self) -> None:
        """Start workers to replace those that left (the pool does so by itself)."""
        core = self._core
        with core.lock:
            core.staff.grow()
        core.staff.processes()

    # -- single calls ------------------------------------------------------------------------------
    # (``kwds={}`` as the standard library's signature has it: it is never mutated)
    def apply(self, func: Callable[..., Any], args: tuple[Any, ...] = (), kwds: dict[str, Any] = {}) -> Any:  # noqa: B006
        """``func(*args, **kwds)`` on a worker; waits for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: tuple[Any, ...] = (), kwds: dict[str, Any] = {},  # noqa: B006
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None) -> ApplyResult:
        """``func(*args, **kwds)`` on a worker; an ``AsyncResult`` for it."""
        self._check_running()
        result = ApplyResult(callback, error_callback)
        task = _Task(func, tuple(args), dict(kwds) or _NO_KWARGS, CALL, result)
        if not self._core.dispatcher.submit_direct(task):    # straight to an idle worker, if there is one
            self._core.dispatcher.enqueue([task])
        return result

    # -- maps ----------------------------------------------------------------------------------------
    def map(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None,
            *, progress: bool = False) -> list[Any]:
        """``list(map(func, iterable))``, in chunks on the workers.

        ``progress=True`` (pydist only) shows a ``tqdm.auto`` bar advancing as results
        arrive (needs ``pip install 'pydist[progress]'``).
        """
        if check_progress(progress, "Pool.map"):
            self._check_running()
            items = iterable if hasattr(iterable, "__len__") else list(iterable)
            n = len(items)   # type: ignore[arg-type]  # a list, or it has __len__
            size = chunksize or max(1, _default_chunksize(n, self._processes))
            return list(ProgressIterator(self.imap(func, items, size), n, "Pool.map"))
        values: list[Any] = self._map_async(func, iterable, CHUNK, chunksize).get()
        return values

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[Any]:
        """``list(itertools.starmap(func, iterable))``, in chunks on the workers."""
        values: list[Any] = self._map_async(func, iterable, STARCHUNK, chunksize).get()
        return values

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Any = None, error_callback: Any = None) -> MapResult:
        """``map`` without waiting: a ``MapResult`` whose ``get()`` gives the list."""
        return self._map_async(func, iterable, CHUNK, chunksize, callback, error_callback)

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Any = None,
                      error_callback: Any = None) -> MapResult:
        """``starmap`` without waiting: a ``MapResult`` whose ``get()`` gives the list."""
        return self._map_async(func, iterable, STARCHUNK, chunksize, callback, error_callback)

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], kind: int,
                   chunksize: int | None, callback: Any = None, error_callback: Any = None) -> MapResult:
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        n = len(iterable)   # type: ignore[arg-type]  # a list, or it has __len__
        if chunksize is None:
            chunksize = _default_chunksize(n, self._processes)
        if n == 0:
            chunksize = 0
        result = MapResult(chunksize, n, callback, error_callback)
        if chunksize <= 0:
            return result
        tasks: list[_Task] = []
        if kind == CHUNK and type(iterable) in (range, list, tuple):
            # Slices of the sequence itself: C-level copies, and a range's slices pickle
            # in a few bytes instead of a list of every number.
            for start in range(0, n, chunksize):
                chunk = iterable[start:start + chunksize]   # type: ignore[index]  # a range, list or tuple
                tasks.append(_Task(func, chunk, _NO_KWARGS, kind, _ChunkSink(result, len(tasks))))
            self._core.dispatcher.enqueue(tasks)
            return result
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
            self._core.dispatcher.enqueue(tasks)
            result._chunk(len(tasks), False, e)
            return result
        self._core.dispatcher.enqueue(tasks)
        return result

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1,
             *, progress: bool = False) -> IMapIterator:
        """Results in order, as they come; the input is read a bounded window ahead.

        ``progress=True`` (pydist only) shows a ``tqdm.auto`` bar, one step per result.
        """
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        if check_progress(progress, "Pool.imap"):
            total = len(iterable) if isinstance(iterable, Sized) else None
            it = IMapIterator(self, func, iterable, chunksize)
            return ProgressIterator(it, total, "Pool.imap")   # type: ignore[return-value]  # next(timeout) too
        return IMapIterator(self, func, iterable, chunksize)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int = 1, *, progress: bool = False) -> IMapUnorderedIterator:
        """Results in the order they finish.

        ``progress=True`` (pydist only) shows a ``tqdm.auto`` bar, one step per result.
        """
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        it = IMapUnorderedIterator(self, func, iterable, chunksize)
        if check_progress(progress, "Pool.imap_unordered"):
            total = len(iterable) if isinstance(iterable, Sized) else None
            return ProgressIterator(it, total, "Pool.imap_unordered")   # type: ignore[return-value]  # next(timeout) too
        return it
