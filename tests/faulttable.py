"""The fault matrix: every cell (fault × phase × API), the outcome written down for it, and
how what a cell saw is held to that outcome (``check``).

``expected(fault, phase, api)`` is the table; ``render()`` prints it as the Markdown tables
of docs/fault-matrix.md (``python tests/faulttable.py``), and a test checks that the doc
shows exactly these tables, so the doc and the tests cannot drift apart.

An outcome names the error the caller gets (its type, then the type of what it wraps: the
captured exception of a ``RemoteException``, the ``__cause__`` of anything else), text its
description must contain, whether the worker (``remotecall_fetch``, ``pmap``) or the
executor/pool (``executor``, ``pool``) survives, and what sibling tasks in flight get.
"""
from __future__ import annotations

import os
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from dataclasses import dataclass, field, replace
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback
from typing import Any

from faultkit import APIS, FAULTS, PHASES

import pydist as pd
from pydist.errors import SerializationError

PEE = pd.ProcessExitedException
ON_MASTER = {"pickle_call", "unpickle_result"}
DEATHS = {"os_exit", "segfault", "sigkill"}
BOUND = 1.0     # seconds from a fault to its error, locally


def bound() -> float:
    """``BOUND``, or three times it while the machine runs more than its CPUs can (a loaded
    machine delays the noticing process too). Either way far below every timeout that
    could stand in for noticing (30 s and more)."""
    return BOUND * (3 if os.getloadavg()[0] > (os.cpu_count() or 1) else 1)


# What the caller is told when the fault ends the process that strikes it.
DEATH_TEXT = {"os_exit": "exited with status 3", "segfault": "was killed by SIGSEGV",
              "sigkill": "was killed by SIGKILL", "sys_exit": "exited with status 3"}
# A worker that dies while it starts: what addprocs' LaunchError says.
LAUNCH_TEXT = {"exception": "ValueError: fault-matrix: addprocs",
               "sys_exit": "before it was ready: it exited with status 3",
               "os_exit": "before it was ready: it exited with status 3",
               "segfault": "before it was ready: it was killed by SIGSEGV",
               "sigkill": "before it was ready: it was killed by SIGKILL",
               "unpicklable": "No module named 'pydist.processes'"}
UNPICKLABLE_TEXT = {"pickle_call": "cannot pickle '_thread.lock' object",
                    "unpickle_call": "No module named 'faultkit_master_only'",
                    "pickle_result": "cannot pickle '_thread.lock' object",
                    "unpickle_result": "No module named 'faultkit_worker_only'",
                    "addprocs": "cannot pickle '_thread.lock' object"}

# Known bugs: cells expected to fail (strictly) until pydist is fixed; none today.
BUGS: dict[tuple[str, str, str], str] = {}


@dataclass(frozen=True)
class Expect:
    """The outcome of one cell."""

    chain: tuple[type, ...] = ()        # the error, then what it wraps; () for no error
    text: tuple[str, ...] = ()          # fragments of the chain's description
    survives: bool | None = None        # None: not a question here (e.g. removed on purpose)
    siblings: str = "right"             # right | right-or-lost | broken | raised | none
    na: str = ""                        # why the cell is not applicable
    bug: str = ""                       # what goes wrong today (the cell is xfail)
    alternative: Expect | None = None   # another outcome a race may give instead
    when: str = ""                      # (of an alternative) when it comes: a race, or a bug


def not_applicable(fault: str, phase: str) -> str:
    """Why (fault, phase) means nothing, or ''."""
    if fault in DEATHS and phase in ON_MASTER:
        return "it would strike the master itself (see test_faults.py::test_master_sigkill_leaves_no_worker)"
    if fault == "unpicklable" and phase == "run":
        return "nothing is pickled or imported while a call runs: see the (un)pickling phases"
    if fault == "unpicklable" and phase == "idle":
        return "an idle worker pickles nothing"
    if fault == "unpicklable" and phase == "rmprocs":
        return "removing a worker pickles nothing of the user's"
    return ""


def expected(fault: str, phase: str, api: str) -> Expect:
    """The outcome written down for the cell (fault, phase, api), on every transport."""
    na = not_applicable(fault, phase)
    if na:
        return Expect(na=na)
    if phase == "idle":
        outcome = _idle(fault, api)
    elif phase == "addprocs":
        outcome = _addprocs(fault, api)
    elif phase == "rmprocs":
        outcome = _rmprocs(fault, api)
    else:
        outcome = _in_call(fault, phase, api)
    return replace(outcome, bug=BUGS.get((fault, phase, api), ""))


def _julia(api: str) -> bool:
    return api in ("remotecall_fetch", "pmap")


