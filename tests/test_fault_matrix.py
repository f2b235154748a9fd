"""The fault matrix: every fault × phase × transport × API, each cell checked against the
outcome written down for it in faulttable.py (and docs/fault-matrix.md).

Each cell strikes its fault (faultkit.py) in its phase, with sibling work in flight, and
checks: the error the caller gets (type, what it wraps, message), how long it took from
the fault (< 1 s), whether the worker or pool survives, what the siblings got; the leak
oracle checks that nothing is left. Workers are kept from cell to cell where the fault
leaves them alive (a *rig* per API and transport); a cell that kills or removes a worker
replaces it before the next cell starts. Run with ``-s`` to see the measured times.
"""
from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faultkit as fk
import pytest
from faultrigs import WAIT, DropinRig, Guard, Hang, Rigs, WorkerRig, outcome
from faulttable import DEATHS, Seen, check, expected, render
from testkit import TRANSPORTS, wait_until

import pydist as pd

HOLD = 0.3                  # seconds a worker stays busy before a fault during removal
SIBLING_DELAY = 0.05        # seconds each sibling call takes
TIMES: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)


@dataclass(frozen=True)
class Cell:
    fault: str
    phase: str
    api: str
    transport: str

    @property
    def id(self) -> str:
        return f"{self.fault}-{self.phase}-{self.api}-{self.transport}"


# -- faults in a call: pickling, unpickling, running, the result's pickling and unpickling ----------
def carrier(cell: Cell, marker: str) -> Any:
    """The element that takes ``cell``'s fault into its phase (run by ``fk.element_fault``)."""
    if cell.phase in ("pickle_call", "unpickle_call"):
        return fk.call_fault(cell.fault, cell.phase, marker)
    if cell.phase == "run":
        return fk.Planned(fk.run_fault, cell.fault, marker)
    if cell.phase == "pickle_result":
        return fk.Planned(fk.result_fault, cell.fault, marker)
    return fk.Planned(fk.result_bad_on_master, cell.fault)


def in_call(cell: Cell, rig: Any, guard: Guard, tmp: Path) -> Seen:
    """The fault rides on a call's argument, its function or its result; siblings are in
    flight meanwhile."""
    marker = str(tmp / "marker")
    x = carrier(cell, marker)
    killer = fk.kill_later(marker) if cell.fault == "sigkill" else None
    return IN_CALL[cell.api](rig, guard, x, killer)


def _since(t0: float, killer: fk.Killer | None, stamp: str | Path | None = None) -> float:
    """When the fault struck: when it was killed, or the moment it stamped, or else ``t0``
    (it strikes as soon as the call gets there)."""
    if killer is not None:
        return killer.outcome()[0]
    return fk.read_stamp(stamp, WAIT) if stamp is not None else t0


def rc_in_call(rig: WorkerRig, guard: Guard, x: Any, killer: fk.Killer | None) -> Seen:
    a, b = rig.pids
    sibling = pd.remotecall(fk.square, b, 7, SIBLING_DELAY)
    t0 = time.monotonic()
    value, error, t1 = guard.call(lambda: pd.remotecall_fetch(fk.element_fault, a, x))
    seen = Seen(error, value, t1 - _since(t0, killer))
    seen.siblings = [(49, outcome(lambda: sibling.fetch(timeout=WAIT)))]
    seen.survives = worker_answers(guard, a)
    return seen


def pmap_in_call(rig: WorkerRig, guard: Guard, x: Any, killer: fk.Killer | None) -> Seen:
    """The faulty element comes first (so it is sent alone, to the first worker taken);
    ``on_error`` hands back each element's error as its result."""
    pool = pd.WorkerPool(rig.pids)
    items = [x] + list(range(1, 8))
    t0 = time.monotonic()
    value, error, t1 = guard.call(lambda: pd.pmap(fk.element_fault, items, pool=pool,
                                                  on_error=lambda e: e))
    seen = Seen(error, value, t1 - _since(t0, killer))
    if error is None:
        seen.error = value[0] if isinstance(value[0], BaseException) else None
        seen.siblings = [(i * i, v) for i, v in zip(items[1:], value[1:])]
    seen.survives = all(p in pd.workers() for p in rig.pids)
    assert_pool_answers(guard, pool)
    return seen


def dropin_in_call(rig: DropinRig, guard: Guard, x: Any, killer: fk.Killer | None) -> Seen:
    """The faulty task goes first (an idle worker starts it at once), then siblings, some
    queued behind it. It has another function than theirs, so it travels in a message of
    its own (a task sharing one with a crash is run again: compat_tests/DIVERGENCES.md, 12)."""
    t0 = time.monotonic()
    culprit = rig.submit(fk.element_fault, x)
    siblings = [rig.submit(fk.square, i, SIBLING_DELAY / 2) for i in range(1, 7)]
    value, error, t1 = rig.settle(culprit)
    seen = Seen(error, value, t1 - _since(t0, killer))
    seen.siblings = [(i * i, outcome(lambda f=f: rig.get(f, WAIT)))
                     for i, f in zip(range(1, 7), siblings)]
    seen.survives = rig.answers()
    return seen


