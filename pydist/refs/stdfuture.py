"""The standard library's face of pydist's ``Future``: ``concurrent.futures`` and asyncio.

``concurrent.futures.wait`` and ``as_completed`` do not call a future's public methods:
they take its ``_condition``, read its ``_state`` and put a waiter in its ``_waiters``,
which the future tells when it completes. ``StdFutureFace`` gives a pydist ``Future`` those
three, and the everyday methods of a ``concurrent.futures.Future`` (``result``, ``done``,
``add_done_callback``, ...), plus ``__await__`` for asyncio.

The model: nothing happens until one of these is used (``fetch`` and ``wait`` stay as
they were, and a Future that is only fetched pays nothing). The first use makes a
``_Watch`` and asks the owner for the value once (``_when_ready``, supplied by the
Future); when the answer arrives, on whichever thread reads it, the value is cached in the
handle (as ``fetch`` would have cached it) and the waiters and callbacks are told.
A value that is a failure counts as the future's exception.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from concurrent.futures._base import FINISHED, PENDING
from typing import Any, Generic, Self, TypeVar

__all__ = ["StdFutureFace"]

T = TypeVar("T")
_watch_lock = threading.Lock()     # guards the creation of each Future's _Watch


class _Watch:
    """One Future's completion as ``concurrent.futures`` sees it."""

    __slots__ = ("condition", "state", "failed", "waiters", "callbacks")

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.state = PENDING
        self.failed = False
        self.waiters: list[Any] = []
        self.callbacks: list[Callable[[Any], object]] | None = []

    def settle(self, future: Any, failed: bool) -> None:
        """The value has arrived: tell the waiters (under the condition) and the callbacks."""
        with self.condition:
            if self.state == FINISHED:
                return
            self.state, self.failed = FINISHED, failed
            for waiter in self.waiters:
                if failed:
                    waiter.add_exception(future)
                else:
                    waiter.add_result(future)
            self.condition.notify_all()
            callbacks, self.callbacks = self.callbacks or [], None
        for cb in callbacks:
            _run_callback(cb, future)


def _run_callback(cb: Callable[[Any], object], future: Any) -> None:
    try:
        cb(future)
    except Exception:
        logging.getLogger("concurrent.futures").exception(
            "exception calling callback for %r", future)


class StdFutureFace(Generic[T]):
    """Mixin for ``Future[T]``: what ``concurrent.futures`` and asyncio expect of a future.

    The class using it supplies ``fetch(timeout)``, ``isready()``, a ``_watch`` slot
    (``None`` at first), ``_cached()`` (whether the value is here) and
    ``_when_ready(cb)``: call ``cb(failed)`` once the value is cached in the handle.
    """

    __slots__ = ()

    _watch: _Watch | None

    def fetch(self, timeout: float | None = None) -> T:
        raise NotImplementedError

    def isready(self) -> bool:
        raise NotImplementedError

    def _cached(self) -> bool:
        raise NotImplementedError

    def _when_ready(self, cb: Callable[[bool], None]) -> None:
        raise NotImplementedError

    def _the_watch(self) -> _Watch:
        watch = self._watch
        if watch is not None:
            return watch
        with _watch_lock:
            watch = self._watch
            if watch is not None:
                return watch
            watch = self._watch = _Watch()  # type: ignore[misc]  # a slot of the class using this mixin
        self._when_ready(lambda failed: watch.settle(self, failed))
        return watch

    # -- what concurrent.futures.wait and as_completed read -----------------------------------
    @property
    def _condition(self) -> threading.Condition:
        return self._the_watch().condition

    @property
    def _state(self) -> str:
        return self._the_watch().state

    @property
    def _waiters(self) -> list[Any]:
        return self._the_watch().waiters

    # -- the concurrent.futures.Future methods ------------------------------------------------
    def result(self, timeout: float | None = None) -> T:
        """The value (as ``fetch``); raises the call's ``RemoteException`` if it failed."""
        return self.fetch(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's ``RemoteException`` if it failed, else ``None`` (waits for it)."""
        try:
            self.fetch(timeout)
        except TimeoutError:
            raise
        except Exception as e:
            return e
        return None

    def done(self) -> bool:
        """Whether the value is set (as ``isready``)."""
        return self._cached() or bool(self.isready())

    def running(self) -> bool:
        """Whether the value is still to come (a pydist Future is never pending unsent)."""
        return not self.done()

    def cancelled(self) -> bool:
        """Always ``False``: a pydist Future cannot be cancelled."""
        return False

    def cancel(self) -> bool:
        """A call already sent cannot be taken back: ``False``, as for a running future."""
        return False

    def add_done_callback(self, fn: Callable[[Self], object]) -> None:
        """Call ``fn(future)`` once the value is set (at once if it is), on the thread
        that receives it."""
        watch = self._the_watch()
        with watch.condition:
            if watch.callbacks is not None:
                watch.callbacks.append(fn)
                return
        _run_callback(fn, self)

    def __await__(self) -> Generator[Any, None, T]:
        """``await future``: the value, without blocking the event loop."""
        import asyncio  # only programs that await pay for importing asyncio
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()

        def deliver() -> None:
            if waiter.done():
                return
            try:
                waiter.set_result(self.fetch(0))
            except BaseException as e:
                waiter.set_exception(e)

        def wake(_f: Any) -> None:
            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:
                pass     # the loop was closed meanwhile: nobody awaits any more

        self.add_done_callback(wake)
        return (yield from waiter)
