"""The faults of the fault matrix, and the objects that carry each one into a phase.

A *fault* is what goes wrong; a *phase* is when. Each fault is struck by ``strike`` in the
process where the phase takes place:

* ``exception``  raises ``ValueError("fault-matrix: <phase>")``;
* ``sys_exit``   calls ``sys.exit(3)``;
* ``os_exit``    calls ``os._exit(3)``;
* ``segfault``   reads address 0 (the process dies of SIGSEGV);
* ``sigkill``    announces itself in a marker file and sleeps, so that the test can
  SIGKILL the process from outside at that very point (``kill_at_marker``);
* ``unpicklable`` is not struck: the phase is given an object that cannot be pickled (a
  lock) or cannot be imported where it is unpickled (its class lives in a module only
  the other process has).

Everything here is importable by workers (tests/ is on the master's ``sys.path``, which
workers adopt when they join), so the objects travel by reference.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pydist as pd

FAULTS = ("exception", "sys_exit", "os_exit", "segfault", "sigkill", "unpicklable")
PHASES = ("pickle_call", "unpickle_call", "run", "pickle_result", "unpickle_result",
          "idle", "addprocs", "rmprocs")
APIS = ("remotecall_fetch", "pmap", "executor", "pool")
EXIT_CODE = 3
SLEEP_FOR_KILL = 60.0     # how long a ``sigkill`` fault waits to be killed


# -- striking a fault ---------------------------------------------------------------------------
def strike(fault: str, phase: str, marker: str | None = None) -> None:
    """Make ``fault`` happen here and now (it never returns normally)."""
    if fault == "exception":
        raise ValueError(f"fault-matrix: {phase}")
    if fault == "sys_exit":
        sys.exit(EXIT_CODE)
    if fault == "os_exit":
        os._exit(EXIT_CODE)
    if fault == "segfault":
        ctypes.string_at(0)
    if fault == "sigkill":
        assert marker is not None, "a sigkill fault needs a marker to announce itself"
        if os.path.exists(marker):     # run again after the kill: say so rather than sleep
            raise RuntimeError(f"fault-matrix: {phase}: a sigkill fault struck twice")
        arrive(marker)
        time.sleep(SLEEP_FOR_KILL)
    raise AssertionError(f"fault {fault!r} did not strike")


def arrive(marker: str) -> None:
    """Write ``"<os pid> <pydist id> <time.monotonic()>"`` to ``marker`` (atomically: the
    reader never sees half; the clock is one for every process of the host)."""
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {pd.myid()} {time.monotonic()!r}")
    os.replace(tmp, marker)


def stamp(path: str) -> None:
    """Write the moment now (``time.monotonic()``, one clock for every process of the host)
    to ``path``, unless an earlier stamp is there: when a fault struck first."""
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(repr(time.monotonic()))
        os.replace(tmp, path)


def read_stamp(path: str | Path, timeout: float) -> float:
    """Wait for the stamp at ``path``; the moment it holds."""
    p = Path(path)
    deadline = time.monotonic() + timeout
    while not p.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no stamp at {p} within {timeout} s")
        time.sleep(0.002)
    return float(p.read_text())


def read_marker(marker: str | Path, timeout: float) -> tuple[int, int]:
    """Wait for ``marker`` to appear: the (os pid, pydist id) of the process that wrote it."""
    path = Path(marker)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no process reached the marker {path} within {timeout} s")
        time.sleep(0.002)
    ospid, pid = path.read_text().split()[:2]
    return int(ospid), int(pid)


def marker_time(marker: str | Path) -> float:
    """When the process announced itself in ``marker`` (after ``read_marker``)."""
    return float(Path(marker).read_text().split()[2])


def kill_at_marker(marker: str | Path, timeout: float = 20.0) -> tuple[float, int, int]:
    """Wait for a ``sigkill`` fault to announce itself, SIGKILL its process; the moment of
    the kill (``time.monotonic()``), its os pid and its pydist id."""
    ospid, pid = read_marker(marker, timeout)
    t0 = time.monotonic()
    os.kill(ospid, signal.SIGKILL)
    return t0, ospid, pid


def kill_later(marker: str | Path, timeout: float = 20.0) -> Killer:
    """``kill_at_marker`` in a thread; ``.join()`` returns its answer."""
    return Killer(marker, timeout)


class Killer(threading.Thread):
    """A thread that kills the process announcing itself in ``marker``."""

    def __init__(self, marker: str | Path, timeout: float) -> None:
        super().__init__(name="fault-killer", daemon=True)
        self.marker, self.timeout = marker, timeout
        self.result: tuple[float, int, int] | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = kill_at_marker(self.marker, self.timeout)
        except BaseException as e:
            self.error = e

    def outcome(self, timeout: float = 30.0) -> tuple[float, int, int]:
        self.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the killer did not finish"
        return self.result


# -- objects that fault while being pickled or unpickled ------------------------------------------
class BadReduce:
    """Strikes its fault when pickled (on whoever pickles it)."""

    def __init__(self, fault: str, phase: str, marker: str | None = None) -> None:
        self.fault, self.phase, self.marker = fault, phase, marker

    def __reduce__(self):
        strike(self.fault, self.phase, self.marker)


class BadRebuild:
    """Pickles anywhere; strikes its fault when unpickled on the master (``on="master"``)
    or on a worker (``on="worker"``), and rebuilds harmlessly elsewhere."""

    def __init__(self, fault: str, phase: str, on: str, marker: str | None = None) -> None:
        self.fault, self.phase, self.on, self.marker = fault, phase, on, marker

    def __reduce__(self):
        return (_rebuild, (self.fault, self.phase, self.on, self.marker))


def _rebuild(fault: str, phase: str, on: str, marker: str | None) -> BadRebuild:
    if (pd.myid() == 1) == (on == "master"):
        strike(fault, phase, marker)
    return BadRebuild(fault, phase, on, marker)


def ghost(module: str) -> Any:
    """An instance of a class of module ``module``, which exists only in this process: it
    pickles by reference, and unpickling it anywhere else fails to import the module."""
    mod = sys.modules.get(module)
    if mod is None:
        mod = types.ModuleType(module)
        exec("class Ghost:\n    pass\n", mod.__dict__)
        mod.Ghost.__module__ = module
        sys.modules[module] = mod
    return mod.Ghost()


MASTER_GHOST = "faultkit_master_only"     # created on the master only
WORKER_GHOST = "faultkit_worker_only"     # created on workers only


# -- the functions workers run ---------------------------------------------------------------------
def square(x: int, delay: float = 0.0) -> int:
    if delay:
        time.sleep(delay)
    return x * x


def run_fault(fault: str, marker: str | None = None) -> None:
    """Strike ``fault`` while running."""
    strike(fault, "run", marker)


def result_fault(fault: str, marker: str | None = None) -> Any:
    """A result that strikes ``fault`` while being pickled (or cannot be pickled at all)."""
    if fault == "unpicklable":
        return threading.Lock()
    return BadReduce(fault, "pickle_result", marker)


def result_bad_on_master(fault: str) -> Any:
    """A result that strikes ``fault`` while the master unpickles it (or cannot be imported
    there)."""
    if fault == "unpicklable":
        return ghost(WORKER_GHOST)
    return BadRebuild(fault, "unpickle_result", "master")


def call_fault(fault: str, phase: str, marker: str | None = None) -> Any:
    """The argument that carries ``fault`` into ``phase`` (``pickle_call`` on the master,
    ``unpickle_call`` on the worker)."""
    if phase == "pickle_call":
        return threading.Lock() if fault == "unpicklable" else BadReduce(fault, phase, marker)
    if fault == "unpicklable":
        return ghost(MASTER_GHOST)
    return BadRebuild(fault, phase, "worker", marker)


def element_fault(x: Any) -> Any:
    """The function every cell calls: run ``x`` if it is a ``Planned`` call, else square
    it (an argument that strikes does so before this runs)."""
    if isinstance(x, Planned):
        return x.go()
    return square(x)


class Planned:
    """A call planned inside a map element: ``fn(*args)`` when the element is run."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def go(self) -> Any:
        return self.fn(*self.args)


