"""``Executor`` (also ``ProcessPoolExecutor``): a ``concurrent.futures.Executor`` on pydist.

Migrating is one changed import. Tasks go to the workers of a ``CachingPool`` (each
function is shipped to each worker once), several in flight per worker so that tiny
tasks are not bound by the round trip, and each reply completes its
``concurrent.futures.Future`` from the thread that read it.

Where it differs from the standard library, on purpose (see compat_tests/DIVERGENCES.md):
a worker that dies fails only the task it was running (``ProcessExitedException``, a
``BrokenProcessPool``) and is replaced, while the other tasks go on; ``map`` consumes
its input lazily, a bounded window ahead of the results.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

from .control import addprocs, rmprocs
from .errors import ProcessExitedException, RemoteException, SerializationError
from .values import Failure
from .workerpool import CachingPool, _start

__all__ = ["Executor", "ProcessPoolExecutor"]

WINDOW = 4            # calls in flight per worker
MAX_BATCH = 64        # items of one function sent in one call when many are waiting


class _RemoteTraceback(Exception):
    """The remote traceback, chained as ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _unwrap_failure(exc: BaseException) -> BaseException:
    """The exception a task's future raises: user errors unwrapped, as the stdlib does."""
    if isinstance(exc, RemoteException):
        original = exc.captured.ex
        original.__cause__ = _RemoteTraceback(f'\n"""\n{exc.captured.traceback}"""')
        return original
    return exc


class _Item:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: cf.Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs


def _call_initializer(initializer: Callable[..., Any], initargs: tuple) -> None:
    initializer(*initargs)


def _run_batch(fn: Callable[..., Any], calls: list[tuple[tuple, dict]]) -> list[Any]:
    """On a worker: run ``fn`` over several argument sets; a value or Failure for each."""
    from .dispatch import run_call
    return [run_call(fn, args, kwargs) for args, kwargs in calls]


