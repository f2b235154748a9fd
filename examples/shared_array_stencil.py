"""Blur an image held in a SharedArray: every worker smooths its own band of rows.

    python examples/shared_array_stencil.py [--size 3000] [--steps 20] [--workers 2]

Each step is one Jacobi sweep of a 5-point average (a blur) from one SharedArray into
another. The master sends the two arrays to the workers by name (no pixel is copied),
``pmap`` gives each worker a band of rows (contiguous memory in numpy's C order: bands of
columns would make every worker stride through every row, measured 3x slower here), and
the master swaps the two for the next step. ``pmap`` ships ``blur_rows``, a function of
this script, to the workers by value; ``everywhere`` has them import numpy beforehand.
The same steps then run in this process alone, over private and over shared memory, and
the results are compared: same image, and the time of each.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import pydist as pd


def blur_rows(src: np.ndarray, dst: np.ndarray, lo: int, hi: int) -> None:
    """One sweep on the interior rows in [lo, hi): each pixel becomes the mean of itself
    and its four neighbours (the border stays as it is)."""
    lo, hi = max(lo, 1), min(hi, src.shape[0] - 1)
    if lo >= hi:
        return
    out = dst[lo:hi, 1:-1]
    np.add(src[lo:hi, 1:-1], src[lo - 1:hi - 1, 1:-1], out=out)
    out += src[lo + 1:hi + 1, 1:-1]
    out += src[lo:hi, :-2]
    out += src[lo:hi, 2:]
    out /= 5


def image(n: int) -> np.ndarray:
    """A test picture: a bright disc and stripes on a noisy background."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:n, 0:n]
    disc = ((x - n / 2) ** 2 + (y - n / 2) ** 2 < (n / 4) ** 2) * 1.0
    return disc + 0.5 * (x // 32 % 2) + 0.1 * rng.random((n, n))


def serial(a: np.ndarray, steps: int, shared: bool = False) -> tuple[np.ndarray, float]:
    make = pd.SharedArray.copy_of if shared else np.copy
    src, dst = make(a), make(a)
    t0 = time.perf_counter()
    for _ in range(steps):
        blur_rows(src, dst, 0, a.shape[0])
        src, dst = dst, src
    return src, time.perf_counter() - t0


def parallel(a: np.ndarray, steps: int) -> tuple[np.ndarray, float]:
    src, dst = pd.SharedArray.copy_of(a), pd.SharedArray.copy_of(a)
    n, k = a.shape[0], len(src.pids)
    bands = [(i * n // k, (i + 1) * n // k) for i in range(k)]   # one band per worker
    los, his = [lo for lo, _ in bands], [hi for _, hi in bands]
    t0 = time.perf_counter()
    for _ in range(steps):
        pd.pmap(blur_rows, [src] * k, [dst] * k, los, his)
        src, dst = dst, src
    return pd.sdata(src), time.perf_counter() - t0


def main() -> None:
    small = bool(os.environ.get("PYDIST_EXAMPLES_SMALL"))   # the test suite's quick run
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=400 if small else 3000,
                    help="image side in pixels")
    ap.add_argument("--steps", type=int, default=3 if small else 20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    pd.addprocs(args.workers)
    pd.everywhere("import numpy")   # every worker loads numpy once, before the clock starts
    try:
        a = image(args.size)
        mb = a.nbytes / 1e6
        print(f"{args.size}x{args.size} image ({mb:.0f} MB), {args.steps} blur steps")
        par, t_par = parallel(a, args.steps)
        ser, t_ser = serial(a, args.steps)
        _, t_shm = serial(a, args.steps, shared=True)
        same = np.allclose(par, ser)
        print(f"one process, private memory:  {t_ser:6.2f} s")
        print(f"one process, shared memory:   {t_shm:6.2f} s   (no huge pages for shared memory "
              "on most systems: it can be slower)")
        print(f"{args.workers} workers, shared memory:    {t_par:6.2f} s   speedup "
              f"{t_ser / t_par:.2f}x over private, {t_shm / t_par:.2f}x over shared; same image: "
              f"{same}")
    finally:
        pd.rmprocs(*[p for p in pd.workers() if p != 1])


if __name__ == "__main__":
    main()
