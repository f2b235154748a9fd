"""Where calls run: Julia runs every incoming call as a task of its own; so do we, with threads.

A worker's *main thread* is the preferred runner: calls run there one after another, so
``interrupt(pid)`` (SIGINT) reaches the running call as ``KeyboardInterrupt``, even inside
``time.sleep``. When the running call blocks inside a pydist wait (``fetch``, ``take``,
``wait``, ``remotecall_fetch``) it says so through ``blocking()``; if no runner is left
active a *spare* thread is started to serve queued calls meanwhile, and retires once
another runner is active again. So a blocked call never stops a process from serving
others (no distributed deadlock), while ordinary calls still run one at a time.

On the master, which owns no main thread, the runner is a daemon thread.
"""
from __future__ import annotations

import ctypes
import queue
import signal
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["TaskRunner"]

_STOP = object()
_SPARE_POLL = 0.05


class TaskRunner:
    """Runs zero-argument callables submitted from reader threads."""

    def __init__(self, *, main_thread: bool) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._runners = 0            # runner threads alive (the main loop counts once started)
        self._blocked = 0            # runners inside a blocking() section
        self._local = threading.local()
        self._in_call: dict[int, bool] = {}   # thread ident -> running a call now
        self._main_ident: int | None = None
        self._stopped = False
        if not main_thread:
            self._start_runner(spare=False)

    # -- submission -----------------------------------------------------------------
    def submit(self, task: Callable[[], None]) -> None:
        """Queue ``task``; it runs on the first free runner."""
        self._queue.put(task)

    def stop(self) -> None:
        """Make every runner loop return (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            n = self._runners
        for _ in range(max(n, 1)):
            self._queue.put(_STOP)

    # -- the loops ----------------------------------------------------------------
    def run_main_loop(self) -> None:
        """Serve calls on the calling (main) thread until ``stop()``."""
        self._main_ident = threading.get_ident()
        with self._lock:
            self._runners += 1
        self._local.runner = True
        while True:
            try:
                task = self._queue.get()
                if task is _STOP:
                    return
                self._run(task)
            except KeyboardInterrupt:
                # An interrupt that arrived between calls: nothing to interrupt.
                continue

    def _start_runner(self, *, spare: bool) -> None:
        with self._lock:
            self._runners += 1
        t = threading.Thread(target=self._thread_loop, args=(spare,),
                             name="pydist-spare" if spare else "pydist-runner", daemon=True)
        t.start()

    def _thread_loop(self, spare: bool) -> None:
        self._local.runner = True
        while True:
            if spare and self._should_retire():
                return
            try:
                task = self._queue.get(timeout=_SPARE_POLL) if spare else self._queue.get()
            except queue.Empty:
                continue
            if task is _STOP:
                with self._lock:
                    self._runners -= 1
                return
            self._run(task)

    def _should_retire(self) -> bool:
        """A spare retires once another runner is active (not blocked)."""
        with self._lock:
            if self._runners - self._blocked > 1:
                self._runners -= 1
                return True
            return False

    def _run(self, task: Callable[[], None]) -> None:
        try:
            task()
        except BaseException:  # a task reports its own errors; this is a last resort
            traceback.print_exc()

    # -- user code ----------------------------------------------------------------------
    # Only user code may be interrupted: never the sending of its result, which would
    # leave a frame half-written and the connection unusable.
    def enter_call(self) -> None:
        """Mark the current thread as running user code (interruptible)."""
        self._in_call[threading.get_ident()] = True

    def exit_call(self) -> None:
        """Mark the current thread as back in pydist's own code."""
        self._in_call[threading.get_ident()] = False

    # -- blocking sections ----------------------------------------------------------
    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Mark the current runner as blocked so that queued calls still get served."""
        if not getattr(self._local, "runner", False):
            yield
            return
        start_spare = False
        with self._lock:
            self._blocked += 1
            if self._runners - self._blocked < 1 and not self._stopped:
                start_spare = True
        if start_spare:
            self._start_runner(spare=True)
        try:
            yield
        finally:
            with self._lock:
                self._blocked -= 1

    # -- interrupts -------------------------------------------------------------------
    def install_sigint(self) -> None:
        """On the main thread: make SIGINT interrupt the running call, and nothing else."""
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self._in_call.get(self._main_ident or -1):
            raise KeyboardInterrupt
        # The main thread is idle: interrupt calls running on spare threads instead.
        for ident, busy in list(self._in_call.items()):
            if busy and ident != self._main_ident:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))

    def busy(self) -> bool:
        """Whether any call is running now."""
        return any(self._in_call.values())