IN_CALL = {"remotecall_fetch": rc_in_call, "pmap": pmap_in_call,
           "executor": dropin_in_call, "pool": dropin_in_call}


def worker_answers(guard: Guard, pid: int) -> bool:
    if pid not in pd.workers():
        return False
    value, error, _ = guard.call(lambda: pd.remotecall_fetch(fk.square, pid, 3), WAIT)
    return error is None and value == 9


def assert_pool_answers(guard: Guard, pool: pd.WorkerPool) -> None:
    value, error, _ = guard.call(lambda: pd.pmap(fk.square, range(6), pool=pool), WAIT)
    assert error is None and value == [x * x for x in range(6)], \
        f"the pool does not answer after the fault: {error or value!r}"


def map_in_background(guard: Guard, fn: Callable[..., Any], pool: pd.WorkerPool, *iterables: list,
                      **kwargs: Any) -> Callable[[], Any]:
    """Start ``pmap(fn, *iterables, pool=pool, **kwargs)`` in a thread; a function that
    waits for its list (or error)."""
    box: dict[str, Any] = {}
    th = guard.start(lambda: box.update(out=outcome(lambda: pd.pmap(fn, *iterables, pool=pool,
                                                                    **kwargs))))

    def result() -> Any:
        th.join(WAIT)
        if th.is_alive():
            raise Hang("the map did not finish")
        return box["out"]
    return result


# -- an idle worker ---------------------------------------------------------------------------------
def idle(cell: Cell, rig: Any, guard: Guard, tmp: Path) -> Seen:
    """A worker between calls dies (os._exit or a segfault in a thread of its own, SIGKILL
    from outside), or a thread of its own raises or calls sys.exit."""
    trigger = tmp / "trigger"
    if cell.api in ("remotecall_fetch", "pmap"):
        pool = pd.WorkerPool(rig.pids)
        ospid, wid = pd.remotecall_fetch(fk.arm_idle, rig.pids[0], cell.fault, str(trigger))
    else:
        ospid, wid = rig.get(rig.submit(fk.arm_idle, cell.fault, str(trigger)), WAIT)
    t0 = time.monotonic()
    if cell.fault == "sigkill":
        os.kill(ospid, signal.SIGKILL)
    else:
        trigger.touch()
    seen = Seen()
    if cell.fault != "sigkill":
        t0 = fk.read_stamp(str(trigger) + ".struck", WAIT)     # the thread struck then
    if cell.fault in DEATHS:
        assert wait_until(lambda: wid not in pd.workers(), WAIT, interval=0.001), \
            f"worker {wid} died while idle and is still listed"
        seen.seconds = time.monotonic() - t0
    else:
        time.sleep(0.01)      # it is striking: let it finish
    if cell.api == "remotecall_fetch":
        value, seen.error, _ = guard.call(lambda: pd.remotecall_fetch(fk.square, wid, 3))
        seen.survives = wid in pd.workers() and value == 9
    elif cell.api == "pmap":
        seen.survives = wid in pd.workers()
        assert_pool_answers(guard, pool)
    else:
        seen.survives = rig.answers()
    return seen


# -- a worker that faults as it starts ----------------------------------------------------------------
def at_addprocs(cell: Cell, rig: Any, guard: Guard, tmp: Path) -> Seen:
    if cell.api in ("remotecall_fetch", "pmap"):
        return addprocs_julia(cell, rig, guard, tmp)
    return addprocs_dropin(cell, tmp)


def addprocs_julia(cell: Cell, rig: WorkerRig, guard: Guard, tmp: Path) -> Seen:
    """``addprocs(2)`` where the first worker to start strikes the fault, while other work
    is in flight on the workers already there (a call, or a map)."""
    if cell.api == "remotecall_fetch":
        call = pd.remotecall(fk.square, rig.pids[1], 7, 0.3)
        in_flight = [(49, lambda: call.fetch(timeout=WAIT))]
    else:
        items = list(range(60))
        mapped = map_in_background(guard, fk.square, pd.WorkerPool(rig.pids), items,
                                   [0.005] * len(items))
        in_flight = [(sum(x * x for x in items), lambda: sum(mapped()))]
    killer = fk.kill_later(tmp / "marker") if cell.fault == "sigkill" else None
    t0 = time.monotonic()
    value, error, t1 = guard.call(lambda: pd.addprocs(2, transport=cell.transport,
                                                      **fk.starter_params(cell.fault, tmp)), WAIT)
    joined = list(value or getattr(error, "pids", []))
    try:
        seen = Seen(error, value, t1 - _since(t0, killer, tmp / "marker.struck"), survives=len(joined) == 2)
        seen.siblings = [(want, outcome(get)) for want, get in in_flight]
        seen.siblings += [(4, outcome(lambda p=p: pd.remotecall_fetch(fk.square, p, 2))) for p in joined]
    finally:
        if joined:
            pd.rmprocs(*joined, waitfor=WAIT)
    return seen


