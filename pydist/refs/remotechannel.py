"""``RemoteChannel``: a channel that lives on one process, used from every process it reaches.

The owner keeps the channel in ``PGRP.refs`` (a ``_ChannelRef``: the channel and its
clients). Every operation of a handle elsewhere is an internal operation on the owner
(``_chan_put``, ``_chan_take``, ...), run by its reader thread through the channel's
callback interface, so the reader never blocks; a channel made by a user's factory has
blocking methods, so its operations run on a runner thread instead (``_SyncAdapter``).
A remote ``take`` with a timeout is timed by the owner: an item is either delivered or
stays in the channel.
"""
from __future__ import annotations

from typing import Any

from ..cluster.dispatch import OpContext, internal_op
from ..cluster.group import PGRP
from ..cluster.values import Failure, RemoteValue, check_timeout, unwrap
from ..cluster.waiting import call_on_owner, wait_value
from ..wire.messages import RRID
from .channel import Channel
from .remotecall import remotecall_wait
from .remoteref import AbstractRemoteRef, _handles

__all__ = ["RemoteChannel", "channel_from_id"]


class _ChannelRef:
    """What the owner keeps for a RemoteChannel: the channel and its clients."""

    __slots__ = ("channel", "clients")

    def __init__(self, channel: Any, client: int) -> None:
        self.channel = channel
        self.clients = {client}


def _make_channel(rrid: RRID, factory: Any) -> None:
    """On the owner: create the channel behind ``rrid`` (runs as a call: may run user code)."""
    chan = Channel(1) if factory is None else factory()
    for attr in ("put", "take", "fetch", "isready"):
        if not callable(getattr(chan, attr, None)):
            raise TypeError(f"a RemoteChannel factory must return a channel (with put, take, fetch, "
                            f"isready), not {type(chan).__name__}")
    with PGRP.lock:
        PGRP.refs[rrid] = _ChannelRef(chan, rrid.whence)   # type: ignore[assignment]  # refs is typed for Futures


def channel_from_id(rrid: RRID) -> Any:
    """The channel object behind a RemoteChannel's id, on its owner process."""
    ref = PGRP.refs.get(rrid)
    if not isinstance(ref, _ChannelRef):
        raise ValueError(f"no channel with id {rrid} lives on process {PGRP.myid}")
    return ref.channel


def _channel_op(ctx: OpContext, rrid: RRID, run: Any) -> None:
    """Apply ``run(channel, reply)`` to the owner's channel, answering errors as failures."""
    try:
        chan = channel_from_id(rrid)
    except ValueError as e:
        ctx.reply(Failure(e))
        return
    if isinstance(chan, Channel):
        run(chan, ctx.reply)
        return

    def blocking() -> None:   # a user-made channel: its methods may block, so use a runner
        try:
            run(_SyncAdapter(chan), ctx.reply)
        except BaseException as e:
            ctx.reply(Failure(e))
    PGRP.runner.submit(blocking)


class _SyncAdapter:
    """Gives a user channel with blocking methods the callback interface."""

    def __init__(self, chan: Any) -> None:
        self.chan = chan

    def _call(self, cb: Any, fn: Any, *args: Any) -> None:
        try:
            cb(fn(*args))
        except BaseException as e:
            cb(Failure(e))

    def put_async(self, value: Any, cb: Any, timeout: float | None = None) -> None:
        self._call(lambda _v: cb(None) if type(_v) is not Failure else cb(_v), self.chan.put, value)

    def take_async(self, cb: Any, timeout: float | None = None) -> None:
        self._call(cb, self.chan.take)

    def fetch_async(self, cb: Any, timeout: float | None = None, *, peek: bool = True) -> None:
        self._call(cb if peek else (lambda v: cb(v if type(v) is Failure else None)), self.chan.fetch)

    def isready(self) -> bool:
        return bool(self.chan.isready())

    def close(self) -> None:
        self.chan.close()


@internal_op
def _chan_put(ctx: OpContext, rrid: RRID, value: Any, timeout: float | None) -> None:
    _channel_op(ctx, rrid, lambda ch, cb: ch.put_async(value, cb, timeout))


@internal_op
def _chan_take(ctx: OpContext, rrid: RRID, timeout: float | None) -> None:
    _channel_op(ctx, rrid, lambda ch, cb: ch.take_async(cb, timeout))


