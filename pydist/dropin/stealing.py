"""Work stealing: the part of an executor (``_Stealer``) that takes back queued tasks.

A worker may hold several batches; the oldest runs, the others wait behind it. When a
worker falls idle with nothing pending, batches waiting behind one that has run well past
its estimate (``pools/scheduler.py``'s ``overdue``) are asked back (``_revoke`` on that
worker, the gate its batches pass); those that had not started are taken off its books
(``Slot.take_back``: they no longer count towards ``max_tasks_per_child``) and dispatched
again, so the idle worker runs them. When no batch is due yet, a timer (owned here) looks
again when the first will be.
"""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

from ..cluster.values import Failure
from ..pools.abstract import start_call
from ..pools.scheduler import overdue
from .futures import _report
from .records import _NO_KWARGS, _Task, _Worker
from .worker_side import _revoke


class _Stealer:
    """Taking back batches not started behind a long one."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.timer: threading.Timer | None = None     # (under the lock)

    def maybe_steal(self) -> None:
        """A worker fell idle with nothing pending: take back batches queued behind a long
        task on another worker (those not started yet), so the idle one runs them."""
        core = self.core
        now = time.perf_counter()
        est = core.dispatcher.pace.per_task
        later: float | None = None
        with core.lock:
            if core.tasks.pending or core.flags.broken or core.flags.terminating:
                return
            workers = core.staff.workers
            if not any(not w.load and w.pid is not None and not w.retiring and not w.unreachable
                       for w in workers):
                return
            victims: list[tuple[_Worker, int, list[int]]] = []
            for w in workers:
                pid = w.pid
                if pid is None or len(w.batches) < 2:
                    continue
                running = w.batches[0]
                due = overdue(running.sent, len(running.tasks), est)
                if now < due:
                    later = due if later is None else min(later, due)
                    continue
                seqs = [b.seq for b in list(w.batches)[1:] if not b.revoking]
                if seqs:
                    for b in list(w.batches)[1:]:
                        b.revoking = True
                    victims.append((w, pid, seqs))
            if not victims and later is not None and self.timer is None:
                self.timer = threading.Timer(later - now + 0.0005, self._on_timer)
                self.timer.daemon = True
                self.timer.start()
        for w, pid, seqs in victims:
            try:
                _, done = start_call(pid, _revoke, (core.key, seqs), _NO_KWARGS, keep=False)
            except Exception:
                continue
            done.add_callback(partial(self._revoked_safely, w))

    def cancel(self) -> None:
        """(Under the lock.) No more looks: the executor stops."""
        if self.timer is not None:
            self.timer.cancel()

    def _on_timer(self) -> None:
        with self.core.lock:
            self.timer = None
        self.maybe_steal()

    def _revoked_safely(self, w: _Worker, taken: Any) -> None:
        try:
            self._revoked(w, taken)
        except BaseException as e:
            _report(e)

    def _revoked(self, w: _Worker, taken: Any) -> None:
        core = self.core
        if type(taken) is Failure or not taken:
            with core.lock:
                for b in w.batches:
                    b.revoking = False
            return
        taken = set(taken)
        moved: list[_Task] = []
        with core.lock:
            if w.gone:
                return
            for b in list(w.batches):
                if b.seq in taken and not b.settled:
                    b.settled = True
                    w.batches.remove(b)
                    moved.extend(b.tasks)
                b.revoking = False
            w.take_back(len(moved), core.max_tasks)
            core.tasks.push_front(moved)
        core.dispatcher.dispatch()
