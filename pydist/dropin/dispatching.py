"""Dispatching and replies: the part of ``_Core`` (core.py) that moves tasks.

``dispatch`` runs on whichever thread made work possible (a ``submit``, a reply, a worker
started): under the lock it picks the worker with the most room and moves a batch of
pending tasks to its outbox (``_pick``), then sends outside the lock (``_flush``), each
worker's outbox in order. How much a worker may hold (``cap``) follows the time a
task takes there and the round trip, both learnt from replies (``_learn``).

A reply completes its tasks' sinks on the thread that read it (``on_reply``). A batch
that failed as a whole (it could not be pickled here, or unpickled there, or its results
could not be unpickled here) has its tasks tried again one by one, so only the culprit
fails. A batch is settled exactly once (``_Batch.settled``, mostly by ``_answered``):
whoever settles it (its reply, its worker's death, a revoke) decides what becomes of its
tasks.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, Callable, Iterable

from ..cluster.destinations import pickling_ahead
from ..cluster.values import Failure
from ..errors import ProcessExitedException, SerializationError
from ..pools.abstract import start_call
from ..refs.remotecall import remote_do
from .futures import _copy_exc, _report, _unwrap, mark_sent
from .mpshare import dumps_shared
from .records import _NO_KWARGS, _Batch, _Task, _Worker
from .worker_side import (_REVOKED, CALL, _fn_drop, _Packed, _Results, _run_batch, _run_one,
                          _Undecodable, inline_ok)

MAX_BATCH = 256          # tasks in one message at most
MAX_AHEAD = 2048         # tasks in flight per worker at most
AHEAD_TIME = 0.002       # seconds of work to keep queued on a worker (at least)
IDLE_CHECK = 0.002        # seconds idle after which a worker's process is checked before a send
_settling = threading.local()         # set while this thread completes futures


class _Dispatching:
    """Part of ``_Core``: pending tasks out to the workers, their replies back in."""

    # -- submitting ------------------------------------------------------------------------------

    def enqueue(self, tasks: Iterable[_Task], check: bool = True) -> None:
        with self.lock:
            if check:
                self.check_open()
            n = len(self.pending)
            self.pending.extend(tasks)
            self.unfinished += len(self.pending) - n
            broken = self.broken
        if broken:
            self._fail_pending()
        self.dispatch()

    def submit_direct(self, task: _Task) -> bool:
        """Send one task straight to an idle worker when nothing is pending (the common
        ``submit().result()`` case: no queue, no outbox); False to take the usual way."""
        with self.lock:
            self.check_open()
            if self.pending:
                return False
            for w in self.workers:
                if (not w.ntasks and w.pid is not None and not w.retiring and not w.gone
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
            self.unfinished += 1
            w.ntasks = 1
            w.assigned += 1
            if self.max_tasks is not None and w.assigned >= self.max_tasks:
                w.retiring = True
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
            self._flush(w)
        if self.fcache.dead:
            self._drop_dead_functions()
        return True

    def _fail_pending(self) -> None:
        with self.lock:
            doomed = list(self.pending)
            self.pending.clear()
        self._settle_all(doomed, self.broken_error())

    # -- dispatching -----------------------------------------------------------------------------
    def cap(self) -> int:
        """Tasks a worker may hold: 1 until tasks are measured, then enough to cover the
        round trip (many tiny tasks, one long one)."""
        if self.est is None:
            return 1
        ahead = max(2 * self.rtt, AHEAD_TIME)
        return 1 + min(MAX_AHEAD, int(ahead / max(self.est, 1e-7)))

    def dispatch(self, grow: bool = True) -> None:
        """Send pending tasks out; ``grow``: start workers where tasks still wait (after a
        reply that retired no worker, only pending tasks can want one)."""
        while True:
            with self.lock:
                w = self._pick()
                if w is None:
                    if grow or self.pending:
                        self._grow()
                    break
            self._flush(w)
        if self.fcache.dead:
            self._drop_dead_functions()

    def _pick(self) -> _Worker | None:
        """Move a batch of pending tasks to the outbox of the worker with most room (under
        the lock); that worker, or ``None``."""
        while self.pending and not self.broken:
            cap = self.cap()
            best, room, avail = None, 0, 0
            for w in self.workers:
                if w.retiring or w.gone or w.unreachable:
                    continue
                r = cap - w.ntasks
                if self.max_tasks is not None:
                    r = min(r, self.max_tasks - w.assigned)
                if r > 0:
                    avail += 1
                    if r > room:
                        best, room = w, r
            if best is None:
                return None
            size = min(room, MAX_BATCH, max(1, -(-len(self.pending) // avail)))
            tasks = self._take(size)
            if not tasks:
                continue
            batch = _Batch(tasks)
            best.outbox.append(batch)
            best.ntasks += len(tasks)
            best.assigned += len(tasks)
            if self.max_tasks is not None and best.assigned >= self.max_tasks:
                best.retiring = True
            return best
        return None

    def _take(self, size: int) -> list[_Task]:
        """Up to ``size`` consecutive pending tasks of one function (cancelled ones dropped)."""
        tasks: list[_Task] = []
        pending = self.pending
        while pending and len(tasks) < size:
            t = pending[0]
            if tasks and (t.fn is not tasks[0].fn or t.solo):
                break
            pending.popleft()
            if not t.started:
                if not t.sink.set_running_or_notify_cancel():
                    self.unfinished -= 1
                    continue
                t.started = True
            tasks.append(t)
            if t.solo:
                break
        if self.unfinished == 0:
            self.changed.notify_all()
        return tasks

    def _flush(self, w: _Worker) -> None:
        """Send ``w``'s outbox in order (whoever holds its send lock sends everything)."""
        while True:
            if not w.send_lock.acquire(blocking=False):
                return
            try:
                while True:
                    with self.lock:
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
            with self.lock:
                if w.pid is None or w.gone or w.unreachable or not w.outbox:
                    return

    def _send(self, w: _Worker, batch: _Batch) -> None:
        try:
            self._send_batch(w, batch)
        except BaseException as e:     # a bug here must not leave the batch unanswered
            _report(e)
            if self._answered(w, batch):
                self._settle_all(batch.tasks, e)

    def _payload(self, batch: _Batch, pid: int) -> tuple[Callable[..., Any], tuple]:
        """What runs ``batch`` on worker ``pid``, and its arguments after the function. A
        task sent alone to an idle worker skips the revoke gate, and its atom arguments
        travel inline; other arguments are pickled ahead, so a failure to unpickle them there
        is their task's error (``worker_side.py``), and checked here for ``pid`` (an argument
        that may not go there, a SharedArray it does not map, is refused before sending)."""
        tasks = batch.tasks
        if batch.direct:
            t = tasks[0]
            if inline_ok(t.args, t.kwargs):
                return _run_one, (t.args, t.kwargs, None, self.pool_mode)
            packed = self._pack([(CALL, t.args, t.kwargs)], pid)
            return _run_one, ((), _NO_KWARGS, packed, self.pool_mode)
        packed = self._pack([(t.kind, t.args, t.kwargs) for t in tasks], pid)
        return _run_batch, (packed, self.pool_mode, self.key, batch.seq)

    def _pack(self, triples: list, pid: int) -> _Packed:
        with pickling_ahead() as limits:
            data, bufs = dumps_shared(triples, self.main is not None)
        limits.check(pid)
        return _Packed(data, *bufs)

    def _send_batch(self, w: _Worker, batch: _Batch) -> None:
        tasks = batch.tasks
        fn = tasks[0].fn
        try:
            run, rest = self._payload(batch, w.pid)   # type: ignore[arg-type]
        except BaseException as e:
            self._unsendable(w, batch, e)
            return
        g, token = self.fcache.prepare(fn, w.pid)   # type: ignore[arg-type]
        for t in tasks:
            mark_sent(t.sink, w.pid)   # type: ignore[arg-type]
        batch.sent = time.perf_counter()
        try:
            if batch.alone and time.monotonic() - w.idle_since > IDLE_CHECK and w.exited():
                # It died while idle and its connection has not said so yet: the batch would
                # go nowhere and be taken for the one that killed it.
                raise ProcessExitedException(w.pid, "has exited")   # type: ignore[arg-type]
            _, done = start_call(w.pid, run, (g, *rest), _NO_KWARGS, keep=False)   # type: ignore[arg-type]
        except SerializationError as e:   # the function itself cannot be pickled
            self._unsendable(w, batch, e)
            return
        except Exception as e:            # the worker is gone (or unusable): the batch never left
            if not isinstance(e, ProcessExitedException):
                e = ProcessExitedException(w.pid, f"could not be sent a task ({e})")  # type: ignore[arg-type]
            if self._answered(w, batch):
                self._requeue(batch.tasks)
            self._lost_in_send(w, e)
            return
        batch.sending = False    # in flight: from now on its worker's death settles it
        self.fcache.sent(token)
        done.add_callback(partial(self._on_reply_safely, w, batch))

    def _on_reply_safely(self, w: _Worker, batch: _Batch, value: Any) -> None:
        """``on_reply`` on a reader thread, which must never see an exception."""
        try:
            self.on_reply(w, batch, value)
        except BaseException as e:
            _report(e)
            if self._answered(w, batch):
                self._settle_all(batch.tasks, e)

    def _unsendable(self, w: _Worker, batch: _Batch, e: BaseException) -> None:
        """A batch could not be pickled: resend its tasks one by one, so only the culprit
        fails, with the pickler's own error (as the standard library reports it)."""
        err = e.__cause__ if isinstance(e, SerializationError) and e.__cause__ is not None else e
        if not self._answered(w, batch):
            return       # its worker died meanwhile, and took care of it
        if len(batch.tasks) > 1:
            self._requeue(batch.tasks, solo=True)
            self.dispatch()
        else:
            self._settle_all(batch.tasks, err)

    # -- replies ---------------------------------------------------------------------------------
    def on_reply(self, w: _Worker, batch: _Batch, value: Any) -> None:
        now = time.perf_counter()
        if type(value) is Failure and isinstance(value.exc, ProcessExitedException):
            self._worker_died(w, value.exc)
            if self._answered(w, batch):   # still being sent when the death was decided
                self._requeue(batch.tasks, solo=True)
                self.dispatch()
            return
        if batch.settled:
            return
        if type(value) is _Results:          # run in this very process
            value = (value.values, value.elapsed)
        elif batch.direct:
            if type(value) is not Failure and type(value) is not tuple:
                value = ([value], None)      # an atom result, as itself
        elif type(value) is str and value == _REVOKED:   # a copy, once unpickled
            return     # taken back earlier; its tasks went elsewhere
        if type(value) is Failure or type(value[0]) is _Undecodable:
            exc = value.exc if type(value) is Failure else value[0].exc
            if not isinstance(exc, Exception):
                cause = exc
                exc = BrokenProcessPool(f"the result of a task could not be received: {exc!r}")
                exc.__cause__ = cause
            self._whole_batch_failed(w, batch, _unwrap(exc, self.tb_class))
            return
        values, elapsed = value
        with self.lock:
            if not self._answered(w, batch):
                return
            self._learn(batch, elapsed, now)
            retire = self._retire_due(w)
        self._deliver(batch.tasks, values)
        if retire:
            self._retire(w)
        if retire or self.pending:    # (a hint: whoever adds to pending dispatches too)
            self.dispatch(grow=retire)
        if not w.ntasks and any(len(o.batches) > 1 for o in self.workers):   # (a hint)
            self._maybe_steal()

    def _answered(self, w: _Worker, batch: _Batch) -> bool:
        """Take ``batch`` off ``w``'s books (once); False if it already was."""
        with self.lock:
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
            w.ntasks -= len(batch.tasks)
            if not w.ntasks:
                w.idle_since = time.monotonic()
            return True

    def _learn(self, batch: _Batch, elapsed: float | None, now: float) -> None:
        if elapsed is None:     # an atom result travels without its timing
            return
        per = elapsed / len(batch.tasks)
        self.est = per if self.est is None else 0.7 * self.est + 0.3 * per
        if batch.alone:
            sample = max(0.0, now - batch.sent - elapsed)
            self.rtt = 0.8 * self.rtt + 0.2 * min(sample, 0.05)

    def _whole_batch_failed(self, w: _Worker, batch: _Batch, exc: BaseException) -> None:
        """The call failed as a whole (its message could not be unpickled there, or its
        results here): alone, the task fails; together, each is tried alone."""
        if not self._answered(w, batch):
            return
        if len(batch.tasks) > 1:
            self._requeue(batch.tasks, solo=True)
        else:
            self._settle_all(batch.tasks, exc)
        self.dispatch()

    def _deliver(self, tasks: list[_Task], values: list) -> None:
        tb_class = self.tb_class
        _settling.active = True
        try:
            for t, v in zip(tasks, values):
                try:
                    if type(v) is Failure:
                        t.sink.set_exception(_unwrap(v.exc, tb_class))
                    else:
                        t.sink.set_result(v)
                except cf.InvalidStateError:
                    pass
        finally:
            _settling.active = False
        self._finished(len(tasks))

    def _settle_all(self, tasks: list[_Task], exc: BaseException) -> None:
        """Fail ``tasks`` with (a copy per task of) ``exc``."""
        _settling.active = True
        try:
            for t in tasks:
                if not t.started and not t.sink.set_running_or_notify_cancel():
                    continue
                e = exc if len(tasks) == 1 else _copy_exc(exc)
                try:
                    t.sink.set_exception(e)
                except cf.InvalidStateError:
                    pass
        finally:
            _settling.active = False
        self._finished(len(tasks))

    def _finished(self, n: int) -> None:
        with self.lock:
            self.unfinished -= n
            if self.unfinished <= 0 and self.changed._waiters:   # (skip the call when none wait)
                self.changed.notify_all()

    def _requeue(self, tasks: list[_Task], solo: bool = False) -> None:
        """Put tasks back at the front of the queue, in order."""
        with self.lock:
            for t in tasks:
                t.solo = t.solo or solo
            self.pending.extendleft(reversed(tasks))

    def _drop_dead_functions(self) -> None:
        for pid, fids in self.fcache.take_dead().items():
            try:
                remote_do(_fn_drop, pid, self.key, fids)
            except Exception:
                pass
