"""Large copies and page mappings split across a few threads.

One thread copying memory reaches well under what the memory can move: here ~10 GB/s for
one thread against ~18 GB/s for two (four are slower again). A large frame is copied once
into a segment (``bigbuf.py``), and while it is, the receiving process waits; so the sender
copies a frame of ``PARALLEL_MIN`` bytes or more in pieces, some in the calling thread, the
others in ``ways() - 1`` helper threads, as long as that has been the faster way lately
(``_Pace``: on a busy machine one thread may copy faster). Mapping the pages of a fresh
segment (``madvise`` with ``MADV_POPULATE_*``) is split the same way, and done through
``ctypes`` so that the GIL is released meanwhile (``mmap.madvise`` holds it for the whole call: tens of milliseconds
for a large segment, during which no other thread of the process runs).

The model:

* one ``Copier`` per process (``copier()``; a fresh one in a forked child) owns the helper
  threads. They start at the first large job and end after ``IDLE_SECONDS`` without one, or
  at ``close()`` (idempotent; a later job starts them again), so an idle process has none.
* A job is a list of pieces (about 8 MiB each, at least one per thread); the calling
  thread and the helpers claim pieces one by one until none is left, so a job never waits
  for a busy or missing helper: the caller does the pieces nobody took. The caller returns
  once every piece is done, even if a signal handler raises meanwhile (the pieces write
  into memory the caller owns; the exception is raised after).
* The memory of every piece (source and destination) is held exported (``Py_buffer``) by
  the caller until the job is done, so nothing is unmapped or freed under a helper.
* Where ``ctypes`` cannot get at the memory (another interpreter), everything is done the
  plain way, in the calling thread.
"""
from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

# One step of a piece: (function, *its arguments), e.g. (ctypes.memmove, dst, src, n).
_Call = tuple[Any, ...]

__all__ = ["PARALLEL_MIN", "IDLE_SECONDS", "Copier", "copier", "ways"]

# Measured on a 2-vCPU machine (docs/performance.md): two threads copy 1 MiB no faster
# than one (waking a helper costs ~50 µs); from a few MiB on they copy ~1.7x as fast.
PARALLEL_MIN = 4 << 20
IDLE_SECONDS = 1.0   # a helper idle this long ends (starting one again costs ~0.1 ms)
_ALIGN = 1 << 16       # piece boundaries, so that no two threads write one cache line or page
_CLOSE_WAIT = 5.0      # seconds close() waits for each helper to end
_PIECE = 8 << 20       # bytes a piece of a large job holds, about
_MAX_PIECES = 64
_PROBE_EVERY = 8       # copies of one size class between two tries of the way found slower
_SAMPLES = 4           # copies of each way and size class whose cost is kept


def ways() -> int:
    """How many threads share a large copy: two where two CPUs may run them
    (``PYDIST_SHM_COPIERS`` sets it: 1 copies in the calling thread only)."""
    forced = os.environ.get("PYDIST_SHM_COPIERS", "").strip()
    if forced:
        return max(1, int(forced))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(2, cpus)


class _PyBuffer(ctypes.Structure):
    # CPython's Py_buffer (part of the stable ABI since 3.11; the same layout before). The
    # exporter is held as a plain pointer: CPython takes and drops that reference itself.
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _c_api() -> tuple[Any, Any, Any] | None:
    """(PyObject_GetBuffer, PyBuffer_Release, madvise or None), or None where ctypes cannot
    reach CPython's buffer API."""
    try:
        get = ctypes.pythonapi.PyObject_GetBuffer
        get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
        get.restype = ctypes.c_int
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = [ctypes.POINTER(_PyBuffer)]
        release.restype = None
    except (AttributeError, OSError):
        return None
    try:   # a plain CDLL function: the GIL is released during the call
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    except (AttributeError, OSError):
        madvise = None
    return get, release, madvise


_API = _c_api()
_PyBUF_SIMPLE, _PyBUF_WRITABLE = 0, 1


