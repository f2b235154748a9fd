"""Remote calls: ``remotecall``, ``remotecall_fetch``, ``remotecall_wait``, ``remote_do``.

A call to ``myid()`` runs in this process with the same semantics: ``remotecall`` and
``remote_do`` as a task of the local runner, ``remotecall_fetch`` right here.
``pid`` may also be a worker pool (anything with ``run_remotecall``): an idle worker is
taken from it for the duration of the call.

For type checkers the arguments are checked against ``f``'s parameters, and the result is
typed by what ``f`` returns: ``remotecall(f, ...)`` is a ``Future[R]`` for ``f`` returning ``R``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from ..cluster.dispatch import remote_do_here, run_call
from ..cluster.group import PGRP
from ..cluster.values import Failure, unwrap
from ..cluster.waiting import wait_value
from ..wire.messages import NULL_HEADER, CallFetchMsg, CallMsg, CallWaitMsg, MsgHeader, RemoteDoMsg
from .remoteref import Future

__all__ = ["remotecall", "remotecall_fetch", "remotecall_wait", "remote_do"]

P = ParamSpec("P")
R = TypeVar("R")


class PoolLike(Protocol):
    """A worker pool as the calls see it: it runs a call on one of its workers."""

    def run_remotecall(self, kind: str, f: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any], /) -> Any: ...




def _check_callable(f: object) -> None:
    if not callable(f):
        raise TypeError(f"the function to call remotely must be callable, not {type(f).__name__}")


def _pool_call(kind: str, f: Callable[..., Any], pool: object, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    via = getattr(pool, "run_remotecall", None)
    if via is None or isinstance(pool, bool):
        raise TypeError(f"{kind}(f, pid, ...): pid must be a process id (an int) or a worker "
                        f"pool, not {pool!r} ({type(pool).__name__})")
    return via(kind, f, args, kwargs)


def remotecall(f: Callable[P, R], pid: int | PoolLike, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """Start ``f(*args, **kwargs)`` on ``pid``; a ``Future`` for its result, held there."""
    _check_callable(f)
    if not isinstance(pid, int) or isinstance(pid, bool):
        return cast("Future[R]", _pool_call("remotecall", f, pid, args, kwargs))
    if pid == PGRP.myid:
        fut: Future[R] = Future()
        cell = fut.local_cell()
        PGRP.runner.submit(lambda: cell.try_set(run_call(f, args, kwargs)))
        return fut
    fut = Future.for_call(pid, register=False)    # (send() checks pid)
    # The worker keeps the result and also tells us when it is there, sending a small one
    # along: the usual fetch() that follows then costs no second round trip.
    rrid, fut._pushed = PGRP.expect_reply(pid)
    try:
        PGRP.send(pid, MsgHeader(response_oid=fut.rrid, notify_oid=rrid), CallMsg(f, args, kwargs))
    except BaseException:
        fut.mark_released()   # the worker never heard of it
        PGRP.forget_reply(rrid)
        raise
    return fut


def remotecall_fetch(f: Callable[P, R], pid: int | PoolLike, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``f(*args, **kwargs)`` on ``pid`` and return its value (one round trip)."""
    result: R
    _check_callable(f)
    if not isinstance(pid, int) or isinstance(pid, bool):
        result = _pool_call("remotecall_fetch", f, pid, args, kwargs)
        return result
    if pid == PGRP.myid:
        result = unwrap(run_call(f, args, kwargs))
        return result
    rrid, rv = PGRP.expect_reply(pid)      # send() checks pid (its fast path costs nothing)
    try:
        PGRP.send(pid, MsgHeader(notify_oid=rrid), CallFetchMsg(f, args, kwargs))
        value = wait_value(rv, None, f"the call on process {pid}", via=pid)
    finally:
        PGRP.forget_reply(rrid)
    result = unwrap(value)
    return result


def remotecall_wait(f: Callable[P, R], pid: int | PoolLike, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """Like ``remotecall``, but return only once the call has finished there."""
    _check_callable(f)
    if not isinstance(pid, int) or isinstance(pid, bool):
        return cast("Future[R]", _pool_call("remotecall_wait", f, pid, args, kwargs))
    if pid == PGRP.myid:
        return remotecall(f, pid, *args, **kwargs).wait()
    PGRP.check_pid(pid)
    fut = Future.for_call(pid)
    rrid, rv = PGRP.expect_reply(pid)
    try:
        PGRP.send(pid, MsgHeader(response_oid=fut.rrid, notify_oid=rrid),
                  CallWaitMsg(f, args, kwargs))
    except BaseException:
        fut.mark_released()
        PGRP.forget_reply(rrid)
        raise
    try:
        value = wait_value(rv, None, f"the call on process {pid}", via=pid)
    finally:
        PGRP.forget_reply(rrid)
    if type(value) is Failure:
        raise value.exc
    return fut


def remote_do(f: Callable[P, object], pid: int | PoolLike, *args: P.args, **kwargs: P.kwargs) -> None:
    """Run ``f(*args, **kwargs)`` on ``pid`` for its effect; errors are printed there."""
    _check_callable(f)
    if not isinstance(pid, int) or isinstance(pid, bool):
        _pool_call("remote_do", f, pid, args, kwargs)
        return
    if pid == PGRP.myid:
        remote_do_here(RemoteDoMsg(f, args, kwargs))   # the same task, run by the local runner
        return
    PGRP.check_pid(pid)
    PGRP.send(pid, NULL_HEADER, RemoteDoMsg(f, args, kwargs))
