"""Estimate pi by Monte-Carlo with pmap: each element is one independent batch of samples.

    python examples/monte_carlo_pi.py [--batches 64] [--samples 200000] [--workers N]

Each batch draws its points from its own seeded generator, so the estimate is the same
whatever the number of workers (and the same as a serial run).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import pydist as pd

SMALL = os.environ.get("PYDIST_EXAMPLES_SMALL") == "1"   # the test suite runs a small case


def hits_in_circle(seed: int, samples: int) -> int:
    """How many of ``samples`` random points of the unit square fall in the quarter circle."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        hits += x * x + y * y <= 1.0
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8 if SMALL else 64)
    parser.add_argument("--samples", type=int, default=2_000 if SMALL else 200_000)
    parser.add_argument("--workers", type=int, default=2 if SMALL else os.cpu_count() or 2)
    args = parser.parse_args()

    pids = pd.addprocs(args.workers)
    try:
        t0 = time.perf_counter()
        seeds = range(args.batches)
        hits = pd.pmap(hits_in_circle, seeds, [args.samples] * args.batches)
        elapsed = time.perf_counter() - t0
    finally:
        pd.rmprocs(*pids)

    total = args.batches * args.samples
    estimate = 4 * sum(hits) / total
    # The standard error of the estimate: 4 * sqrt(p (1 - p) / n), with p = pi / 4.
    error = 4 * math.sqrt(math.pi / 4 * (1 - math.pi / 4) / total)
    print(f"pi ~ {estimate:.5f} from {total:,} points on {len(pids)} workers in {elapsed:.2f} s "
          f"(true {math.pi:.5f}, standard error {error:.5f})")
    assert abs(estimate - math.pi) < 6 * error, "the estimate is off by more than 6 standard errors"


if __name__ == "__main__":
    main()