def _in_call(fault: str, phase: str, api: str) -> Expect:
    """Faults while a call is pickled, unpickled, run, or its result pickled or unpickled."""
    julia = _julia(api)
    if fault in DEATHS or (fault == "sys_exit" and phase == "unpickle_call" and not julia):
        # The process ends (a drop-in's worker exits when its arguments ask it to, as a
        # multiprocessing worker would); only the task it was running fails.
        siblings = "right-or-lost" if api == "pmap" else "right"
        return Expect((PEE,), (DEATH_TEXT[fault],), survives=not julia, siblings=siblings)
    text = {"exception": f"ValueError: fault-matrix: {phase}", "sys_exit": "SystemExit: 3",
            "unpicklable": UNPICKLABLE_TEXT.get(phase, "")}[fault]
    inner = {"exception": ValueError, "sys_exit": SystemExit,
             "unpicklable": TypeError if phase in ("pickle_call", "pickle_result") else ModuleNotFoundError}[fault]
    siblings = "raised" if (api == "pmap" and phase == "pickle_call") else "right"
    if phase == "pickle_call":
        # On the master, in the caller's thread: raised at the call (a drop-in: the future's error).
        if fault == "sys_exit":
            chain = (SystemExit,)
        else:
            chain = (SerializationError, inner) if julia else (inner,)
    elif phase == "pickle_result" and api == "pool":
        # multiprocessing's own wrapper, which shows the error's repr
        chain = (MaybeEncodingError,)
        text = {"exception": f"fault-matrix: {phase}", "sys_exit": "SystemExit(3)"}.get(fault, text)
    elif phase == "pickle_result" and julia:
        chain = (pd.RemoteException, SerializationError) if fault != "sys_exit" else (pd.RemoteException,)
        text = "SystemExit" if fault == "sys_exit" else text
    elif phase == "unpickle_result" and fault == "sys_exit" and not julia:
        chain = (BrokenProcessPool, SystemExit)
        text = "the result of a task could not be received: SystemExit(3)"
    else:
        chain = (pd.RemoteException, inner) if julia else (inner,)
    return Expect(chain, (text,), survives=True, siblings=siblings)


def _idle(fault: str, api: str) -> Expect:
    """A worker between calls: a thread of its own raises or exits, or it dies."""
    if fault not in DEATHS:
        return Expect((), (), survives=True, siblings="none")
    if api == "remotecall_fetch":
        return Expect((PEE,), (DEATH_TEXT[fault],), survives=False, siblings="none")
    return Expect((), (), survives=api != "pmap", siblings="none")


def _addprocs(fault: str, api: str) -> Expect:
    """A worker fails while it starts: addprocs (the Julia API), or the drop-ins'
    initializer, which runs as their workers start."""
    if _julia(api):
        return Expect((pd.LaunchError,), (LAUNCH_TEXT[fault],), survives=False, siblings="right")
    cause = {"exception": (ValueError, "ValueError: fault-matrix: addprocs"),
             "sys_exit": (SystemExit, "SystemExit: 3"),
             "unpicklable": (TypeError, UNPICKLABLE_TEXT["addprocs"])}.get(fault)
    if cause is None:
        cause = (PEE, DEATH_TEXT[fault])
    return Expect((BrokenProcessPool, cause[0]), ("initializer failed", cause[1]), survives=False,
                  siblings="broken")


def _rmprocs(fault: str, api: str) -> Expect:
    """A fault in a worker while it is being removed (the drop-ins: by shutdown/close+join)."""
    if _julia(api):
        siblings = "right-or-lost" if api == "pmap" else "right"
        own = None
        if fault not in DEATHS:
            # The worker lives through the fault: its answer and its exit race.
            inner = ValueError if fault == "exception" else SystemExit
            text = "ValueError: fault-matrix: rmprocs" if fault == "exception" else "SystemExit: 3"
            own = Expect((pd.RemoteException, inner), (text,), survives=False, siblings=siblings,
                         when="if its answer left first")
        return Expect((PEE,), ("was removed by rmprocs",), survives=False, siblings=siblings,
                      alternative=own)
    if fault in DEATHS:
        return Expect((PEE,), (DEATH_TEXT[fault],), survives=None, siblings="right")
    chain = (ValueError,) if fault == "exception" else (SystemExit,)
    text = "ValueError: fault-matrix: rmprocs" if fault == "exception" else "SystemExit: 3"
    return Expect(chain, (text,), survives=None, siblings="right")


# -- holding what a cell saw to its outcome -----------------------------------------------------------
@dataclass
class Seen:
    """What a cell observed."""

    error: BaseException | None = None
    value: Any = None
    seconds: float | None = None             # from the fault to the error (or its detection)
    survives: bool | None = None
    siblings: list[tuple[Any, Any]] = field(default_factory=list)   # (right value, what came)


def error_chain(e: BaseException | None) -> list[BaseException]:
    """The error, then what it wraps: a RemoteException's captured exception, else the
    ``__cause__`` (not the text of a remote traceback)."""
    out: list[BaseException] = []
    while e is not None and len(out) < 6:
        out.append(e)
        e = e.captured.ex if isinstance(e, pd.RemoteException) else e.__cause__
        if isinstance(e, (_RemoteTraceback, RemoteTraceback)):
            break
    return out


def described(chain: list[BaseException]) -> str:
    return " <- ".join(f"RemoteException (worker {e.pid})" if isinstance(e, pd.RemoteException)
                       else f"{type(e).__name__}: {e}" for e in chain)


