"""Stopping a process: asking a worker to exit or to interrupt its call, and a worker's exit.

``request_exit`` and ``send_interrupt`` are remote-do messages to a worker; the worker runs
``exit_worker`` (close every listener and connection, flush, ``os._exit``) or raises
``KeyboardInterrupt`` in its main thread. Both are fire-and-forget: a worker that is already
gone is no error.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

from ..errors import ProcessExitedException
from ..wire.messages import NULL_HEADER, RemoteDoMsg
from .dispatch import OpContext, internal_op
from .group import PGRP

__all__ = ["request_exit", "send_interrupt", "exit_worker", "flush_and_exit"]

_exit_lock = threading.Lock()


def request_exit(pid: int) -> None:
    """Ask ``pid`` to exit (ignored if it is already gone)."""
    try:
        PGRP.send(pid, NULL_HEADER, RemoteDoMsg(_exit_op, (), {}))
    except (ProcessExitedException, ValueError, OSError):
        pass


@internal_op
def _exit_op(ctx: OpContext) -> None:
    threading.Thread(target=exit_worker, args=(0,), daemon=True).start()


def send_interrupt(pid: int) -> None:
    """Interrupt ``pid`` through its cluster connection (any manager, any host)."""
    PGRP.send(pid, NULL_HEADER, RemoteDoMsg(_interrupt_op, (), {}))


@internal_op
def _interrupt_op(ctx: OpContext) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def exit_worker(code: int = 0) -> None:
    """Close every connection and listener, flush output and end the process now."""
    if not _exit_lock.acquire(blocking=False):
        return
    PGRP.stop_sending()   # before any close: see ``ProcessGroup.stop_sending``
    for listener in list(PGRP.listeners):
        try:
            listener.close()
        except Exception:
            pass
    for w in list(PGRP.workers.values()):
        t = w.transport
        if t is not None:
            try:
                t.close()
            except Exception:
                pass
    flush_and_exit(code)


def flush_and_exit(code: int) -> NoReturn:
    """Flush ``sys.stdout`` and ``sys.stderr`` (whatever fails) and end the process now,
    without running ``atexit`` handlers or finalizers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
