"""Objects that may travel only to some processes, refused on the sender.

A SharedArray may go only to the processes that map it. The check runs while the object
is pickled, and needs to know where the bytes go:

* a message pickled for one process (``ProcessGroup.send``) names it in
  ``PGRP.sending.pid``: the object checks it there and then;
* bytes pickled *ahead* of their message (a drop-in's tasks, an initializer's arguments,
  pickled before the message that carries them, or once for several workers) have no
  destination yet. While ``pickling_ahead()`` runs, each such object records its rule in
  the ``Limits`` it yields, and the caller checks every destination with
  ``Limits.check(pid)`` before sending the bytes there.

Either way a refusal is a ``ValueError`` naming the process, raised on the sender before
anything is sent. Nothing is counted for bytes pickled ahead: they may be unpickled there
later, or never (a batch taken back).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator

from .group import PGRP

__all__ = ["Limits", "pickling_ahead", "restrict"]


class Limits:
    """The rules met while pickling ahead: (processes allowed, the refusal for a pid)."""

    __slots__ = ("rules",)

    def __init__(self) -> None:
        self.rules: list[tuple[Collection[int], Callable[[int], str]]] = []

    def check(self, pid: int) -> None:
        """Raise the first refusal (ValueError) for sending the bytes to ``pid``."""
        for allowed, refusal in self.rules:
            if pid not in allowed:
                raise ValueError(refusal(pid))

    def __bool__(self) -> bool:
        return bool(self.rules)


@contextlib.contextmanager
def pickling_ahead() -> Iterator[Limits]:
    """Pickle, in this block, bytes whose destination is not known yet; then check each
    destination with the ``Limits`` yielded."""
    tls = PGRP.sending
    outer_pid, outer_ahead = getattr(tls, "pid", None), getattr(tls, "ahead", None)
    limits = Limits()
    tls.pid, tls.ahead = None, limits
    try:
        yield limits
    finally:
        tls.pid, tls.ahead = outer_pid, outer_ahead


def restrict(allowed: Collection[int], refusal: Callable[[int], str]) -> int | None:
    """Called by an object while it is pickled: it may go only to ``allowed``. Raises
    ``ValueError(refusal(pid))`` for a message to another process; records the rule when
    pickling ahead. The destination, if known (None otherwise)."""
    tls = PGRP.sending
    dest: int | None = getattr(tls, "pid", None)
    if dest is not None:
        if dest not in allowed:
            raise ValueError(refusal(dest))
        return dest
    ahead = getattr(tls, "ahead", None)
    if ahead is not None:
        ahead.rules.append((allowed, refusal))
    return None
