"""One handler per message kind, and ``read_one`` that feeds them (Julia's
``process_messages.jl``).

Whoever holds a connection's read role (``inbox.py``) calls ``read_one``. Handlers never
block: user calls go to the process's ``TaskRunner``; pydist's own small operations (reference
bookkeeping, fetches answered by callback, exit and interrupt requests) are marked with
``@internal_op`` and run right on the reader thread, so they are answered even while every
runner is busy.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

from ..errors import (
    BodyDecodeError,
    CapturedException,
    DecodeError,
    ProcessExitedException,
    RemoteException,
    SerializationError,
    TransportBroken,
    TransportClosed,
)
from ..wire.codec import decode_message
from ..wire.messages import (
    NULL_HEADER,
    NULL_RRID,
    RRID,
    CallFetchMsg,
    CallMsg,
    CallWaitMsg,
    MsgHeader,
    RemoteDoMsg,
    ResultMsg,
)
from .group import PGRP
from .inbox import Inbox
from .peers import W_TERMINATED, Worker
from .values import STORED, Failure, pushable

__all__ = ["read_one", "start_serving", "internal_op", "OpContext", "run_call", "capture", "reply"]


# -- running user code -------------------------------------------------------------
def capture(exc: BaseException, pid: int | None = None) -> RemoteException:
    """Wrap an exception of user code run here (never wrapping a RemoteException twice)."""
    if isinstance(exc, RemoteException):
        return exc
    tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    return RemoteException(PGRP.myid if pid is None else pid, CapturedException(exc, tb))


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without its leading frames of pydist itself (what ran the user's code), so a
    remote traceback starts in the user's code; all of it if it never reaches user code."""
    first = tb
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    return first if tb is None else tb