def whoami() -> tuple[int, int]:
    """(os pid, pydist id) of the process running this."""
    return os.getpid(), pd.myid()


# -- faults of an idle worker ------------------------------------------------------------------------
def arm_idle(fault: str, trigger: str) -> tuple[int, int]:
    """Start a thread that strikes ``fault`` once the file ``trigger`` appears (the worker
    is idle by then); answer (os pid, pydist id)."""
    def watch() -> None:
        while not os.path.exists(trigger):
            time.sleep(0.001)
        stamp(trigger + ".struck")
        strike(fault, "idle")
    threading.Thread(target=watch, name="fault-armed", daemon=True).start()
    return whoami()


# -- faults while the worker is being removed ---------------------------------------------------------
def hold_then_strike(fault: str, marker: str, hold: float) -> None:
    """Announce this call, keep the whole process unresponsive for ``hold`` seconds (a C
    sleep that keeps the GIL, so not even pydist's own threads run), then strike ``fault``
    (a process-ending one still holding the GIL, so nothing else runs before it)."""
    arrive(marker)
    libc = ctypes.PyDLL(None)         # PyDLL: calls keep the GIL
    libc.usleep(int(hold * 1e6))
    if fault == "os_exit":
        libc._exit(EXIT_CODE)
    if fault == "segfault":
        libc.strlen(None)
    strike(fault, "rmprocs", marker + ".kill")


