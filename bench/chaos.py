"""A randomized fault soak: random operations on several workers while workers are killed
(SIGKILL), stopped (SIGSTOP, then SIGKILL) and removed (``rmprocs``) at random moments.

    python bench/chaos.py [--ops 1000000] [--seconds 0] [--seed N] [--transport shm]
                          [--workers 3] [--clients 3] [--chaos-every 0.5]

Operations: ``remotecall_fetch``, ``remotecall`` + ``fetch``, ``remotecall_wait``,
``remote_do`` into a RemoteChannel, Futures owned by the master and put by a worker, Futures
owned by one worker, put by the master and fetched by another, RemoteChannels owned by a
worker and drained by another, worker-to-worker calls, calls that raise, ``pmap``, and the
drop-ins (``Executor.submit``, ``Pool.apply_async``). References are made by the master and
by workers and passed between them.

The invariant, checked for every operation: its right value, or the right exception -- a
``ProcessExitedException`` (bare, or inside a ``RemoteException``) naming a worker the chaos
hit, or the ``RemoteException`` of a call that raises; a ``remote_do`` whose worker was hit
may be lost. A wrong value, any other exception, or an operation still running after
``HANG`` seconds is a violation. A drop-in whose worker the chaos killed as it ran its
initializer is broken, as the standard library's pools are: its ``BrokenProcessPool``, caused
by a ``ProcessExitedException`` naming that worker, is the right exception, and the run
replaces the drop-in and goes on. Afterwards every reference table (master and live workers)
must be back where it started, and once the workers are removed, no process and no
``/dev/shm`` entry of pydist may be left.

The seed is printed first; the same seed replays the same operations and chaos choices
(thread interleavings aside). Exit status 1 on any violation.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HANG = 60.0          # an operation running longer than this is a hang
WAIT = 45.0          # the timeout of each wait inside an operation


# -- run on the workers (by reference: module ``chaos``, on the workers' sys.path) ---------
def tiny(x: int) -> int:
    return x + 1


def boom(x: int) -> None:
    raise ValueError(f"boom {x}")


def put_into(ref: Any, x: int) -> None:
    ref.put(x)


def fetch_it(ref: Any) -> Any:
    return ref.fetch(timeout=WAIT)


def take_it(ref: Any) -> Any:
    return ref.take(timeout=WAIT)


def relay(w2: int, x: int) -> int:
    import pydist as pd
    return pd.remotecall_fetch(tiny, w2, x)


def tables() -> tuple[int, int]:
    """(values owned here, reference handles held here), after a garbage collection."""
    gc.collect()
    from pydist.cluster.group import PGRP
    from pydist.refs.remoteref import _handles
    return len(PGRP.refs), len(_handles)


def _within(now: dict[int, tuple[int, int]], want: dict[int, tuple[int, int]]) -> bool:
    """Every table of ``now`` holds no more than its counterpart in ``want``."""
    return now.keys() == want.keys() and all(
        all(n <= w for n, w in zip(now[p], want[p])) for p in now)


# -- bookkeeping --------------------------------------------------------------------------
class Violation(Exception):
    """An operation broke the invariant."""


@dataclass
class Stats:
    ops: int = 0
    ok: int = 0
    expected_errors: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.ops += 1
            if outcome == "ok":
                self.ok += 1
            else:
                self.expected_errors[outcome] = self.expected_errors.get(outcome, 0) + 1

    def violate(self, text: str) -> None:
        with self.lock:
            self.ops += 1
            self.violations.append(text)


class Cluster:
    """The chaos run's own workers (replaced as they are hit) and the ids it has hit."""

    def __init__(self, pd: Any, n: int, transport: str) -> None:
        self.pd, self.n, self.transport = pd, n, transport
        self.lock = threading.Lock()
        self.hit: set[int] = set()
        self.live: list[int] = pd.addprocs(n, transport=transport)
        self.baseline = {p: pd.remotecall_fetch(tables, p) for p in self.live}

    def pick(self, rng: random.Random, k: int = 1) -> list[int]:
        with self.lock:
            live = list(self.live)
        if not live:
            raise LookupError("no live worker")
        return [rng.choice(live) for _ in range(k)]

    def mark_hit(self, pid: int) -> None:
        with self.lock:
            self.hit.add(pid)
            if pid in self.live:
                self.live.remove(pid)

    def replace(self) -> None:
        """Start workers until there are ``n`` live ones again."""
        missing = self.n - len(self.live)
        fresh = self.pd.addprocs(missing, transport=self.transport) if missing > 0 else []
        for p in fresh:
            self.baseline[p] = self.pd.remotecall_fetch(tables, p)
        with self.lock:
            self.live.extend(fresh)


