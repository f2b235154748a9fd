"""How much work to keep on each worker, learnt from the replies: the pacing that ``pmap``
and the drop-ins share.

A reply says how long its tasks ran on the worker; a call that was alone on its worker
also says how long the round trip took beyond that work. ``Pace`` keeps moving averages
of both (the newest sample weighs 0.3 for task times, 0.2 for round trips, which change
less). From them:

* ``window``: how many chunks ``pmap`` keeps in flight per worker: one until a time is
  known and while elements are slow (a second chunk would wait behind the first while
  another worker may be idle), several while they are quick (so a worker never waits for
  a round trip);
* ``hold``: how many tasks a drop-in lets a worker hold: one until a time is known, then
  enough work to cover the round trip (many tiny tasks, one long one).

One owner each (a map's loop, an executor's dispatcher), so no lock.
"""
from __future__ import annotations

__all__ = ["Pace"]


class Pace:
    """Seconds a task takes on the workers and the round trip beyond it, from replies."""

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
