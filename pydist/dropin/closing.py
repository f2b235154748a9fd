"""The end of an executor: the part of ``_Core`` (core.py) that stops it.

* ``shutdown_`` takes no new tasks (``check_open``) and, unless told to cancel them,
  lets every submitted one finish; ``stop`` then removes the workers (and forgets what
  this executor left on workers it was only lent). ``abandon`` does the same for an
  executor garbage collected without ``shutdown``.
* ``_break``: the executor cannot go on (a worker could not start, an initializer
  failed): every unfinished task fails with ``BrokenProcessPool``. ``terminate`` (a
  ``Pool``'s) breaks it on purpose.
* At interpreter exit (``_at_exit``, before ``atexit`` functions, as the standard
  library's hook) every executor still in ``_live`` finishes its tasks; pools are
  terminated.
"""
from __future__ import annotations

import atexit
import collections
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool

from ..processes.lifecycle import rmprocs
from ..refs.remotecall import remote_do
from .dispatching import _settling
from .futures import _copy_exc
from .records import _Task
from .worker_side import _fn_drop

_global_shutdown = False
_live: "weakref.WeakSet[_Closing]" = weakref.WeakSet()   # every core not yet stopped


class _Closing:
    """Part of ``_Core``: shutting down, stopping, breaking, terminating."""

    def check_open(self) -> None:
        if self.broken:
            raise self.broken_error()
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def broken_error(self) -> BrokenProcessPool:
        """The error of a broken executor, caused by what broke it (as its tasks saw it)."""
        exc = BrokenProcessPool(self.broken or "the process pool is broken")
        exc.__cause__ = self.broken_cause
        return exc

    # -- breaking and stopping -------------------------------------------------------------------
    def _break(self, why: str, cause: BaseException | None) -> None:
        """The executor cannot go on: every unfinished task fails, every worker goes."""
        with self.lock:
            if self.broken:
                return
            # A copy without the traceback: its frames would hold this object (and the
            # executor, whose finalizer holds this object: a leak, not a cycle).
            self.broken, self.broken_cause = why, None if cause is None else _copy_exc(cause)
            doomed = list(self.pending)
            self.pending.clear()
            owned = []
            for w in self.workers:
                for b in list(w.batches) + list(w.outbox):
                    b.settled = True
                    doomed.extend(b.tasks)
                w.batches.clear()
                w.outbox.clear()
                w.gone = True
                if w.owned and w.pid is not None:
                    owned.append(w.pid)
            self.workers.clear()
        exc = BrokenProcessPool(why)
        exc.__cause__ = cause
        self._settle_all(doomed, exc)
        if owned:
            self._helper(rmprocs, *owned, waitfor=30)
        with self.lock:
            self.changed.notify_all()

    def shutdown_(self, wait: bool, cancel_futures: bool) -> None:
        with self.lock:
            self.shutdown = True
            cancelled: list[_Task] = []
            if cancel_futures:
                keep = collections.deque()
                for t in self.pending:
                    if t.started:
                        keep.append(t)
                    else:
                        cancelled.append(t)
                self.pending = keep
            feeds = list(self.feeds)
        for t in cancelled:
            t.sink.cancel()
        self._finished(len(cancelled))
        for feed in feeds:
            feed.at_shutdown(cancel_futures)
        if wait and not getattr(_settling, "active", False):
            self.stop()
        else:
            threading.Thread(target=self.stop, name="pydist-executor-stop", daemon=True).start()

    def stop(self) -> None:
        """Wait for every task, then remove the workers (idempotent)."""
        with self.stop_lock:
            with self.lock:
                while self.unfinished > 0 and not self.broken:
                    self.changed.wait(0.1)
                    self._purge_cancelled()
                self.stopped = True
                while self.starter is not None:
                    self.changed.wait(0.1)
                owned = [w.pid for w in self.workers if w.owned and w.pid is not None]
                given = [w.pid for w in self.workers if not w.owned and w.pid is not None]
                for w in self.workers:
                    w.gone = True
                self.workers.clear()
                helpers = list(self.helpers)
                if self.steal_timer is not None:
                    self.steal_timer.cancel()
            if owned:
                try:
                    rmprocs(*owned, waitfor=30)
                except Exception:
                    pass
            for pid in given:
                try:
                    remote_do(_fn_drop, pid, self.key, None)
                except Exception:
                    pass
            for t in helpers:
                t.join(35)
            _live.discard(self)
            self.stop_done.set()

    def _purge_cancelled(self) -> None:
        """(Under the lock.) Drop pending tasks cancelled by their owners."""
        keep = collections.deque(t for t in self.pending if t.started or not t.sink.cancelled())
        gone = len(self.pending) - len(keep)
        if gone:
            for t in self.pending:
                if not t.started and t.sink.cancelled():
                    t.sink.set_running_or_notify_cancel()
            self.pending = keep
            self.unfinished -= gone

    def terminate(self, why: str) -> None:
        """Stop now (``Pool.terminate``): unfinished tasks fail, workers are removed."""
        with self.lock:
            self.shutdown = True
            self.terminating = True
        self._break(why, None)
        with self.lock:
            self.stopped = True

    def abandon(self) -> None:
        """The executor was garbage collected without ``shutdown``: finish, then stop."""
        if not self.stopped:
            self.shutdown_(wait=False, cancel_futures=False)


def _at_exit() -> None:
    """At interpreter exit (before ``atexit`` functions, as the standard library's hook):
    no new tasks; executors still running finish theirs and remove their workers; pools
    are terminated."""
    global _global_shutdown
    _global_shutdown = True
    for core in list(_live):
        if core.stopped or core.terminating:
            continue
        try:
            if core.pool_mode:    # a Pool is terminated at exit, as multiprocessing does
                core.terminate("the pool was terminated at interpreter exit")
            else:
                core.shutdown_(wait=True, cancel_futures=False)
        except Exception:
            pass


try:
    threading._register_atexit(_at_exit)     # type: ignore[attr-defined]
except (AttributeError, RuntimeError):
    atexit.register(_at_exit)
