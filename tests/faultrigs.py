"""Where the fault matrix's cells run: *rigs* of workers kept from cell to cell, and calls
guarded against hanging.

A rig is made ready before a cell's leak check starts (so a worker started to replace one
an earlier cell killed is not taken for a leak), and tidied by the cell itself at its end
(so whatever the cell broke is gone before the leak check looks).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from multiprocessing import TimeoutError as MpTimeoutError
from typing import Any

import faultkit as fk
from faulttable import bound
from testkit import wait_until

import pydist as pd

WAIT = 20.0                 # seconds: a bound for waits that are not what a cell measures
GUARD = 0.5   # seconds beyond bound() to wait for an answer that is due within bound()


class Hang(AssertionError):
    """A call was not answered in time."""


class Guard:
    """Runs calls that may hang in threads of their own; the cell joins them at its end,
    once its clean-up has released whatever they wait for."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> tuple[Any, BaseException | None, float]:
        """``fn()``'s (value, error, moment it ended); ``Hang`` after ``timeout`` s."""
        timeout = bound() + GUARD if timeout is None else timeout
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:   # SystemExit too: some cells expect it
                box["error"] = e
            box["t"] = time.monotonic()
        th = self.start(run)
        th.join(timeout)
        if th.is_alive():
            raise Hang(f"no answer within {timeout} s")
        return box.get("value"), box.get("error"), box["t"]

    def start(self, fn: Callable[[], Any]) -> threading.Thread:
        """Run ``fn`` in a thread the cell joins at its end."""
        th = threading.Thread(target=fn, name="fault-call", daemon=True)
        self.threads.append(th)
        th.start()
        return th

    def join(self) -> None:
        for th in self.threads:
            th.join(WAIT)


def outcome(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the exception it raised."""
    try:
        return fn()
    except BaseException as e:
        return e


class WorkerRig:
    """Two workers for ``remotecall_fetch`` and ``pmap`` cells: the first takes the fault,
    the second runs the siblings. Dead or removed ones are replaced before the next cell."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.pids: list[int] = []

    def ready(self) -> None:
        live = set(pd.workers())
        self.pids = [p for p in self.pids if p in live]
        if len(self.pids) < 2:
            self.pids += pd.addprocs(2 - len(self.pids), transport=self.transport)

    def after(self, ok: bool) -> None:
        """At the end of a cell: drop the dead, and remove every worker if it failed (a
        worker it broke may hold a call that never ends)."""
        doomed = [p for p in self.pids if not ok or p not in pd.workers()]
        self.pids = [p for p in self.pids if p not in doomed]
        alive = [p for p in doomed if p in pd.workers()]
        if alive:
            pd.rmprocs(*alive, waitfor=WAIT)

    def close(self) -> None:
        self.after(False)


class DropinRig:
    """A warm ``ProcessPoolExecutor`` or ``Pool`` of two workers; a cell that kills one of
    them (or shuts it down) spoils it, and the next cell gets a new one."""

    def __init__(self, api: str, transport: str, obj: Any = None) -> None:
        self.api, self.transport = api, transport
        self.obj: Any = obj
        self.ids: set[int] = set()

    def ready(self) -> None:
        if self.obj is not None:
            return
        if self.api == "executor":
            self.obj = pd.ProcessPoolExecutor(2, transport=self.transport)
        else:
            self.obj = pd.Pool(2, transport=self.transport)
        warm = [self.submit(fk.square, i, 0.05) for i in range(2)]
        for f in warm:
            self.get(f, WAIT)
        assert wait_until(lambda: len(self.processes()) == 2, WAIT)
        self.ids = {p.worker_id for p in self.processes()}

    def processes(self) -> list[Any]:
        """Its worker processes (the standard library's ``_processes`` / ``_pool``)."""
        try:
            procs = self.obj._processes if self.api == "executor" else self.obj._pool
        except Exception:     # a broken or closed pool may not say
            return []
        return list(procs.values()) if isinstance(procs, dict) else list(procs)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.api == "executor":
            return self.obj.submit(fn, *args)
        return self.obj.apply_async(fn, args)

    def get(self, fut: Any, timeout: float) -> Any:
        try:
            return fut.result(timeout=timeout) if self.api == "executor" else fut.get(timeout)
        except (TimeoutError, MpTimeoutError):
            raise Hang(f"no answer within {timeout} s") from None

    def settle(self, fut: Any, timeout: float | None = None) -> tuple[Any, BaseException | None, float]:
        """(value, error, moment it came) of ``fut``; ``Hang`` after ``timeout`` s."""
        timeout = bound() + GUARD if timeout is None else timeout
        try:
            value = self.get(fut, timeout)
        except Hang:
            raise
        except BaseException as e:
            return None, e, time.monotonic()
        return value, None, time.monotonic()

    def answers(self) -> bool:
        """Does it still run tasks, and right?"""
        try:
            futures = [self.submit(fk.square, i) for i in range(4)]
            return [self.get(f, WAIT) for f in futures] == [0, 1, 4, 9]
        except Hang:
            raise
        except BaseException:
            return False

    def intact(self) -> bool:
        return self.obj is not None and self.ids <= set(pd.workers())

    def shut(self) -> None:
        """Shut it down and make sure its workers are gone; forget it."""
        obj = self.obj
        if obj is None:
            return
        ids = {p.worker_id for p in self.processes()} | self.ids
        self.obj = None
        if self.api == "executor":
            done = threading.Thread(target=obj.shutdown, kwargs={"cancel_futures": True}, daemon=True)
            done.start()
            done.join(WAIT)
        else:
            obj.terminate()
            obj.join()
        left = [p for p in ids if p in pd.workers()]
        if left:       # something hung: remove its workers by force
            pd.rmprocs(*left, waitfor=WAIT)

    def after(self, ok: bool) -> None:
        if not ok or not self.intact():
            self.shut()

    def close(self) -> None:
        self.shut()


class Rigs:
    """One rig at a time (cells come grouped by transport, then API)."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.rig: Any = None

    def get(self, api: str, transport: str) -> Any:
        kind = "workers" if api in ("remotecall_fetch", "pmap") else api
        if (kind, transport) != self.key:
            self.close()
            self.key = (kind, transport)
            self.rig = WorkerRig(transport) if kind == "workers" else DropinRig(api, transport)
        self.rig.ready()
        return self.rig

    def close(self) -> None:
        if self.rig is not None:
            self.rig.close()
        self.rig = self.key = None
