"""Worker pools: ``WorkerPool``, ``CachingPool``, ``default_worker_pool`` and ``remote``.

The model (the modules this one builds on say the rest):

* A ``WorkerPool`` is a *handle*. Its state lives on its owner, the process that created
  it (``poolstate``); the owner's handle uses that state directly. A pool passed to another
  process arrives there as a handle holding a reference to the state, counted like a
  Future's (the owner frees the state once no process holds the pool), and sends each
  operation to the owner as ``_pool_op``. Each process has one handle per pool.
* ``default_worker_pool()`` is owned by process 1 under a fixed id, so a worker reaches
  the master's pool without being told about it.
* A ``CachingPool`` ships a function to a worker once, under a short id (``funccache``);
  ``clear`` makes every worker forget them.
* A pool call runs as ``AbstractWorkerPool`` says (``abstract.py``); ``remote(f, pool)``
  is such a call waiting to happen.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..cluster.group import PGRP
from ..cluster.values import unwrap
from ..cluster.waiting import call_on_owner, wait_value
from ..refs.remoteref import AbstractRemoteRef
from ..wire.messages import NULL_HEADER, RRID, CallFetchMsg, MsgHeader, RemoteDoMsg
from .abstract import AbstractWorkerPool
from .funccache import FunctionCache, _cache_info, drop_caches, drop_later
from .poolstate import DEFAULT_POOL_ID, _check_pid, _default_state, _pool_op, _PoolState, _state, _Waiter

__all__ = ["AbstractWorkerPool", "WorkerPool", "CachingPool", "default_worker_pool", "clear",
           "remote"]


# -- WorkerPool ------------------------------------------------------------------------------------
class _PoolRef(AbstractRemoteRef):
    """The reference a pool handle holds to its state on the owner."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"_PoolRef({self.where}, {self.rrid.whence}, {self.rrid.id})"


_handles: weakref.WeakValueDictionary[RRID, WorkerPool] = weakref.WeakValueDictionary()


class WorkerPool(AbstractWorkerPool):
    """A pool of workers whose state lives on the process that created it; usable from
    any process it is passed to (Julia's ``WorkerPool``)."""

    def __init__(self, workers: Iterable[int] = ()) -> None:
        if isinstance(workers, (str, bytes)) or not isinstance(workers, Iterable):
            raise TypeError(f"a worker pool takes a list of worker ids, not {workers!r}")
        pids = [_check_pid(p) for p in workers]
        rrid = PGRP.next_rrid()
        st = _PoolState()
        st.push(pids)
        PGRP.lookup_ref(rrid).set(st)
        self._attach(_PoolRef.from_id(PGRP.myid, rrid, counted=True), st)

    def _init_handle(self) -> None:
        """Per-process parts of a handle (none here)."""

    def _attach(self, ref: _PoolRef, local: _PoolState | None) -> None:
        self._ref = ref.register() if not ref.released else ref
        self._local = local
        _handles[ref.rrid] = self

    @property
    def owner(self) -> int:
        """The process that holds the pool's state."""
        return self._ref.where

    def __repr__(self) -> str:
        what = "default pool" if self._ref.rrid == DEFAULT_POOL_ID else f"{self._ref.rrid.whence}:{self._ref.rrid.id}"
        return f"<{type(self).__name__} {what}, owned by process {self._ref.where}>"

    def __reduce__(self) -> tuple[Any, ...]:
        if self._ref.rrid == DEFAULT_POOL_ID:
            return (default_worker_pool, ())
        self._ref.note_sent()
        return (_rebuild_pool, (type(self), self._ref.where, self._ref.rrid))

    # -- talking to the owner ------------------------------------------------------------------
    def _remote(self, name: str, *args: Any) -> Any:
        return unwrap(call_on_owner(_pool_op, self._ref.where, self._ref.rrid, name, args))

    def _state(self) -> _PoolState | None:
        if self._local is None and self._ref.where == PGRP.myid:
            self._local = _state(self._ref.rrid)
        return self._local

    # -- the operations --------------------------------------------------------------------------
    def push(self, pid: int) -> WorkerPool:
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
        taken: int = waiter.value
        return taken

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
            rv.add_callback(self._back_if_handed)
            raise
        pid: int = unwrap(value)
        return pid

    def _back_if_handed(self, value: Any) -> None:
        if type(value) is int:
            self.put_back(value)

    def take_some(self, n: int) -> list[int]:
        st = self._state()
        if st is None:
            got: list[int] = self._remote("take_some", n)
            return got
        return st.take_some(n, PGRP.myid)

    def poll(self, n: int) -> tuple[list[int], int]:
        st = self._state()
        if st is None:
            got, waiting = self._remote("poll", n)
            return got, waiting
        return st.take_some(n, PGRP.myid), st.waiting()

    def __len__(self) -> int:
        st = self._state()
        return self._remote("len") if st is None else len(st.members)

    def isready(self) -> bool:
        st = self._state()
        return self._remote("isready") if st is None else st.ready()

    def wait(self, timeout: float | None = None) -> WorkerPool:
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