def run_call(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run user code; its value, or a ``Failure`` carrying a ``RemoteException``."""
    runner = PGRP._runner
    try:
        if runner is None:
            return f(*args, **kwargs)
        runner.enter_call()
        try:
            return f(*args, **kwargs)
        finally:
            runner.exit_call()
    except BaseException as e:  # KeyboardInterrupt and SystemExit are the call's failure too
        return Failure(capture(e))


def reply(pid: int, rrid: RRID, value: Any) -> None:
    """Send ``value`` to ``pid`` as the answer to ``rrid``; a value that cannot be pickled
    is answered with a RemoteException saying so. A dead receiver is ignored."""
    header = MsgHeader(response_oid=rrid)
    try:
        try:
            PGRP.send(pid, header, ResultMsg(value))
        except (SerializationError, SystemExit) as e:   # SystemExit: from a __reduce__
            PGRP.send(pid, header, ResultMsg(Failure(capture(e))))
    except (ProcessExitedException, ValueError):
        pass


# -- pydist's own operations ---------------------------------------------------------
class OpContext:
    """What an internal operation knows of the message that asked for it.

    ``local`` replaces the reply message when the operation runs in the calling process.
    """

    __slots__ = ("sender", "rrid", "local")

    def __init__(self, sender: int, rrid: RRID | None,
                 local: Callable[[Any], None] | None = None) -> None:
        self.sender = sender
        self.rrid = rrid
        self.local = local

    def reply(self, value: Any) -> None:
        """Answer the caller (nothing to do for a ``remote_do``)."""
        if self.local is not None:
            self.local(value)
        elif self.rrid is not None:
            reply(self.sender, self.rrid, value)


def internal_op(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn(ctx, *args)`` as an operation run on the reader thread; it must not block."""
    fn._pydist_op = True  # type: ignore[attr-defined]  # a mark on the function object itself
    return fn


def _is_op(f: Any) -> bool:
    return getattr(f, "_pydist_op", False) is True


# -- the handlers ----------------------------------------------------------------------
def _on_call(w: Worker, header: MsgHeader, msg: CallMsg) -> None:
    rv = PGRP.lookup_ref(header.response_oid)
    assert rv is not None
    notify = header.notify_oid
    if notify == NULL_RRID:
        PGRP.runner.submit(lambda: rv.try_set(run_call(msg.f, msg.args, msg.kwargs)))
        return
    sender = w.id

    def task() -> None:
        # The caller asked to hear of the result: a small one is sent along (its fetch
        # then needs no round trip), a large one stays here until fetched.
        value = run_call(msg.f, msg.args, msg.kwargs)
        rv.try_set(value)
        reply(sender, notify, value if pushable(value) else STORED)
    PGRP.runner.submit(task)


def _run_op(w: Worker, rrid: RRID | None, msg: Any) -> None:
    """Run an internal operation on the reader; a failure (bad input from the caller) is
    answered, or printed for a ``remote_do``, and never ends the reader."""
    ctx = OpContext(w.id, rrid)
    try:
        msg.f(ctx, *msg.args, **msg.kwargs)
    except Exception as e:
        if rrid is not None:
            ctx.reply(Failure(e))
        else:
            print(f"pydist: process {PGRP.myid}: {getattr(msg.f, '__name__', msg.f)} from process "
                  f"{w.id} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _on_call_fetch(w: Worker, header: MsgHeader, msg: CallFetchMsg) -> None:
    if _is_op(msg.f):
        _run_op(w, header.notify_oid, msg)
        return
    sender, rrid = w.id, header.notify_oid
    PGRP.runner.submit(lambda: reply(sender, rrid, run_call(msg.f, msg.args, msg.kwargs)))


def _on_call_wait(w: Worker, header: MsgHeader, msg: CallWaitMsg) -> None:
    rv = PGRP.lookup_ref(header.response_oid)
    assert rv is not None
    sender, rrid = w.id, header.notify_oid

    def task() -> None:
        value = run_call(msg.f, msg.args, msg.kwargs)
        rv.try_set(value)
        reply(sender, rrid, value if type(value) is Failure else None)
    PGRP.runner.submit(task)


def _on_remote_do(w: Worker, header: MsgHeader, msg: RemoteDoMsg) -> None:
    if _is_op(msg.f):
        _run_op(w, None, msg)
        return

    def task() -> None:
        value = run_call(msg.f, msg.args, msg.kwargs)
        if type(value) is Failure:
            print(f"Error in remote_do on process {PGRP.myid}:\n{value.exc}", file=sys.stderr)
    PGRP.runner.submit(task)


def remote_do_here(msg: RemoteDoMsg) -> None:
    """Handle ``msg`` as if this process had sent it to itself (``remote_do(f, myid())``)."""
    _on_remote_do(Worker(PGRP.myid), NULL_HEADER, msg)


def _on_result(w: Worker, header: MsgHeader, msg: ResultMsg) -> None:
    PGRP.complete_reply(header.response_oid, msg.value)


HANDLERS: dict[type, Callable[[Worker, MsgHeader, Any], None]] = {
    CallMsg: _on_call,
    CallFetchMsg: _on_call_fetch,
    CallWaitMsg: _on_call_wait,
    RemoteDoMsg: _on_remote_do,
    ResultMsg: _on_result,
}


def _on_undecodable(w: Worker, e: BodyDecodeError) -> None:
    """A message whose body failed to unpickle still gets its caller an answer."""
    cause = e.__cause__ or e
    what = "result" if e.kind is ResultMsg else "call"
    failure = Failure(capture(cause, pid=PGRP.myid if e.kind is not ResultMsg else w.id))
    h = cast(MsgHeader, e.header)   # (errors.py, below the messages, cannot name the type)
    if e.kind is ResultMsg:
        PGRP.complete_reply(h.response_oid, failure)
    elif e.kind in (CallMsg, CallWaitMsg):
        rv = PGRP.lookup_ref(h.response_oid)
        if rv is not None:
            rv.try_set(failure)
        if e.kind is CallWaitMsg or h.notify_oid != NULL_RRID:
            reply(w.id, h.notify_oid, failure)
    elif e.kind is CallFetchMsg:
        reply(w.id, h.notify_oid, failure)
    else:
        print(f"pydist: process {PGRP.myid} could not unpickle a {what} from process {w.id}: "
              f"{cause!r}", file=sys.stderr)


# -- reading a connection ------------------------------------------------------------------
def read_one(w: Worker) -> str | None:
    """Read and handle one message from ``w``; how the connection ended, or ``None``."""
    t = w.transport
    if t is None:
        return w.detail or "closed its connection"
    try:
        frame = t.recv_frame()
    except TransportClosed:
        return "closed its connection"
    except TransportBroken as e:
        return f"lost its connection ({e})"
    try:
        header, msg = decode_message(frame)
    except BodyDecodeError as e:
        _on_undecodable(w, e)
        return None
    except DecodeError as e:
        t.abort()
        return f"sent a message that could not be decoded ({e})"
    handler = HANDLERS.get(type(msg))
    if handler is None:
        t.abort()
        return f"sent an unexpected {type(msg).__name__} after joining"
    handler(w, header, msg)
    return None


def _lost(w: Worker, detail: str) -> None:
    """Turn the end of ``w``'s connection into ``ProcessExitedException`` for its waiters."""
    if w.state == W_TERMINATED or w.inbox is None or w.inbox.w is not w:
        return
    detail = PGRP.exit_detail(w) or detail
    busy = " while running a call" if PGRP.waits_on(w.id) else ""
    PGRP.worker_lost(w, detail + busy)


def start_serving(w: Worker) -> Inbox:
    """Start reading ``w``'s connection (its pumpers, or a background reader)."""
    inbox = w.inbox = Inbox(w, read_one, _lost)
    return inbox
