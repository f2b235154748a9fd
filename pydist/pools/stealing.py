"""Stealing: calls queued on a worker behind a long one, taken back for an idle worker.

A scheduler that keeps several calls in flight on a worker (``scheduler.py``: a drop-in's
window holds as many tasks as cover the round trip) may find one worker busy with a call
far longer than expected while the calls queued behind it wait and another worker is idle.
Those calls are taken back:

1. The scheduler numbers the calls it sends to each worker (``seq``, in the order sent)
   under a key of its own (an executor's). On the worker, each such call first passes the
   scheduler's *gate* (``claim``): it runs unless it was taken back, and the gate keeps the
   highest number started there.
2. When a worker falls idle with nothing pending, the calls queued behind one that has run
   four times its estimate, and at least ``STEAL_AFTER``, are due (``due``; or the time
   the first will be, for a timer). Each is marked ``revoking``, so it is asked once.
3. ``ask_back`` asks the worker (``revoke``, an operation answered by its reader thread
   without waiting for the running call) which of them have not started; those are
   answered ``REVOKED`` when they reach the gate.
4. ``taken_back`` takes them off the worker's books (``Slot.take_back``: no longer counted
   towards ``max_tasks``), and the scheduler sends their work again.

Only the drop-ins steal: ``pmap`` keeps one chunk in flight per worker while elements are
slow and sizes its chunks to a few milliseconds, so nothing long waits behind a chunk.
A scheduler that stops drops its gates on the workers (``drop_gate``).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from ..cluster.dispatch import OpContext, internal_op
from ..cluster.values import Failure
from .abstract import start_call
from .scheduler import Slot

__all__ = ["QueuedCall", "STEAL_AFTER", "REVOKED", "claim", "revoke", "drop_gate", "overdue",
           "due", "ask_back", "taken_back"]

STEAL_AFTER = 0.005      # seconds a call runs (at least) before those behind it may be stolen
REVOKED = "pydist-revoked"     # a call's answer once taken back before it started


class QueuedCall(Protocol):
    """A call in flight on a worker, as the scheduler that sent it books it."""

    seq: int             # its number on that worker, in the order sent
    sent: float          # when it was sent (``time.perf_counter``)
    settled: bool        # its outcome is decided (answered, lost or taken back)
    revoking: bool       # being asked back

    @property
    def units(self) -> int:
        """The units (tasks) it carries."""
        ...


S = TypeVar("S", bound=Slot)
C = TypeVar("C", bound=QueuedCall)


# -- on the worker: the gates ----------------------------------------------------------------
class _Gate:
    """One scheduler's gate on a worker: the last call started, and calls taken back."""

    __slots__ = ("started", "revoked")

    def __init__(self) -> None:
        self.started = 0
        self.revoked: set[int] = set()


_gates: dict[Any, _Gate] = {}
_gates_lock = threading.Lock()


def _gate(key: Any) -> _Gate:
    gate = _gates.get(key)
    if gate is None:
        gate = _gates[key] = _Gate()
    return gate


def claim(key: Any, seq: int) -> bool:
    """May call ``seq`` of scheduler ``key`` run? (No, if it was taken back.) Calls start
    in the order sent."""
    with _gates_lock:
        gate = _gate(key)
        if seq in gate.revoked:
            gate.revoked.discard(seq)
            return False
        if seq > gate.started:
            gate.started = seq
        return True


@internal_op
def revoke(ctx: OpContext, key: Any, seqs: list[int]) -> None:
    """Take back the calls ``seqs`` of scheduler ``key`` that have not started; answer
    which were taken."""
    with _gates_lock:
        gate = _gate(key)
        taken = [s for s in seqs if s > gate.started]
        gate.revoked.update(taken)
    ctx.reply(taken)


def drop_gate(key: Any) -> None:
    """Forget scheduler ``key``'s gate (it has stopped)."""
    with _gates_lock:
        _gates.pop(key, None)


# -- on the scheduler's side -------------------------------------------------------------------
def overdue(sent: float, units: int, per_task: float | None) -> float:
    """When the calls queued behind one sent at ``sent`` with ``units`` tasks may be
    stolen: once it has run four times its estimate, and ``STEAL_AFTER``."""
    return sent + max(STEAL_AFTER, 4 * (per_task or 0.0) * units)


def due(held: Iterable[tuple[S, Sequence[C]]], now: float,
        per_task: float | None) -> tuple[list[tuple[S, int, list[int]]], float | None]:
    """(Under the scheduler's lock.) Of each worker and its calls in flight (oldest, the
    running one, first): ``(worker, pid, seqs to ask back)`` for those whose running call
    is overdue (the calls asked are marked ``revoking``), and when the first of the others
    will be (``None``: none)."""
    victims: list[tuple[S, int, list[int]]] = []
    later: float | None = None
    for slot, calls in held:
        pid = slot.pid
        if pid is None or len(calls) < 2:
            continue
        running = calls[0]
        when = overdue(running.sent, running.units, per_task)
        if now < when:
            later = when if later is None else min(later, when)
            continue
        behind = list(calls)[1:]
        seqs = [c.seq for c in behind if not c.revoking]
        if seqs:
            for c in behind:
                c.revoking = True
            victims.append((slot, pid, seqs))
    return victims, later


def ask_back(pid: int, key: Any, seqs: list[int], then: Callable[[Any], None]) -> None:
    """Ask worker ``pid`` for scheduler ``key``'s calls ``seqs``; ``then(answer)`` follows
    on a reader thread (the list taken, or a ``Failure``). Nothing if ``pid`` is gone."""
    try:
        _, done = start_call(pid, revoke, (key, seqs), {}, keep=False)
    except Exception:
        return
    done.add_callback(then)


def taken_back(slot: Slot, calls: deque[C], answer: Any, max_tasks: int | None) -> list[C] | None:
    """(Under the scheduler's lock.) ``ask_back``'s ``answer`` for ``slot``, whose calls in
    flight are ``calls``: those taken back, settled and off its books (the others may be
    asked again); ``None`` if nothing was taken (or the worker is gone meanwhile)."""
    if type(answer) is Failure or not answer:
        for c in calls:
            c.revoking = False
        return None
    if slot.gone:
        return None
    taken = set(answer)
    moved: list[C] = []
    for c in list(calls):
        if c.seq in taken and not c.settled:
            c.settled = True
            calls.remove(c)
            moved.append(c)
        c.revoking = False
    slot.take_back(sum(c.units for c in moved), max_tasks)
    return moved
