"""``_Core``: one executor (or ``Pool``), made of parts, under one lock.

The ``Executor`` and ``Pool`` objects are thin fronts over a core, so that dropping the
front can shut the core down (``weakref.finalize``). The core holds the settings, the
shared state objects (``state.py``: the lifecycle ``flags``, the task queue ``tasks``)
and its parts, each the one owner of its own state (composition, one module each):

* ``dispatcher`` (``dispatching.py``): pending tasks out to the workers in batches,
  replies back in; owns the learnt ``Pace``; schedules as ``pmap`` does
  (``pools/scheduler.py``);
* ``staff`` (``staffing.py``): the worker records; workers started on demand, lost and
  replaced, retired;
* ``stealer`` (``stealing.py``): batches taken back from behind a long task;
* ``closer`` (``closing.py``): shutdown, stop, breaking, termination; the only writer of
  the flags;
* ``borrower`` (``borrowing.py``, given a pool): workers taken from it and put back;
* ``pool``: the worker set: the given pool, or a ``CachingPool`` of the workers the staff
  starts; ``fcache``, the function cache functions ship through (``funccache.py``).

Each part holds the core it belongs to as ``core`` (typed ``Any``: the core composes the
parts, so naming its type in them would make an import cycle) and reaches the others
through it. ``lock`` guards the queue, the worker records and the counts; ``changed`` (on that lock)
is notified when no task is left unfinished, when the starter thread ends, and when the
executor breaks.
"""
from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures.process import _RemoteTraceback
from typing import Any

from ..cluster.group import PGRP
from ..pools.funccache import FunctionCache
from ..pools.workerpool import AbstractWorkerPool, CachingPool
from ..wire.messages import RRID
from .borrowing import _Borrower
from .closing import _Closer, _live
from .dispatching import _Dispatcher
from .futures import fail_all
from .mainscript import check_not_importing_main, main_spec
from .records import _Task
from .staffing import _Staff
from .state import _Flags, _TaskQueue
from .stealing import _Stealer

_keys = itertools.count(1)


class _OwnWorkers(CachingPool):
    """The workers an executor starts itself: a CachingPool whose cache is weak (functions
    pickled by value only, dropped on the workers once collected here), and whose functions
    of the main script travel by reference (the workers run the script)."""

    def __init__(self, main_by_reference: bool) -> None:
        self._main_by_reference = main_by_reference
        super().__init__()

    def make_function_cache(self, key: RRID) -> FunctionCache:
        return FunctionCache(key, weak=True, main_by_reference=self._main_by_reference)

    def enlist(self, pids: list[int]) -> None:
        """Workers just started: members of the pool, lent to their executor at once."""
        for pid in pids:
            self.push(pid)
        self.take_some(len(pids))


class _Core:
    """Everything an executor owns; the ``Executor`` object is a thin front, so that
    dropping it can shut this down (``weakref.finalize``)."""

    def __init__(self, max_workers: int, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...],
                 max_tasks: int | None, transport: str, pool: AbstractWorkerPool | None,
                 eager: bool = False, pool_mode: bool = False,
                 tb_class: type = _RemoteTraceback, max_memory: int | None = None) -> None:
        check_not_importing_main()
        # -- settings (never changed) --
        self.max_workers = max_workers
        self.initializer, self.initargs = initializer, initargs
        self.max_tasks = max_tasks
        self.max_memory = max_memory        # bytes of resident memory per worker, or None
        self.transport = transport
        self.eager = eager                  # keep max_workers alive (Pool), not on demand
        self.pool_mode = pool_mode
        self.tb_class = tb_class
        self.key = (PGRP.myid, os.getpid(), next(_keys))
        # The main script, which the workers this executor starts run as __mp_main__: its
        # functions and classes then travel by reference (None: by value).
        self.main = main_spec() if pool is None else None
        # -- shared state --
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.flags = _Flags()
        self.tasks = _TaskQueue(self.changed)
        self.feeds: weakref.WeakSet[Any] = weakref.WeakSet()    # Executor.map inputs
        # The worker set: the given pool, or a CachingPool of the workers this executor
        # starts (pushed as they start, dropped as they go). Functions ship once per worker
        # through the pool's cache (a private one for a given pool that has none).
        self.pool: AbstractWorkerPool = pool if pool is not None else _OwnWorkers(self.main is not None)
        self.fcache: FunctionCache = (self.pool.function_cache if isinstance(self.pool, CachingPool)
                                       else FunctionCache(PGRP.next_rrid(), weak=True))
        # -- the parts --
        self.dispatcher = _Dispatcher(self)
        self.staff = _Staff(self)
        self.stealer = _Stealer(self)
        self.closer = _Closer(self)
        self.borrower = _Borrower(self, pool) if pool is not None else None
        _live.add(self)

    def let_go_of_pool(self) -> None:
        """Once stopped: the pool of the workers this executor started is let go, so that
        its state on this process is freed now, not when the executor object is collected
        (a stopped executor may be kept long after). A given pool stays its owner's."""
        if isinstance(self.pool, _OwnWorkers):
            self.pool = None    # type: ignore[assignment]   # nothing reads it once stopped

    # -- what every part uses --------------------------------------------------------------------
    def finished(self, n: int) -> None:
        """``n`` tasks have their outcome."""
        with self.lock:
            self.tasks.finished(n)

    def fail_all(self, tasks: list[_Task], exc: BaseException) -> None:
        """Fail ``tasks`` with (a copy per task of) ``exc``; they are finished."""
        fail_all(tasks, exc)
        self.finished(len(tasks))

    def cap(self) -> int:
        """Tasks a worker may hold now (``_Dispatcher.cap``)."""
        return self.dispatcher.cap()
