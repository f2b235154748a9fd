"""The function cache: ship a function to a worker once, then refer to it by a short id.

A ``FunctionCache`` is one process's record of what it shipped to which worker, under a
key (a ``CachingPool``'s id, or a single ``pmap``'s). The function travels as ``_Cached``,
which unpickles *on the worker's reader thread, while the message is decoded*: the first
time as a store into that worker's cache (``_cache_store``), later as a lookup in it
(``_cache_lookup``), so in-order delivery on a connection is all the bookkeeping needs. A lookup
that finds nothing (the cache was dropped meanwhile) fails with ``_CacheMiss``, and the
caller ships the function again. ``drop_caches`` tells workers to forget a key's functions.

The drop-ins ship through the same cache, made *weak*: only functions pickled by value,
held weakly, each dropped on the workers (``drop_dead``) once garbage collected here.
"""
from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Iterable
from functools import partial
from typing import Any

from ..cluster.dispatch import OpContext, internal_op
from ..cluster.group import PGRP
from ..cluster.values import Failure
from ..cluster.waiting import call_on_owner
from ..errors import ProcessExitedException, RemoteException
from ..wire.messages import NULL_HEADER, RRID, RemoteDoMsg
from ..wire.serialize import MainRef

__all__ = ["FunctionCache", "is_cache_miss", "drop_caches", "drop_later", "drop_dead", "by_value"]


# -- on each worker: the functions shipped to it -------------------------------------------------
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
def _cache_drop(ctx: OpContext, key: RRID, whence: int | None, forget_count: bool,
                fids: list[RRID] | None = None) -> None:
    """Forget the functions cached under ``key`` (those shipped by ``whence``, or only
    ``fids``, when given)."""
    with _cache_lock:
        fns = _cache.get(key, {})
        if fids is None:
            fids = [fid for fid in fns if whence is None or fid.whence == whence]
        for fid in fids:
            fns.pop(fid, None)
        if not fns:
            _cache.pop(key, None)
        if forget_count:
            _unpickled.pop(key, None)
    ctx.reply(None)


@internal_op
def _cache_info(ctx: OpContext, key: RRID) -> None:
    with _cache_lock:
        ctx.reply((_unpickled.get(key, 0), len(_cache.get(key, {}))))


# -- on the shipping side -----------------------------------------------------------------------
def is_cache_miss(value: Any) -> bool:
    """Whether a call's value says the worker no longer had the function (ship it again)."""
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

    def __reduce__(self) -> tuple[Any, ...]:
        if self.ship:
            return (_cache_store, (self.key, self.fid, self.f))
        return (_cache_lookup, (self.key, self.fid))


_SENT = object()      # in ``FunctionCache.sent``: shipped (a weak cache keeps no stand-in)


def by_value(f: Any) -> bool:
    """Whether ``f`` is a function pickled by value (a lambda, a closure, one of
    ``__main__``): the only kind worth caching when the rest travel by reference anyway."""
    return isinstance(f, types.FunctionType) and (f.__module__ == "__main__"
                                                  or "<" in f.__qualname__)


