"""Producers and a consumer on different workers, talking through RemoteChannels.

    python examples/remote_channel.py [--jobs 100]

The master puts jobs in one RemoteChannel; two workers take them, compute, and put the
results in another; the master collects them. A channel lives on one process (here the
master) and any process can put to it or take from it.
"""
from __future__ import annotations

import argparse
import os

import pydist as pd

SMALL = os.environ.get("PYDIST_EXAMPLES_SMALL") == "1"
STOP = None          # the job that tells a worker to stop


def serve(jobs: pd.RemoteChannel, results: pd.RemoteChannel) -> int:
    """Run on a worker: take jobs until STOP, put (job, result, worker id) for each."""
    done = 0
    while (n := jobs.take()) is not STOP:
        results.put((n, sum(i * i for i in range(n)), pd.myid()))
        done += 1
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20 if SMALL else 100)
    args = parser.parse_args()

    pids = pd.addprocs(2)
    try:
        jobs = pd.RemoteChannel(lambda: pd.Channel(10))        # bounded: producers wait
        results = pd.RemoteChannel(lambda: pd.Channel(10**6))
        servers = [pd.remotecall(serve, p, jobs, results) for p in pids]
        for n in range(args.jobs):
            jobs.put(n)
        for _ in pids:
            jobs.put(STOP)
        got = [results.take(timeout=60) for _ in range(args.jobs)]
        per_worker = [s.fetch() for s in servers]
    finally:
        pd.rmprocs(*pids)

    assert sorted(n for n, _, _ in got) == list(range(args.jobs))
    assert all(r == sum(i * i for i in range(n)) for n, r, _ in got)
    print(f"{args.jobs} jobs done; per worker: {dict(zip(pids, per_worker))}")


if __name__ == "__main__":
    main()