class _Exported:
    """The addresses of contiguous buffers, held exported until ``release()``."""

    def __init__(self) -> None:
        self._held: list[_PyBuffer] = []

    def address(self, obj: Any, writable: bool = False) -> tuple[int, int]:
        """(address, length) of ``obj``'s bytes (TypeError/BufferError if not contiguous)."""
        assert _API is not None
        view = _PyBuffer()
        _API[0](obj, ctypes.byref(view), _PyBUF_WRITABLE if writable else _PyBUF_SIMPLE)
        self._held.append(view)
        return view.buf or 0, view.len

    def release(self) -> None:
        assert _API is not None
        for view in self._held:
            _API[1](ctypes.byref(view))
        self._held = []


class _Job:
    """Pieces of work claimed one at a time by whichever thread comes first."""

    __slots__ = ("pieces", "next", "left", "lock", "done", "error")

    def __init__(self, pieces: list[list[_Call]]) -> None:
        self.pieces = pieces
        self.next = 0
        self.left = len(pieces)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Do pieces until none is left unclaimed."""
        while True:
            with self.lock:
                i = self.next
                if i >= len(self.pieces):
                    return
                self.next = i + 1
            try:
                for fn, *args in self.pieces[i]:
                    fn(*args)
            except BaseException as exc:  # handed to the caller, who raises it
                self.error = exc
            finally:
                with self.lock:
                    self.left -= 1
                    if not self.left:
                        self.done.set()

    def wait(self) -> None:
        """Return once every piece is done, whatever a signal handler raises meanwhile;
        then raise what it raised, or what a piece raised."""
        interrupted: BaseException | None = None
        while True:
            try:
                self.done.wait()
                break
            except BaseException as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted
        if self.error is not None:
            raise self.error


class _Pace:
    """Whether splitting a copy has paid lately, per size class (a power of two).

    On a machine shared with other work a helper may wait for a CPU, or the memory may be
    busy already, and two threads then copy slower than one. So the copier keeps the
    seconds per byte of each way's last ``_SAMPLES`` copies, and uses the way whose best is
    better: other work only ever slows a copy down, so the best of a few is the fair figure,
    and the first copies of a size (into memory not yet in any cache) do not count for long.
    Until each way has two figures the ways take turns; after that the slower way is tried
    again every ``_PROBE_EVERY`` copies of the class, so that a change of load is noticed.
    (Races between threads only blur the figures: each update is one append under the GIL.)
    """

    def __init__(self) -> None:
        self._cost: dict[tuple[int, bool], deque[float]] = {}
        self._jobs: dict[int, int] = {}

    def _of(self, c: int, split: bool) -> deque[float]:
        return self._cost.setdefault((c, split), deque(maxlen=_SAMPLES))

    def split(self, size: int) -> bool:
        """Whether to split the next copy of ``size`` bytes."""
        c = size.bit_length()
        n = self._jobs[c] = self._jobs.get(c, 0) + 1
        split, alone = self._of(c, True), self._of(c, False)
        if len(split) < 2 or len(alone) < 2:
            return len(split) <= len(alone)
        return (min(split) <= min(alone)) != (n % _PROBE_EVERY == 0)

    def record(self, size: int, split: bool, seconds: float) -> None:
        self._of(size.bit_length(), split).append(seconds / size)

    def known(self, size: int) -> tuple[bool, bool]:
        """Whether each way (split, alone) has been measured for copies of ``size`` bytes."""
        c = size.bit_length()
        return bool(self._of(c, True)), bool(self._of(c, False))


class Copier:
    """Helper threads (``helpers`` of them, started when first needed) for large jobs."""

    def __init__(self, helpers: int) -> None:
        self.helpers = helpers
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pace = _Pace()

    def copy(self, dst: memoryview, parts: Sequence[Any]) -> None:
        """Copy the concatenation of ``parts`` (contiguous buffers) to the start of ``dst``
        (a writable contiguous buffer at least that long)."""
        total = sum(memoryview(p).nbytes for p in parts)
        if total < PARALLEL_MIN or not self.helpers or _API is None:
            _copy_plain(dst, parts)
            return
        split = self._pace.split(total)
        start = time.perf_counter()
        if split:
            self._split_copy(dst, parts, total)
        else:
            _copy_plain(dst, parts)
        self._pace.record(total, split, time.perf_counter() - start)

    def _split_copy(self, dst: memoryview, parts: Sequence[Any], total: int) -> None:
        held = _Exported()
        try:
            base, size = held.address(dst, writable=True)
            if size < total:
                raise ValueError(f"a copy of {total} bytes into a buffer of {size}")
            spans = [held.address(p) for p in parts]
            self._run(_copy_pieces(base, spans, total, self._ways(total)))
        finally:
            held.release()

    def populate(self, buf: mmap.mmap, advice: int) -> None:
        """``madvise(advice)`` over all of ``buf`` (to map its pages now, in one go); where
        the kernel cannot, nothing (pages then fault in one by one)."""
        if _API is None or _API[2] is None:
            try:
                buf.madvise(advice)
            except (OSError, ValueError, AttributeError):
                pass
            return
        held = _Exported()
        try:
            base, size = held.address(buf, writable=True)
            n = self._ways(size) if size >= PARALLEL_MIN and self.helpers else 1
            self._run([[(_madvise, a, m, advice)] for a, m in _split(base, size, n)])
        finally:
            held.release()

    def _ways(self, size: int) -> int:
        """Pieces for a job of ``size`` bytes: at least one per thread, and about
        ``_PIECE`` bytes each, so that a thread the OS leaves waiting holds up little of it
        (the others take the rest)."""
        return max(self.helpers + 1, min(size // _PIECE, _MAX_PIECES))

    def _run(self, pieces: list[list[_Call]]) -> None:
        job = _Job(pieces)
        if len(pieces) > 1:
            self._start()
            for _ in range(min(self.helpers, len(pieces) - 1)):
                self._jobs.put(job)
        job.run()
        job.wait()

    def _start(self) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.helpers:
                t = threading.Thread(target=self._serve, name="pydist-shm-copier", daemon=True)
                self._threads.append(t)
                t.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                job = None
            if job is None:
                break
            job.run()
        with self._lock:
            if me in self._threads:
                self._threads.remove(me)

    def threads(self) -> list[threading.Thread]:
        """The helper threads alive now."""
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def close(self, timeout: float = _CLOSE_WAIT) -> None:
        """End the helper threads (each finishes the piece it is on). Idempotent."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)