def addprocs_dropin(cell: Cell, tmp: Path) -> Seen:
    """A drop-in whose initializer strikes the fault as its workers start (in every worker;
    SIGKILL: in the first, killed from outside while it runs its initializer)."""
    marker = str(tmp / "marker")
    if cell.fault == "unpicklable":
        init, args = fk.init_nothing, (threading.Lock(),)
    elif cell.fault == "sigkill":
        init, args = fk.init_fault, (cell.fault, str(tmp / "claim"), marker)
    else:
        init, args = fk.init_fault_everywhere, (cell.fault, marker)
    killer = fk.kill_later(marker) if cell.fault == "sigkill" else None
    t0 = time.monotonic()
    make = pd.ProcessPoolExecutor if cell.api == "executor" else pd.Pool
    rig = DropinRig(cell.api, cell.transport, make(2, initializer=init, initargs=args,
                                                   transport=cell.transport))
    try:
        # Once broken, submit itself raises (as the standard library's does): a task
        # submitted after the break sees it there. An initializer that cannot be pickled
        # breaks the pool as its first workers start, which may come before the first submit.
        try:
            first = rig.submit(fk.square, 1)
        except BrokenProcessPool as e:
            first = e
        others = [outcome(lambda i=i: rig.submit(fk.square, i, SIBLING_DELAY)) for i in (2, 3, 4)]
        if isinstance(first, BaseException):
            value, error, t1 = None, first, time.monotonic()
        else:
            value, error, t1 = rig.settle(first, WAIT)
        struck = marker + ".struck" if cell.fault not in ("sigkill", "unpicklable") else None
        seen = Seen(error, value, t1 - _since(t0, killer, struck))
        seen.siblings = [(i * i, f if isinstance(f, BaseException) else outcome(lambda f=f: rig.get(f, WAIT)))
                         for i, f in zip((2, 3, 4), others)]
        seen.survives = rig.answers()
    finally:
        rig.shut()
    return seen


# -- a worker that faults while it is being removed -----------------------------------------------------
def at_rmprocs(cell: Cell, rig: Any, guard: Guard, tmp: Path) -> Seen:
    if cell.api in ("remotecall_fetch", "pmap"):
        return rmprocs_julia(cell, rig, guard, tmp)
    return rmprocs_dropin(cell, rig, guard, tmp)


def rmprocs_julia(cell: Cell, rig: WorkerRig, guard: Guard, tmp: Path) -> Seen:
    """``rmprocs`` of a worker in the middle of a call that keeps it unresponsive (holding
    the GIL) and then strikes the fault; SIGKILL comes from outside while rmprocs waits."""
    marker = str(tmp / "marker")
    hold = 30.0 if cell.fault == "sigkill" else HOLD
    planned = fk.Planned(fk.hold_then_strike, cell.fault, marker, hold)
    a, b = rig.pids
    if cell.api == "remotecall_fetch":
        held = pd.remotecall(fk.element_fault, a, planned)
        ospid, wid = fk.read_marker(marker, WAIT)
        sibling = pd.remotecall(fk.square, b, 7, SIBLING_DELAY)
    else:
        items = [planned] + list(range(1, 8))
        pool = pd.WorkerPool([a, b])
        mapped = map_in_background(guard, fk.element_fault, pool, items, on_error=lambda e: e)
        ospid, wid = fk.read_marker(marker, WAIT)
    t_fault = remove_during_fault(guard, lambda: pd.rmprocs(wid, waitfor=WAIT), ospid, cell.fault,
                                  lambda: fk.marker_time(marker) + hold)
    seen = Seen(seconds=time.monotonic() - t_fault, survives=wid in pd.workers())
    if cell.api == "remotecall_fetch":
        _, seen.error, _ = guard.call(lambda: held.fetch(timeout=WAIT))
        seen.siblings = [(49, outcome(lambda: sibling.fetch(timeout=WAIT)))]
    else:
        out = mapped()
        assert isinstance(out, list), f"the map ended with {out!r}"
        seen.error = out[0] if isinstance(out[0], BaseException) else None
        seen.siblings = [(i * i, v) for i, v in zip(items[1:], out[1:])]
        assert_pool_answers(guard, pool)
    return seen


