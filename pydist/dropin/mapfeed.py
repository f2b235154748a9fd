"""``Executor.map``'s window: its input read lazily, a bounded number of tasks ahead.

A ``_Feed`` turns items of the input into tasks, each with a ``_Slot`` (a lighter sink
than a future) in the window, in order. Taking a result from the front (``pop``) lets
the window be topped up again once it is a quarter below its target, which follows the
executor's per-worker window. At shutdown the rest of the input is submitted (as the
standard library would have done at ``map`` time) or cancelled.
``_map_results`` is the generator ``map`` returns.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .futures import pump_for
from .records import _NO_KWARGS, _Task
from .worker_side import CALL

if TYPE_CHECKING:
    from .core import _Core


class _Slot:
    """Where one task of a map puts its result (lighter than a Future)."""

    __slots__ = ("feed", "value", "exc", "state", "pid")

    PENDING, RUNNING, DONE, CANCELLED = 0, 1, 2, 3

    def __init__(self, feed: _Feed) -> None:
        self.feed = feed
        self.value: Any = None
        self.exc: BaseException | None = None
        self.state = 0
        self.pid: int | None = None

    def done(self) -> bool:
        return self.state >= 2

    def set_running_or_notify_cancel(self) -> bool:
        if self.state == 3:
            return False
        self.state = 1
        return True

    def cancel(self) -> bool:
        if self.state == 0:
            self.state = 3
            self.feed.wake(self)
            return True
        return self.state == 3

    def cancelled(self) -> bool:
        return self.state == 3

    def set_result(self, value: Any) -> None:
        self.value = value
        self.state = 2
        self.feed.wake(self)

    def set_exception(self, exc: BaseException) -> None:
        self.exc = exc
        self.state = 2
        self.feed.wake(self)


class _Feed:
    """A map's input and its window of tasks in flight, refilled as results are taken."""

    def __init__(self, core: _Core, fn: Callable[..., Any], source: Iterator[Any], kind: int,
                 window: int, keep: set[Any] | None = None) -> None:
        self.core = core
        self.fn = fn
        self.kind = kind
        self.source: Iterator[Any] | None = source
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.cond = threading.Condition(threading.Lock())
        self.window: collections.deque[_Slot] = collections.deque()
        self.waiting: _Slot | None = None
        self.min_window = window
        self.cancel_rest = False
        self.keep = keep                # who holds this feed while its input is unread
        if keep is not None:
            keep.add(self)
        core.feeds.add(self)

    def wake(self, slot: _Slot) -> None:
        if self.waiting is slot:
            with self.cond:
                self.cond.notify()

    def target(self) -> int:
        core = self.core
        per_worker = core.cap() if self.kind == CALL else 1
        return max(self.min_window, min(8192, 2 * per_worker * max(1, core.max_workers)))

    def top_up(self, first: bool = False, drain: bool = False) -> None:
        """Read more input into tasks until the window is full (or the input ends).
        ``first``: the call from ``map`` itself (it may raise as ``submit`` does)."""
        with self.lock:
            if self.source is None:
                return
            target = self.target()
            if not (first or drain) and len(self.window) > target * 3 // 4:
                return
            want = None if drain else max(0, target - len(self.window))
            tasks: list[_Task] = []
            fn, kind, window = self.fn, self.kind, self.window
            try:
                for item in (self.source if want is None else itertools.islice(self.source, want)):
                    slot = _Slot(self)
                    tasks.append(_Task(fn, item, _NO_KWARGS, kind, slot))
                    window.append(slot)
                if want is None or len(tasks) < want:
                    self.source = None
            except BaseException as e:
                self.source = None
                self.error = e
            if self.source is None and self.keep is not None:
                self.keep.discard(self)
            if tasks:
                self.core.dispatcher.enqueue(tasks, check=first)

    def at_shutdown(self, cancel_futures: bool) -> None:
        """The executor shuts down: the rest of the input is submitted now (as the
        standard library would have done at ``map`` time), or cancelled."""
        if cancel_futures:
            with self.lock:
                self.source = None
                self.cancel_rest = True
        else:
            self.top_up(drain=True)

    def pop(self, deadline: float | None) -> Any:
        """The next result in order (raising its exception), waiting up to ``deadline``."""
        slot = self.window[0]
        if slot.state < 2 and deadline is None:
            pump_for(slot, slot.done)
        if slot.state < 2:
            with self.cond:
                self.waiting = slot
                while slot.state < 2:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self.waiting = None
                        raise TimeoutError()
                    self.cond.wait(left)
                self.waiting = None
        self.window.popleft()
        if slot.state == 3:
            raise cf.CancelledError()
        if slot.exc is not None:
            exc, slot.exc = slot.exc, None
            raise exc
        value, slot.value = slot.value, None
        return value

    def close(self) -> None:
        with self.lock:
            self.source = None
            for slot in self.window:
                slot.cancel()
            self.window.clear()
            if self.keep is not None:
                self.keep.discard(self)
        self.core.feeds.discard(self)


def _chunks(iterables: tuple[Any, ...], size: int) -> Iterator[list[Any]]:
    it = zip(*iterables)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _map_results(feed: _Feed, deadline: float | None, chunked: bool,
                 owner: Any) -> Iterator[Any]:
    """The generator ``map`` returns (``owner`` keeps the executor alive while it runs)."""
    try:
        while True:
            feed.top_up()
            if not feed.window:
                if feed.cancel_rest:
                    raise cf.CancelledError()
                if feed.error is not None:
                    err, feed.error = feed.error, None
                    raise err
                return
            if chunked:
                chunk = feed.pop(deadline)
                chunk.reverse()
                while chunk:
                    yield chunk.pop()
            else:
                yield feed.pop(deadline)
    finally:
        feed.close()
