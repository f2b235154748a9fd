"""Worker pools: ``AbstractWorkerPool``, ``WorkerPool``, ``CachingPool``,
``default_worker_pool``, ``remote`` and the pool variants of the four remote calls.

The model:

* A ``WorkerPool``'s state (its member workers, the queue of idle ones, the takers waiting
  for one) lives on its *owner*, the process that created it, in the cell of a remote
  reference (``PGRP.refs``). A pool passed to another process arrives there as a handle
  holding that reference (counted like a Future's: the owner frees the state once no
  process holds the pool) and sends every operation to the owner as ``_pool_op``, an
  internal operation answered on the owner's reader thread without blocking: a ``take``
  that has to wait parks a *taker* that the next ``put_back``/``push`` hands a worker to.
* A worker handed out is *lent* to the taking process; if that process dies, its workers
  go back to the pool. A worker that dies leaves every pool of every process that hears of
  it (``PGRP.on_worker_lost``), and ``take`` skips workers known to be gone.
* ``default_worker_pool()`` is owned by process 1 under a fixed id, so a worker reaches
  the master's pool without being told about it. ``addprocs``/``rmprocs`` keep it current.
  When it has no member it lends process 1.
* A ``CachingPool`` ships a function to a worker once, under a short id; later calls
  carry only the id. The function travels as ``_Cached``, which unpickles *on the reader
  thread, while the message is decoded* into a store in (first time) or a lookup of (later)
  the worker's cache, so in-order delivery on a connection is all the bookkeeping needs.
* A pool call takes an idle worker, runs the call there and puts the worker back once the
  call has finished there (a completion notice, not the caller's fetch).
"""
from __future__ import annotations

import heapq
import itertools
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable, Iterable

from .cluster import PGRP, W_CONNECTED, W_TERMINATED, W_TERMINATING
from .control import on_workers_added
from .dispatch import OpContext, internal_op, run_call
from .errors import ProcessExitedException, RemoteException
from .messages import (NULL_HEADER, RRID, CallFetchMsg, CallWaitMsg, MsgHeader, RemoteDoMsg)
from .remoteref import AbstractRemoteRef, Future, call_on_owner, wait_value
from .values import Failure, RemoteValue, unwrap

__all__ = ["AbstractWorkerPool", "WorkerPool", "CachingPool", "default_worker_pool", "clear",
           "remote"]

DEFAULT_POOL_ID = RRID(1, 0)       # never handed out by next_rrid (ids start at 1)


# -- starting a call with a completion notice -----------------------------------------------
def _start(pid: int, f: Callable[..., Any], args: tuple, kwargs: dict,
           keep: bool) -> tuple[Future | None, RemoteValue]:
    """Start ``f(*args, **kwargs)`` on ``pid``; return ``(future, done)``.

    ``done`` is set once the call has finished there (or ``pid`` died): with the call's raw
    value (``keep=False``: nothing stays on ``pid``), or with ``None``/``Failure`` while the
    value stays in ``future``, held on ``pid`` (``keep=True``).
    """
    if pid == PGRP.myid:
        done = RemoteValue()
        if keep:
            fut = Future()
            cell = fut._local_cell()

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
    fut = Future._for_call(pid) if keep else None
    try:
        if fut is not None:
            PGRP.send(pid, MsgHeader(response_oid=fut.rrid, notify_oid=rrid), CallWaitMsg(f, args, kwargs))
        else:
            PGRP.send(pid, MsgHeader(notify_oid=rrid), CallFetchMsg(f, args, kwargs))
    except BaseException:
        if fut is not None:
            fut._released = True   # the worker never heard of it
        PGRP.forget_reply(rrid)
        raise
    return fut, done


