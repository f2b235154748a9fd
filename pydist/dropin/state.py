"""An executor's state, in small objects each with one owner.

* ``_Flags``: where the executor is in its life, as loky's ``_ExecutorFlags``: written only
  by ``closing.py`` (``_Closer``), read by every part.
* ``_TaskQueue``: the tasks waiting for a worker and the count of those not finished
  (waiting, on a worker, or being answered); every change goes through its methods, under
  the executor's lock, and ``changed`` is notified when nothing is left unfinished.

The learnt timings are the dispatcher's ``Pace`` (``pools/scheduler.py``, shared with ``pmap``);
each worker's books are its record, a ``pools/scheduler.Slot``.

The worker records are the ``_Staff``'s (``staffing.py``), the borrowed workers the
``_Borrower``'s (``borrowing.py``).
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

from .records import _Task


class _Flags:
    """Where an executor is in its life (written by ``_Closer`` only)."""

    __slots__ = ("shutdown", "stopped", "terminating", "broken", "broken_cause")

    def __init__(self) -> None:
        self.shutdown = False            # no new tasks
        self.stopped = False             # every task done, the workers going
        self.terminating = False         # Pool.terminate: unfinished tasks fail
        self.broken: str | None = None   # why the executor cannot go on
        self.broken_cause: BaseException | None = None   # what broke it, for later raises

    def closed(self) -> bool:
        """Whether the executor takes on no more workers."""
        return bool(self.broken or self.terminating or self.stopped)


class _TaskQueue:
    """The tasks waiting for a worker, and how many are unfinished (under the lock)."""

    __slots__ = ("pending", "unfinished", "changed")

    def __init__(self, changed: threading.Condition) -> None:
        self.pending: collections.deque[_Task] = collections.deque()
        self.unfinished = 0
        self.changed = changed

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, tasks: Iterable[_Task]) -> None:
        """New tasks, at the back."""
        n = len(self.pending)
        self.pending.extend(tasks)
        self.unfinished += len(self.pending) - n

    def add_running(self) -> None:
        """A new task that went straight to a worker, never queued."""
        self.unfinished += 1

    def push_front(self, tasks: list[_Task], solo: bool = False) -> None:
        """Tasks back at the front, in order (``solo``: each to be sent alone)."""
        for t in tasks:
            t.solo = t.solo or solo
        self.pending.extendleft(reversed(tasks))

    def take(self, size: int) -> list[_Task]:
        """Up to ``size`` consecutive pending tasks of one function (cancelled ones dropped)."""
        tasks: list[_Task] = []
        pending = self.pending
        while pending and len(tasks) < size:
            t = pending[0]
            if tasks and (t.fn is not tasks[0].fn or t.solo):
                break
            pending.popleft()
            if not t.started:
                if not t.sink.set_running_or_notify_cancel():
                    self.unfinished -= 1
                    continue
                t.started = True
            tasks.append(t)
            if t.solo:
                break
        if self.unfinished == 0:
            self.changed.notify_all()
        return tasks

    def finished(self, n: int) -> None:
        """``n`` tasks have their outcome."""
        self.unfinished -= n
        if self.unfinished <= 0 and self.changed._waiters:   # type: ignore[attr-defined]  # Condition's own list
            self.changed.notify_all()                          # (skip the call when none wait)

    def drain(self) -> list[_Task]:
        """Every pending task, taken off the queue."""
        out = list(self.pending)
        self.pending.clear()
        return out

    def cancel_unstarted(self) -> list[_Task]:
        """Take off the tasks that never started (``shutdown(cancel_futures=True)``)."""
        keep: collections.deque[_Task] = collections.deque()
        cancelled: list[_Task] = []
        for t in self.pending:
            (keep if t.started else cancelled).append(t)
        self.pending = keep
        return cancelled

    def purge_cancelled(self) -> None:
        """Drop pending tasks cancelled by their owners."""
        keep = collections.deque(t for t in self.pending if t.started or not t.sink.cancelled())
        gone = len(self.pending) - len(keep)
        if gone:
            for t in self.pending:
                if not t.started and t.sink.cancelled():
                    t.sink.set_running_or_notify_cancel()
            self.pending = keep
            self.unfinished -= gone
