"""How a task's outcome reaches the caller.

``_Future`` is the ``concurrent.futures.Future`` that ``submit`` returns: an untimed wait
reads the worker's connection in the waiting thread (``pump_for``) rather than sleeping
until a reader thread hands the reply over. A task's exception is the original one, with
the remote traceback as ``__cause__`` (``_unwrap``); one exception that fails several
tasks is copied for each (``_copy_exc``). An error in the machinery itself is printed
(``_report``), and the tasks it hit fail with it.
"""
from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..cluster.group import PGRP
from ..cluster.values import Failure
from ..cluster.waiting import may_pump
from ..errors import RemoteException

_WAITING = ("PENDING", "RUNNING")
_SENT_POLL = 0.02     # seconds between checks of a task not sent yet (it may fail unsent)
_settling = threading.local()         # set while this thread completes futures


def pump_for(sink: Any, done: Callable[[], bool]) -> None:
    """Wait for ``done()`` by reading, in this thread, the connection of the worker that
    runs ``sink``'s task (no hand-off from the reader thread: the reply is handled here).
    A task not sent yet (its worker still starting) is waited for first. Returns early,
    leaving the rest to an ordinary wait, where this thread may not read."""
    while not done():
        pid = sink.pid
        if pid is None:
            if not _await_sent(sink, done):
                return
            continue
        w = PGRP.workers.get(pid)
        inbox = getattr(w, "inbox", None)
        if inbox is None or inbox.ended or not may_pump():
            return
        inbox.pump(lambda p=pid: done() or sink.pid != p)
        if sink.pid == pid:
            return       # done, or the connection ended


def _await_sent(sink: Any, done: Callable[[], bool]) -> bool:
    """Wait until ``sink``'s task is sent to a worker (``mark_sent``) or ``done()``; False
    for a sink that is not one task's (one is made with ``_sent = None``): the caller then
    waits as usual. Without this, the reply to a task sent while its caller waited would
    wait for the background reader. (Two threads waiting on one task: the later one's
    event wins, and the other sees the send within ``_SENT_POLL``.)"""
    if getattr(sink, "_sent", False) is not None:
        return False            # not a task's own sink (a map's whole result, a slot)
    sent = threading.Event()
    sink._sent = sent
    try:
        while sink.pid is None and not done():
            sent.wait(_SENT_POLL)    # (done() is polled: a task may fail before it is sent)
    finally:
        sink._sent = None
    return True


def mark_sent(sink: Any, pid: int) -> None:
    """``sink``'s task goes to worker ``pid``: a caller waiting for that starts reading."""
    sink.pid = pid
    sent = getattr(sink, "_sent", None)
    if sent:
        sent.set()


class _Future(cf.Future[Any]):
    """A ``concurrent.futures.Future`` whose untimed ``result``/``exception`` read the
    worker's reply in the waiting thread."""

    pid: int | None = None
    _sent: Any = None       # set while a caller waits for the task to be sent (_await_sent)

    def _settled(self) -> bool:
        return self._state not in _WAITING

    def result(self, timeout: float | None = None) -> Any:
        if timeout is None and self._state in _WAITING:
            pump_for(self, self._settled)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if timeout is None and self._state in _WAITING:
            pump_for(self, self._settled)
        return super().exception(timeout)

    def __await__(self) -> Any:
        """``await future`` in asyncio (as ``asyncio.wrap_future`` gives)."""
        import asyncio  # only programs that await pay for importing asyncio
        return asyncio.wrap_future(self).__await__()


def _unwrap(exc: BaseException, tb_class: type) -> BaseException:
    """The exception a task's future raises: the original, remote traceback as cause."""
    if isinstance(exc, RemoteException):
        original = exc.captured.ex
        original.__cause__ = tb_class(f'\n"""\n{exc.captured.traceback}"""')
        return original
    return exc


def _report(exc: BaseException) -> None:
    """An error in the executor's own machinery: said on stderr (the tasks it hit fail)."""
    import traceback
    print("pydist executor: internal error", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


def _copy_exc(exc: BaseException) -> BaseException:
    """A fresh instance of ``exc`` for each future (exceptions carry their traceback)."""
    try:
        new = exc.__class__(*exc.args)
    except Exception:
        return exc
    new.__cause__ = exc.__cause__
    return new


def deliver(tasks: list[Any], values: list[Any], tb_class: type) -> None:
    """Complete each task's sink with its value (or its ``Failure``'s exception)."""
    _settling.active = True
    try:
        for t, v in zip(tasks, values):
            try:
                if type(v) is Failure:
                    t.sink.set_exception(_unwrap(v.exc, tb_class))
                else:
                    t.sink.set_result(v)
            except cf.InvalidStateError:
                pass
    finally:
        _settling.active = False


def fail_all(tasks: list[Any], exc: BaseException) -> None:
    """Fail every task's sink with (a copy per task of) ``exc``."""
    _settling.active = True
    try:
        for t in tasks:
            if not t.started and not t.sink.set_running_or_notify_cancel():
                continue
            e = exc if len(tasks) == 1 else _copy_exc(exc)
            try:
                t.sink.set_exception(e)
            except cf.InvalidStateError:
                pass
    finally:
        _settling.active = False