def sleep_then_strike(fault: str, marker: str, delay: float) -> None:
    """Announce this call, sleep ``delay`` seconds, then strike ``fault``."""
    arrive(marker)
    time.sleep(delay)
    stamp(marker + ".struck")
    strike(fault, "rmprocs", marker + ".kill")


# -- faults while a worker starts ----------------------------------------------------------------------
STARTER_ENV = "FAULTKIT_STARTER"

# Run as ``python -c STARTER -m pydist.worker ...`` (through addprocs' exeflags). The first
# process to claim the file named in the environment strikes the fault there; the others
# start as plain workers. Self-contained: the ``unpicklable`` fault (here: pydist cannot be
# imported) must not import pydist first.
STARTER = r"""
import ctypes, os, sys, time
fault, claim, marker = os.environ["FAULTKIT_STARTER"].split("|")
try:
    os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    first = True
except FileExistsError:
    first = False
if first:
    if fault != "sigkill":
        with open(marker + ".struck.tmp", "w") as f:
            f.write(repr(time.monotonic()))
        os.replace(marker + ".struck.tmp", marker + ".struck")
    if fault == "exception":
        raise ValueError("fault-matrix: addprocs")
    if fault == "sys_exit":
        sys.exit(3)
    if fault == "os_exit":
        os._exit(3)
    if fault == "segfault":
        ctypes.string_at(0)
    if fault == "sigkill":
        with open(marker + ".tmp", "w") as f:
            f.write(f"{os.getpid()} 0")
        os.replace(marker + ".tmp", marker)
        time.sleep(60)
    if fault == "unpicklable":
        sys.modules["pydist"] = None
from pydist.processes.bootstrap import worker_main
worker_main(sys.argv[3:])
"""


def starter_params(fault: str, tmp: Path) -> dict[str, Any]:
    """``addprocs`` keywords that start workers through ``STARTER`` with ``fault``."""
    spec = f"{fault}|{tmp / 'claim'}|{tmp / 'marker'}"
    return {"exeflags": ("-c", STARTER), "env": {STARTER_ENV: spec}}


def init_fault(fault: str, claim: str, marker: str) -> None:
    """An initializer that strikes ``fault`` in the first worker that runs it (the later
    ones start normally)."""
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    strike(fault, "addprocs", marker)


def init_fault_everywhere(fault: str, marker: str) -> None:
    """An initializer that strikes ``fault`` in every worker (stamping when it first did)."""
    stamp(marker + ".struck")
    strike(fault, "addprocs", marker)


def init_nothing(*args: Any) -> None:
    """An initializer that does nothing with its arguments."""