def rmprocs_dropin(cell: Cell, rig: DropinRig, guard: Guard, tmp: Path) -> Seen:
    """``shutdown(wait=True)`` (Executor) or ``close()`` and ``join()`` (Pool) while a task
    runs that strikes the fault shortly; SIGKILL comes from outside while they wait."""
    marker = str(tmp / "marker")
    delay = 30.0 if cell.fault == "sigkill" else HOLD
    culprit = rig.submit(fk.sleep_then_strike, cell.fault, marker, delay)
    siblings = [rig.submit(fk.square, i, SIBLING_DELAY / 2) for i in range(1, 7)]
    ospid, _ = fk.read_marker(marker, WAIT)
    obj = rig.obj

    def close() -> None:
        if rig.api == "executor":
            obj.shutdown(wait=True)
        else:
            obj.close()
            obj.join()
    t_fault = remove_during_fault(guard, close, ospid, cell.fault,
                                  lambda: fk.read_stamp(marker + ".struck", WAIT))
    seen = Seen(seconds=time.monotonic() - t_fault)
    _, seen.error, _ = rig.settle(culprit, WAIT)
    seen.siblings = [(i * i, outcome(lambda f=f: rig.get(f, WAIT))) for i, f in zip(range(1, 7), siblings)]
    return seen


def remove_during_fault(guard: Guard, remove: Callable[[], None], ospid: int, fault: str,
                        struck: Callable[[], float]) -> float:
    """Run ``remove()`` while the fault is due (its call has announced itself and strikes
    shortly; SIGKILL: sent 0.1 s into the removal); once ``remove()`` has returned, when
    the fault struck (``struck()``, or the kill)."""
    remover = guard.start(remove)
    if fault == "sigkill":
        time.sleep(0.1)
        t_fault = time.monotonic()
        os.kill(ospid, signal.SIGKILL)
    remover.join(WAIT)
    if remover.is_alive():
        raise Hang("the removal did not return")
    return t_fault if fault == "sigkill" else struck()


DRIVERS = {"idle": idle, "addprocs": at_addprocs, "rmprocs": at_rmprocs}


# -- the matrix ----------------------------------------------------------------------------------------------
def _cells() -> list[Any]:
    params = []
    for transport in TRANSPORTS:
        for api in fk.APIS:
            for phase in fk.PHASES:
                for fault in fk.FAULTS:
                    cell = Cell(fault, phase, api, transport)
                    e = expected(fault, phase, api)
                    marks: list[Any] = []
                    if e.na:
                        marks.append(pytest.mark.skip(reason=f"N/A: {e.na}"))
                    elif e.bug:
                        marks.append(pytest.mark.xfail(strict=True, reason=e.bug))
                    params.append(pytest.param(cell, id=cell.id, marks=marks))
    return params


@pytest.fixture(scope="module")
def rigs():
    r = Rigs()
    yield r
    r.close()
    report()


@pytest.fixture
def rig(request, rigs):
    """The cell's rig, made ready before the leak oracle looks (so replacements are not leaks)."""
    cell = request.node.callspec.params["cell"]
    return rigs.get(cell.api, cell.transport)


@pytest.mark.parametrize("cell", _cells())
def test_cell(cell: Cell, rig: Any, leak_oracle: None, tmp_path: Path) -> None:
    expect = expected(cell.fault, cell.phase, cell.api)
    guard, ok = Guard(), False
    try:
        seen = DRIVERS.get(cell.phase, in_call)(cell, rig, guard, tmp_path)
        ok = True
    finally:
        rig.after(ok)
        guard.join()
    if seen.seconds is not None:
        print(f"\nfault-matrix {cell.id}: {seen.seconds * 1000:.1f} ms", end="")
    check(expect, seen)
    if seen.seconds is not None:
        TIMES[(cell.api, cell.transport)].append((cell.id, seen.seconds))


def report() -> None:
    """Median and maximum fault-to-error times, per API and transport."""
    if not TIMES:
        return
    print("\nfault-matrix: seconds from fault to error (median / max over the cells)")
    for (api, transport), rows in sorted(TIMES.items()):
        values = [s for _, s in rows]
        worst = max(rows, key=lambda r: r[1])
        print(f"  {api:17} {transport:4} n={len(values):3}  median {statistics.median(values) * 1000:6.1f} ms"
              f"  max {worst[1] * 1000:6.1f} ms ({worst[0]})")


def test_the_doc_shows_this_matrix() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "fault-matrix.md"
    assert render() in doc.read_text(), "docs/fault-matrix.md is out of date: paste `python tests/faulttable.py`"
