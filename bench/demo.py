"""A demonstration: the same CPU-bound job serially and spread over local pydist workers.

Counts the primes below 2,000,000 by trial division in chunks, first in this process, then
on one worker per CPU with ``remotecall``, and prints both times and the speedup.
"""
from __future__ import annotations

import argparse
import os
import time

import pydist as pd


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi), by trial division (deliberately plain Python: CPU-bound)."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            count += n == 2
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=2_000_000)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    step = -(-args.limit // args.chunks)
    ranges = [(lo, min(lo + step, args.limit)) for lo in range(0, args.limit, step)]

    t0 = time.perf_counter()
    serial = sum(count_primes(lo, hi) for lo, hi in ranges)
    t_serial = time.perf_counter() - t0

    t0 = time.perf_counter()
    pids = pd.addprocs(args.workers)
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    futures = [pd.remotecall(count_primes, pids[i % len(pids)], lo, hi)
               for i, (lo, hi) in enumerate(ranges)]
    parallel = sum(f.fetch() for f in futures)
    t_parallel = time.perf_counter() - t0
    pd.rmprocs(*pids)

    assert parallel == serial, (parallel, serial)
    print(f"primes below {args.limit:,}: {serial:,}")
    print(f"serial, 1 process:            {t_serial:6.2f} s")
    print(f"pydist, {len(pids)} workers (+{t_start:.2f} s start): {t_parallel:6.2f} s")
    print(f"speedup: {t_serial / t_parallel:.2f}x on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
