"""Remote references: ``Future`` and the owner-side operations behind them.

A ``Future`` names a write-once value that lives on process ``where``. The owner keeps it
in ``PGRP.refs`` with the set of processes that hold a reference (its clients), as
Julia's distributed reference counting does:

* creating a reference makes its creator a client;
* sending a reference to another process first registers that process as a client with
  the owner (``add_clients``);
* dropping the last handle in a process, or fetching the value (which is then cached in
  the handle), sends ``del_clients`` to the owner, batched;
* the owner frees the value when no client is left.

Each process keeps at most one handle per reference id (``_handles``), so that a
reference that travels back and forth is counted once per process.

``Future`` is generic in its value's type for type checkers: ``remotecall(f, ...)`` gives a
``Future[R]`` when ``f`` returns ``R``, and ``fetch`` of it an ``R``.
"""
from __future__ import annotations

import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn, Self, TypeVar, cast

from ..cluster.dispatch import OpContext, internal_op
from ..cluster.group import PGRP
from ..cluster.values import STORED, Failure, RemoteValue, check_timeout, unwrap
from ..cluster.waiting import call_on_owner, wait_value
from ..errors import InvalidStateException, ProcessExitedException
from ..wire.messages import RRID, CallFetchMsg, MsgHeader, RemoteDoMsg
from .stdfuture import StdFutureFace

__all__ = ["Future", "AbstractRemoteRef", "remoteref_id"]

T = TypeVar("T")

_UNSET: Any = object()
BATCH_WINDOW = 0.005   # seconds a del-client notice waits for others to the same owner
_handles: weakref.WeakValueDictionary[RRID, AbstractRemoteRef] = weakref.WeakValueDictionary()


