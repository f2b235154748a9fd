"""The distributed ``pmap``: one ``_Mapper`` per call, and the chunks it runs on workers.

``pmap.py`` tells the story; this module is its steps 2 to 5. A chunk is one remote call of
``_run_chunk``, which runs ``f`` over several elements on the worker and answers each
element's value or captured failure (``_ChunkResult``, with the time they took there, from
which the next chunks' lengths are chosen).
"""
from __future__ import annotations

import heapq
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from ..cluster.dispatch import capture
from ..cluster.group import PGRP
from ..cluster.values import Failure
from ..errors import ProcessExitedException, SerializationError
from ..wire import serialize
from .abstract import AbstractWorkerPool, start_call
from .funccache import FunctionCache, drop_caches, is_cache_miss
from .retries import RetryPolicy
from .scheduler import POLL, Pace, Slot, chunks_in_flight, give_back, most_room, retry_apart, wait_for_one, yield_one
from .workerpool import CachingPool

__all__ = ["CHUNK_SECONDS", "MAX_CHUNK", "CHUNK_BYTES"]

CHUNK_SECONDS = 0.005      # worker time a chunk aims at
MAX_CHUNK = 4096           # elements
CHUNK_BYTES = 4 << 20      # pickled bytes a chunk (or its answer) aims at
_MISSING: Any = object()


# -- what runs on the worker --------------------------------------------------------------------
class _ChunkResult:
    """The answers for one chunk: values or ``Failure``s, and how long they took there.

    It pickles its values itself, so that one value that cannot be pickled fails only its
    own element.
    """

    __slots__ = ("values", "elapsed", "nfail", "nbytes")

    def __init__(self, values: list[Any], elapsed: float, nfail: int, nbytes: int = 0) -> None:
        self.values, self.elapsed, self.nfail, self.nbytes = values, elapsed, nfail, nbytes

    def __reduce__(self) -> tuple[Any, ...]:
        values, nfail = self.values, self.nfail
        try:
            data, buffers = serialize.dumps(values)
        except (SerializationError, SystemExit):
            values = [_picklable_or_failure(v) for v in values]
            nfail = sum(type(v) is Failure for v in values)
            data, buffers = serialize.dumps(values)
        nbytes = len(data) + sum(memoryview(b).nbytes for b in buffers)
        return (_chunk_result, (data, buffers, self.elapsed, nfail, nbytes))


def _picklable_or_failure(v: Any) -> Any:
    try:
        serialize.dumps(v)
    except (SerializationError, SystemExit) as e:
        return Failure(capture(e))
    return v


def _chunk_result(data: Any, buffers: list[Any], elapsed: float, nfail: int, nbytes: int) -> _ChunkResult:
    return _ChunkResult(serialize.loads(data, buffers), elapsed, nfail, nbytes)


def _run_chunk(f: Callable[..., Any], star: bool, items: list[Any]) -> _ChunkResult:
    """Apply ``f`` to each element, capturing each failure on its own."""
    out: list[Any] = []
    append = out.append
    nfail = 0
    t0 = time.perf_counter()
    for x in items:
        try:
            append(f(*x) if star else f(x))
        except BaseException as e:   # an interrupt fails this element, like a call
            append(Failure(capture(e)))
            nfail += 1
    return _ChunkResult(out, time.perf_counter() - t0, nfail)


