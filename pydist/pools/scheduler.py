"""Scheduling work on the workers one holds: the service ``pmap`` and the drop-ins share.

Both engines hold some workers for a while (taken from a pool, or, for an executor that
starts its own, lent by its own pool as they start) and keep each busy with calls in
flight, so that a worker never waits for a round trip. The units differ (``pmap`` sends
chunks of elements, a drop-in batches of tasks); the scheduling is the same, and lives
here:

* **The books of a held worker** (``Slot``): how much it holds now (``load``: calls or
  tasks sent and not answered), how much it was given in its life (``assigned``), and
  whether it takes more (``retiring``: it leaves once idle). One owner each: a map's loop,
  an executor's lock.
* **Windows** (``most_room``): how much a worker may hold follows the ``Pace`` learnt
  from the replies: ``chunks_in_flight`` for ``pmap`` (chunks sized for a few
  milliseconds each), ``tasks_held`` for the drop-ins (tasks of any size). The next unit
  goes to the worker with the most room: the least loaded, first held on a tie.
* **The pace** (``Pace``): a reply says how long its tasks ran on the worker; a call that
  was alone on its worker also says how long the round trip took beyond that work.
  ``Pace`` keeps moving averages of both (the newest sample weighs 0.3 for task times,
  0.2 for round trips, which change less).
* **Recycling** (``Slot.give``): a worker given ``max_tasks`` units in its life retires
  (``max_tasks_per_child``); units taken back from it (stealing) no longer count.
* **Sharing the pool** (``yield_one``, ``wait_for_one``, ``give_back``): while someone else waits for a
  worker of the pool, the least loaded of several held workers retires, so it goes back
  once idle; a worker goes back through the pool's ``put_back``, and a pool whose owner is
  gone has nothing to take it. Workers are looked for at most every ``POLL`` seconds
  (``AbstractWorkerPool.poll``), and waited for (``take``) only when none is held, so the
  pool's other users see a taker waiting.
* **Stealing** (``stealing.py``): the calls queued behind one that has run well past the
  time its tasks should take are taken back for an idle worker, through a gate on the
  worker. Only the drop-ins queue several calls of unknown length behind each other, so
  only they steal (``pmap`` holds one chunk per worker while elements are slow, and
  shrinks its chunks towards the end).
* **Retries** of a message that failed as a whole (``retry_apart``): its units are tried
  again one by one, so that each gets its own outcome. ``pmap``'s retries of a failed
  element (``retry_delays``) are ``retries.py``.
"""
from __future__ import annotations

import queue
import time
from collections.abc import Iterable
from typing import TypeVar

from .abstract import AbstractWorkerPool

__all__ = ["Pace", "Slot", "most_room", "yield_one", "wait_for_one", "give_back", "retry_apart", "chunks_in_flight",
           "tasks_held", "POLL", "WINDOW", "SLOW_ELEMENT", "AHEAD_TIME", "MAX_AHEAD"]

POLL = 0.05              # seconds between looks for more free workers
WINDOW = 3               # pmap: chunks in flight per worker, once element times are known
SLOW_ELEMENT = 0.02      # pmap: seconds an element takes from which one chunk is in flight
AHEAD_TIME = 0.002       # drop-ins: seconds of work to keep queued on a worker (at least)
MAX_AHEAD = 2048         # drop-ins: tasks in flight per worker at most


class Pace:
    """Seconds a task takes on the workers and the round trip beyond it, from replies (one
    owner each, a map's loop or an executor's dispatcher, so no lock)."""

    __slots__ = ("per_task", "rtt")

    def __init__(self) -> None:
        self.per_task: float | None = None    # seconds per task (element) there
        self.rtt = 0.0005                     # seconds of round trip beyond the work

    def learn(self, ntasks: int, elapsed: float, round_trip: float | None = None) -> None:
        """``ntasks`` ran ``elapsed`` seconds there; ``round_trip``: the time from send to
        reply beyond that, when the call was alone on its worker."""
        per = elapsed / ntasks
        self.per_task = per if self.per_task is None else 0.7 * self.per_task + 0.3 * per
        if round_trip is not None:
            self.rtt = 0.8 * self.rtt + 0.2 * min(max(0.0, round_trip), 0.05)

    def window(self, slow: float, deep: int) -> int:
        """Calls in flight per worker: 1 until timed and for tasks of ``slow`` seconds or
        more, else ``deep``."""
        per = self.per_task
        return 1 if per is None or per >= slow else deep

    def hold(self, ahead: float, most: int) -> int:
        """Tasks a worker may hold: 1 until timed, then enough for ``ahead`` seconds of
        work or two round trips, whichever is more (at most ``most`` besides the first)."""
        per = self.per_task
        if per is None:
            return 1
        return 1 + min(most, int(max(2 * self.rtt, ahead) / max(per, 1e-7)))


