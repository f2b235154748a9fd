"""How an end of a ring waits for its peer: a short spin where it pays, then a timed sleep.

Blocking on a semaphore costs ~50 µs when the peer has to wake a sleeping vCPU; a spin on
the shared counter answers in well under a microsecond, but only when the peer runs on
another vCPU: sharing one, the spin merely delays the peer (BASELINE.md). So an end spins
only when both hold:

* the ``SpinPolicy`` grants a budget: it starts at 20 µs, grows up to 150 µs after waits that
  ended soon after the spin gave up, halves after a wait over 400 µs, and after 3 misses in
  a row stops spinning except for a retry every 64 waits;
* the ``Placement`` says the peer can run on another vCPU meanwhile (``placement.py``);
* the waiting thread is the one that sent last on the connection: the one that expects the
  answer. A spin holds the GIL, so a reader thread that hands frames to another thread must
  not spin: the thread it has just handed a frame to could not run until the spin ended.

That is mode ``"auto"``; ``"on"`` (the ``spin=True`` argument, ``PYDIST_SHM_SPIN=1``) spins
whenever the policy grants a budget, ``"off"`` never.

No ``sched_yield`` in the spin: it would hand the vCPU to a busy process for a whole time
slice. The sleep is on the end's own semaphore, announced in its sleep word (``episode * 2 +
1``) with a full fence before the counter is re-checked, so the peer's post is never lost
(``fence.py``); every sleep is also bounded by ``WAIT_TIMEOUT`` and followed by a re-check.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from threading import get_ident

import posix_ipc

from ..errors import TransportBroken, TransportClosed
from .placement import MOVED, Placement

__all__ = ["WAIT_TIMEOUT", "LinkState", "SpinPolicy", "Waiter", "spin_mode"]

WAIT_TIMEOUT = 0.1  # seconds; every semaphore wait is bounded by this
_POLLS_PER_CLOCK = 32  # counter polls between two clock reads while spinning


class LinkState:
    """What one transport shares with its ring ends: this side closed, the link broken, and
    the thread that sent last (the one that spins: see ``Waiter``)."""

    __slots__ = ("closed", "broken", "sender")

    def __init__(self) -> None:
        self.closed = False
        self.broken: str | None = None
        self.sender = 0

    def check(self) -> None:
        """Raise if this side closed or the link is broken."""
        if self.broken is not None:
            raise TransportBroken(self.broken)
        if self.closed:
            raise TransportClosed("the shared-memory transport is closed")


class SpinPolicy:
    """Adaptive spin-then-block (start 20 µs, grow up to 150 µs on short misses, after 3
    misses in a row block and re-try spinning every 64 waits, halve after a wait over 400 µs).

    The ceiling is set by a master's turnaround between a reply and its next call through
    the drop-ins (tens of µs of bookkeeping): a worker that gives up sooner sleeps on every
    call, and each call then pays a wake-up (~50 µs) on top."""

    START_NS, MAX_NS, MIN_NS, LONG_NS = 20_000, 150_000, 5_000, 400_000
    MISSES_TO_BLOCK, RETRY_EVERY = 3, 64

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.budget_ns = self.START_NS
        self._misses = 0
        self._blocked_waits = 0

    def budget(self) -> int:
        """Nanoseconds to spin before sleeping on this wait (0: sleep at once)."""
        if not self.enabled:
            return 0
        if self._misses < self.MISSES_TO_BLOCK:
            return self.budget_ns
        self._blocked_waits += 1
        return self.budget_ns if self._blocked_waits % self.RETRY_EVERY == 0 else 0

    def hit(self) -> None:
        self._misses = 0

    def reset(self) -> None:
        """Start afresh (the circumstances the misses were learned in have changed)."""
        self.budget_ns = self.START_NS
        self._misses = self._blocked_waits = 0

    def miss(self, waited_ns: int, spun: bool) -> None:
        if spun:
            self._misses += 1
        if waited_ns > self.LONG_NS:  # the peer was far away: spinning longer would not help
            self.budget_ns = max(self.MIN_NS, self.budget_ns // 2)
        else:  # the answer came soon after we gave up: a longer spin would have caught it
            self.budget_ns = min(self.MAX_NS, self.budget_ns * 3 // 2)


def _acquire(sem: posix_ipc.Semaphore, timeout: float) -> None:
    """One bounded wait; a timeout or a signal simply returns (the caller re-checks)."""
    try:
        sem.acquire(timeout)
    except (posix_ipc.BusyError, posix_ipc.SignalError):
        pass


class Waiter:
    """Waits for a word of one ring's control block to move (spin, then sleep), and wakes
    the peer that sleeps on the other side.

    ``mode`` is ``"auto"``, ``"on"`` or ``"off"`` (see the module's story).
    """

    def __init__(self, ctl: memoryview, store_load: Callable[[int, int, int], int], *,
                 own_sem: posix_ipc.Semaphore, peer_sem: posix_ipc.Semaphore,
                 state: LinkState, placement: Placement | None, mode: str) -> None:
        self._ctl = ctl
        self._store_load = store_load
        self.own_sem = own_sem  # we sleep on it
        self.peer_sem = peer_sem  # we post it when the peer sleeps
        self._state = state
        self.policy = SpinPolicy(mode != "off")
        self._placement = placement  # published to in every mode (the peer may consult it)
        self._consult = placement is not None and mode == "auto"
        self._episode = 0
        self._last_woken = 0

    def wake_peer(self, sleep: int) -> None:
        """Post the peer's semaphore if its sleep word says it sleeps (once per episode)."""
        if sleep & 1 and sleep != self._last_woken:
            self._last_woken = sleep
            if self._placement is not None:
                self._placement.woke_peer()
            self.peer_sem.release()

    def wait(self, watch: int, seen: int, sleep_word: int, closed_word: int,
             check: Callable[[], None], timeout: float | None = None) -> bool:
        """Return True once ``ctl[watch]`` has moved from ``seen``, False if ``timeout``
        seconds passed first; ``check()`` raises when no move will ever come."""
        policy, placement = self.policy, self._placement
        budget = 0
        if policy.enabled:
            where = 1  # mode "on"
            if self._consult:  # mode "auto": the sending thread, if the peer runs elsewhere
                where = 0
                if self._state.sender == get_ident() and placement is not None:   # (it is)
                    where = placement.apart()
            if where == MOVED:
                policy.reset()  # misses on the old vCPU say nothing about the new one
            budget = policy.budget() if where else 0
            if timeout is not None:
                budget = min(budget, int(timeout * 1e9))
        if budget:
            start = time.perf_counter_ns()
            if self._spin(watch, seen, start + budget):
                policy.hit()
                return True  # (in "auto" mode `apart()` has just published our vCPU)
            news = self._sleep(watch, seen, sleep_word, closed_word, check,
                                None if timeout is None else timeout - budget / 1e9)
            policy.miss(time.perf_counter_ns() - start, True)
        else:
            news = self._sleep(watch, seen, sleep_word, closed_word, check, timeout)
        if news and placement is not None:
            placement.publish()  # we run again, maybe on another vCPU than before
        return news

    def _spin(self, watch: int, seen: int, deadline: int) -> bool:
        # Plain loads are only a hint here; the caller re-reads through the fence.
        ctl, clock, polls = self._ctl, time.perf_counter_ns, range(_POLLS_PER_CLOCK)
        while True:
            for _ in polls:
                if ctl[watch] != seen:
                    return True
            if clock() >= deadline:
                return False

    def _sleep(self, watch: int, seen: int, sleep_word: int, closed_word: int,
               check: Callable[[], None], timeout: float | None) -> bool:
        ctl, state, sem = self._ctl, self._state, self.own_sem
        deadline = None if timeout is None else time.monotonic() + timeout
        self._episode += 1
        asleep = (self._episode << 1) | 1
        try:
            while self._store_load(sleep_word, asleep, watch) == seen:
                if state.closed or state.broken is not None or ctl[closed_word]:
                    check()  # cheap test first: this path runs before every sleep
                wait = WAIT_TIMEOUT
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                _acquire(sem, wait)
                if ctl[watch] != seen:  # woken with news (the caller re-reads it fenced)
                    break
                check()
        finally:
            # A plain store: if the peer sees "asleep" a little longer it merely posts once.
            ctl[sleep_word] = asleep - 1
        return True


def spin_mode(forced: bool | None, same_process: bool) -> str:
    """The ``Waiter`` mode for a connection: ``forced`` (the ``spin`` argument) first, then
    ``PYDIST_SHM_SPIN=0``/``1``; otherwise ``"auto"``, except between two threads of one
    process (a spinning thread holds the GIL the other one needs)."""
    if forced is not None:
        return "on" if forced else "off"
    env = os.environ.get("PYDIST_SHM_SPIN", "")
    if env in ("0", "1"):
        return "on" if env == "1" else "off"
    return "off" if same_process else "auto"