def _run_and_report(f: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """``remote_do`` through a pool: run for the effect, print a failure here."""
    value = run_call(f, args, kwargs)
    if type(value) is Failure:
        print(f"Error in remote_do on process {PGRP.myid}:\n{value.exc}", file=sys.stderr)


def _alive(pid: int) -> bool:
    """Whether ``pid`` may still be handed out (not known to be gone or going)."""
    if pid == PGRP.myid:
        return True
    if pid in PGRP.removed:
        return False
    w = PGRP.workers.get(pid)
    if w is None:
        return PGRP.role == "worker"    # a peer this worker has not met yet
    return w.state not in (W_TERMINATING, W_TERMINATED)


# -- timed waits on the owner -------------------------------------------------------------------
class _Timers:
    """One thread running callbacks at deadlines (for takers and watchers that time out)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pydist-pool-timers",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        fn = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(self._heap[0][0] - now if self._heap else None)
            try:
                fn()
            except Exception:
                pass


_timers = _Timers()


class _Waiter:
    """Someone waiting on a pool: a taker (wants a worker) or a watcher (wants readiness)."""

    __slots__ = ("client", "_ctx", "_given", "value")

    def __init__(self, client: int, ctx: OpContext | None = None) -> None:
        self.client = client
        self._ctx = ctx
        self._given = threading.Event() if ctx is None else None
        self.value: Any = None

    def give(self, value: Any) -> None:
        """Hand over ``value`` (a pid, or ``None`` for a watcher); called outside pool locks."""
        if self._ctx is not None:
            self._ctx.reply(value)
        else:
            self.value = value
            self._given.set()       # type: ignore[union-attr]

    def wait(self, timeout: float | None) -> bool:
        """Whether something was handed over within ``timeout`` (may be called again)."""
        runner = PGRP._runner
        if runner is None:
            return self._given.wait(timeout)    # type: ignore[union-attr]
        with runner.blocking():
            return self._given.wait(timeout)    # type: ignore[union-attr]


# -- the owner's state --------------------------------------------------------------------------
class _PoolState:
    """Members, idle workers, waiting takers and watchers of one pool, on its owner."""

    def __init__(self, lends_master: bool = False) -> None:
        self.lock = threading.Lock()
        self.members: set[int] = set()
        self.idle: deque[int] = deque()
        self.takers: deque[_Waiter] = deque()
        self.watchers: list[_Waiter] = []
        self.lent: dict[int, int] = {}          # worker -> process that took it
        self.lends_master = lends_master
        _STATES.add(self)

    # Every method decides under the lock and hands over outside it.
    def _lending(self) -> bool:
        return self.lends_master and not self.members

    def _offer(self, pid: int, out: list) -> None:
        """Give ``pid`` to the first live taker, else make it idle (under the lock)."""
        while self.takers:
            w = self.takers.popleft()
            if w.client == PGRP.myid or w.client not in PGRP.removed:
                self.lent[pid] = w.client
                out.append((w, pid))
                return
        if pid not in self.idle:
            self.idle.append(pid)
        out.extend((w, None) for w in self.watchers)
        self.watchers.clear()

    def _lend_master_to_all(self, out: list) -> None:
        """The default pool just became empty: everyone waiting gets process 1."""
        out.extend((w, 1) for w in self.takers)
        out.extend((w, None) for w in self.watchers)
        self.takers.clear()
        self.watchers.clear()

    @staticmethod
    def _hand_over(out: list) -> None:
        for w, value in out:
            w.give(value)

    def push(self, pids: Iterable[int]) -> None:
        out: list = []
        with self.lock:
            for pid in pids:
                if pid not in self.members:
                    self.members.add(pid)
                    self._offer(pid, out)
        self._hand_over(out)

    def put_back(self, pid: int) -> None:
        out: list = []
        with self.lock:
            if self.lent.pop(pid, None) is None:
                return      # not taken from this pool (or already back): nothing to do
            if pid in self.members and pid not in self.idle:
                if _alive(pid):
                    self._offer(pid, out)
                else:
                    self._drop_locked(pid, out)
        self._hand_over(out)

    def _drop_locked(self, pid: int, out: list) -> None:
        self.members.discard(pid)
        self.lent.pop(pid, None)
        try:
            self.idle.remove(pid)
        except ValueError:
            pass
        if self._lending():
            self._lend_master_to_all(out)

    def drop(self, pid: int) -> None:
        """``pid`` died: it leaves the pool; workers lent to it come back."""
        out: list = []
        with self.lock:
            if pid in self.members:
                self._drop_locked(pid, out)
            self.takers = deque(w for w in self.takers if w.client != pid)
            self.watchers = [w for w in self.watchers if w.client != pid]
            for worker in [p for p, c in self.lent.items() if c == pid]:
                del self.lent[worker]
                if worker in self.members and _alive(worker):
                    self._offer(worker, out)
        self._hand_over(out)

    def _take_idle_locked(self, client: int) -> int | None:
        while self.idle:
            pid = self.idle.popleft()
            if _alive(pid):
                self.lent[pid] = client
                return pid
            self._drop_locked(pid, [])   # nobody can wait while a worker is idle
        return None

    def take(self, waiter: _Waiter, timeout: float | None) -> int | None:
        """A worker now, or ``None`` once ``waiter`` is parked (``TimeoutError`` if
        ``timeout`` is 0 and none is free)."""
        with self.lock:
            pid = self._take_idle_locked(waiter.client)
            if pid is not None:
                return pid
            if self._lending():
                return 1
            if timeout is not None and timeout <= 0:
                raise TimeoutError("no worker of the pool is free")
            self.takers.append(waiter)
        if timeout is not None:
            _timers.call_at(time.monotonic() + timeout, lambda: self._expire(waiter, timeout))
        return None

    def take_some(self, n: int, client: int) -> list[int]:
        """Up to ``n`` idle workers, without waiting and without lending process 1."""
        out = []
        with self.lock:
            while len(out) < n:
                pid = self._take_idle_locked(client)
                if pid is None:
                    break
                out.append(pid)
        return out

    def waiting(self) -> int:
        """How many takers wait for a worker."""
        with self.lock:
            return len(self.takers)

    def ready(self) -> bool:
        with self.lock:
            return bool(self.idle) or self._lending()

    def watch(self, waiter: _Waiter, timeout: float | None) -> bool:
        """True if ready now; else park ``waiter`` until it is (or ``timeout``)."""
        with self.lock:
            if self.idle or self._lending():
                return True
            if timeout is not None and timeout <= 0:
                raise TimeoutError("no worker of the pool became free")
            self.watchers.append(waiter)
        if timeout is not None:
            _timers.call_at(time.monotonic() + timeout, lambda: self._expire(waiter, timeout))
        return False

    def cancel(self, waiter: _Waiter) -> bool:
        """Withdraw a waiter; False if it was already handed something."""
        with self.lock:
            for queue in (self.takers, self.watchers):
                try:
                    queue.remove(waiter)   # type: ignore[arg-type]
                    return True
                except ValueError:
                    pass
        return False

    def _expire(self, waiter: _Waiter, timeout: float) -> None:
        if self.cancel(waiter) and waiter._ctx is not None:
            waiter._ctx.reply(Failure(TimeoutError(
                f"timed out after {timeout} s waiting for a worker of the pool")))

    def snapshot(self) -> list[int]:
        with self.lock:
            return sorted(self.members)


_STATES: "weakref.WeakSet[_PoolState]" = weakref.WeakSet()
_default_lock = threading.Lock()
_default: "_PoolState | None" = None


def _default_state() -> _PoolState:
    """The master's default pool state, made on first use from the connected workers."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                st = _PoolState(lends_master=True)
                with PGRP.lock:
                    pids = [p for p, w in PGRP.workers.items() if w.state == W_CONNECTED and p != 1]
                st.push(sorted(pids))
                _default = st
    return _default


def _state(rrid: RRID) -> _PoolState:
    """The state of pool ``rrid`` owned by this process."""
    if rrid == DEFAULT_POOL_ID and PGRP.myid == 1:
        return _default_state()
    cell = PGRP.lookup_ref(rrid, create=False)
    if cell is None or not cell.ready() or not isinstance(cell.value, _PoolState):
        raise ValueError(f"worker pool {rrid.whence}:{rrid.id} no longer exists on process {PGRP.myid}")
    return cell.value


def _check_pid(pid: Any) -> int:
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise TypeError(f"a pool holds worker ids (int), not {type(pid).__name__}")
    PGRP.check_pid(pid)
    return pid


@internal_op
def _pool_op(ctx: OpContext, rrid: RRID, name: str, args: tuple) -> None:
    """Every pool operation, run on the owner for another process."""
    try:
        st = _state(rrid)
        if name == "take":
            pid = st.take(_Waiter(ctx.sender, ctx), args[0])
            if pid is not None:
                ctx.reply(pid)
        elif name == "wait":
            if st.watch(_Waiter(ctx.sender, ctx), args[0]):
                ctx.reply(None)
        elif name == "put_back":
            st.put_back(args[0])
            ctx.reply(None)
        elif name == "push":
            st.push([_check_pid(args[0])])
            ctx.reply(None)
        elif name == "take_some":
            ctx.reply(st.take_some(args[0], ctx.sender))
        elif name == "poll":
            ctx.reply((st.take_some(args[0], ctx.sender), st.waiting()))
        elif name == "len":
            ctx.reply(len(st.members))
        elif name == "isready":
            ctx.reply(st.ready())
        elif name == "workers":
            ctx.reply(st.snapshot())
        else:
            raise ValueError(f"unknown pool operation {name!r}")
    except Exception as e:
        ctx.reply(Failure(e))


def _on_worker_lost(pid: int) -> None:
    for st in list(_STATES):
        st.drop(pid)


def _on_workers_added(pids: list[int]) -> None:
    if PGRP.myid == 1 and _default is not None:
        _default.push(pids)


PGRP.on_worker_lost.append(_on_worker_lost)
on_workers_added.append(_on_workers_added)


# -- the abstract pool ---------------------------------------------------------------------------
class AbstractWorkerPool(ABC):
    """A set of workers and a queue of the idle ones (Julia's ``AbstractWorkerPool``).

    Subclasses implement the seven operations; the pool variants of ``remotecall``,
    ``remotecall_fetch``, ``remotecall_wait`` and ``remote_do`` and ``pmap`` work with
    any of them.
    """

    @abstractmethod
    def push(self, pid: int) -> "AbstractWorkerPool":
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
    def wait(self, timeout: float | None = None) -> "AbstractWorkerPool":
        """Block until ``take`` would return at once."""

    @abstractmethod
    def workers(self) -> list[int]:
        """The ids of the pool's workers, ascending."""

    def __contains__(self, pid: object) -> bool:
        return pid in self.workers()

    # -- hooks used by remotecall and pmap ---------------------------------------------------
    def _prepare(self, f: Callable[..., Any], pid: int) -> tuple[Any, Any]:
        """What to send as the function to ``pid``, and a token for ``_settle``."""
        return f, None

    def _settle(self, token: Any, sent: bool) -> None:
        """Told whether the message prepared with ``token`` went out."""

    def _take_some(self, n: int) -> list[int]:
        """Up to ``n`` idle workers without waiting (never lends process 1)."""
        out: list[int] = []
        while len(out) < n and len(self) > 0 and self.isready():
            try:
                out.append(self.take(timeout=0))
            except Exception:   # a subclass may say "empty" its own way (queue.Empty, ...)
                break
        return out

    def _poll(self, n: int) -> tuple[list[int], int]:
        """Up to ``n`` idle workers (as ``_take_some``), and how many takers wait."""
        return self._take_some(n), 0

    def _remotecall_via(self, kind: str, f: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run one of the four remote calls on a worker taken from this pool."""
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
                    fut, done = _start(pid, _run_and_report, (g, args, kwargs), {}, keep=False)
                else:
                    fut, done = _start(pid, g, args, kwargs, keep=kind != "remotecall_fetch")
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
            if attempt == 0 and _is_cache_miss(value):
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


# -- WorkerPool ------------------------------------------------------------------------------------
class _PoolRef(AbstractRemoteRef):
    """The reference a pool handle holds to its state on the owner."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"_PoolRef({self.where}, {self.rrid.whence}, {self.rrid.id})"


def _new_ref(where: int, rrid: RRID, counted: bool) -> _PoolRef:
    r = _PoolRef.__new__(_PoolRef)
    r.where, r.rrid, r._released = where, rrid, not counted
    return r


_handles: "weakref.WeakValueDictionary[RRID, WorkerPool]" = weakref.WeakValueDictionary()


class WorkerPool(AbstractWorkerPool):
    """A pool of workers whose state lives on the process that created it; usable from
    any process it is passed to (Julia's ``WorkerPool``)."""

    def __init__(self, workers: Iterable[int] = ()) -> None:
        pids = [_check_pid(p) for p in workers]
        rrid = PGRP.next_rrid()
        st = _PoolState()
        st.push(pids)
        PGRP.lookup_ref(rrid).set(st)    # type: ignore[union-attr]
        self._attach(_new_ref(PGRP.myid, rrid, counted=True), st)

    def _init_handle(self) -> None:
        """Per-process parts of a handle (none here)."""

    def _attach(self, ref: _PoolRef, local: _PoolState | None) -> None:
        self._ref = ref._register() if not ref._released else ref
        self._local = local
        _handles[ref.rrid] = self

    @property
    def owner(self) -> int:
        """The process that holds the pool's state."""
        return self._ref.where

    def __repr__(self) -> str:
        what = "default pool" if self._ref.rrid == DEFAULT_POOL_ID else f"{self._ref.rrid.whence}:{self._ref.rrid.id}"
        return f"<{type(self).__name__} {what}, owned by process {self._ref.where}>"

    def __reduce__(self):
        if self._ref.rrid == DEFAULT_POOL_ID:
            return (default_worker_pool, ())
        self._ref._note_sent()
        return (_rebuild_pool, (type(self), self._ref.where, self._ref.rrid))

    # -- talking to the owner ------------------------------------------------------------------
    def _remote(self, name: str, *args: Any) -> Any:
        return unwrap(call_on_owner(_pool_op, self._ref.where, self._ref.rrid, name, args))

    def _state(self) -> _PoolState | None:
        if self._local is None and self._ref.where == PGRP.myid:
            self._local = _state(self._ref.rrid)
        return self._local

    # -- the operations --------------------------------------------------------------------------
    def push(self, pid: int) -> "WorkerPool":
        st = self._state()
        if st is None:
            self._remote("push", pid)
        else:
            st.push([_check_pid(pid)])
        return self

    def put_back(self, pid: int) -> int:
        st = self._state()
        if st is None:   # one way: later messages from here arrive after it
            PGRP.send(self._ref.where, NULL_HEADER,
                      RemoteDoMsg(_pool_op, (self._ref.rrid, "put_back", (pid,)), {}))
        else:
            st.put_back(pid)
        return pid

    def take(self, timeout: float | None = None) -> int:
        st = self._state()
        if st is None:
            return self._take_remote(timeout)
        waiter = _Waiter(PGRP.myid)
        pid = st.take(waiter, None)     # the timeout is kept here
        if pid is not None:
            return pid
        try:
            got = waiter.wait(timeout)
        except BaseException:           # interrupted: a worker handed over goes back
            if not st.cancel(waiter):
                waiter.wait(None)
                st.put_back(waiter.value)
            raise
        if not got:
            if st.cancel(waiter):
                raise TimeoutError(f"timed out after {timeout} s waiting for a worker of {self!r}")
            waiter.wait(None)           # handed a worker while giving up: keep it
        return waiter.value

    def _take_remote(self, timeout: float | None) -> int:
        """``take`` from the owner, which keeps the deadline."""
        where, rrid = self._ref.where, self._ref.rrid
        reply_id, rv = PGRP.expect_reply(where)
        try:
            PGRP.send(where, MsgHeader(notify_oid=reply_id),
                      CallFetchMsg(_pool_op, (rrid, "take", (timeout,)), {}))
        except BaseException:
            PGRP.forget_reply(reply_id)
            raise
        try:
            value = wait_value(rv, None, f"a worker of {self!r}", via=where)
        except BaseException:           # interrupted: a worker handed over later goes back
            rv.add_callback(lambda v: type(v) is int and self.put_back(v))
            raise
        return unwrap(value)

    def _take_some(self, n: int) -> list[int]:
        st = self._state()
        if st is None:
            return self._remote("take_some", n)
        return st.take_some(n, PGRP.myid)

    def _poll(self, n: int) -> tuple[list[int], int]:
        st = self._state()
        if st is None:
            return tuple(self._remote("poll", n))    # type: ignore[return-value]
        return st.take_some(n, PGRP.myid), st.waiting()

    def __len__(self) -> int:
        st = self._state()
        return self._remote("len") if st is None else len(st.members)

    def isready(self) -> bool:
        st = self._state()
        return self._remote("isready") if st is None else st.ready()

    def wait(self, timeout: float | None = None) -> "WorkerPool":
        st = self._state()
        if st is None:
            self._remote("wait", timeout)
            return self
        waiter = _Waiter(PGRP.myid)
        if st.watch(waiter, None):
            return self
        if not waiter.wait(timeout) and st.cancel(waiter):
            raise TimeoutError(f"timed out after {timeout} s waiting for a worker of {self!r}")
        return self

    def workers(self) -> list[int]:
        st = self._state()
        return self._remote("workers") if st is None else st.snapshot()

    def __contains__(self, pid: object) -> bool:
        st = self._state()
        if st is None:
            return pid in self._remote("workers")
        with st.lock:
            return pid in st.members


def _rebuild_pool(cls: type, where: int, rrid: RRID) -> WorkerPool:
    """A pool arriving in this process: the one handle this process has for it."""
    existing = _handles.get(rrid)
    if existing is not None:
        return existing
    if where == PGRP.myid:
        PGRP.add_client(rrid, where)
    pool = cls.__new__(cls)
    pool._attach(_new_ref(where, rrid, counted=True), None)
    pool._init_handle()
    return pool


_default_handle: WorkerPool | None = None


def default_worker_pool() -> WorkerPool:
    """The pool of all workers, kept current by ``addprocs``/``rmprocs``; owned by
    process 1 (on a worker, this is the master's pool). With no worker it lends process 1."""
    global _default_handle
    h = _default_handle
    if h is None:
        with _default_lock:
            if _default_handle is None:
                h = WorkerPool.__new__(WorkerPool)
                h._ref = _new_ref(1, DEFAULT_POOL_ID, counted=False)
                h._local = None
                _default_handle = h
            h = _default_handle
    if PGRP.myid == 1 and h._local is None:
        h._local = _default_state()
    return h


# -- CachingPool -----------------------------------------------------------------------------------
class _CacheMiss(LookupError):
    """A cached function was asked for that the worker no longer has (``clear`` ran)."""


_cache: dict[RRID, dict[RRID, Any]] = {}     # on each worker: pool key -> fid -> function
_unpickled: dict[RRID, int] = {}             # pool key -> functions unpickled here
_cache_lock = threading.Lock()


def _cache_store(key: RRID, fid: RRID, f: Any) -> Any:
    """Unpickling a shipped function: keep it for later references."""
    with _cache_lock:
        _cache.setdefault(key, {})[fid] = f
        _unpickled[key] = _unpickled.get(key, 0) + 1
    return f


def _cache_lookup(key: RRID, fid: RRID) -> Any:
    """Unpickling a reference to a shipped function."""
    try:
        return _cache[key][fid]
    except KeyError:
        raise _CacheMiss(f"process {PGRP.myid} has no function {fid.whence}:{fid.id} cached "
                         f"for pool {key.whence}:{key.id} (was the pool cleared?)") from None


@internal_op
def _cache_drop(ctx: OpContext, key: RRID, whence: int | None, forget_count: bool) -> None:
    with _cache_lock:
        fns = _cache.get(key, {})
        for fid in [fid for fid in fns if whence is None or fid.whence == whence]:
            del fns[fid]
        if not fns:
            _cache.pop(key, None)
        if forget_count:
            _unpickled.pop(key, None)
    ctx.reply(None)


@internal_op
def _cache_info(ctx: OpContext, key: RRID) -> None:
    with _cache_lock:
        ctx.reply((_unpickled.get(key, 0), len(_cache.get(key, {}))))


def _is_cache_miss(value: Any) -> bool:
    if type(value) is not Failure or not isinstance(value.exc, RemoteException):
        return False
    return isinstance(value.exc.captured.ex, _CacheMiss)


class _Cached:
    """A function on its way to a worker's cache: shipped whole once, then by id."""

    __slots__ = ("key", "fid", "f", "ship")

    def __init__(self, key: RRID, fid: RRID, f: Any, ship: bool) -> None:
        self.key, self.fid, self.f, self.ship = key, fid, f, ship

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.f(*args, **kwargs)

    def __reduce__(self):
        if self.ship:
            return (_cache_store, (self.key, self.fid, self.f))
        return (_cache_lookup, (self.key, self.fid))


class _FunctionCache:
    """This process's record of which function it shipped to which worker, under which id."""

    def __init__(self, key: RRID) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.fids: dict[int, tuple[Any, RRID]] = {}        # id(f) -> (f, fid); keeps f alive
        self.sent: dict[tuple[int, RRID], Any] = {}         # (pid, fid) -> _Cached ref or Event

    def prepare(self, f: Any, pid: int) -> tuple[Any, Any]:
        """(what to send to ``pid`` as ``f``, token for ``settle``)."""
        if pid == PGRP.myid:
            return f, None
        with self.lock:
            entry = self.fids.get(id(f))
            if entry is None:
                entry = self.fids[id(f)] = (f, PGRP.next_rrid())
        fid = entry[1]
        while True:
            with self.lock:
                s = self.sent.get((pid, fid))
                if s is None:
                    ev = threading.Event()
                    self.sent[(pid, fid)] = ev
                    return _Cached(self.key, fid, f, True), (pid, fid, ev, f)
                if type(s) is _Cached:
                    return s, None
            s.wait(1.0)   # another thread is shipping it to pid right now

    def settle(self, token: Any, sent: bool) -> None:
        if token is None:
            return
        pid, fid, ev, f = token
        with self.lock:
            if sent:
                self.sent[(pid, fid)] = _Cached(self.key, fid, f, False)
            else:
                self.sent.pop((pid, fid), None)
        ev.set()

    def forget(self, g: Any, pid: int) -> None:
        if type(g) is _Cached:
            with self.lock:
                self.sent.pop((pid, g.fid), None)

    def shipped_to(self) -> set[int]:
        with self.lock:
            return {pid for pid, _ in self.sent}

    def reset(self) -> set[int]:
        with self.lock:
            pids = {pid for pid, _ in self.sent}
            self.fids.clear()
            self.sent.clear()
        return pids


def _drop_caches(key: RRID, pids: Iterable[int], whence: int | None, final: bool,
                 wait: bool) -> None:
    """Tell each of ``pids`` to drop the functions cached under ``key``."""
    for pid in pids:
        if pid == PGRP.myid:
            _cache_drop(OpContext(pid, None), key, whence, final)
            continue
        try:
            if wait:
                call_on_owner(_cache_drop, pid, key, whence, final)
            else:
                PGRP.send(pid, NULL_HEADER, RemoteDoMsg(_cache_drop, (key, whence, final), {}))
        except (ProcessExitedException, ValueError, OSError):
            pass   # gone, and its cache with it


def _drop_later(key: RRID, cache: _FunctionCache, whence: int) -> None:
    """A CachingPool handle was collected: free what it shipped (from a thread of its own)."""
    pids = cache.shipped_to()
    if pids:
        threading.Thread(target=_drop_caches, args=(key, pids, whence, False, False),
                         daemon=True).start()


class CachingPool(WorkerPool):
    """A WorkerPool that ships each function to each worker once: later calls refer to it
    by a short id, until ``clear(pool)`` (Julia's ``CachingPool``)."""

    def __init__(self, workers: Iterable[int] = ()) -> None:
        super().__init__(workers)
        self._init_handle()

    def _init_handle(self) -> None:
        self._fcache = _FunctionCache(self._ref.rrid)
        fin = weakref.finalize(self, _drop_later, self._ref.rrid, self._fcache, PGRP.myid)
        fin.atexit = False

    def _prepare(self, f: Callable[..., Any], pid: int) -> tuple[Any, Any]:
        return self._fcache.prepare(f, pid)

    def _settle(self, token: Any, sent: bool) -> None:
        self._fcache.settle(token, sent)

    def _forget(self, g: Any, pid: int) -> None:
        self._fcache.forget(g, pid)

    def _worker_cache_info(self, pid: int) -> tuple[int, int]:
        """(functions unpickled, functions held) in ``pid``'s cache for this pool."""
        return call_on_owner(_cache_info, pid, self._ref.rrid)


def clear(pool: CachingPool) -> CachingPool:
    """Drop every function cached for ``pool`` on every worker (Julia's ``clear!``)."""
    if not isinstance(pool, CachingPool):
        raise TypeError(f"clear() takes a CachingPool, not {type(pool).__name__}")
    pids = pool._fcache.reset() | set(pool.workers())
    _drop_caches(pool._ref.rrid, sorted(pids), None, False, True)
    return pool


# -- remote ------------------------------------------------------------------------------------------
class _Remote:
    """``remote(f, pool)``: calling it is ``remotecall_fetch(f, pool, ...)``."""

    __slots__ = ("f", "pool")

    def __init__(self, f: Callable[..., Any], pool: AbstractWorkerPool | None) -> None:
        self.f, self.pool = f, pool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pool = default_worker_pool() if self.pool is None else self.pool
        return pool._remotecall_via("remotecall_fetch", self.f, args, kwargs)

    def __repr__(self) -> str:
        return f"remote({self.f!r}, {self.pool!r})"

    def __reduce__(self):
        return (_Remote, (self.f, self.pool))


def remote(f: Callable[..., Any], pool: AbstractWorkerPool | None = None) -> Callable[..., Any]:
    """A callable whose call runs ``f`` on a worker of ``pool`` (default: the default
    pool, looked up at each call) and returns its value."""
    if not callable(f):
        raise TypeError(f"remote() needs a callable, not {type(f).__name__}")
    if pool is not None and not isinstance(pool, AbstractWorkerPool):
        raise TypeError(f"remote() takes a worker pool, not {type(pool).__name__}")
    return _Remote(f, pool)
