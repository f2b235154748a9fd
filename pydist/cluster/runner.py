"""Where calls run: Julia runs every incoming call as a task of its own; so do we, with threads.

A worker's *main thread* is the preferred runner: while idle it pumps the master's
connection (``inbox.py``) and runs each call it reads right there, one after another, so
no thread hand-off sits on the hot path and ``interrupt(pid)`` (SIGINT) reaches the
running call as ``KeyboardInterrupt``, even inside ``time.sleep``.

When the running call blocks inside a pydist wait (``fetch``, ``take``, ``wait``,
``remotecall_fetch``) it says so through ``blocking()``; if no runner is left active a
*spare* thread is started to serve queued calls meanwhile, and retires once another
runner is active again. A call that arrives on another connection while the main thread
is blocked reading goes to a spare as well. So a blocked call never stops a process from
serving others (no distributed deadlock), while ordinary calls run one at a time.

On the master, which owns no main thread, the runner is a daemon thread.
"""
from __future__ import annotations

import ctypes
import enum
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .inbox import Inbox

__all__ = ["TaskRunner"]

Task = Callable[[], object]   # what it returns is dropped


class _Stop(enum.Enum):
    STOP = 0   # put in the queue to end one runner thread


_STOP: Final = _Stop.STOP
_SPARE_POLL = 0.05


class TaskRunner:
    """Runs zero-argument callables submitted by the readers of connections."""

    def __init__(self, *, main_thread: bool) -> None:
        self._queue: queue.SimpleQueue[Task | _Stop] = queue.SimpleQueue()
        self._mine: deque[Task] = deque()   # read by the idle main thread: runs there, always
        self._lock = threading.Lock()
        self._runners = 0            # runner threads alive
        self._blocked = 0            # runners inside a blocking() section
        self._local = threading.local()
        self._in_call: dict[int, bool] = {}   # thread ident -> running user code now
        self._main_ident: int | None = None
        self._main_inbox: Inbox | None = None  # what the idle main thread pumps
        self._main_idle = False
        self._stopped = False
        if not main_thread:
            self._start_runner(None, spare=False)

    # -- submission -----------------------------------------------------------------
    def submit(self, task: Task) -> None:
        """Run ``task`` on the first free runner."""
        if threading.get_ident() == self._main_ident:
            if self._main_idle:
                self._mine.append(task)   # read by the idle main thread: it runs it next
            else:
                self._queue.put(task)     # read while the main thread's call is blocked
            return
        with self._lock:
            inbox = self._main_inbox
            to_spare = False
            if not self._main_idle:
                self._queue.put(task)      # the main thread, or a spare, takes it when free
            elif inbox is not None and inbox.reader == self._main_ident:
                to_spare = True            # blocked reading its connection: it would not see it
            else:
                self._mine.append(task)    # the idle main thread is waiting: it runs it
        if to_spare:
            self._start_runner(task, spare=True)
        elif inbox is not None:
            inbox.notify()

    def has_task(self) -> bool:
        return bool(self._mine) or not self._queue.empty() or self._stopped

    def stop(self) -> None:
        """Make every runner loop return (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            n = self._runners
        for _ in range(max(n, 1)):
            self._queue.put(_STOP)
        inbox = self._main_inbox
        if inbox is not None:
            inbox.notify()

    # -- the loops ----------------------------------------------------------------------
    def run_main_loop(self, main_inbox: Callable[[], Inbox | None]) -> None:
        """Serve calls on the calling (main) thread until ``stop()``; while idle, pump the
        connection ``main_inbox()`` names (once there is one)."""
        self._main_ident = threading.get_ident()
        with self._lock:
            self._runners += 1
        self._local.runner = True
        while True:
            try:
                task = self._next_main_task(main_inbox)
                if task is _STOP:
                    return
                if task is not None:
                    self._run(task)
                task = None   # do not keep the call's arguments alive while idle
            except KeyboardInterrupt:
                continue   # an interrupt that arrived between calls: nothing to interrupt

    def _next_main_task(self, main_inbox: Callable[[], Inbox | None]) -> Task | _Stop | None:
        if self._mine:
            return self._mine.popleft()
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        inbox = main_inbox()
        if inbox is None or inbox.ended:
            try:
                return self._queue.get(timeout=0.05)
            except queue.Empty:
                return None
        with self._lock:
            self._main_inbox = inbox
            self._main_idle = True
        try:
            inbox.pump(self.has_task, safe=True)
        finally:
            with self._lock:
                self._main_idle = False
        return None

    def _start_runner(self, first: Task | None, *, spare: bool) -> None:
        with self._lock:
            self._runners += 1
        t = threading.Thread(target=self._thread_loop, args=(first, spare),
                             name="pydist-spare" if spare else "pydist-runner", daemon=True)
        t.start()

    def _thread_loop(self, first: Task | None, spare: bool) -> None:
        task: Task | _Stop | None
        self._local.runner = True
        if first is not None:
            self._run(first)
            first = None
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
            task = None   # do not keep the call's arguments alive while idle

    def _should_retire(self) -> bool:
        """A spare retires once another runner is active (not blocked) or idle-reading."""
        with self._lock:
            others_active = self._runners - self._blocked > 1
            if others_active or (self._main_idle and self._queue.empty()):
                self._runners -= 1
                return True
            return False

    def _run(self, task: Task) -> None:
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
    def enter_blocking(self) -> bool:
        """The current thread is about to block in a pydist wait: if it is a runner, make
        sure queued calls still get served. Returns whether ``exit_blocking`` is owed."""
        if not getattr(self._local, "runner", False):
            return False
        start_spare = False
        with self._lock:
            self._blocked += 1
            if self._runners - self._blocked < 1 and not self._stopped:
                start_spare = True
        if start_spare:
            self._start_runner(None, spare=True)
        return True

    def exit_blocking(self) -> None:
        with self._lock:
            self._blocked -= 1

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """``enter_blocking``/``exit_blocking`` around a block of code."""
        owed = self.enter_blocking()
        try:
            yield
        finally:
            if owed:
                self.exit_blocking()

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

    def in_user_call(self) -> bool:
        """Whether the current thread is running user code (and so may be interrupted)."""
        return self._in_call.get(threading.get_ident(), False)

    def busy(self) -> bool:
        """Whether any user code is running now."""
        return any(self._in_call.values())
