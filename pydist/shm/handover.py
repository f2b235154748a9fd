"""Handing a connection's names over so that whichever end survives removes them.

A connection's segment and six semaphores have names in ``/dev/shm`` from their creation
until both ends have opened them. So that an end killed in between leaves nothing behind,
the dialer tells the acceptor every name *before* it creates anything, and from then on
each end answers for them: the dialer until the acceptor says it has opened them (it
unlinks them on any failure), the acceptor from the moment it has read the names until it
has unlinked them itself (it unlinks them whenever the rendezvous ends any other way:
end of file, a bad line, a timeout, its listener closing). The names outlive the
rendezvous only if both ends die inside it.

The lines on the rendezvous socket (one message each, at most ``MAX_LINE`` bytes)::

    dialer    {"v": 2, "capacity": C, "shm": N, "sems": [6 names]}   the intent; nothing exists yet
    dialer    {"instead": [TAKEN, FRESH]}   zero or more: TAKEN was in use, FRESH replaces it
    dialer    ready                         every object exists
    acceptor  opened                        every object is open, and its name unlinked
    acceptor  ok                            mapped, header checked: the connection stands

Instead of ``opened`` or ``ok`` the acceptor may send one line saying why not, and close.

A ``Claim`` is the acceptor's duty. It trusts only names of pydist's own form (the fixed
prefix and 64 random bits or more, ``segment.valid_name``); an intent with any other name
is refused whole, so a peer cannot make the acceptor unlink anything but pydist's objects.
"""
from __future__ import annotations

import json
import socket
import threading
import time

from ..errors import TransportBroken
from . import segment as seg
from .layout import SEM_COUNT, check_capacity

__all__ = ["VERSION", "MAX_LINE", "Claim", "LineReader", "intent_line", "instead_line",
           "settle_buffered"]

VERSION = 2
MAX_LINE = 4096
READY, OPENED, OK = b"ready", b"opened", b"ok"
# Each object may be renamed a few times (segment._CREATE_ATTEMPTS); a peer that renames
# more than this is not following the protocol.
_MAX_RENAMES = 8 * (1 + SEM_COUNT)


def intent_line(capacity: int, plan: seg.NamePlan) -> bytes:
    """The dialer's first line: the ring capacity and every name it is about to create."""
    intent = {"v": VERSION, "capacity": capacity, "shm": plan.shm, "sems": plan.sems}
    return json.dumps(intent).encode() + b"\n"


def instead_line(taken: str, fresh: str) -> bytes:
    """The line that tells the acceptor ``fresh`` replaces ``taken`` (sent before creating)."""
    return json.dumps({"instead": [taken, fresh]}).encode() + b"\n"


def _parse(line: bytes) -> object:
    try:
        return json.loads(line)
    except RecursionError:  # deeply nested brackets: not a message of ours
        raise ValueError("rendezvous message nested too deeply") from None


def _name(value: object) -> str:
    if not (isinstance(value, str) and seg.valid_name(value)):
        raise ValueError(f"rendezvous names {value!r:.80}: not a pydist object name")
    return value


class Claim:
    """The names an acceptor must unlink unless it unlinked them already.

    Made from the dialer's intent (``from_intent``), kept up to date with its ``instead``
    lines (``follow``); ``settle`` unlinks every name once, from whichever thread comes
    first. Thread-safe.
    """

    def __init__(self, capacity: int, shm: str, sems: list[str]) -> None:
        self.capacity = capacity
        self.shm = shm
        self.sems = sems
        self._renames = 0
        self._settled = False
        self._lock = threading.Lock()

    @classmethod
    def from_intent(cls, line: bytes) -> Claim:
        """The claim an intent line makes; ValueError (claiming nothing) if it is not one."""
        intent = _parse(line)
        if not isinstance(intent, dict) or intent.get("v") != VERSION:
            raise ValueError(f"unknown rendezvous intent {intent!r:.200}")
        capacity = check_capacity(intent.get("capacity"))
        sems = intent.get("sems")
        if not isinstance(sems, list) or len(sems) != SEM_COUNT:
            raise ValueError(f"a rendezvous intent must name {SEM_COUNT} semaphores")
        return cls(capacity, _name(intent.get("shm")), [_name(s) for s in sems])

    def follow(self, line: bytes) -> bool:
        """Take in the dialer's next line: True once it is ``ready``, False after a rename;
        ValueError for anything else."""
        if line == READY:
            return True
        message = _parse(line)
        pair = message.get("instead") if isinstance(message, dict) else None
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"unexpected rendezvous line {line[:200]!r}")
        taken, fresh = _name(pair[0]), _name(pair[1])
        with self._lock:
            if self._settled:
                raise ValueError("a rename after the names were given up")
            self._renames += 1
            if self._renames > _MAX_RENAMES:
                raise ValueError("too many renames in one rendezvous")
            if taken == self.shm:
                self.shm = fresh
            elif taken in self.sems:
                self.sems[self.sems.index(taken)] = fresh
            else:
                raise ValueError(f"rename of {taken}, which the intent did not name")
        return False

    def settle(self) -> None:
        """Unlink every claimed name (one already gone is fine); later calls do nothing."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
            seg.unlink_names(self.shm, self.sems)


def settle_buffered(data: bytes) -> bool:
    """Unlink the names in ``data``, what a peer nobody will serve had sent so far.

    Returns whether ``data`` began with a valid intent (only then is anything unlinked).
    """
    lines = data.split(b"\n")[:-1]  # complete lines only
    try:
        claim = Claim.from_intent(lines[0]) if lines else None
    except ValueError:
        return False
    if claim is None:
        return False
    for line in lines[1:]:
        try:
            if claim.follow(line):
                break
        except ValueError:
            break
    claim.settle()
    return True


class LineReader:
    """The rendezvous lines arriving on ``sock``, keeping bytes that came early."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._sock = sock
        self._where = where
        self._buffer = b""

    def line(self, deadline: float) -> bytes:
        """The next line without its newline, before ``deadline`` (``time.monotonic``)."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise TransportBroken(f"{self._where}: oversized rendezvous message")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self._where}: the shared-memory rendezvous timed out")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(MAX_LINE)
            if not chunk:
                raise TransportBroken(f"{self._where}: the peer hung up during the rendezvous")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if len(line) > MAX_LINE:
            raise TransportBroken(f"{self._where}: oversized rendezvous message")
        return line

    def expect_end(self) -> None:
        """Nothing may follow the last line of the rendezvous (the socket is a lifeline next)."""
        if self._buffer:
            raise TransportBroken(f"{self._where}: unexpected bytes after the rendezvous")
