"""The generic functions of Julia's API: ``fetch``, ``put``, ``take``, ``isready``, ``wait``.

Each calls the method of the same name on its argument; ``fetch`` of anything that is not
a reference returns the thing itself, as in Julia. For type checkers, ``fetch`` of a
``Future[T]`` (or of anything whose ``fetch`` method returns a ``T``) is a ``T``.
"""
from __future__ import annotations

from typing import Any, Protocol, TypeVar, overload

__all__ = ["fetch", "put", "take", "isready", "wait", "close"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Fetchable(Protocol[T_co]):
    """Anything with a ``fetch(timeout=...)`` method: a Future, a channel."""

    def fetch(self, timeout: float | None = None) -> T_co: ...


@overload
def fetch(x: Fetchable[T], timeout: float | None = None) -> T: ...
@overload
def fetch(x: T, timeout: float | None = None) -> T: ...


def fetch(x: Any, timeout: float | None = None) -> Any:
    """A Future's value or a channel's oldest item (without removing it); else ``x``."""
    method = getattr(x, "fetch", None)
    if method is None:
        return x
    return method(timeout=timeout)


def put(x: Any, value: Any) -> Any:
    """Set a Future's value, or append ``value`` to a channel (blocking while it is full)."""
    if not hasattr(x, "put"):
        raise TypeError(f"put() needs a Future or a channel, not {type(x).__name__}")
    return x.put(value)


def take(x: Any, timeout: float | None = None) -> Any:
    """Remove and return a channel's oldest item (``TypeError`` for a Future)."""
    if not hasattr(x, "take"):
        raise TypeError(f"take() needs a channel, not {type(x).__name__}")
    return x.take(timeout=timeout)


def isready(x: Any) -> bool:
    """Whether ``fetch(x)`` would return without blocking."""
    if not hasattr(x, "isready"):
        raise TypeError(f"isready() needs a Future, a channel or a pool, not {type(x).__name__}")
    ready: bool = x.isready()
    return ready


def wait(x: Any, timeout: float | None = None) -> Any:
    """Block until ``x`` is ready; raises the failure of a failed Future."""
    if not hasattr(x, "wait"):
        raise TypeError(f"wait() needs a Future, a channel or a pool, not {type(x).__name__}")
    return x.wait(timeout=timeout)


def close(x: Any) -> None:
    """Close a channel (or a pool, or anything with ``close``)."""
    if not hasattr(x, "close"):
        raise TypeError(f"close() needs a channel, not {type(x).__name__}")
    x.close()
