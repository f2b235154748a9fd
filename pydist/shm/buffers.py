"""Where a received frame lands: fresh memory for a small frame, reused memory for a large one.

A frame is handed out as a memoryview of memory the transport allocated, and the pickle
protocol-5 buffers decoded from it (numpy arrays) are views of that same memory: the array
owns it, and nothing is copied again. Fresh memory is slow for a large frame, though: the
kernel faults in and zeroes every page on first touch (~1.5-2 GB/s here, against ~10 GB/s
for the copy out of the ring). So:

* a frame of at least ``LARGE`` bytes gets memory from a small per-process pool. A pooled
  buffer is handed out again once nothing refers to it any more: every view of it, and every
  array made from one, holds a reference to it, so its reference count says when the last
  user is gone. (A user who keeps a view, an array or ``frame.obj`` keeps it out of the pool.)
* new large memory is an anonymous mapping populated in one call (``MAP_POPULATE``), about
  twice as fast as faulting it in page by page;
* the pool keeps at most ``POOL_BYTES`` (whole buffers, never one larger than that), and a
  buffer nobody has asked for within ``IDLE_SECONDS`` is unmapped by a daemon thread that
  lives only while the pool holds something: memory stays bounded, in size and in time.
"""
from __future__ import annotations

import mmap
import os
import pickle
import sys
import threading
import time
from collections.abc import Sequence

from .. import transport

__all__ = ["receive_buffer", "LARGE", "POOL_BYTES", "IDLE_SECONDS", "pool_stats", "byte_views",
           "skip"]

LARGE = 1 << 20
POOL_BYTES = 256 << 20
IDLE_SECONDS = 5.0
_ROUND = 1 << 16  # pooled sizes are rounded up to this, so near sizes share a buffer
_SMALL = 4096  # bytes parts up to this size are sent as they are, without a memoryview
_MAP_FLAGS = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0) | getattr(mmap, "MAP_POPULATE", 0)


def _fresh(size: int) -> mmap.mmap:
    try:
        return mmap.mmap(-1, size, flags=_MAP_FLAGS)
    except OSError as exc:
        raise MemoryError(f"cannot map {size} bytes for a received frame: {exc}") from None


class _Pool:
    """Large receive buffers, handed out again once unreferenced (one pool per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: list[mmap.mmap] = []  # least recently handed out first
        self._used: list[float] = []      # when each was last handed out
        self._bytes = 0
        self._trimmer: threading.Thread | None = None

    def get(self, n: int) -> memoryview:
        with self._lock:
            buf = self._reuse(n)
            if buf is None:
                size = -(-n // _ROUND) * _ROUND
                buf = _fresh(size)
                self._keep(buf)
        return memoryview(buf)[:n]

    def _idle(self, i: int) -> bool:
        # Two references when idle: the pool's list and getrefcount's own argument.
        return sys.getrefcount(self._bufs[i]) == 2

    def _reuse(self, n: int) -> mmap.mmap | None:
        bufs = self._bufs
        for i in range(len(bufs)):
            size = len(bufs[i])
            if n <= size <= 2 * n + _ROUND and self._idle(i):
                buf = bufs.pop(i)
                self._used.pop(i)
                bufs.append(buf)  # most recently used last
                self._used.append(time.monotonic())
                return buf
        return None

    def _keep(self, buf: mmap.mmap) -> None:
        size = len(buf)
        if size > POOL_BYTES:
            return
        i = 0
        while self._bytes + size > POOL_BYTES and i < len(self._bufs):
            if self._idle(i):
                self._drop(i)
            else:
                i += 1
        if self._bytes + size > POOL_BYTES:
            return  # every pooled buffer is in use: this one lives and dies on its own
        self._bufs.append(buf)
        self._used.append(time.monotonic())
        self._bytes += size
        if self._trimmer is None:
            self._trimmer = threading.Thread(target=self._trim_loop, name="pydist-shm-buffers",
                                             daemon=True)
            self._trimmer.start()

    def _drop(self, i: int) -> None:
        buf = self._bufs.pop(i)
        self._used.pop(i)
        self._bytes -= len(buf)  # unmapped when its last reference goes, right here

    def _trim_loop(self) -> None:
        while True:
            time.sleep(IDLE_SECONDS)
            with self._lock:
                cutoff = time.monotonic() - IDLE_SECONDS
                i = 0
                while i < len(self._bufs):
                    if self._used[i] <= cutoff and self._idle(i):
                        self._drop(i)
                    else:
                        i += 1
                if not self._bufs:
                    self._trimmer = None
                    return

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return len(self._bufs), self._bytes


_POOL = _Pool()


def _forget_after_fork() -> None:
    """A forked child starts with an empty pool (its lock may have been held at the fork,
    and no trimmer thread survives it)."""
    global _POOL
    _POOL = _Pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def receive_buffer(n: int) -> memoryview:
    """A writable view of ``n`` bytes for a frame (``MemoryError`` if none can be had)."""
    if n < LARGE:
        return memoryview(bytearray(n))
    return _POOL.get(n)


def pool_stats() -> tuple[int, int]:
    """(buffers, bytes) the pool holds now, in use or idle."""
    return _POOL.stats()


# -- the parts of a frame being sent ---------------------------------------------------------------
def skip(parts: Sequence[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """``parts`` without their first ``n`` bytes."""
    out: list[bytes | memoryview] = []
    for part in parts:
        size = len(part)
        if n >= size:
            n -= size
            continue
        out.append(memoryview(part)[n:] if n else part)
        n = 0
    return out


def byte_views(parts: Sequence[transport.Buffer]) -> tuple[list[bytes | memoryview], int]:
    """1-D byte views of ``parts`` and their total size, checked before anything is sent."""
    views: list[bytes | memoryview] = []
    total = 0
    for part in parts:
        if type(part) is bytes:
            n = len(part)
            if n <= _SMALL:  # slicing a small bytes is cheap: no view needed
                if n:
                    views.append(part)
                    total += n
                continue
        view = memoryview(part)
        if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous or view.format != "B":
            try:
                view = pickle.PickleBuffer(view).raw()  # any C- or Fortran-contiguous buffer
            except BufferError as exc:
                i = next(i for i, p in enumerate(parts) if p is part)
                raise ValueError(f"frame part {i} is not a contiguous buffer: {exc}") from None
        if view.nbytes:
            views.append(view)
            total += view.nbytes
    return views, total
