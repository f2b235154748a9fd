"""``Executor`` (also ``ProcessPoolExecutor``): a ``concurrent.futures`` executor on pydist.

Migrating is one changed import. The model:

1. ``submit`` puts a *task* (function, arguments, and the ``concurrent.futures.Future`` it
   completes) on the pending queue and dispatches at once from the calling thread.
2. Dispatching hands pending tasks to the worker with the fewest tasks in flight, as
   *batches*: consecutive tasks of one function go out in one message, so tiny tasks are
   not bound by the round trip. How many tasks a worker may hold depends on how long tasks
   take (measured on the workers): enough to cover a round trip of latency when tasks are
   tiny, and just the running one when they are long, so an idle worker never looks on
   while a task waits behind a long one elsewhere. A task already queued on a busy worker
   is taken back (*revoked*, if it has not started) when another worker falls idle.
3. Workers start on demand, as the standard library's do: a task that finds no idle worker
   starts one, up to ``max_workers``. Each runs the initializer first; one that fails
   breaks the executor (``BrokenProcessPool`` for every pending task and later submit).
4. The workers an executor starts form a ``CachingPool``: a function pickled by value
   (lambda, closure, function of ``__main__``) is shipped to each worker once, through the
   pools' function cache, and referred to by a short id afterwards; it is let go on the
   workers when the function is garbage collected here. Given a pool, the executor takes
   its workers and puts them back through that pool (``dropin/borrowing.py``).
5. A reply completes its tasks' futures on the thread that read it. A task's exception is
   the original one, its remote traceback chained as ``__cause__``.
6. A worker that dies fails only the task it was running (``ProcessExitedException``, a
   ``BrokenProcessPool``); the tasks queued behind it go to other workers, and it is
   replaced. Tasks that shared a message with the one running are run again one by one,
   so the culprit alone fails. ``max_tasks_per_child`` retires a worker once its share is
   done and starts a fresh one, also during ``shutdown``.
7. ``shutdown(wait=True)`` lets every submitted task finish, then removes the workers; an
   executor that is never shut down is shut down when it is garbage collected, and at
   interpreter exit (waiting for its tasks, as the standard library does).

``map`` consumes its input lazily, a bounded window ahead of the results it has yielded
(the standard library reads it all at once). See compat_tests/DIVERGENCES.md.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

from ..pools.progress import ProgressIterator, check_progress
from ..pools.workerpool import AbstractWorkerPool
from . import closing as _closing
from . import nested as _nested
from .core import _Core
from .futures import _Future
from .mapfeed import _chunks, _Feed, _map_results
from .records import _NO_KWARGS, WorkerProcess, _Task
from .staffing import check_max_memory
from .worker_side import CALL, STARCHUNK

__all__ = ["Executor", "ProcessPoolExecutor"]


class Executor(cf.Executor):
    """A process pool executor on pydist workers (a drop-in for the standard library's
    ``concurrent.futures.ProcessPoolExecutor``).

    ``mp_context`` is accepted and ignored (workers are fresh interpreters, never forks).
    Beyond the standard library: ``transport`` picks how to talk to the workers it starts,
    ``pool`` makes it use the workers of a pydist worker pool instead, and
    ``max_memory_per_child`` (bytes; Linux) replaces a worker whose resident memory is over
    it after a task: it takes no more tasks and a fresh worker takes its place.
    """

    def __new__(cls, max_workers: int | None = None, mp_context: Any = None,
                initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (), *,
                max_tasks_per_child: int | None = None, transport: str = "auto",
                pool: AbstractWorkerPool | None = None,
                max_memory_per_child: int | None = None) -> Any:
        if pool is None and _nested.in_task():
            # Inside a task: the standard library's executor on private children
            # (dropin/nested.py); only process 1 adds cluster workers.
            return _nested.nested_executor(max_workers, initializer, initargs,
                                           max_tasks_per_child)
        return super().__new__(cls)

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (), *,
                 max_tasks_per_child: int | None = None, transport: str = "auto",
                 pool: AbstractWorkerPool | None = None,
                 max_memory_per_child: int | None = None) -> None:
        if max_workers is None:
            max_workers = (len(pool.workers()) or 1) if pool is not None else (os.cpu_count() or 1)
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            elif max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if pool is not None and not isinstance(pool, AbstractWorkerPool):
            raise TypeError(f"pool must be a pydist worker pool, not {type(pool).__name__}")
        max_memory = check_max_memory(max_memory_per_child, pool)
        self._given_context = mp_context
        self._core = _Core(max_workers, initializer, tuple(initargs), max_tasks_per_child,
                           transport, pool, max_memory=max_memory)
        weakref.finalize(self, self._core.closer.abandon).atexit = False   # see _at_exit

    # -- the standard interface --------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; a ``concurrent.futures.Future`` for its result."""
        core = self._core
        future = _Future()
        task = _Task(fn, args, kwargs or _NO_KWARGS, CALL, future)
        dispatcher = core.dispatcher
        if not dispatcher.submit_direct(task):
            dispatcher.enqueue((task,))
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, progress: bool = False) -> Iterator[Any]:
        """Like ``builtins.map(fn, *iterables)``, run on the workers; results in order.

        The input is read a bounded window ahead of the results taken (all at once only
        when the executor shuts down first); ``TimeoutError`` once ``timeout`` seconds have
        passed since this call; ``chunksize`` items go to a worker as one task.
        ``progress=True`` (pydist only) shows a ``tqdm.auto`` bar, one step per result
        (needs ``pip install 'pydist[progress]'``).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if check_progress(progress, "Executor.map"):
            sizes = [len(it) for it in iterables if isinstance(it, Sized)]
            total = min(sizes) if iterables and len(sizes) == len(iterables) else None
            return ProgressIterator(self.map(fn, *iterables, timeout=timeout, chunksize=chunksize),
                                    total, "Executor.map")
        deadline = None if timeout is None else time.monotonic() + timeout
        core = self._core
        if chunksize == 1:
            feed = _Feed(core, fn, zip(*iterables), CALL, 64)
        else:
            feed = _Feed(core, fn, _chunks(iterables, chunksize), STARCHUNK, 16)
        try:
            feed.top_up(first=True)
        except BaseException:
            feed.close()
            raise
        if feed.error is not None:
            # The input failed before the first window was full: raise here, as the
            # standard library does (the tasks already submitted still run).
            err, feed.error = feed.error, None
            feed.window.clear()
            feed.close()
            raise err
        return _map_results(feed, deadline, chunksize > 1, self)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; ``cancel_futures`` cancels those not started; ``wait`` waits until
        every other task has finished and the workers are gone (else that happens in the
        background)."""
        self._core.closer.shutdown(wait, cancel_futures)

    # -- what the standard library's object also shows -----------------------------------------
    @property
    def _max_workers(self) -> int:
        return self._core.max_workers

    @property
    def _broken(self) -> str | bool:
        return self._core.flags.broken or False

    @property
    def _processes(self) -> dict[int, WorkerProcess]:
        """The worker processes by OS pid (as the standard library's ``_processes``)."""
        return self._core.staff.processes()

    @property
    def _executor_manager_thread(self) -> _Stopping | None:
        """What ``join()`` waits for the end of a shutdown (the standard library's
        manager thread ends once the workers are gone)."""
        return _Stopping(self._core)

    @property
    def _mp_context(self) -> Any:
        if self._given_context is not None:
            return self._given_context
        if self._core.max_tasks is not None:
            return multiprocessing.get_context("spawn")
        return multiprocessing.get_context()

    def __repr__(self) -> str:
        core = self._core
        state = "broken" if core.flags.broken else ("shut down" if core.flags.shutdown else "running")
        return f"<pydist.Executor max_workers={core.max_workers} {state}>"


ProcessPoolExecutor = Executor


class _Stopping:
    """The end of an executor's shutdown, as a thread-like object (``join``, ``is_alive``)."""

    def __init__(self, core: _Core) -> None:
        self._core = core

    def join(self, timeout: float | None = None) -> None:
        self._core.closer.stop_done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._core.closer.stop_done.is_set()



def __getattr__(name: str) -> Any:
    """``_global_shutdown`` is rebound at interpreter exit: read it where it lives."""
    if name == "_global_shutdown":
        return _closing._global_shutdown
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
