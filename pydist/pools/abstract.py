"""``AbstractWorkerPool``: the seven operations of a pool, and how a call runs on one.

A pool call (the pool variants of ``remotecall``, ``remotecall_fetch``, ``remotecall_wait``
and ``remote_do``) takes an idle worker, starts the call there with ``start_call`` and puts the
worker back once the call has finished there: a completion notice from the worker, not the
caller's fetch. A pool may send a stand-in for the function (``_prepare``/``_settle``: a
``CachingPool`` sends an id once the function is there); if the worker no longer has what
the stand-in refers to, the call is sent once more (``_forget``).

``start_call`` is also what ``pmap`` and the executors use to run a call with such a notice.
They hold several workers at once, taken with ``take_some``/``poll`` (never waiting; ``poll``
also says how many takers wait, so a holder can hand one over: ``scheduler.py``); a
subclass may answer them better than the defaults built on the seven operations.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from ..cluster.dispatch import run_call
from ..cluster.group import PGRP
from ..cluster.values import Failure, RemoteValue, unwrap
from ..cluster.waiting import wait_value
from ..refs.remoteref import Future
from ..wire.messages import CallFetchMsg, CallWaitMsg, MsgHeader
from .funccache import is_cache_miss


# -- starting a call with a completion notice -----------------------------------------------
def start_call(pid: int, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
           keep: bool) -> tuple[Future[Any] | None, RemoteValue]:
    """Start ``f(*args, **kwargs)`` on ``pid``; return ``(future, done)``.

    ``done`` is set once the call has finished there (or ``pid`` died): with the call's raw
    value (``keep=False``: nothing stays on ``pid``), or with ``None``/``Failure`` while the
    value stays in ``future``, held on ``pid`` (``keep=True``).
    """
    fut: Future[Any] | None
    if pid == PGRP.myid:
        done = RemoteValue()
        if keep:
            fut = Future()
            cell = fut.local_cell()

            def task() -> None:
                value = run_call(f, args, kwargs)
                cell.try_set(value)
                done.set(value if type(value) is Failure else None)
        else:
            fut = None

            def task() -> None:
                done.set(run_call(f, args, kwargs))
        PGRP.runner.submit(task)
        return fut, done
    PGRP.check_pid(pid)
    rrid, done = PGRP.expect_reply(pid)
    fut = Future.for_call(pid) if keep else None
    try:
        if fut is not None:
            PGRP.send(pid, MsgHeader(response_oid=fut.rrid, notify_oid=rrid), CallWaitMsg(f, args, kwargs))
        else:
            PGRP.send(pid, MsgHeader(notify_oid=rrid), CallFetchMsg(f, args, kwargs))
    except BaseException:
        if fut is not None:
            fut.mark_released()   # the worker never heard of it
        PGRP.forget_reply(rrid)
        raise
    return fut, done


def _run_and_report(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``remote_do`` through a pool: run for the effect, print a failure here."""
    value = run_call(f, args, kwargs)
    if type(value) is Failure:
        print(f"Error in remote_do on process {PGRP.myid}:\n{value.exc}", file=sys.stderr)



# -- the abstract pool ---------------------------------------------------------------------------
class AbstractWorkerPool(ABC):
    """A set of workers and a queue of the idle ones (Julia's ``AbstractWorkerPool``).

    Subclasses implement the seven operations; the pool variants of ``remotecall``,
    ``remotecall_fetch``, ``remotecall_wait`` and ``remote_do``, ``pmap`` and the drop-ins
    (``Executor(pool=...)``) work with any of them.
    """

    @abstractmethod
    def push(self, pid: int) -> AbstractWorkerPool:
        """Add worker ``pid`` to the pool (idle)."""

    @abstractmethod
    def put_back(self, pid: int) -> int:
        """Return a worker taken from the pool."""

    @abstractmethod
    def take(self, timeout: float | None = None) -> int:
        """An idle worker, marked busy; waits while none is free."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of workers in the pool."""

    @abstractmethod
    def isready(self) -> bool:
        """Whether ``take`` would return at once."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> AbstractWorkerPool:
        """Block until ``take`` would return at once."""

    @abstractmethod
    def workers(self) -> list[int]:
        """The ids of the pool's workers, ascending."""

    def __contains__(self, pid: object) -> bool:
        return pid in self.workers()

    # -- hooks used by the pool calls and pmap ------------------------------------------------
    def _prepare(self, f: Callable[..., Any], pid: int) -> tuple[Any, Any]:
        """What to send as the function to ``pid``, and a token for ``_settle``."""
        return f, None

    def _settle(self, token: Any, sent: bool) -> None:
        """Told whether the message prepared with ``token`` went out."""

    # -- taking several workers without waiting (pmap and the drop-ins) ----------------------
    def take_some(self, n: int) -> list[int]:
        """Up to ``n`` idle workers, marked busy, without waiting (never lends process 1);
        each goes back with ``put_back``."""
        out: list[int] = []
        while len(out) < n and len(self) > 0 and self.isready():
            try:
                out.append(self.take(timeout=0))
            except Exception:   # a subclass may say "empty" its own way (queue.Empty, ...)
                break
        return out

    def poll(self, n: int) -> tuple[list[int], int]:
        """Up to ``n`` idle workers (as ``take_some``; ``n`` may be 0), and how many takers
        wait for a worker of the pool (0 if the pool cannot tell): a user holding several
        workers hands one back while someone waits."""
        return self.take_some(n), 0

    def run_remotecall(self, kind: str, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one of the four remote calls (``kind``: ``"remotecall"``, ``"remotecall_fetch"``,
        ``"remotecall_wait"``, ``"remote_do"``) on a worker taken from this pool: the hook by
        which ``remotecall(f, pool, ...)`` and its kin reach a pool."""
        for attempt in (0, 1):
            pid = self.take()
            if pid == PGRP.myid and kind == "remotecall_fetch":
                try:                    # a call to this very process runs right here
                    return unwrap(run_call(f, args, kwargs))
                finally:
                    self.put_back(pid)
            try:
                g, token = self._prepare(f, pid)
            except BaseException:
                self.put_back(pid)
                raise
            try:
                if kind == "remote_do":
                    fut, done = start_call(pid, _run_and_report, (g, args, kwargs), {}, keep=False)
                else:
                    fut, done = start_call(pid, g, args, kwargs, keep=kind != "remotecall_fetch")
            except BaseException:
                self._settle(token, False)
                self.put_back(pid)
                raise
            self._settle(token, True)
            done.add_callback(_putter(self, pid))
            if kind == "remotecall":
                return fut
            if kind == "remote_do":
                return None
            value = wait_value(done, None, f"the call on process {pid}",
                               via=pid if pid != PGRP.myid else None)
            if attempt == 0 and is_cache_miss(value):
                self._forget(g, pid)
                continue    # the worker's cache was cleared meanwhile: ship the function again
            if kind == "remotecall_wait":
                unwrap(value)
                return fut
            return unwrap(value)
        raise AssertionError("unreachable")

    def _forget(self, g: Any, pid: int) -> None:
        """The worker ``pid`` no longer has what ``g`` refers to."""


def _putter(pool: AbstractWorkerPool, pid: int) -> Callable[[Any], None]:
    def put_back(_value: Any) -> None:
        try:
            pool.put_back(pid)
        except Exception:   # the pool's owner is gone: nothing to give back to
            pass
    return put_back