def check(expect: Expect, seen: Seen) -> None:
    """Assert that ``seen`` is ``expect``, or else its alternative."""
    if expect.alternative is None:
        return _check(expect, seen)
    try:
        _check(expect, seen)
    except AssertionError as first:
        try:
            _check(expect.alternative, seen)
        except AssertionError as second:
            raise AssertionError(f"{first}\n(nor its alternative: {second})") from None


def _check(expect: Expect, seen: Seen) -> None:
    chain = error_chain(seen.error)
    if expect.chain:
        assert chain, f"expected {expect.chain[0].__name__}, but the call returned {seen.value!r}"
        text = described(chain)
        assert _is_error(expect, seen), f"expected {[c.__name__ for c in expect.chain]}: {text}"
        for fragment in expect.text:
            assert fragment in text, f"{fragment!r} not in {text!r}"
        assert seen.seconds is not None and seen.seconds < bound(), \
            f"{seen.seconds:.3f} s from the fault to the error"
    else:
        assert not chain, f"expected no error, got {described(chain)}"
        if seen.seconds is not None:
            assert seen.seconds < bound(), f"{seen.seconds:.3f} s to notice the fault"
    if expect.survives is not None:
        assert seen.survives == expect.survives, f"survives: {seen.survives}, expected {expect.survives}"
    check_siblings(expect.siblings, seen.siblings)


def _is_error(expect: Expect, seen: Seen) -> bool:
    chain = error_chain(seen.error)
    return len(chain) >= len(expect.chain) and all(isinstance(got, want)
                                                   for want, got in zip(expect.chain, chain))


def check_siblings(kind: str, siblings: list[tuple[Any, Any]]) -> None:
    if kind in ("none", "raised"):
        assert not siblings, siblings
        return
    assert siblings, "no sibling to look at"
    if kind == "right":
        assert all(want == got for want, got in siblings), siblings
    elif kind == "right-or-lost":
        assert all(want == got or isinstance(got, PEE) for want, got in siblings), siblings
        assert any(want == got for want, got in siblings), siblings
    else:
        assert all(isinstance(got, BrokenProcessPool) for _, got in siblings), siblings


# -- the doc ------------------------------------------------------------------------------------------
API_TITLES = {"remotecall_fetch": "`remotecall_fetch`", "pmap": "`pmap` (with `on_error`)",
              "executor": "`ProcessPoolExecutor` (`Executor`)", "pool": "`Pool`"}
SURVIVOR = {"remotecall_fetch": "worker", "pmap": "worker", "executor": "executor", "pool": "pool"}
SIBLINGS = {"right": "right", "right-or-lost": "right, or ProcessExitedException if queued on the dead worker",
            "broken": "BrokenProcessPool", "raised": "— (the map raises)", "none": "—"}
BUG_NUMBERS = {reason: i + 1 for i, reason in enumerate(dict.fromkeys(BUGS.values()))}


def _error(e: Expect) -> tuple[str, str]:
    """The doc's "the caller gets" and "message contains" for ``e``."""
    if not e.chain:
        return "no error", "—"
    names = [c.__name__ for c in e.chain]
    error = names[0] + (f"({', '.join(names[1:])})" if len(names) > 1 else "")
    texts = []
    for t in e.text:
        for name in names:       # the type is named already
            if t.startswith(f"{name}: ") and len(t) > len(name) + 5:
                t = t[len(name) + 2:]
        texts.append(f"“{t}”")
    if e.alternative is not None:
        other, other_text = _error(e.alternative)
        when = e.alternative.when
        when = f"intermittently (bug {BUG_NUMBERS[when]})" if when in BUG_NUMBERS else when
        if other == error:
            return error, f"{' '.join(texts)}, or {when} {other_text}"
        return f"{error}, or {other} {when}", f"{' '.join(texts)} / {other_text}"
    return error, " ".join(texts)


def row(fault: str, phase: str, api: str) -> str:
    """One cell of the matrix as a row of the doc's table for ``api``."""
    e = expected(fault, phase, api)
    if e.na:
        return f"| {phase} | {fault} | N/A | | | | {e.na} |"
    error, text = _error(e)
    survives = "—" if e.survives is None else ("yes" if e.survives else "no")
    note = f"**xfail** (bug {BUG_NUMBERS[e.bug]})" if e.bug else ""
    return f"| {phase} | {fault} | {error} | {text} | {survives} | {SIBLINGS[e.siblings]} | {note} |"


def render() -> str:
    """The matrix as Markdown: a table per API, a row per cell."""
    out = []
    for api in APIS:
        out += [f"### {API_TITLES[api]}", "",
                f"| phase | fault | the caller gets | message contains | {SURVIVOR[api]} survives "
                "| siblings | note |", "|---|---|---|---|---|---|---|"]
        out += [row(fault, phase, api) for phase in PHASES for fault in FAULTS]
        out.append("")
    if BUG_NUMBERS:
        out += ["Bugs the matrix found, still open:", ""]
        out += [f"{n}. {reason}" for reason, n in BUG_NUMBERS.items()]
    else:
        out += ["No cell is known to fail."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render())