class Executor(cf.Executor):
    """A process pool executor over pydist workers (a drop-in for the stdlib's)."""

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None, transport: str = "auto",
                 pool: CachingPool | None = None) -> None:
        if max_workers is None:
            max_workers = len(pool.workers()) if pool is not None else (os.cpu_count() or 1)
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._max_workers = max_workers
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._transport = transport
        self._given_pool = pool
        self._pool: CachingPool | None = pool
        self._owned: list[int] = []            # workers this executor started
        self._lock = threading.RLock()
        self._pending: collections.deque[_Item] = collections.deque()
        self._inflight: dict[int, collections.deque[list[_Item]]] = {}
        self._done_count: dict[int, int] = collections.defaultdict(int)
        self._assigned: dict[int, int] = collections.defaultdict(int)   # for max_tasks_per_child
        self._retiring: set[int] = set()
        self._shutdown = False
        self._broken: str | None = None
        self._idle = threading.Condition(self._lock)
        self._started = False

    # -- workers --------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        if self._pool is None:
            self._pool = CachingPool()
            self._add_workers(self._max_workers)
        else:
            for pid in self._pool.workers():
                self._adopt(pid)

    def _add_workers(self, n: int) -> None:
        try:
            pids = addprocs(n, transport=self._transport)
        except Exception as e:
            self._break(f"could not start workers: {e}")
            return
        self._owned.extend(pids)
        for pid in pids:
            if self._initializer is not None:
                try:
                    from .remotecall import remotecall_fetch
                    remotecall_fetch(_call_initializer, pid, self._initializer, self._initargs)
                except Exception:
                    self._break("A process in the process pool was terminated abruptly "
                                "while the future was running or pending (its initializer failed).")
                    return
            self._pool.push(pid)   # type: ignore[union-attr]
            self._adopt(pid)

    def _adopt(self, pid: int) -> None:
        with self._lock:
            self._inflight.setdefault(pid, collections.deque())

    def _break(self, why: str) -> None:
        with self._lock:
            self._broken = why
            doomed = list(self._pending)
            self._pending.clear()
            for q in self._inflight.values():
                for batch in q:
                    doomed.extend(batch)
                q.clear()
        for item in doomed:
            if not item.future.done():
                item.future.set_exception(BrokenProcessPool(why))
        with self._lock:
            self._idle.notify_all()

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)``; a ``concurrent.futures.Future`` for its result."""
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        self._ensure_started()
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            future: cf.Future = cf.Future()
            self._pending.append(_Item(future, fn, args, kwargs))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Send pending items to workers with room in their window (in batches of one
        function when many wait, so tiny tasks are not bound by the round trip)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                pid = self._least_busy()
                if pid is None:
                    return
                batch = self._take_batch(pid)
                if not batch:
                    continue
                self._assigned[pid] += len(batch)
                self._inflight[pid].append(batch)
            self._send(pid, batch)

    def _take_batch(self, pid: int) -> list[_Item]:
        """Pending items for one call: consecutive items of the same function, a fair share."""
        room = sum(1 for p, q in self._inflight.items() if p not in self._retiring and len(q) < WINDOW)
        size = max(1, min(MAX_BATCH, len(self._pending) // (max(room, 1) * 2)))
        if self._max_tasks is not None:
            size = min(size, self._max_tasks - self._assigned[pid])
        batch: list[_Item] = []
        while self._pending and len(batch) < size:
            item = self._pending[0]
            if batch and item.fn is not batch[0].fn:
                break
            self._pending.popleft()
            if item.future.set_running_or_notify_cancel():
                batch.append(item)
        return batch

    def _least_busy(self) -> int | None:
        best, load = None, WINDOW
        for pid, q in self._inflight.items():
            if pid in self._retiring or len(q) >= load:
                continue
            if self._max_tasks is not None and self._assigned[pid] >= self._max_tasks:
                continue
            best, load = pid, len(q)
        return best

    def _send(self, pid: int, batch: list[_Item]) -> None:
        pool = self._pool
        assert pool is not None
        fn = batch[0].fn
        try:
            g, token = pool._prepare(fn, pid)
            try:
                if len(batch) == 1:
                    _, done = _start(pid, g, batch[0].args, batch[0].kwargs, keep=False)
                else:
                    calls = [(item.args, item.kwargs) for item in batch]
                    _, done = _start(pid, _run_batch, (g, calls), {}, keep=False)
            except BaseException:
                pool._settle(token, False)
                raise
            pool._settle(token, True)
        except (SerializationError, TypeError, ProcessExitedException) as e:
            if len(batch) > 1 and isinstance(e, (SerializationError, TypeError)):
                self._split(pid, batch)   # find the item that cannot be pickled
                return
            self._finish(pid, batch, Failure(e))
            return
        done.add_callback(lambda value: self._finish(pid, batch, value))

    def _split(self, pid: int, batch: list[_Item]) -> None:
        """Send a batch that failed to pickle one item at a time, so only the bad ones fail."""
        with self._lock:
            q = self._inflight.get(pid)
            if q is not None and batch in q:
                q.remove(batch)
                for item in batch:
                    q.append([item])
        for item in batch:
            self._send(pid, [item])

    # -- completing ------------------------------------------------------------------------------
    def _finish(self, pid: int, batch: list[_Item], value: Any) -> None:
        died = type(value) is Failure and isinstance(value.exc, ProcessExitedException)
        with self._lock:
            q = self._inflight.get(pid)
            if q is not None:
                try:
                    q.remove(batch)
                except ValueError:
                    return      # already settled (the worker died and its calls were redone)
            self._done_count[pid] += len(batch)
            if died and q is not None:
                # The oldest call was the one running; the rest had not started: redo them.
                retry = [item for later in q for item in later]
                q.clear()
                del self._inflight[pid]
                self._pending.extendleft(reversed(retry))
            recycle = (self._max_tasks is not None and not died
                       and self._assigned[pid] >= self._max_tasks and pid not in self._retiring)
            if recycle:
                self._retiring.add(pid)
        if len(batch) == 1 or type(value) is Failure:
            values = [value] * len(batch) if len(batch) > 1 else [value]
        else:
            values = value
        for item, v in zip(batch, values):
            if type(v) is Failure:
                item.future.set_exception(_unwrap_failure(v.exc))
            else:
                item.future.set_result(v)
        if died:
            self._replace(pid)
        elif pid in self._retiring:
            self._retire_if_idle(pid)
        self._dispatch()
        with self._lock:
            self._idle.notify_all()

    def _replace(self, pid: int) -> None:
        """A worker died: start another in its place (unless shutting down)."""
        if pid in self._owned:
            self._owned.remove(pid)
        if self._shutdown or self._given_pool is not None:
            return
        threading.Thread(target=self._add_then_dispatch, daemon=True).start()

    def _add_then_dispatch(self) -> None:
        self._add_workers(1)
        self._dispatch()

    def _retire_if_idle(self, pid: int) -> None:
        """``max_tasks_per_child``: once a worker has done its share and is idle, replace it."""
        with self._lock:
            q = self._inflight.get(pid)
            if q is None or q:
                return
            del self._inflight[pid]
            self._retiring.discard(pid)
        if pid in self._owned:
            self._owned.remove(pid)
        threading.Thread(target=self._swap, args=(pid,), daemon=True).start()

    def _swap(self, pid: int) -> None:
        try:
            rmprocs(pid, waitfor=10)
        except Exception:
            pass
        if not self._shutdown:
            self._add_then_dispatch()

    # -- map and shutdown -------------------------------------------------------------------------
    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like ``builtins.map``, run here; the input is consumed lazily, a bounded window
        ahead of the results."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        ahead = max(2 * WINDOW * max(1, self._max_workers), 64)
        args_iter = zip(*iterables)
        window: collections.deque[cf.Future] = collections.deque(
            self.submit(fn, *a) for a in itertools.islice(args_iter, ahead))
        return self._map_results(fn, args_iter, window, deadline)

    def _map_results(self, fn: Callable[..., Any], args_iter: Iterator[tuple],
                     window: collections.deque[cf.Future], deadline: float | None) -> Iterator[Any]:
        try:
            while window:
                fut = window.popleft()
                left = None if deadline is None else deadline - time.monotonic()
                yield fut.result(left)
                nxt = next(args_iter, None)
                if nxt is not None:
                    window.append(self.submit(fn, *nxt))
        finally:
            for fut in window:
                fut.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what has not started; stop the workers."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                for item in self._pending:
                    item.future.cancel()
                self._pending.clear()
        if wait:
            with self._lock:
                while (self._pending or any(self._inflight.values())) and not self._broken:
                    self._idle.wait(0.1)
        owned, self._owned = self._owned, []
        if owned:
            if wait:
                rmprocs(*owned, waitfor=30)
            else:
                threading.Thread(target=rmprocs, args=tuple(owned), daemon=True).start()

    def __repr__(self) -> str:
        state = "broken" if self._broken else ("shut down" if self._shutdown else "running")
        return f"<pydist.Executor max_workers={self._max_workers} {state}>"


ProcessPoolExecutor = Executor
