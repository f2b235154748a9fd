"""Shipping a function once per worker (the master's side).

A function pickled by value (a lambda, a closure, a function of ``__main__``) can be large
and slow to pickle. ``_FnCache`` gives it an id; the first batch for a worker carries it
whole as a ``_Shipped`` (stored there by ``worker_side._fn_store``), later ones only the
id. The cache holds functions weakly: once one is garbage collected here, the ids to let
go are handed to the next dispatch (``take_dead``), which drops them on the workers.
"""
from __future__ import annotations

import collections
import itertools
import threading
import types
import weakref
from functools import partial
from typing import Any, Callable

from ..cluster.group import PGRP
from .mainscript import _MainRef
from .worker_side import _fn_lookup, _fn_store


class _Shipped:
    """A function on its way to a worker: whole the first time, by id afterwards."""

    __slots__ = ("key", "fid", "fn")

    def __init__(self, key: Any, fid: int, fn: Callable[..., Any] | None) -> None:
        self.key, self.fid, self.fn = key, fid, fn

    def __reduce__(self):
        if self.fn is not None:
            return (_fn_store, (self.key, self.fid, self.fn))
        return (_fn_lookup, (self.key, self.fid))


class _FnCache:
    """Which function was shipped under which id to which worker, holding functions weakly."""

    def __init__(self, key: Any, by_reference: bool = False) -> None:
        self.key = key
        self.by_reference = by_reference    # the workers run the main script as __mp_main__
        self.lock = threading.Lock()
        self.entries: dict[int, tuple[weakref.ref, int, set[int]]] = {}   # id(fn) -> (ref, fid, pids)
        self.fids = itertools.count(1)
        self.dead: list[tuple[int, set[int]]] = []

    @staticmethod
    def wanted(fn: Any) -> bool:
        """Worth caching: a function pickled by value (a lambda, a closure, from __main__)."""
        return isinstance(fn, types.FunctionType) and (
            fn.__module__ == "__main__" or "<" in fn.__qualname__)

    def prepare(self, fn: Any, pid: int) -> tuple[Any, Any]:
        """What to send as ``fn`` to ``pid``, and a token for ``sent``."""
        if not self.wanted(fn) or pid == PGRP.myid:
            return fn, None
        if self.by_reference and fn.__module__ == "__main__" and "<" not in fn.__qualname__:
            return _MainRef(fn.__qualname__), None
        with self.lock:
            entry = self.entries.get(id(fn))
            if entry is None or entry[0]() is not fn:
                entry = (weakref.ref(fn, partial(self._died, id(fn))), next(self.fids), set())
                self.entries[id(fn)] = entry
            ref, fid, pids = entry
            if pid in pids:
                return _Shipped(self.key, fid, None), None
        return _Shipped(self.key, fid, fn), (pids, pid)

    @staticmethod
    def sent(token: Any) -> None:
        if token is not None:
            pids, pid = token
            pids.add(pid)

    def _died(self, ident: int, ref: weakref.ref) -> None:
        with self.lock:
            entry = self.entries.get(ident)
            if entry is not None and entry[0] is ref:
                del self.entries[ident]
                if entry[2]:
                    self.dead.append((entry[1], entry[2]))

    def forget_worker(self, pid: int) -> None:
        with self.lock:
            for _, _, pids in self.entries.values():
                pids.discard(pid)

    def take_dead(self) -> dict[int, list[int]]:
        """Functions let go since the last call: pid -> fids to drop there."""
        with self.lock:
            dead, self.dead = self.dead, []
        out: dict[int, list[int]] = collections.defaultdict(list)
        for fid, pids in dead:
            for pid in pids:
                out[pid].append(fid)
        return out
