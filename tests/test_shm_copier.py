"""Large copies into shared segments are split across the copier's threads: the bytes land
exactly as one copy would put them, a copy never waits for a busy helper, and a closed
copier leaves no thread behind. End to end, large arrays of every layout round-trip on
every transport."""
from __future__ import annotations

import mmap
import signal
import threading

import numpy as np
import pytest
from testkit import wait_until

import pydist as pd
from pydist.shm import copier as cp

MIB = 1 << 20


def helpers_of(c: cp.Copier) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t in c.threads()]


def target(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n))


@pytest.mark.parametrize("sizes", [
    [cp.PARALLEL_MIN],                          # exactly at the threshold
    [3, 5 * MIB + 7, 1, 3 * MIB - 5, 4097],     # odd sizes: piece cuts fall inside parts
    [9 * MIB + 1],                              # one part over several pieces
    [cp.PARALLEL_MIN - 1],                      # under it: copied in the calling thread
])
def test_a_split_copy_puts_every_byte_where_one_copy_would(sizes, leak_oracle):
    rng = np.random.default_rng(len(sizes))
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    parts = [a.tobytes() if i % 2 else memoryview(a).toreadonly()   # bytes and read-only views
             for i, a in enumerate(arrays)]
    total = sum(sizes)
    dst = target(total + 64)
    dst[total:] = b"\xee" * 64
    c = cp.Copier(helpers=1)
    try:
        c.copy(dst, parts)
        assert bytes(dst[:total]) == b"".join(a.tobytes() for a in arrays)
        assert bytes(dst[total:]) == b"\xee" * 64, "nothing written past the frame"
        assert bool(helpers_of(c)) == (total >= cp.PARALLEL_MIN)
    finally:
        c.close()
        dst.release()


def test_a_copy_does_not_wait_for_a_busy_helper(leak_oracle):
    c = cp.Copier(helpers=1)
    src = np.arange(8 * MIB // 8, dtype=np.int64)
    dst = target(src.nbytes)
    release = threading.Event()
    try:
        c.copy(dst, [memoryview(src).cast("B")[:cp.PARALLEL_MIN]])   # the helper is up
        c._jobs.put(cp._Job([[(release.wait, 30.0)]]))           # and now stuck on a job
        assert wait_until(lambda: c._jobs.empty(), 10)
        dst[:] = bytes(src.nbytes)
        done = threading.Event()   # a size not measured yet: this copy is split
        copying = threading.Thread(target=lambda: (c.copy(dst, [memoryview(src).cast("B")]),
                                                   done.set()))
        copying.start()
        assert done.wait(30), "the copy waited for a helper that was busy"
        assert np.array_equal(np.frombuffer(dst, dtype=np.int64), src)
        copying.join(10)
    finally:
        release.set()
        c.close()
        dst.release()


def test_closing_the_copier_ends_its_threads_and_a_later_copy_starts_them_again(leak_oracle):
    c = cp.Copier(helpers=2)
    src = bytes(range(256)) * (cp.PARALLEL_MIN // 128)
    dst = target(2 * len(src))
    try:
        c.copy(dst, [src])
        threads = helpers_of(c)
        assert len(threads) == 2 and all(t.daemon for t in threads)
        c.close()
        c.close()   # idempotent
        assert not any(t.is_alive() for t in threads) and not c.threads()
        c.copy(dst, [src[::-1], src])   # twice the size, not measured yet: split first
        assert bytes(dst) == src[::-1] + src and len(c.threads()) == 2
    finally:
        c.close()
        dst.release()
    assert not c.threads()


def test_idle_helpers_end_by_themselves(leak_oracle):
    c = cp.Copier(helpers=1)
    dst = target(cp.PARALLEL_MIN)
    try:
        c.copy(dst, [bytes(cp.PARALLEL_MIN)])
        (helper,) = c.threads()
        helper.join(cp.IDLE_SECONDS + 10)
        assert not helper.is_alive() and not c.threads()
    finally:
        c.close()
        dst.release()


def test_populating_a_segment_maps_every_page_with_the_helpers(leak_oracle):
    c = cp.Copier(helpers=1)
    buf = mmap.mmap(-1, 16 * MIB)
    try:
        c.populate(buf, 23)   # MADV_POPULATE_WRITE (where the kernel lacks it, a no-op)
        buf[-1:] = b"\x01"
        assert buf[-1] == 1 and buf[0] == 0
    finally:
        c.close()
        buf.close()


def identity(x):
    return x


@pytest.mark.parametrize("layout", ["C", "F", "strided", "odd"])
def test_large_arrays_of_every_layout_come_back_equal(cluster, layout):
    rng = np.random.default_rng(7)
    base = rng.standard_normal((1024, 2048))                   # 16 MiB
    a = {"C": base, "F": np.asfortranarray(base), "strided": base[:, ::3],
         "odd": rng.integers(0, 255, 9 * MIB + 13, dtype=np.uint8)}[layout]
    for w in cluster:
        back = pd.remotecall_fetch(identity, w, a)
        assert back.shape == a.shape and back.dtype == a.dtype and np.array_equal(back, a)


def test_an_interrupt_while_a_helper_copies_is_raised_once_the_helper_is_done(leak_oracle):
    c = cp.Copier(helpers=1)
    fired, go_on, done = threading.Event(), threading.Event(), []
    job = cp._Job([[(go_on.wait, 30.0), (done.append, "helper")], [(done.append, "caller")]])
    old = signal.signal(signal.SIGALRM, lambda *_: (fired.set(), interrupt()))
    finisher = threading.Thread(target=lambda: fired.wait(30) and go_on.set())
    try:
        c._start()
        c._jobs.put(job)
        assert wait_until(lambda: job.next == 1, 10)   # the helper is on the slow piece
        finisher.start()
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            job.run()
            job.wait()
        assert fired.is_set() and sorted(done) == ["caller", "helper"], \
            "the caller raised before the helper's piece was done"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        go_on.set()
        finisher.join(10)
        c.close()


def interrupt() -> None:
    raise KeyboardInterrupt


def test_the_copier_keeps_measuring_both_ways_and_copies_right_either_way(leak_oracle):
    c = cp.Copier(helpers=1)
    n = 8 * MIB + 3
    dst = target(n)
    try:
        for i in range(4 + 2 * cp._PROBE_EVERY):
            src = bytes([i]) * n
            c.copy(dst, [src])
            assert dst[0] == dst[n - 1] == i
        assert c._pace.known(n) == (True, True), "a way never tried again cannot win again"
    finally:
        c.close()
        dst.release()


def test_large_arrays_sent_at_once_from_several_threads_share_the_copier(cluster):
    # Each send splits its copy with the process's one copier: the helpers are often busy
    # with another thread's copy, and every array still comes back as it went.
    arrays = [np.full(5 * MIB + 8 * i, i, dtype=np.uint8) for i in range(6)]
    results: dict[int, bool] = {}

    def echo_all(i: int) -> None:
        w = cluster[i % len(cluster)]
        for _ in range(3):
            back = pd.remotecall_fetch(identity, w, arrays[i])
            results[i] = results.get(i, True) and np.array_equal(back, arrays[i])

    threads = [threading.Thread(target=echo_all, args=(i,)) for i in range(len(arrays))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert results == dict.fromkeys(range(len(arrays)), True)
