"""Retries of ``pmap``: after which delays a failed element is tried again, and whether.

``Delays`` reads ``retry_delays`` lazily (it may be an endless generator, as Julia's
``ExponentialBackOff``), checking each delay as it comes; ``RetryPolicy`` keeps, per
element, how many retries it has had and the state of ``retry_check``.
"""
from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["RetryPolicy", "Delays", "check_delay"]


class RetryPolicy:
    """Julia's ``retry(f, delays=retry_delays, check=retry_check)``, one element at a time.

    The state given to ``retry_check`` is Julia's iteration state of the delays: the index
    of the delay after the one about to be waited (an int; what ``retry_check`` returns as
    state is used as that index from then on).
    """

    def __init__(self, delays: Delays, check: Callable[..., Any] | None) -> None:
        self.delays = delays
        self.check = check
        self.next: dict[int, tuple[float, Any] | None] = {}   # element -> (delay, state) / final

    def on_failure(self, i: int, exc: BaseException) -> float | None:
        """Seconds to wait before retrying element ``i``, or ``None``: the failure is final."""
        if i in self.next:
            pending = self.next[i]
        else:
            pending = (self.delays[0], 1) if self.delays.has(0) else None
        if pending is None:
            return None
        delay, state = pending
        if self.check is not None:
            answer = self.check(state, exc)
            if isinstance(answer, tuple) and len(answer) == 2:
                state, go_on = answer
            else:
                go_on = answer
            if not go_on:
                return None
        self.next[i] = (self.delays[state], state + 1) if self.delays.has(state) else None
        return delay


class Delays:
    """``retry_delays`` read as far as the retries need (an endless iterator is fine, as
    Julia's ``ExponentialBackOff``); every element's retries index the same sequence."""

    def __init__(self, source: Iterable[float]) -> None:
        if isinstance(source, (str, bytes)):
            raise TypeError(f"retry_delays must be an iterable of numbers of seconds, not {source!r}")
        try:
            self._it: Iterator[Any] | None = iter(source)
        except TypeError:
            raise TypeError(f"retry_delays must be an iterable of numbers of seconds, "
                            f"not {source!r}") from None
        self._seen: list[float] = []
        self._lock = threading.Lock()
        if isinstance(source, (list, tuple, range)):
            self.has(len(source))   # a finite sequence is checked before anything starts

    def has(self, i: int) -> bool:
        """Whether there is an ``i``-th delay (reading the source up to it)."""
        with self._lock:
            while len(self._seen) <= i and self._it is not None:
                try:
                    d = next(self._it)
                except StopIteration:
                    self._it = None
                    break
                self._seen.append(check_delay(d))
            return i < len(self._seen)

    def __getitem__(self, i: int) -> float:
        if not self.has(i):
            raise IndexError(i)
        return self._seen[i]


def check_delay(d: Any) -> float:
    if isinstance(d, bool) or not isinstance(d, numbers.Real):
        raise TypeError(f"retry_delays must hold numbers of seconds, not {d!r}")
    if d < 0 or math.isnan(d):
        raise ValueError(f"retry_delays must not be negative, got {d!r}")
    return float(d)
