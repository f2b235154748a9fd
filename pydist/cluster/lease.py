"""Heartbeat leases: a remote worker lives only while its master keeps renewing its lease.

A worker on this host learns of its master's death from its lifeline (the end of its
standard input). Over SSH that end comes only when the ssh session closes, and a master
that vanishes silently (a host powered off, a cable pulled, a process stopped) leaves its
TCP connections open for a very long time. So a worker started with ``--lease SECONDS``
also needs to hear from its master at least once per lease:

- On the master, ``renew(pid, lease)`` puts worker ``pid`` on the heartbeat list: a daemon
  thread sends it a tiny ``remote_do`` of ``_beat`` (an internal operation, run on the
  worker's reader thread, never queued behind user calls) every ``lease / BEATS_PER_LEASE``
  seconds, until ``forget(pid)`` or the worker is gone. A slow send to one worker (a big
  frame in the way) never delays the others: each beat is sent by a small pool of threads
  and a worker whose previous beat is still on its way is skipped.
- On the worker, ``watch(lease, joined, on_expiry)`` starts a watchdog once the worker has
  joined: if no beat arrives for ``lease`` seconds it says so on stderr and the worker
  exits. A watchdog that was itself kept from running (a call holding the GIL) looks once
  more before it decides, so beats that wait unread are not mistaken for silence.

A beat is one small frame per worker per period: with the default lease of 30 s, one
frame every 7.5 s.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..errors import ProcessExitedException
from ..wire.messages import NULL_HEADER, RemoteDoMsg
from .dispatch import OpContext, internal_op
from .group import PGRP

__all__ = ["DEFAULT_LEASE", "BEATS_PER_LEASE", "renew", "forget", "watch",
           "check_lease"]

DEFAULT_LEASE = 30.0
BEATS_PER_LEASE = 4
_SENDERS = 4
_EXIT_DEADLINE = 5.0


def check_lease(lease: object) -> float:
    """``lease`` as seconds (0 means no lease); ``ValueError`` if it is not a number >= 0."""
    if lease is None:
        return 0.0
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease >= 0:
        raise ValueError(f"lease must be a number of seconds >= 0 (0: no lease), not {lease!r}")
    return float(lease)


# -- the master's side ------------------------------------------------------------------
class _Heartbeat:
    """The master's heartbeat thread and the workers it keeps alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._due: dict[int, tuple[float, float]] = {}   # pid -> (next beat, period)
        self._in_flight: set[int] = set()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def add(self, pid: int, lease: float) -> None:
        period = lease / BEATS_PER_LEASE
        with self._lock:
            self._due[pid] = (0.0, period)   # the first beat goes out at once
            if self._thread is None:
                self._pool = ThreadPoolExecutor(_SENDERS, thread_name_prefix="pydist-beat")
                self._thread = threading.Thread(target=self._run, name="pydist-heartbeat",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def remove(self, pid: int) -> None:
        with self._lock:
            self._due.pop(pid, None)

    def _run(self) -> None:
        while True:
            with self._lock:   # find the due beats and wait under one lock: no lost wake-up
                while True:
                    now = time.monotonic()
                    ready = []
                    for pid, (at, period) in list(self._due.items()):
                        if at <= now:
                            self._due[pid] = (now + period, period)
                            if pid not in self._in_flight:   # else skip: the last is still going
                                self._in_flight.add(pid)
                                ready.append(pid)
                    if ready:
                        break
                    upcoming = min((at for at, _ in self._due.values()), default=now + 60.0)
                    self._wake.wait(max(0.0, upcoming - now))
                pool = self._pool
            assert pool is not None
            for pid in ready:
                pool.submit(self._send, pid)

    def _send(self, pid: int) -> None:
        try:
            PGRP.send(pid, NULL_HEADER, RemoteDoMsg(_beat, (), {}))
        except (ProcessExitedException, ValueError, OSError):
            self.remove(pid)   # gone: nothing left to keep alive
        except Exception as e:  # never let one worker's trouble stop the thread
            print(f"pydist: heartbeat to worker {pid} failed: {e!r}", file=sys.stderr)
        finally:
            with self._lock:
                self._in_flight.discard(pid)


_HEARTBEAT = _Heartbeat()


def renew(pid: int, lease: float) -> None:
    """Keep renewing worker ``pid``'s lease of ``lease`` seconds (on the master)."""
    if lease > 0:
        _HEARTBEAT.add(pid, lease)


def forget(pid: int) -> None:
    """Stop renewing worker ``pid``'s lease."""
    _HEARTBEAT.remove(pid)


# -- the worker's side ------------------------------------------------------------------
_last_beat = time.monotonic()


@internal_op
def _beat(ctx: OpContext) -> None:
    """On a worker: the master is alive."""
    global _last_beat
    _last_beat = time.monotonic()


def watch(lease: float, joined: threading.Event, on_expiry: Callable[[int], None]) -> None:
    """On a worker: call ``on_expiry(1)`` if, once joined, no beat comes for ``lease`` s."""
    tick = max(lease / 8, 0.05)

    def run() -> None:
        global _last_beat
        while not joined.wait(0.5) and 1 not in PGRP.workers:
            pass
        _last_beat = before = time.monotonic()
        while True:
            now = time.monotonic()
            # A tick that comes late means this process could not run (a call holding the
            # GIL, a stopped process): beats may be waiting unread, so decide a tick later.
            starved, before = now - before > 2 * tick + 0.5, now
            if _last_beat + lease <= now and not starved:
                # Exit even if saying goodbye blocks (output to a master that is gone).
                deadline = threading.Timer(_EXIT_DEADLINE, os._exit, (1,))
                deadline.daemon = True
                deadline.start()
                print(f"pydist-worker: no heartbeat from the master for {lease:g} s "
                      f"(the lease); exiting", file=sys.stderr, flush=True)
                on_expiry(1)
                return
            time.sleep(tick)
    threading.Thread(target=run, name="pydist-lease", daemon=True).start()
