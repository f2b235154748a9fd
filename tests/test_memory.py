"""Memory stays bounded: a big array costs a worker its size and one copy, not ring-sized
multiples of it, on every transport."""
from __future__ import annotations

import numpy as np

import pydist as pd

GIB = 1 << 30


def peak_rss() -> int:
    """This process's peak resident memory in bytes (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def checksum_and_return(a: np.ndarray) -> tuple[int, np.ndarray]:
    """Touch every byte of ``a`` and send it back."""
    return int(a[:: 1 << 20].sum()) + int(a[-1]), a


def test_a_gib_array_there_and_back_costs_the_worker_at_most_two_point_two_gib(fresh):
    (a,) = fresh(1)
    arr = np.full(GIB, 7, dtype=np.uint8)
    before = pd.remotecall_fetch(peak_rss, a)
    total, back = pd.remotecall_fetch(checksum_and_return, a, arr)
    grown = pd.remotecall_fetch(peak_rss, a) - before
    assert total == 7 * (GIB >> 20) + 7
    assert back.nbytes == GIB and back[0] == back[-1] == 7
    print(f"1 GiB there and back: the worker's peak RSS grew by {grown / GIB:.2f} GiB")
    # The array as received, and at most one copy of it on the way back.
    assert grown <= 2.2 * GIB, f"the worker's peak RSS grew by {grown / GIB:.2f} GiB"