# -- batched reference-count messages -------------------------------------------------------
class _ClientMessages:
    """Collects del-client notices and sends them to each owner in batches.

    ``release`` is on the path of every fetched Future, so it takes no lock: it appends to
    a deque (atomic) and wakes the sending thread only when no batch is due yet.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[int, RRID]] = deque()
        self._due = False              # the thread has been woken for what is pending
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the start of the thread
        self._thread: threading.Thread | None = None

    def release(self, where: int, rrid: RRID) -> None:
        if sys.is_finalizing():
            return      # the interpreter is going away, and every connection with it
        if self._thread is None:
            if where == PGRP.myid:
                PGRP.del_client(rrid, where)   # nothing to send: no thread needed
                return
            self._start()
        self._pending.append((where, rrid))
        if not self._due:   # later ones ride along: no wake-up (a thread switch) per notice
            self._due = True
            self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pydist-refs", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(BATCH_WINDOW)   # gather what the next calls release
            self._due = False          # (before taking the batch: a later notice wakes us again)
            self.flush()

    def flush(self) -> None:
        batches: dict[int, list[tuple[int, int]]] = {}
        pending = self._pending
        while pending:
            where, rrid = pending.popleft()
            batches.setdefault(where, []).append((rrid.whence, rrid.id))
        me = PGRP.myid
        for where, ids in batches.items():
            if where == me:
                PGRP.del_clients(ids, me)
                continue
            try:   # plain pairs of ints: they pickle and unpickle far faster than RRIDs
                PGRP.send(where, MsgHeader(), RemoteDoMsg(_del_clients, (ids, me), {}))
            except (ProcessExitedException, ValueError, OSError):
                pass   # the owner is gone, and its values with it


_client_msgs = _ClientMessages()


@internal_op
def _del_clients(ctx: OpContext, ids: list[tuple[int, int]], client: int) -> None:
    PGRP.del_clients(ids, client)


@internal_op
def _add_clients(ctx: OpContext, rrids: list[RRID], client: int) -> None:
    for r in rrids:
        PGRP.add_client(r, client)
    ctx.reply(None)


# -- owner-side operations on a Future's cell --------------------------------------------------
@internal_op
def _fetch_ref(ctx: OpContext, rrid: RRID) -> None:
    PGRP.lookup_ref(rrid).add_callback(ctx.reply)


@internal_op
def _wait_ref(ctx: OpContext, rrid: RRID) -> None:
    PGRP.lookup_ref(rrid).add_callback(
        lambda v: ctx.reply(v if type(v) is Failure else None))


@internal_op
def _isready_ref(ctx: OpContext, rrid: RRID) -> None:
    ctx.reply(PGRP.lookup_ref(rrid).ready())


@internal_op
def _put_ref(ctx: OpContext, rrid: RRID, value: Any) -> None:
    try:
        PGRP.lookup_ref(rrid).set(value)
    except InvalidStateException as e:
        ctx.reply(Failure(e))
        return
    ctx.reply(None)


# -- the handle --------------------------------------------------------------------------------
class AbstractRemoteRef:
    """Base of ``Future`` and ``RemoteChannel``: a reference id and an owner."""

    __slots__ = ("where", "rrid", "_released", "__weakref__")

    where: int
    rrid: RRID

    @classmethod
    def from_id(cls, where: int, rrid: RRID, *, counted: bool) -> Self:
        """A handle of this class for the reference ``rrid`` owned by process ``where``,
        made without ``__init__`` (nothing is created on the owner): the hook by which a
        kind of reference defined elsewhere (a worker pool's) rebuilds its handles.
        ``counted``: the owner counts this process among the reference's clients, so
        dropping the handle tells it (then ``register`` it); ``False``: dropping it tells
        nobody. A subclass with fields of its own sets those itself."""
        r = cls.__new__(cls)
        r.where, r.rrid, r._released = where, rrid, not counted
        return r

    @property
    def released(self) -> bool:
        """Whether this handle holds no claim on the owner (any more): released, its value
        cached here, or never counted. Dropping such a handle tells the owner nothing."""
        return self._released

    def mark_released(self) -> None:
        """Record that this handle holds no claim on its owner, without telling the owner:
        for a handle whose call was never sent (the owner never heard of it)."""
        self._released = True

    def register(self) -> Self:
        """Return the one handle of this process for ``rrid`` (this one if it is new);
        a handle that finds another already there is marked released."""
        existing = _handles.setdefault(self.rrid, self)
        if existing is not self:
            self._released = True
        return cast("Self", existing)   # an rrid names one reference, of one kind

    def _release(self) -> None:
        if not self._released:
            self._released = True
            _client_msgs.release(self.where, self.rrid)

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:   # interpreter shutdown: nothing left to notify
            pass

    def note_sent(self) -> None:
        """Called while pickling the handle (from ``__reduce__``, a subclass's too): make
        the destination a client of the owner first."""
        dest = getattr(PGRP.sending, "pid", None)
        if dest is None or dest == self.where:
            return
        if self.where == PGRP.myid:
            PGRP.add_client(self.rrid, dest)
        else:
            call_on_owner(_add_clients, self.where, [self.rrid], dest)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.rrid == self.rrid

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.rrid))


class Future(StdFutureFace[T], AbstractRemoteRef):
    """A write-once value living on process ``where`` (Julia's ``Future``).

    It is also a future in Python's sense (``stdfuture.py``): ``concurrent.futures.wait``
    and ``as_completed`` take it, mixed with standard futures, and asyncio awaits it.
    ``Future[T]``: a future whose value is a ``T`` (for type checkers; any value at run time).
    """

    __slots__ = ("_cache", "_watch", "_pushed")

    def __init__(self, pid: int | None = None) -> None:
        where = PGRP.myid if pid is None else pid
        PGRP.check_pid(where)
        self.where = where
        self.rrid = PGRP.next_rrid()
        self._cache: Any = _UNSET   # the value once known here (a Failure for a failed call)
        self._pushed: RemoteValue | None = None   # where a call's owner announces its result
        self._released = False
        self._watch = None
        if where == PGRP.myid:
            PGRP.lookup_ref(self.rrid)
        _handles[self.rrid] = self

    @classmethod
    def for_call(cls, pid: int, register: bool = True) -> Future[Any]:
        """A handle for the result of a call about to be sent to ``pid`` (the call's message
        names its ``rrid``): the hook by which remote calls and pools make their Futures.

        ``register=False``: not entered in ``_handles`` yet. No other process can name the
        reference before this one sends the handle somewhere, and ``__reduce__`` enters it
        then, so a Future fetched once and dropped never pays for the table."""
        f = cls.__new__(cls)
        f.where, f.rrid, f._cache, f._released = pid, PGRP.next_rrid(), _UNSET, False
        f._watch = None
        f._pushed = None
        if register:
            _handles[f.rrid] = f
        return f

    def __repr__(self) -> str:
        return f"Future({self.where}, {self.rrid.whence}, {self.rrid.id})"

    def local_cell(self) -> RemoteValue:
        """The cell holding the value of a Future owned by this process: setting the cell
        sets the Future. The hook by which code that computes the value here (a local call,
        a removal) fulfils it."""
        return PGRP.lookup_ref(self.rrid)

    def fetch(self, timeout: float | None = None) -> T:
        """The value (blocking until set); raises the call's ``RemoteException`` if it failed."""
        value: T = self._cache
        if value is _UNSET:
            if timeout is not None:
                check_timeout(timeout)
            if self.where == PGRP.myid:
                value = wait_value(self.local_cell(), timeout, self)
            else:
                value = self._announced(timeout)
                if value is STORED:
                    value = call_on_owner(_fetch_ref, self.where, self.rrid, timeout=timeout)
            self._cache = value
            if self.where != PGRP.myid and not self._released:
                self._released = True   # the value is cached here now
                _client_msgs.release(self.where, self.rrid)
        if type(value) is Failure:
            raise cast(Failure, value).exc
        return value

    def _announced(self, timeout: float | None) -> Any:
        """What the call's owner sent when the result was there: the result itself, or
        ``STORED`` (also when no announcement was asked for)."""
        pushed = self._pushed
        if pushed is None:
            return STORED
        value = wait_value(pushed, timeout, self, via=self.where)
        self._pushed = None
        return value

    def put(self, value: T) -> Future[T]:
        """Set the value; a Future can be set only once (``InvalidStateException``)."""
        if self._cache is not _UNSET:
            raise InvalidStateException(f"{self!r} can be set only once: it already holds a value")
        if self.where == PGRP.myid:
            self.local_cell().set(value)
        else:
            unwrap(call_on_owner(_put_ref, self.where, self.rrid, value))
        self._cache = value
        return self

    def isready(self) -> bool:
        """Whether the value is set (never blocks for the value itself)."""
        if self._cache is not _UNSET:
            return True
        if self.where == PGRP.myid:
            return self.local_cell().ready()
        if self._pushed is not None:
            return self._pushed.ready()
        return bool(unwrap(call_on_owner(_isready_ref, self.where, self.rrid)))

    def wait(self, timeout: float | None = None) -> Future[T]:
        """Block until the value is set; raises the call's ``RemoteException`` if it failed."""
        check_timeout(timeout)
        if self._cache is _UNSET:
            if self.where == PGRP.myid:
                unwrap(wait_value(self.local_cell(), timeout, f"{self!r}"))
            elif self._pushed is not None:
                value = self._announced(timeout)
                if value is not STORED:
                    self._cache = value
                    self._release()   # the value is cached here now
                unwrap(value)
            else:
                unwrap(call_on_owner(_wait_ref, self.where, self.rrid, timeout=timeout))
        else:
            unwrap(self._cache)
        return self

    def take(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Always a TypeError: a Future is fetched, not taken (``take`` is for channels)."""
        raise TypeError("take() is for channels; use fetch() on a Future")

    def _cached(self) -> bool:
        return self._cache is not _UNSET

    def _when_ready(self, cb: Callable[[bool], None]) -> None:
        """Call ``cb(failed)`` once the value is cached here (fetched from its owner)."""
        def arrived(value: Any) -> None:
            if self._cache is _UNSET:
                self._cache = value
                if self.where != PGRP.myid:
                    self._release()   # the value is cached here now
            cb(type(self._cache) is Failure)
        if self._cache is not _UNSET:
            arrived(self._cache)
        elif self.where == PGRP.myid:
            self.local_cell().add_callback(arrived)
        else:
            rrid, rv = PGRP.expect_reply(self.where)
            rv.add_callback(arrived)
            try:
                PGRP.send(self.where, MsgHeader(notify_oid=rrid),
                          CallFetchMsg(_fetch_ref, (self.rrid,), {}))
            except BaseException as e:   # the owner is gone: that is the outcome
                PGRP.forget_reply(rrid)
                rv.try_set(Failure(e))

    def __reduce__(self) -> tuple[Any, ...]:
        _handles.setdefault(self.rrid, self)   # (a call's handle enters the table only now)
        if self._cache is _UNSET:
            self.note_sent()
            return (_rebuild_future, (self.where, self.rrid, _UNSET_MARK))
        return (_rebuild_future, (self.where, self.rrid, self._cache))


class _UnsetMark:
    """Pickles to a marker meaning 'no cached value'."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unset_mark, ())


def _unset_mark() -> _UnsetMark:
    return _UNSET_MARK


_UNSET_MARK = _UnsetMark()


def _rebuild_future(where: int, rrid: RRID, cache: Any) -> Future[Any]:
    existing = _handles.get(rrid)
    if isinstance(existing, Future):
        if cache is not _UNSET_MARK and existing._cache is _UNSET:
            existing._cache = cache
        return existing
    f: Future[Any] = Future.__new__(Future)
    f.where, f.rrid, f._released, f._watch, f._pushed = where, rrid, False, None, None
    f._cache = _UNSET if cache is _UNSET_MARK else cache
    if f._cache is not _UNSET:
        f._released = True     # a handle with a value needs nothing from the owner
    elif where == PGRP.myid:
        PGRP.add_client(rrid, where)
    return f.register()


def remoteref_id(r: AbstractRemoteRef) -> RRID:
    """The ``RRID(whence, id)`` of a reference."""
    return r.rrid
