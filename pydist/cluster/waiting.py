"""Waiting for an answer: a thread blocks on a value while its process keeps serving.

``wait_value`` is the one wait of the cluster layer. While a call running on a worker
waits, a spare thread serves the calls queued behind it (``blocking_section``, see
``runner.py``); when the answer comes over one connection and there is no deadline, the
waiting thread reads that connection itself (``may_pump``, see ``inbox.py``).
``call_on_owner`` runs an internal operation on another process and waits for its answer.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..wire.messages import CallFetchMsg, MsgHeader
from .group import PGRP
from .inbox import SIGINT_DEFERRAL
from .values import RemoteValue

__all__ = ["blocking_section", "wait_value", "may_pump", "call_on_owner"]


@contextmanager
def blocking_section() -> Iterator[None]:
    """Around a wait: lets this process serve other calls while the current one blocks."""
    runner = PGRP._runner
    if runner is None:
        yield
    else:
        with runner.blocking():
            yield


def wait_value(rv: RemoteValue, timeout: float | None, what: object = "the value",
               via: int | None = None) -> Any:
    """Block until ``rv`` is set (serving other calls meanwhile); its raw value.

    ``what`` names what is awaited in the timeout's message (any object: it is formatted
    only then).

    When the answer comes from process ``via`` and there is no deadline, this thread reads
    that connection itself (``inbox.py``): no hand-off from a reader thread.
    """
    if rv.ready():
        return rv.value
    w = PGRP.workers.get(via) if via is not None else None
    inbox = w.inbox if w is not None else None
    runner = PGRP._runner
    blocked = runner.enter_blocking() if runner is not None else False
    try:
        if inbox is None:
            ok = rv.wait(timeout)
        elif timeout is None and may_pump():
            inbox.pump(rv.ready)
            ok = rv.ready() or rv.wait(None)
        else:
            # The connection may end a moment before the death is recorded (the reader
            # first asks the process handle how it ended): wait out the rest of the timeout
            # for that, rather than report a timeout that did not happen.
            deadline = None if timeout is None else time.monotonic() + timeout
            ok = inbox.wait(rv.ready, timeout) or rv.wait(
                None if deadline is None else max(0.0, deadline - time.monotonic()))
    finally:
        if blocked and runner is not None:   # (blocked: there is a runner)
            runner.exit_blocking()
    if not ok:
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
    return rv.value


def may_pump() -> bool:
    """Whether this thread may read a connection itself: not while it runs user code on a
    worker, where ``interrupt`` could raise in the middle of a read (see inbox.py)."""
    if threading.current_thread() is threading.main_thread() and PGRP.role != "worker":
        return SIGINT_DEFERRAL.usable()
    runner = PGRP._runner
    return PGRP.role != "worker" or runner is None or not runner.in_user_call()


def call_on_owner(op: Any, pid: int, *args: Any, timeout: float | None = None) -> Any:
    """Run internal operation ``op(ctx, *args)`` on ``pid`` and return its raw answer."""
    rrid, rv = PGRP.expect_reply(pid)
    try:
        PGRP.send(pid, MsgHeader(notify_oid=rrid), CallFetchMsg(op, args, {}))
        return wait_value(rv, timeout, f"process {pid}", via=pid)
    finally:
        PGRP.forget_reply(rrid)
