"""Work stealing for an executor: the part (``_Stealer``) that decides when to look.

A worker may hold several batches; the oldest runs, the others wait behind it. How they
are taken back is the pools' (``pools/stealing.py``: the gate on the worker, when a
running batch is overdue, asking back, taking off the books). What is the executor's:
when to look (a worker fell idle with nothing pending, or a timer, owned here, set for
when the first batch will be due), and what becomes of the tasks taken back (the front
of the queue, dispatched again, so the idle worker runs them).
"""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

from ..pools.stealing import ask_back, due, taken_back
from .futures import _report
from .records import _Worker


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
        per_task = core.dispatcher.pace.per_task
        with core.lock:
            if core.tasks.pending or core.flags.broken or core.flags.terminating:
                return
            workers: list[_Worker] = core.staff.workers
            if not any(not w.load and w.pid is not None and not w.retiring and not w.unreachable
                       for w in workers):
                return
            victims, later = due(((w, w.batches) for w in workers), now, per_task)
            if not victims and later is not None and self.timer is None:
                self.timer = threading.Timer(later - now + 0.0005, self._on_timer)
                self.timer.daemon = True
                self.timer.start()
        for w, pid, seqs in victims:
            ask_back(pid, core.key, seqs, partial(self._revoked_safely, w))

    def cancel(self) -> None:
        """(Under the lock.) No more looks: the executor stops."""
        if self.timer is not None:
            self.timer.cancel()

    def _on_timer(self) -> None:
        with self.core.lock:
            self.timer = None
        self.maybe_steal()

    def _revoked_safely(self, w: _Worker, answer: Any) -> None:
        try:
            self._revoked(w, answer)
        except BaseException as e:
            _report(e)

    def _revoked(self, w: _Worker, answer: Any) -> None:
        """The worker's answer: the batches it gave back go to the front of the queue."""
        core = self.core
        with core.lock:
            moved = taken_back(w, w.batches, answer, core.max_tasks)
            if moved is None:
                return
            core.tasks.push_front([t for b in moved for t in b.tasks])
        core.dispatcher.dispatch()
