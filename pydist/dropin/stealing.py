"""Work stealing: the part of ``_Core`` (core.py) that takes back queued tasks.

A worker may hold several batches; the oldest runs, the others wait behind it. When a
worker falls idle with nothing pending, batches waiting behind one that has run well past
its estimate are asked back (``_revoke`` on that worker); those that had not started are
taken off its books and dispatched again, so the idle worker runs them. When no batch is
due yet, a timer looks again when the first will be.
"""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

from ..cluster.values import Failure
from ..pools.abstract import start_call
from .futures import _report
from .records import _NO_KWARGS, _Task, _Worker
from .worker_side import _revoke

STEAL_AFTER = 0.005      # a batch running this long (and well past its estimate) may be stolen from


class _Stealing:
    """Part of ``_Core``: taking back batches not started behind a long one."""

    def _maybe_steal(self) -> None:
        """A worker fell idle with nothing pending: take back batches queued behind a long
        task on another worker (those not started yet), so the idle one runs them."""
        now = time.perf_counter()
        est = self.est or 0.0
        later: float | None = None
        with self.lock:
            if self.pending or self.broken or self.terminating:
                return
            if not any(not w.ntasks and w.pid is not None and not w.retiring and not w.unreachable
                       for w in self.workers):
                return
            victims = []
            for w in self.workers:
                if w.pid is None or len(w.batches) < 2:
                    continue
                running = w.batches[0]
                due = running.sent + max(STEAL_AFTER, 4 * est * len(running.tasks))
                if now < due:
                    later = due if later is None else min(later, due)
                    continue
                seqs = [b.seq for b in list(w.batches)[1:] if not b.revoking]
                if seqs:
                    for b in list(w.batches)[1:]:
                        b.revoking = True
                    victims.append((w, seqs))
            if not victims and later is not None and self.steal_timer is None:
                self.steal_timer = threading.Timer(later - now + 0.0005, self._steal_timer)
                self.steal_timer.daemon = True
                self.steal_timer.start()
        for w, seqs in victims:
            try:
                _, done = start_call(w.pid, _revoke, (self.key, seqs), _NO_KWARGS, keep=False)  # type: ignore[arg-type]
            except Exception:
                continue
            done.add_callback(partial(self._revoked_safely, w))

    def _steal_timer(self) -> None:
        with self.lock:
            self.steal_timer = None
        self._maybe_steal()

    def _revoked_safely(self, w: _Worker, taken: Any) -> None:
        try:
            self._revoked(w, taken)
        except BaseException as e:
            _report(e)

    def _revoked(self, w: _Worker, taken: Any) -> None:
        if type(taken) is Failure or not taken:
            with self.lock:
                for b in w.batches:
                    b.revoking = False
            return
        taken = set(taken)
        moved: list[_Task] = []
        with self.lock:
            if w.gone:
                return
            for b in list(w.batches):
                if b.seq in taken and not b.settled:
                    b.settled = True
                    w.batches.remove(b)
                    w.ntasks -= len(b.tasks)
                    w.assigned -= len(b.tasks)
                    moved.extend(b.tasks)
                b.revoking = False
            if self.max_tasks is not None and w.assigned < self.max_tasks:
                w.retiring = False
            self.pending.extendleft(reversed(moved))
        self.dispatch()
