"""SharedArray figures: passing a big one around, filling it, making and dropping many.

    python bench/shared_arrays.py [--mb 800] [--passes 100] [--many 10000]

1. An ``--mb`` MB SharedArray, filled by 2 local workers (each its ``localindices`` with its
   id), checked on the master by its sum.
2. ``--passes`` passes; in each, the array is sent to both workers at once (a call each,
   answered with one element): the median and the worst pass, and how much each worker's
   resident memory grew per pass.
3. ``--many`` small SharedArrays made and dropped: the master's resident memory and the
   pydist names in /dev/shm before and after.
4. A master with SharedArrays alive, and its workers, killed with SIGKILL: pydist names
   left in /dev/shm.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

import pydist as pd  # noqa: E402


def shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "pydist" in n}


def fill(S: np.ndarray) -> None:
    S[..., pd.localindices(S)] = pd.myid()


def one_element(S: np.ndarray) -> float:
    return float(S[-1])


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def big_array(mb: int, passes: int, workers: list[int], ospids: list[int]) -> None:
    n = mb * 1_000_000 // 8
    t0 = time.perf_counter()
    S = pd.SharedArray(n, np.float64, init=fill)
    made = time.perf_counter() - t0
    shares = [(i * n // len(workers), (i + 1) * n // len(workers)) for i in range(len(workers))]
    expected = sum(p * (hi - lo) for p, (lo, hi) in zip(workers, shares))
    total = float(S.sum())
    print(f"{mb} MB SharedArray made and filled by {len(workers)} workers in {made:.2f} s; "
          f"sum on the master {total:.0f}, expected {expected} "
          f"({'right' if total == expected else 'WRONG'})")
    for w in workers:   # the first pass maps nothing new, but warms the call path
        pd.remotecall_fetch(one_element, w, S)
    before = [rss(p) for p in ospids]
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        futures = [pd.remotecall(one_element, w, S) for w in workers]
        for f in futures:
            f.fetch()
        times.append(time.perf_counter() - t)
    grown = [(rss(p) - b) / passes for p, b in zip(ospids, before)]
    print(f"{passes} passes to {len(workers)} workers: median {statistics.median(times) * 1e3:.3f} "
          f"ms, worst {max(times) * 1e3:.3f} ms; worker RSS growth per pass "
          + ", ".join(f"{g / 1e6:.3f} MB" for g in grown))
    del S
    gc.collect()


def many(count: int, workers: list[int]) -> None:
    gc.collect()
    names, mem = shm_names(), psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    for i in range(count):
        S = pd.SharedArray(64)
        S[0] = i
    del S
    took = time.perf_counter() - t0
    gc.collect()
    time.sleep(0.5)
    grown = psutil.Process().memory_info().rss - mem
    left = shm_names() - names
    print(f"{count} SharedArrays made and dropped in {took:.1f} s "
          f"({took / count * 1e6:.0f} µs each, {len(workers)} workers mapping each): master RSS "
          f"{'+' if grown >= 0 else ''}{grown / 1e6:.1f} MB, /dev/shm names left: {len(left)}")


MASTER = textwrap.dedent("""
    import os, sys, numpy as np, pydist as pd
    w = pd.addprocs(2, transport="shm")
    keep = [pd.SharedArray((1 << 20,)), pd.SharedArray.copy_of(np.arange(1000))]
    pd.remotecall_fetch(lambda a: sys.modules["__main__"].__dict__.update(a=a), w[0], keep)
    print(*[pd.remotecall_fetch(os.getpid, p) for p in w], flush=True)
    sys.stdin.read()
""")


def kill_all() -> None:
    before = shm_names()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    master = subprocess.Popen([sys.executable, "-c", MASTER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    pids = [master.pid, *map(int, master.stdout.readline().split())]
    for p in pids:
        os.kill(p, signal.SIGKILL)
    master.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids[1:]):
        time.sleep(0.05)
    print(f"kill -9 of a master with SharedArrays alive and its {len(pids) - 1} workers: "
          f"/dev/shm names left: {len(shm_names() - before)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=800)
    ap.add_argument("--passes", type=int, default=100)
    ap.add_argument("--many", type=int, default=10_000)
    args = ap.parse_args()
    workers = pd.addprocs(2, transport="shm")
    try:
        ospids = [pd.remotecall_fetch(os.getpid, w) for w in workers]
        big_array(args.mb, args.passes, workers, ospids)
        many(args.many, workers)
    finally:
        pd.rmprocs(*workers, waitfor=30)
    kill_all()


if __name__ == "__main__":
    main()