# -- judging one outcome -------------------------------------------------------------------
def judge(exc: BaseException, hit: set[int], raising: int | None = None) -> str:
    """The expected-error kind of ``exc``, or raise ``Violation``."""
    import pydist as pd
    inner = exc.captured.ex if isinstance(exc, pd.RemoteException) else exc
    if isinstance(inner, pd.ProcessExitedException):
        if inner.worker_id in hit:
            return "worker gone" if inner is exc else "worker gone (remote)"
        raise Violation(f"ProcessExitedException for worker {inner.worker_id}, which the chaos "
                        f"never hit: {exc}")
    if raising is not None and isinstance(exc, pd.RemoteException) and \
            isinstance(inner, ValueError) and str(inner) == f"boom {raising}":
        return "raised as asked"
    raise Violation(f"{type(exc).__name__}: {exc}")


def expect(got: Any, want: Any) -> None:
    if got != want:
        raise Violation(f"wrong value: got {got!r}, expected {want!r}")


# -- the operations -----------------------------------------------------------------------
def op_fetch(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    (w,) = c.pick(rng)
    expect(pd.remotecall_fetch(tiny, w, x), x + 1)


def op_future(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    (w,) = c.pick(rng)
    expect(pd.remotecall(tiny, w, x).fetch(timeout=WAIT), x + 1)


def op_wait(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    (w,) = c.pick(rng)
    expect(pd.remotecall_wait(tiny, w, x).fetch(timeout=WAIT), x + 1)


def op_raise(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    (w,) = c.pick(rng)
    pd.remotecall_fetch(boom, w, x)
    raise Violation("a call that raises returned")


def op_remote_do(pd: Any, c: Cluster, rng: random.Random, x: int) -> str | None:
    (w,) = c.pick(rng)
    rc = pd.RemoteChannel()
    pd.remote_do(put_into, w, rc, x)
    t0 = time.monotonic()
    while True:
        try:
            expect(rc.take(timeout=0.2), x)
            return None
        except TimeoutError:
            if w in c.hit:
                return "remote_do lost with its worker"
            if time.monotonic() - t0 > WAIT:
                raise Violation(f"remote_do on live worker {w} never put its item") from None


def op_master_future(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    (w,) = c.pick(rng)
    f = pd.Future()
    pd.remotecall_fetch(put_into, w, f, x)
    expect(f.fetch(timeout=WAIT), x)


def op_worker_future(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    w1, w2 = c.pick(rng, 2)
    if rng.random() < 0.5:
        f = pd.Future(w1).put(x)               # owned by w1, put from here
    else:
        f = pd.remotecall(tiny, w1, x - 1)     # a result on w1, never fetched here
    expect(pd.remotecall_fetch(fetch_it, w2, f), x)


def op_worker_channel(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    w1, w2 = c.pick(rng, 2)
    rc = pd.RemoteChannel(w1)
    rc.put(x)
    expect(pd.remotecall_fetch(take_it, w2, rc), x)


def op_relay(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    w1, w2 = c.pick(rng, 2)
    expect(pd.remotecall_fetch(relay, w1, w2, x), x + 1)


def op_pmap(pd: Any, c: Cluster, rng: random.Random, x: int) -> None:
    ws = sorted(set(c.pick(rng, 2)))
    xs = list(range(x, x + rng.randint(1, 8)))
    expect(pd.pmap(tiny, xs, pool=pd.WorkerPool(ws)), [v + 1 for v in xs])


def op_executor(pd: Any, c: Cluster, rng: random.Random, x: int, ex: Any = None) -> None:
    expect(ex.submit(tiny, x).result(timeout=WAIT), x + 1)


def op_pool(pd: Any, c: Cluster, rng: random.Random, x: int, pool: Any = None) -> None:
    expect(pool.apply_async(tiny, (x,)).get(timeout=WAIT), x + 1)


OPS: list[tuple[str, Callable[..., Any], int]] = [   # name, function, weight
    ("remotecall_fetch", op_fetch, 6), ("remotecall+fetch", op_future, 4),
    ("remotecall_wait", op_wait, 2), ("raise", op_raise, 1), ("remote_do", op_remote_do, 1),
    ("master Future", op_master_future, 2), ("worker Future", op_worker_future, 2),
    ("worker RemoteChannel", op_worker_channel, 2), ("worker to worker", op_relay, 2),
    ("pmap", op_pmap, 1), ("Executor", op_executor, 2), ("Pool", op_pool, 1),
]


# -- the run ------------------------------------------------------------------------------
class Run:
    """Client threads doing operations, one chaos thread, and a watchdog for hangs."""

    def __init__(self, pd: Any, seed: int, ops: int, seconds: float, workers: int,
                 clients: int, chaos_every: float, transport: str, quiet: bool = False) -> None:
        self.pd, self.seed, self.limit, self.seconds = pd, seed, ops, seconds
        self.clients, self.chaos_every, self.quiet = clients, chaos_every, quiet
        self.stats = Stats()
        self.stop = threading.Event()
        self.current: dict[int, tuple[str, float]] = {}   # client -> (operation, start)
        self.cluster = Cluster(pd, workers, transport)
        self.ex = pd.Executor(max_workers=1, transport=transport)
        self.pool = pd.Pool(1)
        self.dropin_lock = threading.Lock()
        self.retired: list[Any] = []   # drop-ins broken by the chaos, replaced, closed at the end
        self.next_x = iter(range(0, 1 << 62, 16))
        self.x_lock = threading.Lock()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def _x(self) -> int:
        with self.x_lock:
            return next(self.next_x)

    def client(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        names = [o[0] for o in OPS]
        weights = [o[2] for o in OPS]
        fns = {o[0]: o[1] for o in OPS}
        while not self.stop.is_set():
            with self.stats.lock:
                if self.stats.ops >= self.limit:
                    break
            name = rng.choices(names, weights)[0]
            x = self._x()
            with self.dropin_lock:
                extra = {"Executor": {"ex": self.ex}, "Pool": {"pool": self.pool}}.get(name, {})
            self.current[i] = (name, time.monotonic())
            try:
                outcome = fns[name](self.pd, self.cluster, rng, x, **extra) or "ok"
            except Violation as v:
                self.violation(f"{name} (x={x}): {v}")
                continue
            except LookupError:
                time.sleep(0.01)   # every worker is being replaced
                continue
            except BaseException as e:   # noqa: BLE001 -- judged below
                try:
                    outcome = self.broken_dropin(e, *extra.values()) or \
                        judge(e, set(self.cluster.hit), x if name == "raise" else None)
                except Violation as v:
                    self.violation(f"{name} (x={x}): {v}")
                    continue
            finally:
                self.current.pop(i, None)
            self.stats.count(outcome)

    def broken_dropin(self, exc: BaseException, dropin: Any = None) -> str | None:
        """A drop-in whose worker the chaos killed while it ran its initializer is broken,
        as the standard library's pools are (the fault matrix holds pydist to that): the right
        exception, naming the hit worker as its cause. The drop-in is then replaced, so the
        run goes on; its other operations in flight see the same break."""
        from concurrent.futures.process import BrokenProcessPool
        if dropin is None or not isinstance(exc, BrokenProcessPool) or \
                isinstance(exc, self.pd.ProcessExitedException):
            return None
        cause = exc.__cause__
        with self.dropin_lock:
            if any(old is dropin for old in self.retired):
                return "drop-in broken by a worker killed as it started"
            if not (isinstance(cause, self.pd.ProcessExitedException)
                    and cause.worker_id in self.cluster.hit):
                return None
            self.retired.append(dropin)
            if dropin is self.ex:
                self.ex = self.pd.Executor(max_workers=1, transport=self.cluster.transport)
            elif dropin is self.pool:
                self.pool = self.pd.Pool(1)
        return "drop-in broken by a worker killed as it started"

    def violation(self, text: str) -> None:
        self.stats.violate(text)
        self.say(f"  VIOLATION (seed {self.seed}): {text}")

    def chaos(self) -> None:
        rng = random.Random(self.seed * 1000 + 999)
        pd = self.pd
        while not self.stop.wait(rng.expovariate(1 / self.chaos_every)):
            kind = rng.choice(["SIGKILL", "SIGSTOP+SIGKILL", "rmprocs", "SIGKILL drop-in"])
            if kind == "SIGKILL drop-in":
                mine = set(self.cluster.live) | self.cluster.hit
                others = [p for p in pd.workers() if p != 1 and p not in mine]
                if not others:
                    continue
                victim = rng.choice(others)
            else:
                try:
                    (victim,) = self.cluster.pick(rng)
                except LookupError:
                    continue
            self.cluster.mark_hit(victim)
            w = pd.cluster.group.PGRP.workers.get(victim)
            ospid = getattr(w, "ospid", None)
            try:
                if kind == "rmprocs":
                    pd.rmprocs(victim, waitfor=rng.choice([0, None]))
                elif ospid is not None:
                    if kind == "SIGSTOP+SIGKILL":
                        os.kill(ospid, signal.SIGSTOP)
                        time.sleep(rng.uniform(0, 0.5))
                    os.kill(ospid, signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
            with self.stats.lock:
                self.stats.events[kind] = self.stats.events.get(kind, 0) + 1
            self.cluster.replace()

    def watchdog(self) -> None:
        while not self.stop.wait(1.0):
            now = time.monotonic()
            for _i, (name, t0) in list(self.current.items()):
                if now - t0 > HANG:
                    self.stats.violate(f"{name}: still running after {HANG:.0f} s (a hang)")
                    faulthandler.dump_traceback(all_threads=True)
                    self.stop.set()
                    return

    def progress(self, t0: float) -> None:
        last = 0
        while not self.stop.wait(10.0):
            s = self.stats
            self.say(f"  {time.monotonic() - t0:7.0f} s  {s.ops:>10,} ops  ({(s.ops - last) / 10:,.0f}/s)"
                     f"  violations {len(s.violations)}  events {sum(s.events.values())}")
            last = s.ops

    def run(self) -> Stats:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                   for i in range(self.clients)]
        helpers = [threading.Thread(target=f, daemon=True) for f in (self.chaos, self.watchdog)]
        if not self.quiet:
            helpers.append(threading.Thread(target=self.progress, args=(t0,), daemon=True))
        for t in threads + helpers:
            t.start()
        deadline = t0 + self.seconds if self.seconds else None
        for t in threads:
            while t.is_alive() and not self.stop.is_set():
                t.join(0.5)
                if deadline is not None and time.monotonic() > deadline:
                    self.stop.set()
        self.stop.set()
        for t in threads + helpers:
            t.join(HANG + 10)
        self.wall = time.monotonic() - t0
        return self.stats

    def close_and_check(self, master_before: tuple[int, int]) -> list[str]:
        """Shut the drop-ins down, check every table, remove the workers."""
        pd, problems = self.pd, []
        for d in [self.ex, self.pool, *self.retired]:
            if hasattr(d, "submit"):   # an Executor; the rest are Pools
                d.shutdown(wait=True)
            else:
                d.terminate()
                d.join()
        live = [p for p in self.cluster.live if p in pd.workers()]
        deadline = time.monotonic() + 30
        while True:
            now = {1: tables(), **{p: pd.remotecall_fetch(tables, p) for p in live}}
            want = {1: master_before, **{p: self.cluster.baseline[p] for p in live}}
            # No table may hold more than it did before the soak; one may hold less, when
            # references left by earlier work were released meanwhile (their clients died).
            if _within(now, want) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not _within(now, want):
            problems.append(f"reference tables not back: {now}, expected at most {want}")
        pd.rmprocs(*[p for p in pd.workers() if p != 1], waitfor=30)
        return problems


def leftovers(before_shm: set[str]) -> list[str]:
    """Processes and /dev/shm entries of pydist left behind (after a grace period); the
    worker server and multiprocessing's resource tracker, which live as long as this
    process, are not among them."""
    from multiprocessing import resource_tracker

    import psutil

    from pydist.managers.forkclient import worker_server_pid
    deadline = time.monotonic() + 15
    while True:
        services = {worker_server_pid(), getattr(resource_tracker._resource_tracker, "_pid", None)}
        kids = [c for c in psutil.Process().children(recursive=True)
                if c.pid not in services and c.is_running()]
        shm = {n for n in os.listdir("/dev/shm") if "pydist" in n} - before_shm
        if (not kids and not shm) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return ([f"processes left: {[c.pid for c in kids]}"] if kids else []) + \
        ([f"/dev/shm left: {sorted(shm)}"] if shm else [])


def soak(seed: int | None = None, ops: int = 1_000_000, seconds: float = 0.0, workers: int = 3,
         clients: int = 3, chaos_every: float = 0.5, transport: str = "shm",
         quiet: bool = False) -> dict[str, Any]:
    """One chaos run; its figures (``violations`` lists every broken promise)."""
    import pydist as pd
    seed = random.randrange(1 << 32) if seed is None else seed
    if not quiet:
        print(f"chaos: seed {seed}, transport {transport}, {workers} workers + 2 drop-in "
              f"workers, {clients} clients, an event every {chaos_every} s on average", flush=True)
    before_shm = {n for n in os.listdir("/dev/shm") if "pydist" in n}
    master_before = tables()
    run = Run(pd, seed, ops, seconds, workers, clients, chaos_every, transport, quiet)
    stats = run.run()
    problems = run.close_and_check(master_before)
    problems += leftovers(before_shm)
    return {"seed": seed, "transport": transport, "ops": stats.ops, "ok": stats.ok,
            "expected_errors": dict(stats.expected_errors), "events": dict(stats.events),
            "violations": stats.violations + problems, "wall": run.wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: no limit)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--transport", default="shm", choices=["shm", "tcp"])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--chaos-every", type=float, default=0.5, help="mean seconds between events")
    args = parser.parse_args(argv)
    out = soak(args.seed, args.ops, args.seconds, args.workers, args.clients, args.chaos_every,
               args.transport)
    print(f"chaos: seed {out['seed']}: {out['ops']:,} operations in {out['wall']:.0f} s "
          f"({out['ops'] / max(out['wall'], 1e-9):,.0f}/s); {out['ok']:,} right values; "
          f"expected errors {out['expected_errors']}; events {out['events']}; "
          f"{len(out['violations'])} violations")
    for v in out["violations"][:50]:
        print(f"  VIOLATION: {v}")
    return 1 if out["violations"] else 0


if __name__ == "__main__":
    # Run as a script, this file is ``__main__``, whose functions would travel by value.
    # Import it again as the module ``chaos`` (its directory is sys.path[0], which the
    # workers receive) so that its functions travel as a name.
    import chaos
    sys.exit(chaos.main())
