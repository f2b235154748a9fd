"""Progress bars for long jobs: ``pmap(progress=True)``, the drop-ins' ``progress=True``,
and ``progress(futures)``.

The bar is ``tqdm.auto``'s: a widget in Jupyter, text in a terminal. tqdm is an optional
dependency (``pip install 'pydist[progress]'``); it is imported only when a bar is asked
for, so programs that never ask do not pay for importing it, and asking without it is an
``ImportError`` that says what to install.
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress", "progress_bar", "ProgressIterator"]

T = TypeVar("T")
POLL = 0.05          # seconds between looks at futures that cannot be waited on together


def progress_bar(total: int | None, desc: str) -> Any:
    """A ``tqdm.auto`` bar of ``total`` steps (``None``: unknown), or a clear ImportError."""
    try:
        auto = importlib.import_module("tqdm.auto")
    except ImportError as e:
        raise ImportError(
            f"{desc}: progress=True needs tqdm, which is not installed; "
            "install it with: pip install 'pydist[progress]'") from e
    return _bar_class(auto.tqdm)(total=total, desc=desc, unit="el")


@functools.cache
def _bar_class(base: type) -> type:
    # tqdm's monitor thread (which only refreshes bars that stall) outlives every bar;
    # pydist's bars advance on each result and leave no thread behind.
    return type("PydistBar", (base,), {"monitor_interval": 0})


def check_progress(progress: object, where: str) -> bool:
    """``progress`` as a bool, or a TypeError naming ``where``."""
    if not isinstance(progress, bool):
        raise TypeError(f"{where}: progress must be True or False, not {progress!r}")
    return progress


class ProgressIterator(Iterator[T]):
    """Wraps a results iterator: one step of the bar per result, the bar closed at the end.

    ``next(timeout)`` is passed through, so an ``IMapIterator`` keeps its interface.
    """

    def __init__(self, inner: Iterator[T], total: int | None, desc: str) -> None:
        self._inner = inner
        self._bar = progress_bar(total, desc)

    def __iter__(self) -> ProgressIterator[T]:
        return self

    def __next__(self) -> T:
        return self._step(next, self._inner)

    def next(self, timeout: float | None = None) -> T:
        """The next result, waiting at most ``timeout`` seconds (as ``IMapIterator.next``)."""
        return self._step(lambda it: it.next(timeout), self._inner)

    def _step(self, get: Any, inner: Iterator[T]) -> T:
        try:
            value: T = get(inner)
        except BaseException:      # the end (StopIteration) or a failure: the bar is done
            self.close()
            raise
        self._bar.update(1)
        return value

    def close(self) -> None:
        """Close the bar (idempotent)."""
        self._bar.close()

    def __del__(self) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.close()


def _is_done(f: Any) -> bool:
    done = getattr(f, "done", None)
    if callable(done):
        return bool(done())
    return bool(f.isready())


def progress(futures: Iterable[Any], *, desc: str = "futures", timeout: float | None = None) -> list[Any]:
    """Show a bar while ``futures`` complete; return them (as a list) once all are done.

    ``futures``: ``pydist.Future``s (from ``remotecall``, ``spawnat``...) and/or
    ``concurrent.futures.Future``s (from ``ProcessPoolExecutor.submit``). Their values are
    not fetched and their errors not raised: call ``fetch()``/``result()`` after.
    ``timeout``: seconds to wait at most, then ``TimeoutError``.
    """
    items = list(futures)
    for f in items:
        if not (callable(getattr(f, "done", None)) or callable(getattr(f, "isready", None))):
            raise TypeError(f"progress: expected futures, got {type(f).__name__}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"progress: timeout must be >= 0, got {timeout!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = progress_bar(len(items), desc)
    try:
        _wait_all(items, bar, deadline)
    finally:
        bar.close()
    return items


def _wait_all(items: list[Any], bar: Any, deadline: float | None) -> None:
    """Advance ``bar`` as the futures complete, until all have or ``deadline`` passes."""
    std = [f for f in items if isinstance(f, concurrent.futures.Future)]
    other = [f for f in items if not isinstance(f, concurrent.futures.Future)]
    while std or other:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"progress: {len(std) + len(other)} futures still pending")
        if std:
            # The standard futures can be waited on together: no polling for them alone.
            wait = POLL if other else _left(deadline)
            done, pending = concurrent.futures.wait(std, timeout=wait,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            std = list(pending)
            bar.update(len(done))
        if other:
            still = [f for f in other if not _is_done(f)]
            bar.update(len(other) - len(still))
            other = still
            if other and not std:
                time.sleep(POLL)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