def _rebuild_pool(cls: type[WorkerPool], where: int, rrid: RRID) -> WorkerPool:
    """A pool arriving in this process: the one handle this process has for it."""
    existing = _handles.get(rrid)
    if existing is not None:
        return existing
    if where == PGRP.myid:
        PGRP.add_client(rrid, where)
    pool = cls.__new__(cls)
    pool._attach(_PoolRef.from_id(where, rrid, counted=True), None)
    pool._init_handle()
    return pool


# -- the default pool ------------------------------------------------------------------------------
_default_handle: WorkerPool | None = None
_default_handle_lock = threading.Lock()


def default_worker_pool() -> WorkerPool:
    """The pool of all workers, kept current by ``addprocs``/``rmprocs``; owned by
    process 1 (on a worker, this is the master's pool). With no worker it lends process 1."""
    global _default_handle
    h = _default_handle
    if h is None:
        with _default_handle_lock:
            if _default_handle is None:
                h = WorkerPool.__new__(WorkerPool)
                h._ref = _PoolRef.from_id(1, DEFAULT_POOL_ID, counted=False)
                h._local = None
                _default_handle = h
            h = _default_handle
    if PGRP.myid == 1 and h._local is None:
        h._local = _default_state()
    return h


# -- CachingPool -----------------------------------------------------------------------------------
class CachingPool(WorkerPool):
    """A WorkerPool that ships each function to each worker once: later calls refer to it
    by a short id, until ``clear(pool)`` (Julia's ``CachingPool``)."""

    def __init__(self, workers: Iterable[int] = ()) -> None:
        super().__init__(workers)
        self._init_handle()

    def _init_handle(self) -> None:
        self._fcache = self.make_function_cache(self._ref.rrid)
        if not self._fcache.weak:
            fin = weakref.finalize(self, drop_later, self._ref.rrid, self._fcache, PGRP.myid)
            fin.atexit = False

    def make_function_cache(self, key: RRID) -> FunctionCache:
        """The cache this handle ships functions through, under ``key`` (called once per
        handle). A subclass may return a weak one (``FunctionCache(key, weak=True)``),
        which drops each function on the workers once it is collected here."""
        return FunctionCache(key)

    @property
    def function_cache(self) -> FunctionCache:
        """What this process shipped to which worker of the pool (``pmap`` and the drop-ins
        ship through it too, so a function goes to each worker once)."""
        return self._fcache

    def _prepare(self, f: Callable[..., Any], pid: int) -> tuple[Any, Any]:
        return self._fcache.prepare(f, pid)

    def _settle(self, token: Any, sent: bool) -> None:
        self._fcache.settle(token, sent)

    def _forget(self, g: Any, pid: int) -> None:
        self._fcache.forget(g, pid)

    def _worker_cache_info(self, pid: int) -> tuple[int, int]:
        """(functions unpickled, functions held) in ``pid``'s cache for this pool."""
        info: tuple[int, int] = call_on_owner(_cache_info, pid, self._ref.rrid)
        return info


def clear(pool: CachingPool) -> CachingPool:
    """Drop every function cached for ``pool`` on every worker (Julia's ``clear!``)."""
    if not isinstance(pool, CachingPool):
        raise TypeError(f"clear() takes a CachingPool, not {type(pool).__name__}")
    pids = pool.function_cache.reset() | set(pool.workers())
    drop_caches(pool._ref.rrid, sorted(pids), None, False, True)
    return pool


# -- remote ------------------------------------------------------------------------------------------
class _Remote:
    """``remote(f, pool)``: calling it is ``remotecall_fetch(f, pool, ...)``."""

    __slots__ = ("f", "pool")

    def __init__(self, f: Callable[..., Any], pool: AbstractWorkerPool | None) -> None:
        self.f, self.pool = f, pool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pool = default_worker_pool() if self.pool is None else self.pool
        return pool.run_remotecall("remotecall_fetch", self.f, args, kwargs)

    def __repr__(self) -> str:
        return f"remote({self.f!r}, {self.pool!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Remote, (self.f, self.pool))


def remote(f: Callable[..., Any], pool: AbstractWorkerPool | None = None) -> Callable[..., Any]:
    """A callable whose call runs ``f`` on a worker of ``pool`` (default: the default
    pool, looked up at each call) and returns its value. Julia's ``remote(pool, f)``
    works too."""
    if isinstance(f, AbstractWorkerPool) and pool is not None and callable(pool):
        f, pool = pool, f
    if not callable(f):
        raise TypeError(f"remote() needs a callable, not {type(f).__name__}")
    if pool is not None and not isinstance(pool, AbstractWorkerPool):
        raise TypeError(f"remote() takes a worker pool, not {type(pool).__name__}")
    return _Remote(f, pool)
