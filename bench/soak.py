"""Soak runs: the long, large runs the test suite is too short for (pytest does not collect
this file). Each prints its figures; the machine's load average is printed around each.

    python bench/soak.py tasks [--n 1000000] [--apis pmap,remotecall,executor] [--transport shm]
    python bench/soak.py ring  [--gib 10]
    python bench/soak.py refs  [--n 100000]
    python bench/soak.py all

- ``tasks``: ``n`` tiny tasks through each API (``pmap``, ``remotecall`` in batches,
  ``Executor.map``), after a warm-up of ``n / 10``. The RSS of the master and of every worker
  is sampled every ``n / 50`` tasks; the slope of a least-squares line through the samples,
  in bytes per 100,000 tasks, says whether memory is flat.
- ``ring``: ``gib`` GiB of payloads through one shared-memory connection, half each way, in
  sizes from 1 KiB up to four times the ring's capacity, the same number of bytes in each
  size. Each payload travels one-way (``remote_do``) with the blake2b digest its sender
  computed; the receiver computes it again: a payload that arrives different is corrupt,
  one that never arrives is missing.
- ``refs``: ``n`` Futures and ``n`` RemoteChannels created, used and dropped, owned by the
  master and by workers, some passed between workers; then the reference tables of every
  process (owned values, handles, reply waiters) must be back where they started.

Exit status 1 when a figure breaks its promise (a corrupt frame, tables not back to
their start); the RSS slope is reported, not judged.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

# The worker-side functions below travel by reference (module ``soak``, which the workers
# import from the master's sys.path), never by value: see the end of this file.

# -- run on the workers (and the ring's payload checks on the master too) ---------------


def tiny(x: int) -> int:
    """A task far cheaper than its round trip."""
    return x + 1


def ospid() -> int:
    return os.getpid()


def digest(data: bytes) -> bytes:
    """The 16-byte blake2b digest of ``data``."""
    return hashlib.blake2b(data, digest_size=16).digest()


_blocks: dict[int, bytearray] = {}


def payload(size: int, i: int) -> bytes:
    """Payload ``i`` of ``size`` bytes: random bytes (made once per size) stamped with ``i``."""
    block = _blocks.get(size)
    if block is None:
        block = _blocks[size] = bytearray(os.urandom(size))
    block[:8] = i.to_bytes(8, "little")
    return bytes(block)


_tally = {"checked": 0, "corrupt": 0}


def verify(data: bytes, expected: bytes) -> None:
    """Check a payload that arrived against the digest its sender computed."""
    _tally["checked"] += 1
    _tally["corrupt"] += digest(data) != expected


def tally() -> tuple[int, int]:
    """(payloads checked, corrupt among them) since the last call; starts afresh."""
    out = _tally["checked"], _tally["corrupt"]
    _tally.update(checked=0, corrupt=0)
    return out


def table_sizes() -> dict[str, int]:
    """How many owned values, reference handles and reply waiters this process holds."""
    from pydist.cluster.group import PGRP
    from pydist.refs.remoteref import _handles
    return {"refs": len(PGRP.refs), "handles": len(_handles), "waiting": len(PGRP.waiting)}


def collect() -> None:
    gc.collect()


def hold(ref: Any) -> bool:
    """Receive a reference (this process becomes a client of its owner) and drop it."""
    return ref is not None


def put_into(chan: Any, value: Any) -> None:
    chan.put(value)


# -- on the master -------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} vCPUs"


def slope_per_100k(points: list[tuple[int, int]]) -> float:
    """Bytes per 100,000 tasks: the least-squares slope of (tasks, rss) samples."""
    xs, ys = zip(*points)
    return statistics.linear_regression(xs, ys).slope * 100_000


# -- tasks: a million tiny tasks, memory sampled ------------------------------------------


class RssSampler:
    """RSS samples of named processes, against the number of tasks done."""

    def __init__(self, ospids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in ospids.items()}
        self.points: dict[str, list[tuple[int, int]]] = {name: [] for name in ospids}

    def sample(self, done: int) -> None:
        for name, proc in self.procs.items():
            self.points[name].append((done, proc.memory_info().rss))

    def report(self) -> list[str]:
        lines = []
        for name, pts in self.points.items():
            first, last = pts[0][1], pts[-1][1]
            lines.append(f"    {name:<10} RSS {first / 2**20:7.1f} -> {last / 2**20:7.1f} MiB, "
                         f"slope {slope_per_100k(pts) / 1024:+8.1f} KiB per 100k tasks")
        return lines


def run_rounds(run: Callable[[int, int], int], n: int, sampler: RssSampler) -> float:
    """``run(start, count)`` in 50 rounds over ``n`` tasks, a sample after each; tasks/s."""
    rounds, spent = 50, 0.0
    size = n // rounds
    sampler.sample(0)
    for r in range(rounds):
        t0 = time.perf_counter()
        checksum = run(r * size, size)
        spent += time.perf_counter() - t0
        expected = size * (2 * r * size + size + 1) // 2  # sum of x + 1 over the round
        if checksum != expected:
            raise SystemExit(f"round {r}: results sum to {checksum}, expected {expected}")
        sampler.sample((r + 1) * size)
    return rounds * size / spent


def pmap_rounds(pd: Any) -> Callable[[int, int], int]:
    return lambda start, count: sum(pd.pmap(tiny, range(start, start + count)))


def remotecall_rounds(pd: Any, pids: list[int], batch: int = 2000) -> Callable[[int, int], int]:
    def run(start: int, count: int) -> int:
        total = 0
        for lo in range(start, start + count, batch):
            futures = [pd.remotecall(tiny, pids[i % len(pids)], i)
                       for i in range(lo, min(lo + batch, start + count))]
            total += sum(f.fetch() for f in futures)
        return total
    return run


def executor_rounds(ex: Any) -> Callable[[int, int], int]:
    return lambda start, count: sum(ex.map(tiny, range(start, start + count)))


def soak_tasks(pd: Any, n: int, apis: list[str], transport: str) -> bool:
    say(f"== tasks: {n:,} tiny tasks per API over {transport}; {load()}")
    for api in apis:
        ex = None
        if api == "executor":
            ex = pd.Executor(2, transport=transport)
            run = executor_rounds(ex)
            run(0, 1000)  # start both workers
            ospids = ex._processes.keys()
        else:
            pids = pd.addprocs(2, transport=transport)
            run = pmap_rounds(pd) if api == "pmap" else remotecall_rounds(pd, pids)
            ospids = [pd.remotecall_fetch(ospid, p) for p in pids]
        try:
            run(0, n // 10)  # warm-up: caches, pools and allocator arenas fill here
            sampler = RssSampler({"master": os.getpid(),
                                  **{f"worker {i + 1}": p for i, p in enumerate(ospids)}})
            rate = run_rounds(run, n, sampler)
        finally:
            if ex is not None:
                ex.shutdown()
            else:
                pd.rmprocs(*pids, waitfor=30)
        say(f"  {api}: {rate:,.0f} tasks/s")
        for line in sampler.report():
            say(line)
    say(f"  {load()}")
    return True


# -- ring: 10 GiB through one shared-memory connection -------------------------------------


def ring_sizes() -> list[int]:
    """1 KiB, 4 KiB, ... up to four times the ring capacity."""
    from pydist.shm.layout import DEFAULT_CAPACITY
    sizes, size = [], 1024
    while size <= 4 * DEFAULT_CAPACITY:
        sizes.append(size)
        size *= 4
    return sizes


def stream(pid: int, size: int, count: int) -> None:
    """Send ``count`` payloads of ``size`` bytes to ``pid``, one-way, each with its digest;
    the ring's back-pressure paces the sender."""
    import pydist as pd
    for i in range(count):
        data = payload(size, i)
        pd.remote_do(verify, pid, data, digest(data))