@internal_op
def _chan_fetch(ctx: OpContext, rrid: RRID, timeout: float | None, peek: bool) -> None:
    _channel_op(ctx, rrid, lambda ch, cb: ch.fetch_async(cb, timeout, peek=peek))


@internal_op
def _chan_isready(ctx: OpContext, rrid: RRID) -> None:
    _channel_op(ctx, rrid, lambda ch, cb: cb(ch.isready()))


@internal_op
def _chan_close(ctx: OpContext, rrid: RRID) -> None:
    _channel_op(ctx, rrid, lambda ch, cb: (ch.close(), cb(None)))


@internal_op
def _new_channel(ctx: OpContext, rrid: RRID) -> None:
    """On the owner: the default ``Channel(1)``, made at once by the reader, as the other
    owner-side bookkeeping is (it never waits behind a call the owner is running)."""
    _make_channel(rrid, None)
    ctx.reply(None)


class RemoteChannel(AbstractRemoteRef):
    """A channel living on process ``where``; usable from every process it reaches.

    ``RemoteChannel(pid)`` (an int first) is Julia's shape for ``RemoteChannel(pid=pid)``.
    The default channel is made at once even on a busy owner; a ``factory`` is user code
    and runs as a call there (after the calls the owner is running).
    """

    __slots__ = ()

    def __init__(self, factory: Any = None, pid: int | None = None) -> None:
        if pid is None and isinstance(factory, int) and not isinstance(factory, bool):
            factory, pid = None, factory
        if factory is not None and not callable(factory):
            raise TypeError(f"RemoteChannel(factory, pid): factory must be callable (returning a "
                            f"channel) or None, not {factory!r}; for the owner, pass pid=")
        where = PGRP.myid if pid is None else pid
        PGRP.check_pid(where, "pid")
        self.where, self.rrid, self._released = where, PGRP.next_rrid(), True
        if where == PGRP.myid:
            _make_channel(self.rrid, factory)
        elif factory is None:
            unwrap(call_on_owner(_new_channel, where, self.rrid))
        else:
            remotecall_wait(_make_channel, where, self.rrid, factory)
        self._released = False
        _handles[self.rrid] = self

    def __repr__(self) -> str:
        return f"RemoteChannel({self.where}, {self.rrid.whence}, {self.rrid.id})"

    def _op(self, op: Any, *args: Any) -> Any:
        if self.where == PGRP.myid:
            box: RemoteValue = RemoteValue()
            op(OpContext(PGRP.myid, None, box.set), self.rrid, *args)
            return unwrap(wait_value(box, None, f"{self!r}"))
        return unwrap(call_on_owner(op, self.where, self.rrid, *args))

    def put(self, value: Any, timeout: float | None = None) -> RemoteChannel:
        """Append ``value`` (blocking while full; for ``Channel(0)``, until taken)."""
        check_timeout(timeout)
        self._op(_chan_put, value, timeout)
        return self

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return the oldest item (blocking while empty)."""
        check_timeout(timeout)
        return self._op(_chan_take, timeout)

    def fetch(self, timeout: float | None = None) -> Any:
        """The oldest item, not removed (blocking while empty)."""
        check_timeout(timeout)
        return self._op(_chan_fetch, timeout, True)

    def wait(self, timeout: float | None = None) -> RemoteChannel:
        """Block until an item is there."""
        check_timeout(timeout)
        self._op(_chan_fetch, timeout, False)
        return self

    def isready(self) -> bool:
        """Whether an item can be taken now."""
        return bool(self._op(_chan_isready))

    def close(self) -> None:
        """Close the channel (idempotent)."""
        self._op(_chan_close)

    def __reduce__(self) -> tuple[Any, ...]:
        self.note_sent()
        return (_rebuild_channel, (self.where, self.rrid))


def _rebuild_channel(where: int, rrid: RRID) -> RemoteChannel:
    existing = _handles.get(rrid)
    if isinstance(existing, RemoteChannel):
        return existing
    rc = RemoteChannel.__new__(RemoteChannel)
    rc.where, rc.rrid, rc._released = where, rrid, False
    if where == PGRP.myid:
        PGRP.add_client(rrid, where)
    return rc.register()