def _auto_batch(n: int, nworkers: int) -> int:
    """Julia's automatic batch size: at most 100, and at least 3 batches per worker."""
    return max(1, min(100, n // (3 * max(nworkers, 1))))


# -- the distributed map -----------------------------------------------------------------------------
class _Mapper:
    """The state of one distributed pmap; see the module docstring."""

    def __init__(self, f: Callable[..., Any], items: list[Any], star: bool, pool: AbstractWorkerPool,
                 batch_size: int | str, policy: RetryPolicy,
                 on_error: Callable[[BaseException], Any] | None, bar: Any) -> None:
        self.f, self.items, self.star, self.pool = f, items, star, pool
        self.policy, self.on_error, self.bar = policy, on_error, bar
        n = len(items)
        self.results: list[Any] = [_MISSING] * n
        self.left = n                        # elements without a final result
        self.next = 0                        # first element never sent
        self.ready: list[int] = []           # elements to send again (a heap)
        self.later: list[tuple[float, int]] = []   # (when, element): retries waiting
        self.singles: list[int] = []         # elements to send one by one
        self.held: dict[int, Slot] = {}      # worker -> its books (load: chunks in flight)
        self.inflight = 0                    # chunks in flight, to held workers or lost ones
        self.done: queue.SimpleQueue[tuple[int, range | list[int], Any, Any]] = queue.SimpleQueue()
        self.fixed = batch_size if isinstance(batch_size, int) else _auto_batch(n, len(pool))
        self.adaptive = batch_size == 1
        self.pace = Pace()                   # seconds per element there (scheduler.py)
        self.in_bytes = 0.0                  # pickled bytes of an element, and of an answer
        self.out_bytes = 0.0
        self.own_cache = not isinstance(pool, CachingPool)
        self.cache = (FunctionCache(PGRP.next_rrid()) if not isinstance(pool, CachingPool)
                      else pool.function_cache)
        self.last_poll = 0.0
        self.lost: int | None = None     # the last worker that died under this map
        self.members = pool.workers()

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> list[Any]:
        runner = PGRP.existing_runner
        try:
            if runner is None:
                self._loop()
            else:
                with runner.blocking():     # a call running pmap lets its process serve others
                    self._loop()
        finally:
            self._finish()
        return self.results

    def _loop(self) -> None:
        self._sample_size()
        while self.left:
            now = time.monotonic()
            while self.later and self.later[0][0] <= now:
                heapq.heappush(self.ready, heapq.heappop(self.later)[1])
            if self._unsent() and (not self.held or now - self.last_poll >= POLL):
                self._acquire(block=not self.held)     # bounded wait when it has none
                self.last_poll = now
            self._fill()
            self._give_back_unneeded()
            if self.inflight:
                self._collect()
            elif self.later:
                time.sleep(max(0.0, min(self.later[0][0] - time.monotonic(), POLL)))

    def _collect(self) -> None:
        """Wait (briefly) for answers and settle every one that has arrived."""
        try:
            item = self.done.get(timeout=self._timeout())
        except queue.Empty:
            return
        while True:
            self._settle(*item)
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                return

    def _timeout(self) -> float:
        t = POLL if self._unsent() else 1.0
        if self.later:
            t = min(t, max(0.0, self.later[0][0] - time.monotonic()))
        return t

    def _unsent(self) -> int:
        return len(self.items) - self.next + len(self.ready) + len(self.singles)

    # -- workers --------------------------------------------------------------------------------------
    def _acquire(self, block: bool) -> None:
        want = max(1, min(self._unsent(), 256))
        got, waiting = self.pool.poll(want)
        for pid in got:
            self._hold(pid)
        # Someone else waits for a worker of this pool: hand one over (once its calls here
        # are done), one per poll, always keeping one for this map.
        yield_one(self.held.values(), waiting)
        if block and not self.held:
            one = wait_for_one(self.pool)
            if one is None:
                self._check_pool_left()
                return
            self._hold(one)

    def _hold(self, pid: int) -> None:
        if pid not in self.held:
            self.held[pid] = Slot(pid)

    def _check_pool_left(self) -> None:
        """Every worker of the pool has died under this map: waiting for one would never end
        (Julia raises too, "no active worker available in pool")."""
        if len(self.pool) != 0:
            return
        gone = [p for p in self.members if p in PGRP.removed]
        pid = self.lost if self.lost is not None else (gone[-1] if gone else None)
        if pid is not None:
            raise ProcessExitedException(pid, f"{PGRP.removed.get(pid, 'has exited')}; "
                                              f"no worker of the pool is left")

    def _give_back_unneeded(self) -> None:
        more = bool(self._unsent() or self.later)
        done = [p for p, s in self.held.items() if s.leaving() or not (more or s.load)]
        for pid in done:
            del self.held[pid]
            give_back(self.pool, pid)

    def _lose(self, pid: int) -> None:
        self.held.pop(pid, None)
        self.lost = pid

    # -- sending ---------------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Chunks to the held workers with room, the least loaded first (``scheduler``)."""
        window = chunks_in_flight(self.pace)
        held = self.held.values()
        while True:
            slot = most_room(held, window, None)[0]
            if slot is None:
                return
            chunk = self._next_chunk()
            if chunk is None:
                return
            self._send(cast(int, slot.pid), chunk)    # (a held worker's pid is known)

    def _chunk_len(self) -> int:
        if not self.adaptive:
            return self.fixed
        per = self.pace.per_task
        if per is None:
            return 1
        n = min(MAX_CHUNK, CHUNK_SECONDS / max(per, 1e-8))
        size = max(self.in_bytes, self.out_bytes)
        if size:
            n = min(n, CHUNK_BYTES / size)
        n = min(n, math.ceil(self._unsent() / (2 * max(len(self.held), 1))))
        return max(1, int(n))

    def _next_chunk(self) -> range | list[int] | None:
        if self.singles:
            return [self.singles.pop()]
        size = self._chunk_len()
        if self.ready:
            return [heapq.heappop(self.ready) for _ in range(min(size, len(self.ready)))]
        if self.next < len(self.items):
            chunk = range(self.next, min(self.next + size, len(self.items)))
            self.next = chunk.stop
            return chunk
        return None

    def _elements(self, chunk: range | list[int]) -> list[Any]:
        if type(chunk) is range:
            return self.items[chunk.start:chunk.stop]
        return [self.items[i] for i in chunk]

    def _send(self, pid: int, chunk: range | list[int]) -> None:
        try:
            g, token = self.cache.prepare(self.f, pid)
        except BaseException:
            self._unsend(chunk)
            raise
        try:
            _, done = start_call(pid, _run_chunk, (g, self.star, self._elements(chunk)), {}, keep=False)
        except ProcessExitedException:
            self.cache.settle(token, False)
            self._lose(pid)
            self._unsend(chunk)   # never ran: not an attempt
            return
        except BaseException:
            self.cache.settle(token, False)
            self._unsend(chunk)
            raise
        self.cache.settle(token, True)
        self.held[pid].give(1, None)
        self.inflight += 1
        put = self.done.put
        done.add_callback(lambda value: put((pid, chunk, g, value)))

    def _unsend(self, chunk: range | list[int]) -> None:
        for i in chunk:
            heapq.heappush(self.ready, i)

    # -- answers -----------------------------------------------------------------------------------------
    def _settle(self, pid: int, chunk: range | list[int], g: Any, value: Any) -> None:
        self.inflight -= 1
        slot = self.held.get(pid)
        if slot is not None:
            slot.answered(1)
        if type(value) is Failure:
            self._chunk_failed(pid, chunk, g, value)
            return
        self._learn(chunk, value)
        values = value.values
        if value.nfail == 0 and type(chunk) is range:
            self.results[chunk.start:chunk.stop] = values
            self._count(len(values))
            return
        for i, v in zip(chunk, values):
            if type(v) is Failure:
                self._element_failed(i, v.exc)
            else:
                self.results[i] = v
                self._count(1)

    def _learn(self, chunk: range | list[int], value: Any) -> None:
        n = len(chunk)
        self.pace.learn(n, value.elapsed)
        if value.nbytes:
            self.out_bytes = value.nbytes / n if not self.out_bytes else \
                0.7 * self.out_bytes + 0.3 * value.nbytes / n

    def _sample_size(self) -> None:
        """Estimate the pickled size of an element from the first one."""
        try:
            data, buffers = serialize.dumps(self.items[0])
        except SerializationError:
            return    # sending will say so
        self.in_bytes = len(data) + sum(memoryview(b).nbytes for b in buffers)

    def _chunk_failed(self, pid: int, chunk: range | list[int], g: Any, value: Failure) -> None:
        exc = value.exc
        if isinstance(exc, ProcessExitedException):
            self._lose(pid)
            for i in chunk:
                self._element_failed(i, exc)
        elif is_cache_miss(value):
            self.cache.forget(g, pid)
            self._unsend(chunk)
        elif retry_apart(len(chunk)):
            # The chunk as a whole failed (its elements could not be read there, or the
            # answers here): try each element on its own, so each gets its own outcome.
            self.singles.extend(reversed(list(chunk)))
        else:
            self._element_failed(chunk[0], exc)

    def _element_failed(self, i: int, exc: BaseException) -> None:
        delay = self.policy.on_failure(i, exc)
        if delay is not None:
            heapq.heappush(self.later, (time.monotonic() + delay, i))
            return
        if self.on_error is None:
            raise exc
        self.results[i] = self.on_error(exc)
        self._count(1)

    def _count(self, n: int) -> None:
        self.left -= n
        if self.bar is not None:
            self.bar.update(n)

    # -- the end ------------------------------------------------------------------------------------
    def _finish(self) -> None:
        """Give every worker back once its calls are over; drop this map's function cache."""
        busy = {pid: s.load for pid, s in self.held.items() if s.load > 0}
        for pid in [p for p, s in self.held.items() if not s.load]:
            give_back(self.pool, pid)
        self.held.clear()
        if self.own_cache:
            # Each chunk looked its function up while it was read, so a drop sent after
            # them is safe even while they still run.
            drop_caches(self.cache.key, self.cache.reset(), None, True, False)
        if busy:
            threading.Thread(target=self._drain, args=(busy,), name="pydist-pmap-drain",
                             daemon=True).start()

    def _drain(self, busy: dict[int, int]) -> None:
        """After a failed map: put each worker back when its last chunk is answered."""
        while busy:
            pid = self.done.get()[0]
            if pid in busy:
                busy[pid] -= 1
                if busy[pid] == 0:
                    del busy[pid]
                    give_back(self.pool, pid)
