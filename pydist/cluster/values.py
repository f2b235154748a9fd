"""The cells that hold values on their owner process: ``RemoteValue`` and ``Failure``.

A ``RemoteValue`` is what Julia keeps in ``PGRP.refs``: the store behind a Future (and
the waiters for a ``remotecall_fetch`` reply). It is written once; readers either block on
it or register a callback, so an owner can answer a remote ``fetch`` without parking a
thread.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import InvalidStateException

__all__ = ["RemoteValue", "Failure", "unwrap", "STORED", "pushable", "PUSH_LIMIT", "check_timeout"]

PUSH_LIMIT = 64 << 10     # bytes of a result sent to its caller before it asks for it


class Failure:
    """A value that stands for an exception: fetching it raises ``exc``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return (Failure, (self.exc,))

    def __repr__(self) -> str:
        return f"Failure({self.exc!r})"


def unwrap(value: Any) -> Any:
    """Return ``value``, or raise the exception a ``Failure`` carries."""
    if type(value) is Failure:
        raise value.exc
    return value


class _Stored:
    """Sent instead of a call's result when the result is too large to send unasked: the
    caller fetches it from its owner if and when it wants it."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_stored, ())

    def __repr__(self) -> str:
        return "STORED"


def _stored() -> _Stored:
    return STORED


STORED = _Stored()
_ATOMS = (type(None), bool, int, float, complex)


def pushable(value: Any) -> bool:
    """Whether a call's result is small enough to send to the caller before it asks: an
    atom, a failure, a short string, a small numpy array, or a short tuple or list of atoms
    and short strings."""
    t = type(value)
    if t in _ATOMS or t is Failure:
        return True
    if t is str or t is bytes:
        return len(value) <= PUSH_LIMIT
    if t is tuple or t is list:
        return len(value) <= 64 and all(type(v) in _ATOMS or (type(v) in (str, bytes) and len(v) <= 1024)
                                        for v in value)
    if t.__module__ == "numpy":     # an array or a scalar, unless it holds objects
        nbytes, dtype = getattr(value, "nbytes", None), getattr(value, "dtype", None)
        return type(nbytes) is int and nbytes <= PUSH_LIMIT and not getattr(dtype, "hasobject", True)
    return False


def check_timeout(timeout: Any) -> None:
    """``None`` or a number of seconds >= 0; else ``TypeError``/``ValueError`` naming it."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not timeout >= 0:
        raise ValueError(f"timeout must not be negative (or NaN), not {timeout!r}")


_UNSET = object()


class RemoteValue:
    """A write-once cell with blocking waits and completion callbacks.

    ``clients`` is the set of process ids holding a reference to it (Julia's clientset);
    the owner drops the cell when the set becomes empty.
    """

    __slots__ = ("_lock", "_value", "_callbacks", "clients", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: Any = _UNSET
        self._callbacks: list[Callable[[Any], None]] | None = []
        self.clients: set[int] = set()

    def ready(self) -> bool:
        """Whether a value (or failure) has been set."""
        return self._value is not _UNSET

    def set(self, value: Any, what: str = "Future") -> None:
        """Store ``value``; a second set raises ``InvalidStateException``."""
        if not self.try_set(value):
            raise InvalidStateException(f"{what} can be set only once: it already holds a value")

    def try_set(self, value: Any) -> bool:
        """Store ``value`` unless one is already there; say whether it was stored."""
        with self._lock:
            if self._value is not _UNSET:
                return False
            self._value = value
            callbacks, self._callbacks = self._callbacks, None
        for cb in callbacks or ():
            cb(value)
        return True

    def add_callback(self, cb: Callable[[Any], None]) -> None:
        """Call ``cb(value)`` once the value is set (at once, if it already is)."""
        with self._lock:
            if self._value is _UNSET:
                assert self._callbacks is not None
                self._callbacks.append(cb)
                return
        cb(self._value)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or ``timeout`` seconds pass; say whether it is set."""
        if self._value is not _UNSET:
            return True
        latch = threading.Lock()
        latch.acquire()
        self.add_callback(lambda _v: latch.release())
        return latch.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))

    @property
    def value(self) -> Any:
        """The stored value (a ``Failure`` for an error); only valid once ``ready()``."""
        if self._value is _UNSET:
            raise InvalidStateException("no value has been set yet")
        return self._value