class FunctionCache:
    """This process's record of which function it shipped to which worker, under which id.

    A ``CachingPool``'s cache holds its functions until ``clear``. The drop-ins' caches
    are *weak* (``weak=True``): they cache only functions pickled by value, hold them
    weakly, and collect the ids of those garbage collected here (``take_dead``) for the
    workers to drop; with ``main_by_reference`` (workers that run the main script) a
    function of the script travels as a ``MainRef`` instead, never cached.
    """

    def __init__(self, key: RRID, *, weak: bool = False, main_by_reference: bool = False) -> None:
        self.key = key
        self.weak = weak
        self.main_by_reference = main_by_reference
        self.lock = threading.RLock()     # (a weak ref's callback may run inside it)
        self.fids: dict[int, tuple[Any, RRID]] = {}        # id(f) -> (f or a weak ref, fid)
        self.sent: dict[tuple[int, RRID], Any] = {}         # (pid, fid) -> stand-in, _SENT or Event
        self.dead: list[tuple[RRID, list[int]]] = []       # (fid, pids) let go (weak caches)

    def prepare(self, f: Any, pid: int) -> tuple[Any, Any]:
        """(what to send to ``pid`` as ``f``, token for ``settle``)."""
        if pid == PGRP.myid:
            return f, None
        if self.weak:
            if not by_value(f):
                return f, None
            if self.main_by_reference and f.__module__ == "__main__" and "<" not in f.__qualname__:
                return MainRef(f.__qualname__), None
        fid = self._fid(f)
        while True:
            with self.lock:
                s = self.sent.get((pid, fid))
                if s is None:
                    ev = threading.Event()
                    self.sent[(pid, fid)] = ev
                    return _Cached(self.key, fid, f, True), (pid, fid, ev, f)
                if s is _SENT:
                    return _Cached(self.key, fid, None, False), None
                if type(s) is _Cached:
                    return s, None
            s.wait(1.0)   # another thread is shipping it to pid right now

    def _fid(self, f: Any) -> RRID:
        with self.lock:
            entry = self.fids.get(id(f))
            if entry is not None and (not self.weak or entry[0]() is f):
                return entry[1]
            fid = PGRP.next_rrid()
            held = weakref.ref(f, partial(self._died, id(f))) if self.weak else f
            self.fids[id(f)] = (held, fid)
            return fid

    def _died(self, ident: int, ref: weakref.ref[Any]) -> None:
        """A weakly held function was garbage collected: its id is to be dropped."""
        with self.lock:
            entry = self.fids.get(ident)
            if entry is None or entry[0] is not ref:
                return
            del self.fids[ident]
            fid = entry[1]
            pids = [pid for pid, shipped in self.sent if shipped == fid]
            for pid in pids:
                del self.sent[(pid, fid)]
            if pids:
                self.dead.append((fid, pids))

    def settle(self, token: Any, sent: bool) -> None:
        if token is None:
            return
        pid, fid, ev, f = token
        with self.lock:
            if sent:
                self.sent[(pid, fid)] = _SENT if self.weak else _Cached(self.key, fid, f, False)
            else:
                self.sent.pop((pid, fid), None)
        ev.set()

    def forget(self, g: Any, pid: int) -> None:
        if type(g) is _Cached:
            with self.lock:
                self.sent.pop((pid, g.fid), None)

    def forget_worker(self, pid: int) -> None:
        """``pid`` is gone (or lost its cache): ship to it again should it come back."""
        with self.lock:
            for k in [k for k in self.sent if k[0] == pid]:
                del self.sent[k]

    def take_dead(self) -> dict[int, list[RRID]]:
        """Functions let go since the last call: pid -> ids to drop there."""
        with self.lock:
            dead, self.dead = self.dead, []
        out: dict[int, list[RRID]] = {}
        for fid, pids in dead:
            for pid in pids:
                out.setdefault(pid, []).append(fid)
        return out

    def shipped_to(self) -> set[int]:
        with self.lock:
            return {pid for pid, _ in self.sent}

    def reset(self) -> set[int]:
        with self.lock:
            pids = {pid for pid, _ in self.sent}
            self.fids.clear()
            self.sent.clear()
        return pids


# -- dropping what was shipped -------------------------------------------------------------------
def drop_caches(key: RRID, pids: Iterable[int], whence: int | None, final: bool,
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


def drop_later(key: RRID, cache: FunctionCache, whence: int) -> None:
    """A CachingPool handle was collected: free what it shipped (from a thread of its own)."""
    pids = cache.shipped_to()
    if pids:
        threading.Thread(target=drop_caches, args=(key, pids, whence, False, False),
                         daemon=True).start()



def drop_dead(cache: FunctionCache) -> None:
    """Tell the workers to drop the functions of a weak cache garbage collected here."""
    for pid, fids in cache.take_dead().items():
        try:
            PGRP.send(pid, NULL_HEADER, RemoteDoMsg(_cache_drop, (cache.key, None, False, fids), {}))
        except (ProcessExitedException, ValueError, OSError):
            pass   # gone, and its cache with it
