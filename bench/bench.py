"""pydist beside the standard library's process pools and loky, in one run, as ratios.

    python bench/bench.py [--quick] [--only NAME ...] [--backends KEY ...] [--json out.json]
                          [--plot DIR] [--from-json recorded.json --plot DIR]

What is measured (every backend has 2 workers; see docs/benchmarks.md):

- ``startup``: start 2 workers and get the first no-op result back (seconds).
- ``noop``:    a blocking call of a no-op, one at a time: median and p99 in µs.
- ``tasks``:   ``map`` of ``x*x`` over 100,000 ints at chunksize 1 and with the backend's
               default chunking, and over 1,000,000 ints with default chunking (tasks/s).
- ``arrays``:  a numpy array sent to a worker and returned, at 1, 16 and 128 MiB
               (GB/s of payload, both directions counted).

How (on a shared 2-vCPU machine only ratios measured together mean much):

1. ``startup`` runs first, in passes; in each pass every backend starts, answers one call
   and is shut down, in an order that rotates from pass to pass.
2. Then every backend is started once and kept (the forking stdlib pools first, so that
   their workers do not inherit pydist's connections), warmed up, and each map is sized so
   one run of it stays within a time cap (a backend too slow for the full size runs a
   smaller map and is marked ``*``).
3. Each pass runs every measurement on every backend, again in a rotating order, and the
   tables report the median over passes (and the spread: the lowest and highest pass).
4. A measurement that raises is left out for that backend (the table says why); one that
   hangs is interrupted by a watchdog and its backend is left out from then on. Everything
   is shut down in ``finally``, on Ctrl-C too, and any worker process still alive after
   that is killed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import gc
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):          # workers get this sys.path: pydist by sending, the rest by fork
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import startpath  # noqa: E402
from workloads import echo, noop, square  # noqa: E402

MIB = 1 << 20
REF = "ppe"                      # the backend every ratio is taken against, unless a row says


class Unsupported(Exception):
    """This backend has no such operation (the table shows a dash)."""


class MeasurementTimeout(KeyboardInterrupt):
    """Raised in the main thread by the watchdog (a KeyboardInterrupt, so that no
    ``except Exception`` inside a library swallows it)."""


# -- configuration -------------------------------------------------------------------------------
@dataclass
class Config:
    passes: int = 3
    noop_calls: int = 3000          # timed round trips per backend per pass
    map_n: int = 100_000
    big_map_n: int = 1_000_000
    sizes_mib: tuple = (1, 16, 128)
    array_min_reps: dict = field(default_factory=lambda: {1: 9, 16: 3, 128: 2})
    array_budget: float = 0.3       # seconds: more reps of a size while under this
    map_cap: float = 20.0           # seconds one map run may take (else a smaller n)
    timeout: float = 60.0           # seconds before the watchdog stops a measurement
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(passes=3, noop_calls=1000, map_n=10_000, big_map_n=200_000,
                   array_min_reps={1: 5, 16: 2, 128: 1}, array_budget=0.15, map_cap=4.0,
                   timeout=20.0, quick=True)


MEASUREMENTS = ("startup", "startpath", "noop", "tasks", "arrays")


# -- the watchdog ----------------------------------------------------------------------------------
class Watchdog:
    """Interrupts the main thread when a measurement overruns; aborts the run if even
    that does not help (dumping every thread's stack and killing our child processes)."""

    GRACE = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._what = ""
        self._pending = False       # a SIGINT was sent for the current measurement
        self._fired_at = 0.0
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._pid = os.getpid()      # forked pool workers inherit the handler: not theirs
        self._thread = threading.Thread(target=self._loop, name="bench-watchdog", daemon=True)

    def install(self) -> None:
        # Only SIGINT. A Python-level SIGTERM handler would be inherited by forked pool
        # workers, and a worker told to stop before it first runs loses the signal (CPython
        # clears signals caught before its after-fork hook) and lives on: Pool.terminate()
        # then waits for it forever.
        signal.signal(signal.SIGINT, self._on_sigint)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def arm(self, seconds: float, what: str) -> None:
        with self._lock:
            self._deadline, self._what = time.monotonic() + seconds, what
            self._pending, self._fired_at = False, 0.0

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            raise KeyboardInterrupt
        with self._lock:
            ours, self._pending = self._pending, False
            armed = self._deadline is not None
        if ours:
            if armed:
                raise MeasurementTimeout(self._what)
            return                  # the measurement finished meanwhile: nothing to stop
        raise KeyboardInterrupt

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                if late and not self._pending and self._fired_at == 0.0:
                    self._pending, self._fired_at = True, time.monotonic()
                    what = self._what
                elif late and self._fired_at and time.monotonic() - self._fired_at > self.GRACE:
                    self._abort()
                    return
                else:
                    continue
            print(f"\n[bench] {what}: no answer after its time limit; interrupting it",
                  file=sys.stderr, flush=True)
            signal.pthread_kill(self._main, signal.SIGINT)

    def _abort(self) -> None:
        print(f"\n[bench] {self._what}: still stuck {self.GRACE:.0f} s after the interrupt; "
              "aborting the run. Stacks:", file=sys.stderr, flush=True)
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            print(f"--- thread {names.get(ident, ident)}", file=sys.stderr)
            traceback.print_stack(frame, file=sys.stderr)
        sys.stderr.flush()
        kill_descendants(grace=2.0)
        os._exit(3)


def descendants() -> list:
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process().children(recursive=True)
    except Exception:
        return []


def kill_descendants(grace: float) -> list[str]:
    """Terminate, then kill, every process this run started that is still alive."""
    try:
        import psutil
    except ImportError:
        return []
    procs = descendants()
    names = []
    for p in procs:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return names


# -- backends -------------------------------------------------------------------------------------
class Backend:
    """Two workers behind one API: start, a blocking no-op, a map, an array echo, close."""

    key = ""
    label = ""

    def __init__(self) -> None:
        self.broken: str | None = None      # why this backend is left out from now on

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (``None``: it can)."""
        return None

    def start(self) -> None:
        raise NotImplementedError

    def noop(self) -> None:
        raise NotImplementedError

    def map(self, f: Callable[[int], int], n: int, chunksize: int | None) -> list:
        """``[f(x) for x in range(n)]`` on the workers; ``chunksize=None``: the default."""
        raise NotImplementedError

    def echo(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class MPPool(Backend):
    key, label = "mp-pool", "multiprocessing.Pool"
    factory: Any = None

    def start(self) -> None:
        self.pool = (self.factory or multiprocessing.Pool)(2)

    def noop(self) -> None:
        self.pool.apply(noop)

    def map(self, f, n, chunksize):
        return self.pool.map(f, range(n), chunksize)

    def echo(self, a):
        return self.pool.apply(echo, (a,))

    def close(self) -> None:
        pool, self.pool = getattr(self, "pool", None), None
        if pool is None:
            return
        procs = list(getattr(pool, "_pool", None) or ())
        _bounded(pool.terminate, 15.0, procs, f"{self.label}.terminate()")  # waits for workers
        _bounded(pool.join, 5.0, procs, f"{self.label}.join()")


def _bounded(fn: Callable[[], Any], seconds: float, procs: list, what: str = "shutdown") -> None:
    """``fn()`` in a helper thread; if it has not returned after ``seconds``, kill ``procs``
    (the pool's own worker processes, by their handles) and give it a little longer."""
    t = threading.Thread(target=fn, name="bench-shutdown", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        print(f"[bench] {what}: still waiting after {seconds:.0f} s; killing its workers",
              file=sys.stderr, flush=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        t.join(5.0)


class PPE(Backend):
    key, label = "ppe", "ProcessPoolExecutor"
    factory: Any = None

    def start(self) -> None:
        self.ex = (self.factory or cf.ProcessPoolExecutor)(max_workers=2)

    def noop(self) -> None:
        self.ex.submit(noop).result()

    def map(self, f, n, chunksize):
        if chunksize is None:
            raise Unsupported("the default chunksize is 1: see that row")
        return list(self.ex.map(f, range(n), chunksize=chunksize))

    def echo(self, a):
        return self.ex.submit(echo, a).result()

    def close(self) -> None:
        ex, self.ex = getattr(self, "ex", None), None
        if ex is None:
            return
        procs = list((getattr(ex, "_processes", None) or {}).values())
        _bounded(lambda: ex.shutdown(wait=True, cancel_futures=True), 15.0, procs,
                 f"{self.label}.shutdown()")


class Loky(PPE):
    key, label = "loky", "loky"

    def unavailable(self) -> str | None:
        try:
            __import__("loky")
        except ImportError as e:
            return f"loky not importable ({e})"
        return None

    def start(self) -> None:
        import loky
        self.ex = loky.get_reusable_executor(max_workers=2)

    def close(self) -> None:
        ex, self.ex = getattr(self, "ex", None), None
        if ex is not None:
            ex.shutdown(wait=True, kill_workers=True)


class Mpire(Backend):
    """``mpire.WorkerPool(2)`` (fork), kept alive between calls so that no call pays a start."""
    key, label = "mpire", "mpire.WorkerPool"

    def unavailable(self) -> str | None:
        try:
            __import__("mpire")
        except ImportError as e:
            return f"mpire not importable ({e})"
        return None

    def start(self) -> None:
        import mpire
        self.pool = mpire.WorkerPool(2, keep_alive=True)

    def noop(self) -> None:
        self.pool.apply(noop)

    def map(self, f, n, chunksize):
        return self.pool.map(f, range(n), chunk_size=chunksize, progress_bar=False)

    def echo(self, a):
        return self.pool.apply(echo, (a,))

    def close(self) -> None:
        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None:
            _bounded(pool.terminate, 15.0, [], f"{self.label}.terminate()")


def _pydist_feature(names: Iterable[str]) -> Any:
    """The first of ``module:attr`` names that imports, or ``None``."""
    import importlib
    for name in names:
        mod, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
        if not isinstance(obj, type(sys)):
            return obj
    return None


def pydist_features() -> dict[str, Any]:
    try:
        __import__("pydist")
    except Exception as e:   # a broken tree must not stop the peers' figures
        return {"error": f"pydist not importable: {type(e).__name__}: {e}"}
    return {
        "pmap": _pydist_feature(["pydist:pmap", "pydist.pools.pmap:pmap"]),
        "WorkerPool": _pydist_feature(["pydist:WorkerPool", "pydist.pools.workerpool:WorkerPool"]),
        "ProcessPoolExecutor": _pydist_feature(["pydist:ProcessPoolExecutor", "pydist:Executor",
                                                "pydist.dropin.executor:ProcessPoolExecutor",
                                                "pydist.dropin.executor:Executor"]),
        "Pool": _pydist_feature(["pydist:Pool", "pydist.dropin.pool:Pool"]),
    }


FEATURES: dict[str, Any] = {}


class PydistCluster(Backend):
    """``addprocs(2, transport=...)``; maps with ``pmap`` (or a window of ``remotecall``s)."""

    transport = ""
    WINDOW = 64                     # calls in flight in the fallback map
    map_kind = ""                   # set by start(): "pmap" or "remotecall window"

    def unavailable(self) -> str | None:
        return FEATURES.get("error")

    def start(self) -> None:
        import pydist
        self.pids = pydist.addprocs(2, transport=self.transport)
        wp = FEATURES.get("WorkerPool")
        self.pool = wp(self.pids) if wp is not None else None
        self.map_kind = "pmap" if FEATURES.get("pmap") and self.pool is not None else "remotecall window"

    def noop(self) -> None:
        import pydist
        pydist.remotecall_fetch(noop, self.pids[0])

    def map(self, f, n, chunksize):
        if self.map_kind == "pmap":
            return FEATURES["pmap"](f, range(n), pool=self.pool)
        return self._window_map(f, n)

    def _window_map(self, f, n):
        import pydist
        pids, futs, out = self.pids, deque(), []
        for x in range(n):
            futs.append(pydist.remotecall(f, pids[x % len(pids)], x))
            if len(futs) >= self.WINDOW:
                out.append(futs.popleft().fetch())
        out.extend(fut.fetch() for fut in futs)
        return out

    def echo(self, a):
        import pydist
        return pydist.remotecall_fetch(echo, self.pids[0], a)

    def close(self) -> None:
        import pydist
        pids, self.pids, self.pool = getattr(self, "pids", None), None, None
        if pids:
            pydist.rmprocs(*pids, waitfor=20)


class PydistShm(PydistCluster):
    key, label, transport = "pydist-shm", "pydist shm", "shm"


class PydistShmRing(PydistShm):
    """The shared-memory transport with every frame through the ring (large frames not
    handed over in segments): the baseline the segments are measured against."""

    key, label = "pydist-shm-ring", "pydist shm, ring only"

    def start(self) -> None:
        old = os.environ.get("PYDIST_SHM_BIGBUF")
        os.environ["PYDIST_SHM_BIGBUF"] = "0"   # read by both ends as the workers connect
        try:
            super().start()
        finally:
            if old is None:
                del os.environ["PYDIST_SHM_BIGBUF"]
            else:
                os.environ["PYDIST_SHM_BIGBUF"] = old

    def map(self, f, n, chunksize):
        raise Unsupported("only the array rows compare the ring with the segments")


class PydistTcp(PydistCluster):
    key, label, transport = "pydist-tcp", "pydist tcp", "tcp"


class PydistPPE(PPE):
    key, label = "pydist-ppe", "pydist.ProcessPoolExecutor"

    def unavailable(self) -> str | None:
        if FEATURES.get("error"):
            return FEATURES["error"]
        return None if FEATURES.get("ProcessPoolExecutor") else "pydist.ProcessPoolExecutor not there yet"

    def start(self) -> None:
        self.ex = FEATURES["ProcessPoolExecutor"](max_workers=2)

    def close(self) -> None:
        ex, self.ex = getattr(self, "ex", None), None
        if ex is None:
            return
        _bounded(lambda: ex.shutdown(wait=True), 20.0, [], f"{self.label}.shutdown()")


class PydistPool(MPPool):
    key, label = "pydist-pool", "pydist.Pool"

    def unavailable(self) -> str | None:
        if FEATURES.get("error"):
            return FEATURES["error"]
        return None if FEATURES.get("Pool") else "pydist.Pool not there yet"

    def start(self) -> None:
        self.pool = FEATURES["Pool"](2)


# The order in which the steady-state phase starts them: forking pools first, before
# anything in this process has threads or sockets a fork would copy.
BACKENDS: list[type[Backend]] = [MPPool, PPE, Loky, Mpire, PydistShm, PydistShmRing, PydistTcp,
                                 PydistPPE, PydistPool]


# -- results --------------------------------------------------------------------------------------
class Results:
    """Per measurement, per row: the value of each pass (and notes)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, Any]]] = {}

    def add(self, measurement: str, row: str, value: Any, **extra: Any) -> None:
        cell = self.data.setdefault(measurement, {}).setdefault(row, {"passes": []})
        cell["passes"].append(value)
        cell.update(extra)

    def note(self, measurement: str, row: str, **extra: Any) -> None:
        self.data.setdefault(measurement, {}).setdefault(row, {"passes": []}).update(extra)

    def cell(self, measurement: str, row: str) -> dict[str, Any] | None:
        return self.data.get(measurement, {}).get(row)

    def median(self, measurement: str, row: str, field: str | None = None) -> float | None:
        cell = self.cell(measurement, row)
        if not cell or not cell["passes"]:
            return None
        values = [p[field] if field else p for p in cell["passes"]]
        return statistics.median(values)

    def spread(self, measurement: str, row: str, field: str | None = None) -> tuple[float, float] | None:
        cell = self.cell(measurement, row)
        if not cell or not cell["passes"]:
            return None
        values = [p[field] if field else p for p in cell["passes"]]
        return min(values), max(values)


# -- the measurements -----------------------------------------------------------------------------
class Runner:
    def __init__(self, cfg: Config, backends: list[Backend], only: set[str], dog: Watchdog) -> None:
        self.cfg, self.backends, self.only, self.dog = cfg, backends, only, dog
        self.res = Results()
        self.live: list[Backend] = []
        self.map_n: dict[tuple[str, str], int] = {}
        self.map_time: dict[tuple[str, str], float] = {}    # expected seconds of one run
        self.arrays = {mib: np.arange(mib * MIB // 8, dtype=np.int64) for mib in cfg.sizes_mib} \
            if "arrays" in only else {}
        self._expected: dict[int, list] = {}
        self.failed: dict[tuple[str, str], str] = {}   # (backend, measurement) -> why

    # each step of the run, bounded and reported -------------------------------------------------
    def guarded(self, b: Backend, what: str, fn: Callable[[], Any], limit: float | None = None,
                measurement: str | None = None) -> Any:
        """Run one step for ``b`` and return its value, or None if it failed.

        A timeout, or any failure of a step that belongs to no ``measurement`` (starting),
        leaves ``b`` out from then on. An exception inside a measurement leaves out only that
        measurement, provided ``b`` still answers a no-op afterwards.
        """
        if b.broken or (measurement is not None and (b.key, measurement) in self.failed):
            return None
        limit = limit or self.cfg.timeout
        self.dog.arm(limit, f"{b.label}: {what}")
        try:
            return fn()
        except MeasurementTimeout:
            b.broken = f"{what} timed out after {limit:.0f} s"
        except Unsupported:
            raise
        except Exception as e:
            why = f"{what} failed: {type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
            if measurement is None:
                b.broken = why
            else:
                self.failed[(b.key, measurement)] = why
                self.dog.disarm()
                if self._answers(b):
                    print(f"[bench] {b.label}: {why}; left out of {measurement}", file=sys.stderr,
                          flush=True)
                    return None
                b.broken = f"{why}, and then it stopped answering"
        finally:
            self.dog.disarm()
        print(f"[bench] {b.label}: {b.broken}; left out from here on", file=sys.stderr, flush=True)
        return None

    def _answers(self, b: Backend) -> bool:
        """Whether ``b`` still answers a no-op (after a failure), within 10 s."""
        self.dog.arm(10.0, f"{b.label}: a no-op after a failure")
        try:
            b.noop()
            return True
        except (Exception, MeasurementTimeout):
            return False
        finally:
            self.dog.disarm()

    def rotated(self, backends: list[Backend], p: int) -> list[Backend]:
        k = p % len(backends) if backends else 0
        return backends[k:] + backends[:k]

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # 1. startup -----------------------------------------------------------------------------------
    def run_startup(self) -> None:
        for p in range(self.cfg.passes):
            self.log(f"startup, pass {p + 1}/{self.cfg.passes}")
            for b in self.rotated(self.backends, p):
                if b.broken:
                    continue
                gc.collect()

                def start_and_call(b: Backend = b) -> float:
                    t0 = time.perf_counter()
                    b.start()
                    b.noop()
                    return time.perf_counter() - t0

                try:
                    took = self.guarded(b, "start", start_and_call)
                finally:
                    t0 = time.perf_counter()
                    self.close_one(b)
                    stop = time.perf_counter() - t0
                if took is not None:
                    self.res.add("startup", b.key, {"start": took, "stop": stop})

    def run_startpath(self) -> None:
        """Import, recycling, the Future path and the first large frame (``startpath.py``),
        each pass with nothing else running."""
        for p in range(self.cfg.passes):
            self.log(f"start path, pass {p + 1}/{self.cfg.passes}")
            self.dog.arm(600, "start path")
            try:
                startpath.run_pass(self.cfg.quick, self.res.add, self.log)
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                self.failed[("pydist-shm", "startpath")] = f"{type(e).__name__}: {e}"
                return
            finally:
                self.dog.disarm()

    # 2. the steady state: start all, warm up, size the maps --------------------------------------
    def start_all(self) -> None:
        for b in self.backends:
            if b.broken:
                continue
            self.live.append(b)
            self.guarded(b, "start", lambda b=b: (b.start(), b.noop(), True)[-1])
        self.log("started: " + ", ".join(b.label for b in self.live if not b.broken))

    def warm_up(self) -> None:
        for b in self.live:
            if "noop" in self.only:
                self.guarded(b, "warm-up", lambda b=b: [b.noop() for _ in range(100)],
                             measurement="noop")
            if "arrays" in self.only:
                for mib, a in self.arrays.items():
                    self.guarded(b, f"warm-up {mib} MiB", lambda b=b, a=a: self._echo_checked(b, a, full=True),
                                 measurement=f"arrays_{mib}")
            if "tasks" in self.only:
                for row, n, chunksize in self.task_rows():
                    self._size_map(b, row, n, chunksize)

    def _echo_checked(self, b: Backend, a: np.ndarray, full: bool = False) -> None:
        r = b.echo(a)
        ok = isinstance(r, np.ndarray) and r.shape == a.shape and r.dtype == a.dtype
        ok = ok and (np.array_equal(r, a) if full else (r[0] == a[0] and r[-1] == a[-1]
                                                          and r[len(a) // 2] == a[len(a) // 2]))
        if not ok:
            raise AssertionError(f"the array came back different ({type(r).__name__})")

    def _size_map(self, b: Backend, row: str, n: int, chunksize: int | None) -> None:
        """A small map first: if the full one would take longer than the cap, shrink it."""
        n0 = max(1000, n // 20)
        try:
            took = self.guarded(b, f"warm-up map {row}", lambda: self._timed_map(b, square, n0, chunksize),
                                measurement=f"tasks_{row}")
        except Unsupported:
            return
        if took is None:
            return
        rate = n0 / max(took, 1e-9)
        self.map_n[(b.key, row)] = n if n / rate <= self.cfg.map_cap else \
            max(n0, int(rate * self.cfg.map_cap) // 1000 * 1000)
        self.map_time[(b.key, row)] = self.map_n[(b.key, row)] / rate

    def _timed_map(self, b: Backend, f: Callable[[int], int], n: int, chunksize: int | None) -> float:
        gc.collect()
        t0 = time.perf_counter()
        out = b.map(f, n, chunksize)
        took = time.perf_counter() - t0
        if out != self._expected_squares(n):
            raise AssertionError("the map returned wrong results")
        return took

    def _expected_squares(self, n: int) -> list:
        if n not in self._expected:
            self._expected[n] = [x * x for x in range(n)]
        return self._expected[n]

    def task_rows(self) -> list[tuple[str, int, int | None]]:
        return [("cs1", self.cfg.map_n, 1), ("default", self.cfg.map_n, None),
                ("big", self.cfg.big_map_n, None)]

    # 3. the passes ---------------------------------------------------------------------------------
    def run_passes(self) -> None:
        for p in range(self.cfg.passes):
            order = self.rotated([b for b in self.live if not b.broken], p)
            self.log(f"pass {p + 1}/{self.cfg.passes}: {', '.join(b.key for b in order)}")
            if "noop" in self.only:
                for b in order:
                    self.pass_noop(b)
            if "tasks" in self.only:
                for row, _n, chunksize in self.task_rows():
                    for b in order:
                        self.pass_map(b, row, chunksize)
            if "arrays" in self.only:
                for b in order:
                    self.pass_arrays(b)

    def pass_noop(self, b: Backend) -> None:
        gc.collect()

        def calls() -> list[float]:
            clock, call = time.perf_counter_ns, b.noop
            times = []
            for _ in range(self.cfg.noop_calls):
                t0 = clock()
                call()
                times.append(clock() - t0)
            return times

        times = self.guarded(b, "no-op round trips", calls, measurement="noop")
        if times:
            times.sort()
            self.res.add("noop", b.key, {"median_us": statistics.median(times) / 1e3,
                                         "p99_us": times[int(0.99 * (len(times) - 1))] / 1e3})

    def pass_map(self, b: Backend, row: str, chunksize: int | None) -> None:
        n = self.map_n.get((b.key, row))
        if n is None:
            return
        limit = min(self.cfg.map_cap * 4 + 30, 10 + 5 * self.map_time[(b.key, row)])
        took = self.guarded(b, f"map {row}", lambda: self._timed_map(b, square, n, chunksize),
                            limit=limit, measurement=f"tasks_{row}")
        if took is not None:
            self.res.add(f"tasks_{row}", b.key, n / took, n=n)
        if row == "cs1" and isinstance(b, PydistCluster) and b.map_kind == "pmap":
            f = lambda x: x * x                                   # noqa: E731 (shipped by value)
            took = self.guarded(b, "map (lambda)", lambda: self._timed_map(b, f, n, chunksize),
                                limit=limit, measurement="tasks_cs1:lambda")
            if took is not None:
                self.res.add("tasks_cs1", b.key + ":lambda", n / took, n=n)

    def pass_arrays(self, b: Backend) -> None:
        for mib, a in self.arrays.items():
            gc.collect()

            def reps(a: np.ndarray = a, mib: int = mib) -> float:
                # One untimed round trip first: buffers and segments a backend pools may
                # have been dropped while the others ran; the rows compare steady states.
                self._echo_checked(b, a)
                times: list[float] = []
                t_end = time.perf_counter() + self.cfg.array_budget
                while len(times) < self.cfg.array_min_reps.get(mib, 1) or \
                        (time.perf_counter() < t_end and len(times) < 50):
                    t0 = time.perf_counter()
                    self._echo_checked(b, a)
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)

            took = self.guarded(b, f"{mib} MiB round trips", reps, measurement=f"arrays_{mib}")
            if took is not None:
                self.res.add(f"arrays_{mib}", b.key, 2 * a.nbytes / took / 1e9)

    # 4. the end -----------------------------------------------------------------------------------
    def close_one(self, b: Backend) -> None:
        """Shut ``b`` down whatever state it is in (broken or not); never raises an Exception."""
        try:
            self.dog.arm(90, f"{b.label}: shutdown")
            b.close()
        except MeasurementTimeout:
            print(f"[bench] {b.label}: shutdown timed out", file=sys.stderr, flush=True)
        except Exception as e:
            print(f"[bench] {b.label}: shutdown failed: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
        finally:
            self.dog.disarm()

    def close_all(self) -> None:
        while self.live:
            self.close_one(self.live.pop())


# -- the report -----------------------------------------------------------------------------------
def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or not ref:
        return "—"
    return f"{value / ref:.2f}×"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _short(text: str, width: int = 90) -> str:
    """One line of at most ``width`` characters (the full text is under "problems")."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


class Report:
    def __init__(self, res: Results, backends: list[Backend], cfg: Config, runner: Runner) -> None:
        self.res, self.backends, self.cfg, self.runner = res, backends, cfg, runner
        self.lines: list[str] = []

    def text(self) -> str:
        return "\n".join(self.lines)

    def out(self, line: str = "") -> None:
        self.lines.append(line)

    def rows(self, extra: dict[str, tuple[str, str]] | None = None) -> list[tuple[str, str, Backend]]:
        """(row key, label, backend) in the table's order; ``extra[key] = (suffix, label)``
        adds a row for a variant right after its backend."""
        out = []
        for b in self.backends:
            out.append((b.key, b.label, b))
            if extra and b.key in extra:
                suffix, label = extra[b.key]
                out.append((f"{b.key}:{suffix}", label, b))
        return out

    def missing(self, b: Backend, measurement: str) -> str:
        """What a row without figures shows: why there are none."""
        why = b.unavailable()
        if why:
            return f"n/a ({why})"
        failed = self.runner.failed.get((b.key, measurement))
        if failed:
            return _short(f"failed: {failed}")
        if b.broken:
            return _short(f"n/a: {b.broken}")
        return "—"

    def header(self, title: str, cols: list[tuple[str, int]]) -> str:
        self.out("")
        self.out(title)
        line = f"{'backend':<30}" + "".join(f"{name:>{w}}" for name, w in cols)
        self.out(line)
        self.out("-" * len(line))
        return line

    def build(self) -> None:
        if self.res.data.get("startup"):
            self.startup()
        if self.res.data.get("noop"):
            self.noop()
        if any(k.startswith("tasks_") for k in self.res.data):
            self.tasks()
        if any(k.startswith("arrays_") for k in self.res.data):
            self.arrays()
        if any(k.startswith("sp_") for k in self.res.data):
            self.lines.extend(startpath.report_lines(self.res.median))
        self.targets()
        self.problems()

    def problems(self) -> None:
        lines = [f"{b.label}: {b.broken}" for b in self.backends if b.broken]
        lines += [f"{next(b.label for b in self.backends if b.key == key)}, {m}: {why}"
                  for (key, m), why in self.runner.failed.items()]
        if lines:
            self.out("")
            self.out("problems (tracebacks went to stderr)")
            for line in lines:
                self.out(f"- {' '.join(line.split())}")

    def startup(self) -> None:
        self.header("start 2 workers + first no-op result, seconds (lower is better; stop: shutdown time)",
                    [("median s", 11), ("spread", 17), ("× PPE", 9), ("stop s", 9)])
        ref = self.res.median("startup", REF, "start")
        for key, label, b in self.rows():
            med = self.res.median("startup", key, "start")
            if med is None:
                self.out(f"{label:<30}  {self.missing(b, 'startup')}")
                continue
            lo, hi = self.res.spread("startup", key, "start")
            stop = self.res.median("startup", key, "stop")
            self.out(f"{label:<30}{med:>11.3f}{f'{lo:.3f}–{hi:.3f}':>17}{_ratio(med, ref):>9}{stop:>9.3f}")

    def noop(self) -> None:
        self.header("no-op round trip, blocking submit + result, µs (lower is better)",
                    [("median", 9), ("p99", 9), ("spread of medians", 20), ("× PPE", 9), ("× pydist tcp", 14)])
        ref = self.res.median("noop", REF, "median_us")
        tcp = self.res.median("noop", "pydist-tcp", "median_us")
        for key, label, b in self.rows():
            med = self.res.median("noop", key, "median_us")
            if med is None:
                self.out(f"{label:<30}  {self.missing(b, 'noop')}")
                continue
            p99 = self.res.median("noop", key, "p99_us")
            lo, hi = self.res.spread("noop", key, "median_us")
            vs_tcp = _ratio(med, tcp) if key == "pydist-shm" else ""
            self.out(f"{label:<30}{med:>9.1f}{p99:>9.1f}{f'{lo:.1f}–{hi:.1f}':>20}"
                     f"{_ratio(med, ref):>9}{vs_tcp:>14}")

    def tasks(self) -> None:
        titles = {
            "cs1": (f"map of x*x over {self.cfg.map_n:,} ints at chunksize 1 (pydist shm/tcp: pmap, "
                    "which picks its own batches), tasks/s (higher is better)", REF, "× PPE"),
            "default": (f"map of x*x over {self.cfg.map_n:,} ints, default chunking, tasks/s "
                        "(higher is better)", "mp-pool", "× mp.Pool"),
            "big": (f"map of x*x over {self.cfg.big_map_n:,} ints, default chunking, tasks/s "
                    "(higher is better)", "mp-pool", "× mp.Pool"),
        }
        shrunk = False
        for row, (title, ref_key, ref_name) in titles.items():
            m = f"tasks_{row}"
            if m not in self.res.data:
                continue
            self.header(title, [("tasks/s", 12), ("spread", 22), (ref_name, 11), ("  how", 6)])
            ref = self.res.median(m, ref_key)
            extra = {"pydist-shm": ("lambda", "pydist shm, a lambda")} if row == "cs1" else None
            for key, label, b in self.rows(extra):
                med = self.res.median(m, key)
                if med is None:
                    why = self.missing(b, m if ":" not in key else f"{m}:{key.split(':', 1)[1]}")
                    if ":" in key and not why.startswith("failed"):
                        continue                      # a variant row shows only its failure
                    if why == "—" and row != "cs1":
                        why = "— (no such call: see the chunksize-1 row)"
                    self.out(f"{label:<30}  {why}")
                    continue
                cell = self.res.cell(m, key)
                lo, hi = self.res.spread(m, key)
                mark = "*" if cell.get("n", 0) < (self.cfg.map_n if row != "big" else self.cfg.big_map_n) else ""
                shrunk = shrunk or bool(mark)
                how = self.how(b, row)
                self.out(f"{label:<30}{med:>11,.0f}{mark:1}{f'{lo:,.0f}–{hi:,.0f}':>22}"
                         f"{_ratio(med, ref):>11}  {how}")
        if shrunk:
            self.out(f"* too slow for the full size within the {self.cfg.map_cap:.0f} s cap: "
                     "measured on a smaller map (see --json for n)")

    def how(self, b: Backend, row: str) -> str:
        if isinstance(b, PydistCluster):
            return b.map_kind
        if isinstance(b, (MPPool, Mpire)):
            return "map(chunksize=1)" if row == "cs1" else "map()"
        return "map(chunksize=1)"

    def arrays(self) -> None:
        sizes = [mib for mib in self.cfg.sizes_mib if f"arrays_{mib}" in self.res.data]
        cols = []
        for mib in sizes:
            cols += [(f"{mib} MiB GB/s", 14), ("× PPE", 8)]
        self.header("numpy array round trip (sent and returned; GB/s of payload both ways, "
                    "higher is better)", cols)
        for key, label, b in self.rows():
            vals = [self.res.median(f"arrays_{mib}", key) for mib in sizes]
            if all(v is None for v in vals):
                whys = [self.missing(b, f"arrays_{mib}") for mib in sizes]
                self.out(f"{label:<30}  {next((w for w in whys if w != '—'), '—')}")
                continue
            line = f"{label:<30}"
            for mib, v in zip(sizes, vals):
                if v is None:
                    failed = (key, f"arrays_{mib}") in self.runner.failed
                    line += f"{'failed' if failed else '—':>14}{'':>8}"
                else:
                    line += f"{v:>14.2f}{_ratio(v, self.res.median(f'arrays_{mib}', REF)):>8}"
            self.out(line)

    # the targets --------------------------------------------------------------------------------
    def target_list(self) -> list[dict[str, Any]]:
        r = self.res

        def ratio(a: float | None, b: float | None) -> float | None:
            return None if a is None or not b else a / b

        noop = lambda k: r.median("noop", k, "median_us")                  # noqa: E731
        return [
            {"what": "pydist shm no-op round trip median ≤ 0.4 × PPE",
             "ratio": ratio(noop("pydist-shm"), noop(REF)), "limit": 0.4, "le": True},
            {"what": "pydist shm no-op round trip median ≤ 0.7 × pydist tcp",
             "ratio": ratio(noop("pydist-shm"), noop("pydist-tcp")), "limit": 0.7, "le": True},
            {"what": "pydist shm 128 MiB round trip ≥ 10 × PPE GB/s",
             "ratio": ratio(r.median("arrays_128", "pydist-shm"), r.median("arrays_128", REF)),
             "limit": 10, "le": False},
            {"what": f"pmap over {self.cfg.map_n:,} ints (shm) ≥ 5 × PPE map(chunksize=1) tasks/s",
             "ratio": ratio(r.median("tasks_cs1", "pydist-shm"), r.median("tasks_cs1", REF)),
             "limit": 5, "le": False},
            {"what": "  the same with a lambda, as users often write it",
             "ratio": ratio(r.median("tasks_cs1", "pydist-shm:lambda"), r.median("tasks_cs1", REF)),
             "limit": 5, "le": False},
            {"what": "pydist.ProcessPoolExecutor submit().result() no-op ≤ 0.4 × PPE",
             "ratio": ratio(noop("pydist-ppe"), noop(REF)), "limit": 0.4, "le": True},
            {"what": f"pydist.ProcessPoolExecutor.map chunksize 1 over {self.cfg.map_n:,} ≥ 5 × PPE",
             "ratio": ratio(r.median("tasks_cs1", "pydist-ppe"), r.median("tasks_cs1", REF)),
             "limit": 5, "le": False},
            {"what": f"pydist.Pool.map over {self.cfg.big_map_n:,} ≥ 1 × multiprocessing.Pool.map",
             "ratio": ratio(r.median("tasks_big", "pydist-pool"), r.median("tasks_big", "mp-pool")),
             "limit": 1, "le": False},
            {"what": "128 MiB through pydist.ProcessPoolExecutor.submit ≥ 10 × PPE GB/s",
             "ratio": ratio(r.median("arrays_128", "pydist-ppe"), r.median("arrays_128", REF)),
             "limit": 10, "le": False},
            {"what": "pydist shm 128 MiB round trip, segments ≥ 1.5 × the ring only",
             "ratio": ratio(r.median("arrays_128", "pydist-shm"),
                            r.median("arrays_128", "pydist-shm-ring")),
             "limit": 1.5, "le": False},
            {"what": "pydist shm 128 MiB round trip ≥ 12 GB/s (on a quiet machine)",
             "ratio": r.median("arrays_128", "pydist-shm"), "limit": 12, "le": False,
             "unit": " GB/s"},
        ] + [dict(t, issue="start") for t in startpath.targets(
            self.res.median, lambda k: r.median("startup", k, "start"))]

    def targets(self) -> None:
        self.target_results = self.target_list()
        self.out("")
        self.out("targets, from the medians above")
        self.out("-" * 96)
        for t in self.target_results:
            v = t["ratio"]
            if v is None:
                state, shown = "not measured", "—"
            else:
                met = v <= t["limit"] if t["le"] else v >= t["limit"]
                state = "met" if met else "NOT MET"
                shown = f"{v:.3f} s" if t.get("seconds") else f"{v:.2f}{t.get('unit', '×')}"
            t["met"] = None if v is None else state == "met"
            self.out(f"{t['what']:<80}{shown:>8}  {state}")
        if self.cfg.quick:
            self.out("(--quick: smaller maps and fewer calls than the targets name; run without it to judge)")


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="pydist beside multiprocessing.Pool, "
                                 "ProcessPoolExecutor and loky, as ratios (see docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: under a minute")
    ap.add_argument("--only", nargs="+", choices=MEASUREMENTS, metavar="NAME",
                    help=f"run only these measurements ({', '.join(MEASUREMENTS)})")
    ap.add_argument("--backends", nargs="+", metavar="KEY",
                    choices=[b.key for b in BACKENDS],
                    help=f"run only these backends ({', '.join(b.key for b in BACKENDS)}); "
                         "ratios need 'ppe'")
    ap.add_argument("--passes", type=int, help="passes (default 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    ap.add_argument("--plot", metavar="DIR", help="also draw PNG plots of the run into DIR "
                    "(needs matplotlib)")
    ap.add_argument("--from-json", metavar="PATH", help="measure nothing: plot the run recorded "
                    "in PATH by --json (with --plot)")
    return ap.parse_args(argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot(run: dict[str, Any], outdir: str) -> None:
    from plot import plot_run  # bench/plot.py, beside this script; matplotlib only here
    for path in plot_run(run, outdir):
        print(f"[bench] plot: {path}", file=sys.stderr)


def environment() -> dict[str, Any]:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "loadavg_start": os.getloadavg(),
            "start_method": multiprocessing.get_start_method()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        if not args.plot:
            raise SystemExit("--from-json needs --plot DIR")
        with open(args.from_json) as f:
            plot(json.load(f), args.plot)
        return 0
    cfg = Config.quick_config() if args.quick else Config()
    if args.passes:
        cfg.passes = max(1, args.passes)
    only = set(args.only or MEASUREMENTS)
    FEATURES.update(pydist_features())
    backends = [cls() for cls in BACKENDS if not args.backends or cls.key in args.backends]
    runnable = [b for b in backends if not b.unavailable()]
    env = environment()
    dog = Watchdog()
    dog.install()
    runner = Runner(cfg, runnable, only, dog)
    t_start = time.perf_counter()
    interrupted = False
    try:
        if "startup" in only:
            runner.run_startup()
        if "startpath" in only:
            runner.run_startpath()
        if only - {"startup", "startpath"}:
            runner.start_all()
            runner.warm_up()
            runner.run_passes()
    except KeyboardInterrupt:
        interrupted = True
        print("\n[bench] interrupted: shutting everything down", file=sys.stderr, flush=True)
    finally:
        try:
            runner.close_all()
        finally:
            left = [p for p in descendants() if "resource_tracker" not in " ".join(_cmdline(p))]
            if left:
                time.sleep(2.0)
                left = [p for p in left if _alive(p)]
            if left:
                print(f"[bench] {len(left)} worker processes outlived their shutdown; killing them",
                      file=sys.stderr)
                for p in left:
                    _kill(p)
            dog.close()
    elapsed = time.perf_counter() - t_start
    env.update(loadavg_end=os.getloadavg(), seconds=round(elapsed, 1), quick=cfg.quick,
               interrupted=interrupted)

    report = Report(runner.res, backends, cfg, runner)
    report.build()
    print(f"pydist benchmark, {env['date']}, Python {env['python']}, {env['cpus']} CPUs, "
          f"{cfg.passes} passes{' (--quick)' if cfg.quick else ''}; medians over passes; "
          f"load average {env['loadavg_start'][0]:.2f} → {env['loadavg_end'][0]:.2f}")
    print(report.text())
    print(f"\ntook {elapsed:.0f} s" + (" (interrupted: partial figures)" if interrupted else ""),
          flush=True)
    record = {"environment": env, "config": asdict(cfg),
              "backends": {b.key: {"label": b.label, "unavailable": b.unavailable(),
                                   "broken": b.broken,
                                   "map": getattr(b, "map_kind", None) or None}
                           for b in backends},
              "results": runner.res.data, "targets": report.target_results,
              "failed": {f"{k}/{m}": why for (k, m), why in runner.failed.items()}}
    text = json.dumps(record, indent=1, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    if args.plot:
        plot(json.loads(text), args.plot)
    return 130 if interrupted else 0


def _cmdline(p: Any) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def _alive(p: Any) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False


def _kill(p: Any) -> None:
    try:
        p.kill()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
