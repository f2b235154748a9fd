"""The end of an executor: the part (``_Closer``) that stops it, and the only writer of
its lifecycle flags (``state._Flags``).

* ``shutdown`` takes no new tasks (``check_open``) and, unless told to cancel them,
  lets every submitted one finish; ``stop`` then removes the workers (and forgets what
  this executor left on workers it was only lent). ``abandon`` does the same for an
  executor garbage collected without ``shutdown``.
* ``break_``: the executor cannot go on (a worker could not start, an initializer
  failed): every unfinished task fails with ``BrokenProcessPool``. ``terminate`` (a
  ``Pool``'s) breaks it on purpose.
* At interpreter exit (``_at_exit``, before ``atexit`` functions, as the standard
  library's hook) every executor still in ``_live`` finishes its tasks; pools are
  terminated.
"""
from __future__ import annotations

import atexit
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..pools.funccache import drop_caches
from ..pools.stealing import drop_gate
from ..pools.workerpool import CachingPool
from ..processes.lifecycle import rmprocs
from ..refs.remotecall import remote_do
from .futures import _copy_exc, _settling

_global_shutdown = False
_live: weakref.WeakSet[Any] = weakref.WeakSet()    # every _Core not yet stopped


class _Closer:
    """Shutting down, stopping, breaking, terminating one executor."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.stop_lock = threading.Lock()
        self.stop_done = threading.Event()

    def check_open(self) -> None:
        flags = self.core.flags
        if flags.broken:
            raise self.broken_error()
        if flags.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def broken_error(self) -> BrokenProcessPool:
        """The error of a broken executor, caused by what broke it (as its tasks saw it)."""
        flags = self.core.flags
        exc = BrokenProcessPool(flags.broken or "the process pool is broken")
        exc.__cause__ = flags.broken_cause
        return exc

    # -- breaking and stopping -------------------------------------------------------------------
    def break_(self, why: str, cause: BaseException | None) -> None:
        """The executor cannot go on: every unfinished task fails, every worker goes."""
        core = self.core
        staff = core.staff
        with core.lock:
            if core.flags.broken:
                return
            # A copy without the traceback: its frames would hold this object (and the
            # executor, whose finalizer holds this object: a leak, not a cycle).
            core.flags.broken = why
            core.flags.broken_cause = None if cause is None else _copy_exc(cause)
            doomed = core.tasks.drain()
            owned, given = [], []
            for w in staff.workers:
                for b in list(w.batches) + list(w.outbox):
                    b.settled = True
                    doomed.extend(b.tasks)
                w.batches.clear()
                w.outbox.clear()
                w.gone = True
                if w.owned and w.pid is not None:
                    owned.append(w.pid)
                elif w.pid is not None:
                    given.append(w.pid)
            staff.workers.clear()
        exc = BrokenProcessPool(why)
        exc.__cause__ = cause
        core.fail_all(doomed, exc)
        if owned:
            staff.helper(rmprocs, *owned, waitfor=30)
        for pid in given:
            core.borrower.give_back(pid)
        with core.lock:
            core.changed.notify_all()

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        core = self.core
        with core.lock:
            core.flags.shutdown = True
            cancelled = core.tasks.cancel_unstarted() if cancel_futures else []
            feeds = list(core.feeds)
        for t in cancelled:
            t.sink.cancel()
        core.finished(len(cancelled))
        for feed in feeds:
            feed.at_shutdown(cancel_futures)
        if wait and not getattr(_settling, "active", False):
            self.stop()
        else:
            threading.Thread(target=self.stop, name="pydist-executor-stop", daemon=True).start()

    def stop(self) -> None:
        """Wait for every task, then remove the workers (idempotent)."""
        core = self.core
        staff = core.staff
        with self.stop_lock:
            with core.lock:
                while core.tasks.unfinished > 0 and not core.flags.broken:
                    core.changed.wait(0.1)
                    core.tasks.purge_cancelled()
                core.flags.stopped = True
                while staff.starter is not None:
                    core.changed.wait(0.1)
                owned = [w.pid for w in staff.workers if w.owned and w.pid is not None]
                given = [w.pid for w in staff.workers if not w.owned and w.pid is not None]
                for w in staff.workers:
                    w.gone = True
                staff.workers.clear()
                helpers = list(staff.helpers)
                core.stealer.cancel()
            if owned:
                try:
                    rmprocs(*owned, waitfor=30)
                except Exception:
                    pass
            if core.borrower is not None:
                core.borrower.join(35)
                self._forget_on(sorted(core.borrower.ever))
                for pid in given:
                    core.borrower.give_back(pid)
            else:
                core.fcache.reset()      # its workers are gone, and their caches with them
            for t in helpers:
                t.join(35)
            core.let_go_of_pool()
            _live.discard(core)
            self.stop_done.set()

    def _forget_on(self, pids: list[int]) -> None:
        """What this executor left on workers it was lent: its gate, and the functions of
        its private cache (a given CachingPool's stay until ``clear``)."""
        core = self.core
        for pid in pids:
            try:
                remote_do(drop_gate, pid, core.key)
            except Exception:
                pass
        if not isinstance(core.pool, CachingPool):
            drop_caches(core.fcache.key, core.fcache.reset(), None, True, False)

    def terminate(self, why: str) -> None:
        """Stop now (``Pool.terminate``): unfinished tasks fail, workers are removed."""
        core = self.core
        with core.lock:
            core.flags.shutdown = True
            core.flags.terminating = True
        self.break_(why, None)
        with core.lock:
            core.flags.stopped = True

    def abandon(self) -> None:
        """The executor was garbage collected without ``shutdown``: finish, then stop."""
        if not self.core.flags.stopped:
            self.shutdown(wait=False, cancel_futures=False)


def _at_exit() -> None:
    """At interpreter exit (before ``atexit`` functions, as the standard library's hook):
    no new tasks; executors still running finish theirs and remove their workers; pools
    are terminated."""
    global _global_shutdown
    _global_shutdown = True
    for core in list(_live):
        if core.flags.stopped or core.flags.terminating:
            continue
        try:
            if core.pool_mode:    # a Pool is terminated at exit, as multiprocessing does
                core.closer.terminate("the pool was terminated at interpreter exit")
            else:
                core.closer.shutdown(wait=True, cancel_futures=False)
        except Exception:
            pass


try:
    threading._register_atexit(_at_exit)     # type: ignore[attr-defined]  # the hook concurrent.futures uses
except (AttributeError, RuntimeError):
    atexit.register(_at_exit)
