"""Dispatching and replies: the part of an executor (``_Dispatcher``) that moves tasks.

``dispatch`` runs on whichever thread made work possible (a ``submit``, a reply, a worker
started): under the lock it picks the worker with the most room and moves a batch of
pending tasks to its outbox (``_pick``), then sends outside the lock (``_flush``), each
worker's outbox in order. The choice of worker, how much it may hold (``cap``: from the
time a task takes there and the round trip, learnt from replies) and when it retires
(``max_tasks_per_child``) are the scheduling ``pmap`` uses too (``pools/scheduler.py``).

A reply completes its tasks' sinks on the thread that read it (``on_reply``). A batch
that failed as a whole (it could not be pickled here, or unpickled there, or its results
could not be unpickled here) has its tasks tried again one by one, so only the culprit
fails. A batch is settled exactly once (``_Batch.settled``, mostly by ``_answered``):
whoever settles it (its reply, its worker's death, a revoke) decides what becomes of its
tasks.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, cast

from ..cluster.destinations import pickling_ahead
from ..cluster.values import Failure
from ..errors import ProcessExitedException, SerializationError
from ..pools.abstract import start_call
from ..pools.funccache import drop_dead, is_cache_miss
from ..pools.scheduler import Pace, most_room, retry_apart, tasks_held
from ..pools.stealing import REVOKED
from .futures import _report, _unwrap, deliver, mark_sent
from .mpshare import dumps_shared
from .records import _NO_KWARGS, _Batch, _Task, _Worker
from .worker_side import CALL, _Packed, _Results, _run_batch, _run_one, _Undecodable, inline_ok

MAX_BATCH = 256          # tasks in one message at most
IDLE_CHECK = 0.002       # seconds idle after which a worker's process is checked before a send


class _Dispatcher:
    """Pending tasks out to the workers, their replies back in; owns the pace."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.pace = Pace()

    def cap(self) -> int:
        """Tasks a worker may hold: 1 until tasks are measured, then enough to cover the
        round trip (many tiny tasks, one long one)."""
        return tasks_held(self.pace)

    # -- submitting ------------------------------------------------------------------------------
    def enqueue(self, tasks: Iterable[_Task], check: bool = True) -> None:
        core = self.core
        with core.lock:
            if check:
                core.closer.check_open()
            core.tasks.add(tasks)
            broken = core.flags.broken
        if broken:
            self.fail_pending()
        self.dispatch()

    def submit_direct(self, task: _Task) -> bool:
        """Send one task straight to an idle worker when nothing is pending (the common
        ``submit().result()`` case: no queue, no outbox); False to take the usual way."""
        core = self.core
        with core.lock:
            core.closer.check_open()
            if core.tasks.pending:
                return False
            for w in core.staff.workers:
                if (not w.load and w.pid is not None and not w.retiring and not w.gone
                        and not w.unreachable):
                    break
            else:
                return False
            if not w.send_lock.acquire(False):
                return False
            task.sink.set_running_or_notify_cancel()   # new: it cannot be cancelled yet
            task.started = True
            batch = _Batch([task])
            batch.direct = True
            core.tasks.add_running()
            w.give(1, core.max_tasks)
            w.seq += 1
            batch.seq = w.seq
            batch.alone = not w.batches
            batch.sending = True
            w.batches.append(batch)
        try:
            self._send(w, batch)
        finally:
            w.send_lock.release()
        if w.outbox:        # queued meanwhile by a thread that found the send lock taken
            self.flush(w)
        if core.fcache.dead:
            drop_dead(core.fcache)
        return True

    def fail_pending(self) -> None:
        core = self.core
        with core.lock:
            doomed = core.tasks.drain()
        core.fail_all(doomed, core.closer.broken_error())

    # -- dispatching -----------------------------------------------------------------------------
    def dispatch(self, grow: bool = True) -> None:
        """Send pending tasks out; ``grow``: start workers where tasks still wait (after a
        reply that retired no worker, only pending tasks can want one)."""
        core = self.core
        while True:
            with core.lock:
                w = self._pick()
                if w is None:
                    if grow or core.tasks.pending:
                        core.staff.grow()
                    break
            self.flush(w)
        if core.fcache.dead:
            drop_dead(core.fcache)

    def _pick(self) -> _Worker | None:
        """Move a batch of pending tasks to the outbox of the worker with most room (under
        the lock); that worker, or ``None``."""
        core = self.core
        queue, max_tasks = core.tasks, core.max_tasks
        while queue.pending and not core.flags.broken:
            workers: list[_Worker] = core.staff.workers
            best, room, avail = most_room(workers, self.cap(), max_tasks)
            if best is None:
                return None
            size = min(room, MAX_BATCH, max(1, -(-len(queue.pending) // avail)))
            tasks = queue.take(size)
            if not tasks:
                continue
            batch = _Batch(tasks)
            best.outbox.append(batch)
            best.give(len(tasks), max_tasks)
            return best
        return None

    def flush(self, w: _Worker) -> None:
        """Send ``w``'s outbox in order (whoever holds its send lock sends everything)."""
        lock = self.core.lock
        while True:
            if not w.send_lock.acquire(blocking=False):
                return
            try:
                while True:
                    with lock:
                        if w.pid is None or w.gone or w.unreachable or not w.outbox:
                            break
                        batch = w.outbox.popleft()
                        w.seq += 1
                        batch.seq = w.seq
                        batch.alone = not w.batches
                        batch.sending = True
                        w.batches.append(batch)
                    self._send(w, batch)
            finally:
                w.send_lock.release()
            with lock:
                if w.pid is None or w.gone or w.unreachable or not w.outbox:
                    return

    def _send(self, w: _Worker, batch: _Batch) -> None:
        try:
            self._send_batch(w, batch)
        except BaseException as e:     # a bug here must not leave the batch unanswered
            _report(e)
            if self._answered(w, batch):
                self.core.fail_all(batch.tasks, e)

    def _payload(self, batch: _Batch, pid: int) -> tuple[Any, tuple[Any, ...]]:
        """What runs ``batch`` on worker ``pid``, and its arguments after the function. A
        task sent alone to an idle worker skips the revoke gate, and its atom arguments
        travel inline; other arguments are pickled ahead, so a failure to unpickle them there
        is their task's error (``worker_side.py``), and checked here for ``pid`` (an argument
        that may not go there, a SharedArray it does not map, is refused before sending)."""
        core = self.core
        tasks = batch.tasks
        if batch.direct:
            t = tasks[0]
            if inline_ok(t.args, t.kwargs):
                return _run_one, (t.args, t.kwargs, None, core.pool_mode)
            packed = self._pack([(CALL, t.args, t.kwargs)], pid)
            return _run_one, ((), _NO_KWARGS, packed, core.pool_mode)
        packed = self._pack([(t.kind, t.args, t.kwargs) for t in tasks], pid)
        return _run_batch, (packed, core.pool_mode, core.key, batch.seq)

    def _pack(self, triples: list[Any], pid: int) -> _Packed:
        with pickling_ahead() as limits:
            data, bufs = dumps_shared(triples, self.core.main is not None)
        limits.check(pid)
        return _Packed(data, *bufs)

    def _send_batch(self, w: _Worker, batch: _Batch) -> None:
        pid = cast(int, w.pid)    # (only a started worker is sent to)
        try:
            run, rest = self._payload(batch, pid)
        except BaseException as e:
            self._unsendable(w, batch, e)
            return
        fcache = self.core.fcache
        g, token = fcache.prepare(batch.tasks[0].fn, pid)
        sent = False
        try:
            sent = self._start_batch(w, pid, batch, run, (g, *rest))
        finally:
            fcache.settle(token, sent)      # (a thread shipping it too waits for this)

    def _start_batch(self, w: _Worker, pid: int, batch: _Batch, run: Any, args: tuple[Any, ...]) -> bool:
        """Send ``batch`` to ``w`` (worker ``pid``) as the call ``run(*args)``; whether it
        went out."""
        for t in batch.tasks:
            mark_sent(t.sink, pid)
        batch.sent = time.perf_counter()
        try:
            if batch.alone and time.monotonic() - w.idle_since > IDLE_CHECK and w.exited():
                # It died while idle and its connection has not said so yet: the batch would
                # go nowhere and be taken for the one that killed it.
                raise ProcessExitedException(pid, "has exited")
            _, done = start_call(pid, run, args, _NO_KWARGS, keep=False)
        except SerializationError as e:   # the function itself cannot be pickled
            self._unsendable(w, batch, e)
            return False
        except Exception as e:            # the worker is gone (or unusable): the batch never left
            if not isinstance(e, ProcessExitedException):
                e = ProcessExitedException(pid, f"could not be sent a task ({e})")
            if self._answered(w, batch):
                self.requeue(batch.tasks)
            self.core.staff.lost_in_send(w, e)
            return False
        batch.sending = False    # in flight: from now on its worker's death settles it
        done.add_callback(partial(self._on_reply_safely, w, batch))
        return True

    def _on_reply_safely(self, w: _Worker, batch: _Batch, value: Any) -> None:
        """``on_reply`` on a reader thread, which must never see an exception."""
        try:
            self.on_reply(w, batch, value)
        except BaseException as e:
            _report(e)
            if self._answered(w, batch):
                self.core.fail_all(batch.tasks, e)

    def _unsendable(self, w: _Worker, batch: _Batch, e: BaseException) -> None:
        """A batch could not be pickled: resend its tasks one by one, so only the culprit
        fails, with the pickler's own error (as the standard library reports it)."""
        err = e.__cause__ if isinstance(e, SerializationError) and e.__cause__ is not None else e
        if not self._answered(w, batch):
            return       # its worker died meanwhile, and took care of it
        if retry_apart(len(batch.tasks)):
            self.requeue(batch.tasks, solo=True)
            self.dispatch()
        else:
            self.core.fail_all(batch.tasks, err)

    # -- replies ---------------------------------------------------------------------------------
    def on_reply(self, w: _Worker, batch: _Batch, value: Any) -> None:
        now = time.perf_counter()
        core = self.core
        if type(value) is Failure:
            if isinstance(value.exc, ProcessExitedException):
                core.staff.worker_died(w, value.exc)
                if self._answered(w, batch):   # still being sent when the death was decided
                    self.requeue(batch.tasks, solo=True)
                    self.dispatch()
                return
            if is_cache_miss(value):
                # The pool's cache was cleared (``clear``) as the batch went: ship it again.
                core.fcache.forget_worker(cast(int, w.pid))    # (it answered: it started)
                if self._answered(w, batch):
                    self.requeue(batch.tasks)
                    self.dispatch()
                return
        if batch.settled:
            return
        if type(value) is _Results:          # run in this very process
            value = (value.values, value.elapsed)
        elif batch.direct:
            if type(value) is not Failure and type(value) is not tuple:
                value = ([value], None)      # an atom result, as itself
        elif type(value) is str and value == REVOKED:   # a copy, once unpickled
            return     # taken back earlier; its tasks went elsewhere
        if type(value) is Failure or type(value[0]) is _Undecodable:
            exc = value.exc if type(value) is Failure else value[0].exc
            if not isinstance(exc, Exception):
                cause = exc
                exc = BrokenProcessPool(f"the result of a task could not be received: {exc!r}")
                exc.__cause__ = cause
            self._whole_batch_failed(w, batch, _unwrap(exc, core.tb_class))
            return
        values, elapsed = value
        with core.lock:
            if not self._answered(w, batch):
                return
            if elapsed is not None:     # an atom result travels without its timing
                trip = now - batch.sent - elapsed if batch.alone else None
                self.pace.learn(len(batch.tasks), elapsed, trip)
            retire = core.staff.retire_due(w)
        deliver(batch.tasks, values, core.tb_class)
        core.finished(len(batch.tasks))
        if retire:
            core.staff.retire(w)
        if retire or core.tasks.pending:    # (a hint: whoever adds to pending dispatches too)
            self.dispatch(grow=retire)
        if not w.load and any(len(o.batches) > 1 for o in core.staff.workers):   # (a hint)
            core.stealer.maybe_steal()

    def _answered(self, w: _Worker, batch: _Batch) -> bool:
        """Take ``batch`` off ``w``'s books (once); False if it already was."""
        with self.core.lock:
            if batch.settled:
                return False
            batch.settled = True
            if w.batches and w.batches[0] is batch:
                w.batches.popleft()
            else:
                try:
                    w.batches.remove(batch)
                except ValueError:
                    pass
            w.answered(len(batch.tasks))
            return True

    def _whole_batch_failed(self, w: _Worker, batch: _Batch, exc: BaseException) -> None:
        """The call failed as a whole (its message could not be unpickled there, or its
        results here): alone, the task fails; together, each is tried alone."""
        if not self._answered(w, batch):
            return
        if retry_apart(len(batch.tasks)):
            self.requeue(batch.tasks, solo=True)
        else:
            self.core.fail_all(batch.tasks, exc)
        self.dispatch()

    def requeue(self, tasks: list[_Task], solo: bool = False) -> None:
        """Put tasks back at the front of the queue, in order."""
        with self.core.lock:
            self.core.tasks.push_front(tasks, solo)