def ring_direction(pd: Any, pid: int, size: int, count: int, outbound: bool) -> tuple[int, int]:
    """Stream ``count`` payloads one way and wait until the far side has checked them all:
    (checked, corrupt) as the far side counted them."""
    if outbound:
        stream(pid, size, count)
        return pd.remotecall_fetch(tally, pid)  # calls run in order: after every verify
    pd.remotecall_fetch(stream, pid, 1, size, count)
    deadline = time.monotonic() + 60
    while _tally["checked"] < count and time.monotonic() < deadline:
        time.sleep(0.0005)
    return tally()


def soak_ring(pd: Any, gib: float) -> bool:
    from pydist.cluster.group import PGRP
    from pydist.shm.layout import DEFAULT_CAPACITY
    sizes = ring_sizes()
    say(f"== ring: {gib:g} GiB over one shm connection (ring capacity {DEFAULT_CAPACITY >> 20} "
        f"MiB), payloads {sizes[0]} B .. {sizes[-1] >> 20} MiB, half each way; {load()}")
    (pid,) = pd.addprocs(1, transport="shm")
    say(f"  connection: {type(PGRP.workers[pid].transport).__name__}")
    share = int(gib * 2**30) // (2 * len(sizes))  # bytes per size per direction
    moved = corrupt = lost = 0
    start = time.perf_counter()
    try:
        for size in sizes:
            count = max(1, share // size)
            for outbound in (True, False):
                t0 = time.perf_counter()
                checked, bad = ring_direction(pd, pid, size, count, outbound)
                spent = time.perf_counter() - t0
                corrupt, lost, moved = corrupt + bad, lost + count - checked, moved + size * count
                say(f"  {size:>10,} B x {count:>7,} {'to  ' if outbound else 'from'} the worker: "
                    f"{size * count / spent / 2**30:5.2f} GiB/s, {count / spent:9,.0f} frames/s, "
                    f"{bad} corrupt, {count - checked} missing")
    finally:
        pd.rmprocs(pid, waitfor=30)
    total = time.perf_counter() - start
    say(f"  total {moved / 2**30:.2f} GiB in {total:.1f} s: {moved / total / 2**30:.2f} GiB/s "
        f"(a digest on each side included), {corrupt} corrupt and {lost} missing frames; {load()}")
    return corrupt == 0 and lost == 0


# -- refs: 100,000 Futures and 100,000 RemoteChannels --------------------------------------


def tables(pd: Any, pids: list[int]) -> dict[int, dict[str, int]]:
    return {1: table_sizes(), **{p: pd.remotecall_fetch(table_sizes, p) for p in pids}}


def future_kinds(pd: Any, a: int, b: int) -> list[Callable[[int], Any]]:
    """Ways to make a Future, each returning the handle: owned by the master, a worker's
    result never fetched, put from the master onto a worker, passed to a second worker."""
    def local(i: int) -> Any:
        return pd.Future().put(i)

    def result(i: int) -> Any:
        return pd.remotecall(tiny, a, i)

    def put_remote(i: int) -> Any:
        return pd.Future(b).put(i)

    def passed(i: int) -> Any:
        f = pd.remotecall(tiny, a, i)
        pd.remotecall_fetch(hold, b, f)
        return f
    return [local, result, put_remote, passed]


def channel_kinds(pd: Any, a: int, b: int) -> list[Callable[[int], Any]]:
    """Ways to make a RemoteChannel: on the master, on a worker, on a worker with a second
    worker putting into it; each item is taken back by the master."""
    def use(chan: Any, i: int, via: int | None = None) -> Any:
        if via is None:
            chan.put(i)
        else:
            pd.remotecall_fetch(put_into, via, chan, i)
        if chan.take() != i:
            raise SystemExit(f"{chan!r} gave back the wrong item")
        return chan
    return [lambda i: use(pd.RemoteChannel(), i), lambda i: use(pd.RemoteChannel(pid=a), i),
            lambda i: use(pd.RemoteChannel(pid=b), i, via=a)]


def churn(kinds: list[Callable[[int], Any]], n: int, batch: int = 1000) -> int:
    """Make ``n`` references in batches held together, then drop each batch; the largest
    number of handles this process held at once."""
    from pydist.refs.remoteref import _handles
    peak = 0
    for lo in range(0, n, batch):
        held = [kinds[i % len(kinds)](i) for i in range(lo, min(lo + batch, n))]
        peak = max(peak, len(_handles))
        del held
    return peak


def soak_refs(pd: Any, n: int) -> bool:
    say(f"== refs: {n:,} Futures and {n:,} RemoteChannels made and dropped; {load()}")
    a, b = pd.addprocs(2)
    try:
        before = tables(pd, [a, b])
        say(f"  tables before: {before}")
        ok = True
        for what, kinds in (("Futures", future_kinds(pd, a, b)), ("RemoteChannels", channel_kinds(pd, a, b))):
            t0 = time.perf_counter()
            peak = churn(kinds, n)
            made = time.perf_counter() - t0
            middle = tables(pd, [a, b])
            t1 = time.perf_counter()
            while tables(pd, [a, b]) != before and time.perf_counter() - t1 < 60:
                time.sleep(0.05)
            after, drained = tables(pd, [a, b]), time.perf_counter() - t1
            say(f"  {what}: made and dropped in {made:.1f} s ({n / made:,.0f}/s), up to {peak} "
                f"handles held at once; right after: {middle}")
            say(f"  {what}: tables {'back to where they started' if after == before else 'NOT back'}"
                f" {drained:.2f} s later: {after}")
            if after != before:
                ok = False
                collect()
                for p in (a, b):
                    pd.remotecall_fetch(collect, p)
                say(f"  {what}: after a garbage collection everywhere: {tables(pd, [a, b])}")
    finally:
        pd.rmprocs(a, b, waitfor=30)
    say(f"  {load()}")
    return ok


# -- the command ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["tasks", "ring", "refs", "all"])
    parser.add_argument("--n", type=int, default=None,
                        help="tasks: tasks per API (1,000,000); refs: references of each kind (100,000)")
    parser.add_argument("--apis", default="pmap,remotecall,executor")
    parser.add_argument("--transport", default="shm", choices=["shm", "tcp"])
    parser.add_argument("--gib", type=float, default=10.0)
    args = parser.parse_args(argv)
    import pydist as pd
    ok = True
    if args.what in ("tasks", "all"):
        ok &= soak_tasks(pd, args.n or 1_000_000, args.apis.split(","), args.transport)
    if args.what in ("ring", "all"):
        ok &= soak_ring(pd, args.gib)
    if args.what in ("refs", "all"):
        ok &= soak_refs(pd, args.n or 100_000)
    return 0 if ok else 1


if __name__ == "__main__":
    # Run as a script, this file is ``__main__``, whose functions would travel by value with
    # every call. Import it again as the module ``soak`` (its directory is sys.path[0],
    # which the workers receive) and run that: its functions travel as a name.
    import soak
    sys.exit(soak.main())