S = TypeVar("S", bound="Slot")


class Slot:
    """The books of one held worker (``pid`` is ``None`` while it starts)."""

    __slots__ = ("pid", "load", "assigned", "retiring", "gone", "unreachable", "idle_since")

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.load = 0             # units sent (or about to be) and not answered
        self.assigned = 0         # units given to it in its life (max_tasks_per_child)
        self.retiring = False     # takes no more; leaves once idle
        self.gone = False         # off the books (dead, retired, given back)
        self.unreachable = False  # a send to it failed: nothing more goes there
        self.idle_since = time.monotonic()

    def open(self) -> bool:
        """Whether it may be given more."""
        return not (self.retiring or self.gone or self.unreachable)

    def room(self, cap: int, max_tasks: int | None) -> int:
        """Units it may be given now, holding at most ``cap`` (and ``max_tasks`` in its life)."""
        r = cap - self.load
        if max_tasks is not None:
            r = min(r, max_tasks - self.assigned)
        return r

    def give(self, n: int, max_tasks: int | None) -> None:
        """``n`` more units; it retires once given ``max_tasks`` in its life."""
        self.load += n
        self.assigned += n
        if max_tasks is not None and self.assigned >= max_tasks:
            self.retiring = True

    def answered(self, n: int) -> None:
        """``n`` of its units are answered (or lost)."""
        self.load -= n
        if not self.load:
            self.idle_since = time.monotonic()

    def leaving(self) -> bool:
        """Whether it retired and is now idle: it leaves the books (given back, or its
        process removed)."""
        return self.retiring and not self.load and not self.gone

    def take_back(self, n: int, max_tasks: int | None) -> None:
        """``n`` units taken back before they ran (stolen): they count for it no more."""
        self.load -= n
        self.assigned -= n
        if max_tasks is not None and self.assigned < max_tasks:
            self.retiring = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.pid} load={self.load} assigned={self.assigned}>"


def most_room(slots: Iterable[S], cap: int, max_tasks: int | None) -> tuple[S | None, int, int]:
    """(the open slot with the most room, its room, how many open slots have room): the
    next unit goes to the least loaded worker, the first held on a tie."""
    best, room, avail = None, 0, 0
    for s in slots:
        if s.retiring or s.gone or s.unreachable:
            continue
        r = s.room(cap, max_tasks)
        if r > 0:
            avail += 1
            if r > room:
                best, room = s, r
    return best, room, avail


def chunks_in_flight(pace: Pace) -> int:
    """``pmap``'s window: one chunk until an answer says how long elements take, and
    while they are slow (a second chunk would wait behind the first while another worker
    may be idle); ``WINDOW`` while they are quick."""
    return pace.window(SLOW_ELEMENT, WINDOW)


def tasks_held(pace: Pace) -> int:
    """The drop-ins' window: one task until tasks are timed, then enough to cover the
    round trip (many tiny tasks, one long one)."""
    return pace.hold(AHEAD_TIME, MAX_AHEAD)


def yield_one(slots: Iterable[S], waiting: int) -> S | None:
    """While ``waiting`` others wait for a worker of the pool, the least loaded of several
    open slots retires (it goes back once idle); one is always kept. The slot, or None."""
    if not waiting:
        return None
    working = [s for s in slots if not s.retiring and not s.gone]
    if len(working) < 2:
        return None
    s = min(working, key=lambda s: s.load)
    s.retiring = True
    return s


def wait_for_one(pool: AbstractWorkerPool) -> int | None:
    """A worker of ``pool``, waiting ``POLL`` seconds at most as a taker (so that the pool's
    other users see one waiting and hand one over): its pid, or ``None`` if none came.
    Other failures (the pool's owner is gone) propagate."""
    try:
        return pool.take(timeout=POLL)
    except (TimeoutError, queue.Empty):    # (a user's pool may say "none" its own way)
        return None


def give_back(pool: AbstractWorkerPool, pid: int) -> None:
    """Put ``pid`` back into ``pool``; a pool whose owner is gone takes nothing back."""
    try:
        pool.put_back(pid)
    except Exception:
        pass


def retry_apart(nunits: int) -> bool:
    """A message of ``nunits`` failed as a whole: whether its units are tried again one by
    one (several), or the failure is its unit's own (one)."""
    return nunits > 1
