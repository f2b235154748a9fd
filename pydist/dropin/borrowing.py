"""Workers borrowed from a given pool: ``Executor(pool=p)`` on ``p``'s protocol.

An executor given a pydist pool owns none of its workers: it *takes* them, as ``pmap``
and the pool variants of ``remotecall`` do, and *puts them back*. So a ``pmap`` (or a
second executor) on the same pool never sends work to a worker the executor holds, and
the other way round. One ``_Borrower`` per such executor, with one thread (the
*keeper*) that lives while the executor holds a worker or has tasks waiting, and on each
round (every ``POLL`` seconds, or at once when asked to):

1. asks the pool for as many idle workers as the tasks waiting want (``poll``, which
   never waits), and when the executor holds none at all, waits for one (``take``, so
   that whoever holds the pool's workers sees a taker waiting);
2. runs the initializer on a worker the first time the executor gets it, then hands it
   to the executor (a record in ``core.staff.workers``) and dispatches;
3. gives workers back: one that has been idle for ``LINGER`` seconds with nothing
   pending, any idle one while another process waits for a worker of the pool, and,
   while someone waits and the executor holds several, one busy worker once its tasks
   are done (``yield_one``: it retires, and the executor's ``retire`` puts it back when
   its last answer is in).

How often it looks, how it hands workers over and back are the scheduling ``pmap`` uses
on a pool too (``pools/scheduler.py``); what is the executor's own is the initializer, the
records, and lingering for more tasks. The executor's lock guards the records; the pool
is only called outside it.
"""
from __future__ import annotations

import threading
import time
from typing import Any, cast

from ..cluster.group import PGRP
from ..pools.scheduler import POLL, give_back, wait_for_one, yield_one
from ..pools.workerpool import AbstractWorkerPool
from .records import _Worker

LINGER = 0.1     # seconds an idle borrowed worker is kept, in case more tasks come


class _Borrower:
    """The workers one executor borrows from ``pool``, and the thread that keeps them."""

    def __init__(self, core: Any, pool: AbstractWorkerPool) -> None:
        self.core = core
        self.pool = pool
        self.thread: threading.Thread | None = None     # the keeper (under core.lock)
        self.wake = threading.Event()
        self.ever: set[int] = set()                     # every worker it has held

    def want(self) -> None:
        """(Under the executor's lock.) Tasks wait for workers: make sure the keeper runs
        (a running keeper looks again within ``POLL`` seconds)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._keep, name="pydist-executor-borrow",
                                           daemon=True)
            self.thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the keeper to end (after the executor has stopped)."""
        t = self.thread
        self.wake.set()
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def give_back(self, pid: int) -> None:
        """Return one worker to the pool (its record is already off the executor's books)."""
        give_back(self.pool, pid)

    # -- the keeper ---------------------------------------------------------------------------
    def _keep(self) -> None:
        try:
            while self._round():
                self.wake.wait(POLL)
                self.wake.clear()
        finally:
            with self.core.lock:
                self.thread = None
                self.core.changed.notify_all()
                if not self.core.flags.closed() and self.core.staff.workers_wanted() > 0:
                    self.want()        # asked for again while it was ending

    def _needed(self) -> int:
        core = self.core
        with core.lock:
            return 0 if core.flags.closed() else core.staff.workers_wanted()

    def _round(self) -> bool:
        """One round; False once the executor holds no worker and wants none."""
        core = self.core
        need = self._needed()
        try:
            got, waiting = self.pool.poll(max(need, 0))
        except Exception:      # the pool's owner is gone
            got, waiting = [], 0
        with core.lock:
            held = sum(1 for w in core.staff.workers if not w.gone)
        if need > 0 and not got and not held:
            one = self._wait_for_one()
            if one is None:
                return False
            got = one
        if got:
            self._adopt(got)
        self._give_back_unneeded(waiting)
        with core.lock:
            if core.flags.closed():
                return False
            return any(not w.gone for w in core.staff.workers) or core.staff.workers_wanted() > 0

    def _wait_for_one(self) -> list[int] | None:
        """The executor holds no worker and tasks wait: take one, waiting a round at most
        (as a taker, so the pool's other users hand one over); None if the pool is empty."""
        try:
            if len(self.pool) == 0:
                self.core.closer.break_("Every worker of the given pool has exited, the process pool "
                                 "is not usable anymore", None)
                return None
            pid = wait_for_one(self.pool)
        except Exception as e:          # the pool's owner is gone
            self.core.closer.break_(f"The given pool cannot lend workers anymore ({e}); the process "
                             f"pool is not usable anymore", e)
            return None
        if pid is None:
            return []
        if pid == PGRP.myid and pid not in self.pool.workers():
            return []        # the default pool lends process 1 while empty: not a worker
        return [pid]

    def _adopt(self, pids: list[int]) -> None:
        """Initialize the workers new to this executor, then hand them all to it."""
        core = self.core
        fresh = [p for p in pids if p not in self.ever]
        if fresh:
            failure = core.staff.initialize(fresh)
            if failure is not None:
                for pid in pids:
                    self.give_back(pid)
                core.closer.break_("A worker's initializer failed, the process pool is not usable "
                            "anymore", failure)
                return
        with core.lock:
            if core.flags.closed():
                back = pids
            else:
                back = []
                self.ever.update(pids)
                core.staff.used_pids.update(pids)
                core.staff.workers.extend(_Worker(pid, owned=False) for pid in pids)
        for pid in back:
            self.give_back(pid)
        if not back:
            core.dispatcher.dispatch(grow=False)

    def _give_back_unneeded(self, waiting: int) -> None:
        """Idle workers the executor can spare go back; with takers waiting, one busy
        worker is let go once its tasks are done."""
        core = self.core
        now = time.monotonic()
        out: list[_Worker] = []
        with core.lock:
            live = [w for w in core.staff.workers if not w.gone and not w.retiring]
            for w in live:
                if w.load or w.outbox:
                    continue
                if core.tasks.pending and not waiting:
                    continue
                if waiting or now - w.idle_since >= LINGER:
                    if waiting and len(live) - len(out) <= 1 and core.tasks.pending:
                        break      # keep one for the tasks waiting here
                    out.append(w)
            for w in out:
                w.gone = True
                core.staff.workers.remove(w)
            if not out:
                yield_one(core.staff.workers, waiting)
        for w in out:
            self.give_back(cast(int, w.pid))      # (a borrowed worker's pid is known)
