"""``_Core``: everything one executor (or ``Pool``) owns, under one lock.

The ``Executor`` and ``Pool`` objects are thin fronts over a core, so that dropping the
front can shut the core down (``weakref.finalize``). The core's state is the fields set
here; its behaviour comes in four parts, one module each:

* ``dispatching.py``: pending tasks out to the workers in batches, replies back in;
* ``staffing.py``: workers started on demand, adopted, lost and replaced, retired;
* ``stealing.py``: batches taken back from behind a long task for an idle worker;
* ``closing.py``: shutdown, stop, breaking, termination, interpreter exit.

``lock`` guards the queue, the worker records and the counts; ``changed`` (on that lock)
is notified when no task is left unfinished, when the starter thread ends, and when the
executor breaks.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
import weakref
from concurrent.futures.process import _RemoteTraceback
from typing import Any, Callable

from ..cluster.destinations import Limits
from ..cluster.group import PGRP
from ..pools.workerpool import AbstractWorkerPool
from .closing import _Closing, _live
from .dispatching import _Dispatching
from .mainscript import check_not_importing_main, main_spec
from .records import _Task, _Worker
from .shipping import _FnCache
from .staffing import _Staffing
from .stealing import _Stealing

_keys = itertools.count(1)


class _Core(_Dispatching, _Staffing, _Stealing, _Closing):
    """Everything an executor owns; the ``Executor`` object is a thin front, so that
    dropping it can shut this down (``weakref.finalize``)."""

    def __init__(self, max_workers: int, initializer: Callable[..., Any] | None, initargs: tuple,
                 max_tasks: int | None, transport: str, pool: AbstractWorkerPool | None,
                 eager: bool = False, pool_mode: bool = False,
                 tb_class: type = _RemoteTraceback, max_memory: int | None = None) -> None:
        check_not_importing_main()
        self.max_workers = max_workers
        self.initializer, self.initargs = initializer, initargs
        self.init_packed: tuple[bytes, list] | None = None
        self.init_limits = Limits()          # where the pickled initializer may go
        self.max_tasks = max_tasks
        self.max_memory = max_memory        # bytes of resident memory per worker, or None
        self.transport = transport
        self.given_pool = pool
        self.eager = eager                  # keep max_workers alive (Pool), not on demand
        self.pool_mode = pool_mode
        self.tb_class = tb_class
        self.key = (PGRP.myid, os.getpid(), next(_keys))
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.pending: collections.deque[_Task] = collections.deque()
        self.workers: list[_Worker] = []
        self.to_start: list[_Worker] = []
        self.starter: threading.Thread | None = None
        self.helpers: set[threading.Thread] = set()
        self.unfinished = 0
        self.shutdown = False
        self.stopped = False
        self.terminating = False
        self.broken: str | None = None
        self.broken_cause: BaseException | None = None   # what broke it, for later raises
        self.est: float | None = None       # seconds per task, measured on the workers
        self.rtt = 0.0005                   # seconds of round trip beyond the work
        # The main script, which the workers this executor starts run as __mp_main__: its
        # functions and classes then travel by reference (None: by value).
        self.main = main_spec() if pool is None else None
        self.fcache = _FnCache(self.key, by_reference=self.main is not None)
        self.feeds: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.stop_lock = threading.Lock()
        self.stop_done = threading.Event()
        self.steal_timer: threading.Timer | None = None
        self.used_pids: set[int] = set()
        self.exiting = 0                    # retired workers whose processes are not gone yet
        _live.add(self)
