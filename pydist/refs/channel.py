"""``Channel``: a local, thread-safe FIFO with Julia's semantics, and the timers its waits use.

Every blocking operation has a callback twin (``put_async``, ``take_async``, ...), so the
owner of a ``RemoteChannel`` can answer remote puts and takes from its reader thread
without parking a thread per waiter. A waiter that times out is withdrawn under the
channel's lock, so an item is either delivered to it or stays in the channel: a timeout
never loses a value.

``Channel(0)`` is a rendezvous: ``put`` returns once a taker has the value.
"""
from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..cluster.values import Failure, check_timeout, unwrap
from ..cluster.waiting import blocking_section
from ..errors import InvalidStateException

__all__ = ["Channel", "TIMERS"]

Callback = Callable[[Any], None]


class _Timers:
    """One thread running callbacks at deadlines (cheaper than a Timer thread per wait)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pydist-timers", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # a timer's failure must not stop the others
                pass


TIMERS = _Timers()


class _Waiter:
    """A pending take/fetch/put: fires once, with a value or a Failure."""

    __slots__ = ("cb", "value", "done")

    def __init__(self, cb: Callback, value: Any = None) -> None:
        self.cb, self.value, self.done = cb, value, False


def _check_size(size: Any) -> float:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"a Channel's size must be an int or math.inf, not {type(size).__name__}")
    if size < 0 or (isinstance(size, float) and size != math.inf):
        raise ValueError(f"a Channel's size must be 0, a positive int or math.inf, not {size!r}")
    return size


class Channel:
    """A FIFO of ``size`` items (0: rendezvous, ``math.inf``: unbounded)."""

    def __init__(self, size: int | float = 0) -> None:
        self.size = _check_size(size)
        self._lock = threading.Lock()
        self._items: deque[Any] = deque()
        self._takers: deque[_Waiter] = deque()
        self._putters: deque[_Waiter] = deque()
        self._watchers: list[_Waiter] = []   # fetch/wait: fire when an item exists
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Channel(size={self.size}, items={len(self._items)}, {state})"

    # -- callback twins (never block) -------------------------------------------------
    def put_async(self, value: Any, cb: Callback, timeout: float | None = None) -> None:
        """Append ``value``; ``cb(None)`` once accepted, or ``cb(Failure)``."""
        check_timeout(timeout)
        fire: list[tuple[_Waiter, Any]] = []
        with self._lock:
            if self._closed:
                err = InvalidStateException("put on a closed channel")
                fire.append((_Waiter(cb), Failure(err)))
            elif self._takers:
                fire.append((self._takers.popleft(), value))
                fire.append((_Waiter(cb), None))
            elif len(self._items) < self.size:
                self._items.append(value)
                fire.append((_Waiter(cb), None))
                fire.extend(self._release_watchers())
            else:
                w = _Waiter(cb, value)
                self._putters.append(w)
                fire.extend(self._release_watchers())
                if timeout is not None:
                    TIMERS.call_later(timeout, lambda: self._expire(w, self._putters, "put"))
        self._fire(fire)

    def take_async(self, cb: Callback, timeout: float | None = None) -> None:
        """``cb(item)`` with the oldest item once there is one, or ``cb(Failure)``."""
        check_timeout(timeout)
        fire: list[tuple[_Waiter, Any]] = []
        with self._lock:
            if self._items:
                fire.append((_Waiter(cb), self._items.popleft()))
                if self._putters:
                    p = self._putters.popleft()
                    self._items.append(p.value)
                    fire.append((p, None))
            elif self._putters:      # a rendezvous: hand over directly
                p = self._putters.popleft()
                fire.append((_Waiter(cb), p.value))
                fire.append((p, None))
            elif self._closed:
                fire.append((_Waiter(cb), Failure(InvalidStateException("take from a closed, empty channel"))))
            else:
                w = _Waiter(cb)
                self._takers.append(w)
                if timeout is not None:
                    TIMERS.call_later(timeout, lambda: self._expire(w, self._takers, "take"))
        self._fire(fire)

    def fetch_async(self, cb: Callback, timeout: float | None = None, *, peek: bool = True) -> None:
        """``cb(item)`` with the oldest item, not removed (``peek=False``: ``cb(None)``)."""
        check_timeout(timeout)
        fire: list[tuple[_Waiter, Any]] = []
        with self._lock:
            head = self._head()
            if head is not _EMPTY:
                fire.append((_Waiter(cb), head if peek else None))
            elif self._closed:
                fire.append((_Waiter(cb), Failure(InvalidStateException("fetch from a closed, empty channel"))))
            else:
                w = _Waiter(cb, peek)
                self._watchers.append(w)
                if timeout is not None:
                    TIMERS.call_later(timeout, lambda: self._expire(w, self._watchers, "fetch"))
        self._fire(fire)

    # -- blocking forms -----------------------------------------------------------------
    def put(self, value: Any, timeout: float | None = None) -> Any:
        """Append ``value``, blocking while the channel is full (a rendezvous: until taken)."""
        unwrap(self._block(lambda cb: self.put_async(value, cb, timeout)))
        return value

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return the oldest item, blocking while there is none."""
        return unwrap(self._block(lambda cb: self.take_async(cb, timeout)))

    def fetch(self, timeout: float | None = None) -> Any:
        """The oldest item, without removing it, blocking while there is none."""
        return unwrap(self._block(lambda cb: self.fetch_async(cb, timeout)))

    def wait(self, timeout: float | None = None) -> Channel:
        """Block until an item is there (``InvalidStateException`` if closed and empty)."""
        unwrap(self._block(lambda cb: self.fetch_async(cb, timeout, peek=False)))
        return self

    def isready(self) -> bool:
        """Whether an item can be taken now."""
        with self._lock:
            return self._head() is not _EMPTY

    def close(self) -> None:
        """Close: later puts fail; takers fail once the items are gone (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            err = Failure(InvalidStateException("the channel was closed"))
            fire = [(p, err) for p in self._putters]
            self._putters.clear()
            if not self._items:
                fire += [(t, Failure(InvalidStateException("take from a closed, empty channel")))
                         for t in self._takers]
                fire += [(w, Failure(InvalidStateException("fetch from a closed, empty channel")))
                         for w in self._watchers]
                self._takers.clear()
                self._watchers.clear()
        self._fire(fire)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (values already in it can still be taken)."""
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    # -- helpers ---------------------------------------------------------------------------
    def _head(self) -> Any:
        if self._items:
            return self._items[0]
        if self._putters:
            return self._putters[0].value
        return _EMPTY

    def _release_watchers(self) -> list[tuple[_Waiter, Any]]:
        head = self._head()
        out = [(w, head if w.value else None) for w in self._watchers]
        self._watchers.clear()
        return out

    def _expire(self, w: _Waiter, queue: Any, what: str) -> None:
        with self._lock:
            if w.done:
                return
            try:
                queue.remove(w)
            except ValueError:
                return
        self._fire([(w, Failure(TimeoutError(f"channel {what} timed out")))])

    @staticmethod
    def _fire(fire: list[tuple[_Waiter, Any]]) -> None:
        for w, value in fire:
            if not w.done:
                w.done = True
                w.cb(value)

    @staticmethod
    def _block(start: Callable[[Callback], None]) -> Any:
        box: list[Any] = []
        latch = threading.Lock()
        latch.acquire()

        def cb(value: Any) -> None:
            box.append(value)
            latch.release()
        start(cb)
        if not box:
            with blocking_section():
                latch.acquire()
        return box[0]


_EMPTY = object()