def _copy_plain(dst: memoryview, parts: Sequence[Any]) -> None:
    pos = 0
    for part in parts:
        n = memoryview(part).nbytes
        dst[pos:pos + n] = part
        pos += n


def _madvise(addr: int, n: int, advice: int) -> None:
    assert _API is not None
    _API[2](addr, n, advice)   # a failure leaves the pages to fault in: nothing to do


def _split(base: int, size: int, n: int) -> list[tuple[int, int]]:
    """``n`` spans (address, length) covering [base, base+size), cut at ``_ALIGN``."""
    cuts = [base] + [base + (size * i // n) // _ALIGN * _ALIGN for i in range(1, n)]
    cuts.append(base + size)
    return [(a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]


def _copy_pieces(dst: int, spans: list[tuple[int, int]], total: int,
                 n: int) -> list[list[_Call]]:
    """The memmoves that copy the concatenation of ``spans`` to ``dst``, in ``n`` pieces."""
    pieces: list[list[_Call]] = []
    srcs = iter(spans)
    src, left = 0, 0   # the current source span: next byte, bytes left in it
    for start, length in _split(0, total, n):
        piece = []
        while length:
            if not left:
                src, left = next(srcs)
                continue
            k = min(left, length)
            piece.append((ctypes.memmove, dst + start, src, k))
            src, left, start, length = src + k, left - k, start + k, length - k
        pieces.append(piece)
    return pieces


_copier = Copier(ways() - 1)


def copier() -> Copier:
    """This process's copier."""
    return _copier


def _forget_after_fork() -> None:
    global _copier
    _copier = Copier(ways() - 1)   # no helper thread survives a fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(lambda: _copier.close(1.0))
