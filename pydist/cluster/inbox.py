"""Who reads a connection: the threads that wait on it, or a background reader.

Handing a frame from a reader thread to the thread that waits for it costs a wake-up,
and on our 2-vCPU machines waking a sleeping thread on the other CPU costs as much as
the whole round trip (docs/design.md, "The hot path"). So a thread that waits for a
reply on a connection *pumps* it: it takes the connection's read role and reads and
handles frames itself until its own answer is in. A worker's main thread pumps its
master's connection whenever it is idle, and runs the calls it reads right away.

Only a thread that cannot be hit by an asynchronous exception in the middle of reading
may pump: Python raises ``KeyboardInterrupt`` at any bytecode, and one raised between a
``recv`` and the bookkeeping after it would lose bytes. So a worker thread running user
code (which ``interrupt`` may hit) waits instead (``wait``) and lets the background
reader read for it; the master's main thread pumps with SIGINT deferred to the moments
between frames (``_SigintDeferral``), polling so that Ctrl-C still acts within 50 ms.

The background reader takes the role when someone waits without pumping, or when
nobody has pumped for ``GRACE`` seconds (so calls on the master, reference counting and
interrupts of a busy worker are still read). A pumper that finds the role taken waits
until the frame it needs has been handled by whoever holds it.
"""
from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: typeshed has no stub for it
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .peers import Worker

__all__ = ["Inbox", "GRACE"]

GRACE = 0.005
_POLL = 0.05
_SIGINT = int(signal.SIGINT)


class Inbox:
    """The read side of one connection: a read role, its pumpers and a background reader.

    ``read_one(w)`` reads and handles one frame and returns ``None``, or a description of
    how the connection ended (then ``on_end(w, detail)`` is called once).
    """

    def __init__(self, w: Worker, read_one: Callable[[Worker], str | None],
                 on_end: Callable[[Worker, str], None]) -> None:
        self.w = w
        self._read = read_one
        self._on_end = on_end
        self._role = threading.Lock()
        self._changed = threading.Condition(threading.Lock())
        self._pumpers = 0
        self._waiters = 0                   # threads waiting without pumping
        self._napping = False               # the background reader waits for the pumpers to go
        self._last_pump = 0.0
        self._kick = threading.Event()      # wakes the background reader for a waiter
        self.reader: int | None = None      # ident of the thread holding the role
        self.ended = False
        self._thread = threading.Thread(target=self._background, name=f"pydist-reader-{w.id}",
                                        daemon=True)
        self._thread.start()

    # -- reading ------------------------------------------------------------------------
    def _read_held(self, poll: bool = False) -> None:
        """Read one frame (``poll``: only if one comes within 50 ms); the caller holds the role."""
        t = self.w.transport
        if poll and t is not None and hasattr(t, "poll") and not t.poll(_POLL):
            return
        detail = self._read(self.w)
        if detail is not None and not self.ended:
            self.ended = True
            self._on_end(self.w, detail)

    def _release(self) -> None:
        self.reader = None
        self._role.release()
        with self._changed:
            self._changed.notify_all()

    def pump(self, done: Callable[[], bool], *, safe: bool = False) -> None:
        """Read and handle frames in this thread until ``done()`` or the connection ends.

        ``safe``: the caller knows no asynchronous exception can arrive meanwhile (a worker's
        idle main thread, whose SIGINT handler ignores signals between calls).
        """
        main = not safe and threading.current_thread() is threading.main_thread()
        hits = SIGINT_DEFERRAL.hits
        with self._changed:
            self._pumpers += 1
        if main:
            SIGINT_DEFERRAL.active = True
        try:
            while not done() and not self.ended and not (main and hits):
                if self._role.acquire(False):
                    self.reader = threading.get_ident()   # before re-checking done(): runner.py
                    try:
                        while not done() and not self.ended and not (main and hits):
                            self._read_held(main)
                    finally:
                        self._release()
                else:
                    self._wait_for_role(done)
        finally:
            if main:
                SIGINT_DEFERRAL.active = False
            with self._changed:
                self._pumpers -= 1
                self._last_pump = time.monotonic()
                if not self._pumpers and self._napping:
                    self._napping = False
                    self._kick.set()
            if main and hits:
                hits.clear()
                SIGINT_DEFERRAL.deliver()   # Python's default raises KeyboardInterrupt here

    def _wait_for_role(self, done: Callable[[], bool]) -> None:
        with self._changed:
            if self._role.locked() and not done() and not self.ended:
                self._changed.wait(_POLL)

    def wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait without reading until ``done()`` (the background reader reads meanwhile)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            self._waiters += 1
            self._kick.set()
            try:
                while not done() and not self.ended:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._changed.wait(_POLL if left is None else min(left, _POLL))
            finally:
                self._waiters -= 1
        return done()

    def notify(self) -> None:
        """Make pumpers and waiters re-check their condition (and stop the background
        reader's nap: the connection may have ended)."""
        with self._changed:
            self._changed.notify_all()
        self._kick.set()

    # -- the background reader -------------------------------------------------------------
    def _wanted(self) -> bool:
        return bool(self._waiters) or (
            not self._pumpers and time.monotonic() - self._last_pump >= GRACE)

    def _background(self) -> None:
        long_nap = True
        while not self.ended:
            if not self._wanted():
                long_nap = self._nap(long_nap)
                continue
            if not self._role.acquire(timeout=GRACE):
                continue
            self.reader = threading.get_ident()
            try:
                if self._wanted():
                    self._read_held()
            finally:
                self._release()

    def _nap(self, long_nap: bool) -> bool:
        """Wait until the role may be wanted: ``GRACE`` at most, or, while a pumper holds
        on, until the last one leaves or a waiter comes (a worker's idle main thread pumps
        for as long as it is idle: waking every ``GRACE`` meanwhile cost each idle worker a
        wake-up every 5 ms). After a long nap the next one is short, so pumps that come
        and go (a caller's round trips) wake this thread once per ``GRACE`` at most.
        Whether the next nap may be long."""
        with self._changed:
            self._napping = long_nap and self._pumpers > 0 and not self._waiters
            napping = self._napping
        self._kick.wait(None if napping else GRACE)
        self._kick.clear()
        with self._changed:
            self._napping = False
        return not napping


class _SigintDeferral:
    """SIGINT on the master's main thread while it pumps: held back until a frame boundary.

    Installed once, over the handler in place (Python's default, or the program's own, which
    it then calls: outside a pump at once, inside a pump at the next frame boundary). Where
    SIGINT is left to the OS (``SIG_DFL``), or a program installs another handler later, the
    main thread waits instead of pumping.
    """

    def __init__(self) -> None:
        self.active = False
        self.hits: list[int] = []
        self.previous: Any = signal.default_int_handler

    def __call__(self, signum: int, frame: Any) -> None:
        if self.active:
            self.hits.append(signum)
            return
        self.deliver(signum, frame)

    def deliver(self, signum: int = _SIGINT, frame: Any = None) -> None:
        """Run the handler this one stands in front of."""
        previous = self.previous
        if callable(previous):
            previous(signum, frame)

    def usable(self) -> bool:
        """Whether the main thread may pump (installing the handler on first use)."""
        try:
            current = _signal.getsignal(_SIGINT)   # the C function: no enum conversion per call
            if current is self:
                return True
            if callable(current) or current == signal.SIG_IGN:
                self.previous = current
                signal.signal(signal.SIGINT, self)
                return True
        except (ValueError, TypeError):   # not the main thread of the main interpreter
            pass
        return False


SIGINT_DEFERRAL = _SigintDeferral()
