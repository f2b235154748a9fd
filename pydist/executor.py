"""``Executor`` (also ``ProcessPoolExecutor``): a ``concurrent.futures`` executor on pydist.

Migrating is one changed import. The model:

1. ``submit`` puts a *task* (function, arguments, and the ``concurrent.futures.Future`` it
   completes) on the pending queue and dispatches at once from the calling thread.
2. Dispatching hands pending tasks to the worker with the fewest tasks in flight, as
   *batches*: consecutive tasks of one function go out in one message, so tiny tasks are
   not bound by the round trip. How many tasks a worker may hold depends on how long tasks
   take (measured on the workers): enough to cover a round trip of latency when tasks are
   tiny, and just the running one when they are long, so an idle worker never looks on
   while a task waits behind a long one elsewhere. A task already queued on a busy worker
   is taken back (*revoked*, if it has not started) when another worker falls idle.
3. Workers start on demand, as the standard library's do: a task that finds no idle worker
   starts one, up to ``max_workers``. Each runs the initializer first; one that fails
   breaks the executor (``BrokenProcessPool`` for every pending task and later submit).
4. A function pickled by value (lambda, closure, function of ``__main__``) is shipped to
   each worker once and referred to by a short id afterwards, as a ``CachingPool`` does;
   it is let go on the workers when the function is garbage collected here.
5. A reply completes its tasks' futures on the thread that read it. A task's exception is
   the original one, its remote traceback chained as ``__cause__``.
6. A worker that dies fails only the task it was running (``ProcessExitedException``, a
   ``BrokenProcessPool``); the tasks queued behind it go to other workers, and it is
   replaced. Tasks that shared a message with the one running are run again one by one,
   so the culprit alone fails. ``max_tasks_per_child`` retires a worker once its share is
   done and starts a fresh one, also during ``shutdown``.
7. ``shutdown(wait=True)`` lets every submitted task finish, then removes the workers; an
   executor that is never shut down is shut down when it is garbage collected, and at
   interpreter exit (waiting for its tasks, as the standard library does).

``map`` consumes its input lazily, a bounded window ahead of the results it has yielded
(the standard library reads it all at once). See compat_tests/DIVERGENCES.md.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
import weakref
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from functools import partial
from typing import Any, Callable, Iterable, Iterator

from .cluster import PGRP
from .control import addprocs, rmprocs
from .dispatch import OpContext, capture, internal_op
from .errors import (CapturedException, ProcessExitedException, RemoteErrorStandIn,
                     RemoteException, SerializationError)
from .remotecall import remote_do, remotecall
from .remoteref import _may_pump
from .serialize import dumps, loads
from .values import Failure
from .workerpool import AbstractWorkerPool, _start

__all__ = ["Executor", "ProcessPoolExecutor"]

MAX_BATCH = 256          # tasks in one message at most
MAX_AHEAD = 2048         # tasks in flight per worker at most
AHEAD_TIME = 0.002       # seconds of work to keep queued on a worker (at least)
STEAL_AFTER = 0.005      # a batch running this long (and well past its estimate) may be stolen from
CALL, CHUNK, STARCHUNK = 0, 1, 2
_NO_KWARGS: dict = {}
_REVOKED = "pydist-executor-revoked"

_global_shutdown = False
_live: "weakref.WeakSet[_Core]" = weakref.WeakSet()
_addprocs_lock = threading.Lock()     # one addprocs at a time from the drop-ins
_settling = threading.local()         # set while this thread completes futures
_keys = itertools.count(1)


# ================================================================================================
# On the workers
# ================================================================================================
class _Packed:
    """Arguments pickled ahead of the message: unpickled on the worker inside the task, so
    a failure to unpickle is that task's error, never the connection's."""

    __slots__ = ("data", "bufs")

    def __init__(self, data: Any, *bufs: Any) -> None:
        self.data, self.bufs = data, bufs

    def __reduce__(self):
        return (_Packed, (self.data, *self.bufs))


class _Results:
    """A batch's results on their way back: pickled as a whole when possible, else item by
    item, each item that cannot be pickled replaced by its pickling error."""

    __slots__ = ("values", "elapsed", "pool_mode")

    def __init__(self, values: list, elapsed: float, pool_mode: bool) -> None:
        self.values, self.elapsed, self.pool_mode = values, elapsed, pool_mode

    def __reduce__(self):
        try:
            data, bufs = dumps(self.values)
        except BaseException:
            data, bufs = dumps([self._sendable(v) for v in self.values])
        return (_load_results, (self.elapsed, data, *bufs))

    def _sendable(self, value: Any) -> Any:
        try:
            dumps(value)
            return value
        except BaseException as e:
            err = e.__cause__ if isinstance(e, SerializationError) and e.__cause__ else e
        if self.pool_mode:
            from multiprocessing.pool import MaybeEncodingError
            return Failure(MaybeEncodingError(err, value))
        if type(value) is Failure and isinstance(value.exc, RemoteException):
            ex, tb = value.exc.captured.ex, value.exc.captured.traceback
            stand_in = RemoteErrorStandIn(type(ex).__qualname__, str(ex))
            return Failure(RemoteException(PGRP.myid, CapturedException(stand_in, tb)))
        return Failure(capture(err))


def _load_results(elapsed: float, data: Any, *bufs: Any) -> tuple[Any, float]:
    """Unpickling a batch's results (on the reader thread): never let an error escape."""
    try:
        return loads(data, bufs), elapsed
    except BaseException as e:
        return _Undecodable(e), elapsed


class _Undecodable:
    """Results that could not be unpickled here: every task of the batch fails with why."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _run_batch(fn: Callable[..., Any], packed: _Packed, pool_mode: bool, key: Any, seq: int) -> Any:
    """On a worker: run a batch of tasks of ``fn``; a result or a ``Failure`` for each."""
    if not _claim(key, seq):
        return _REVOKED
    t0 = time.perf_counter()
    try:
        calls = loads(packed.data, packed.bufs)
    except SystemExit as e:
        # Unpickling the arguments asked the process to exit: it does, as a
        # multiprocessing worker would (the task fails with ProcessExitedException).
        from .bootstrap import exit_worker
        exit_worker(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException as e:
        return Failure(capture(e))
    del packed
    out: list[Any] = []
    for i in range(len(calls)):
        kind, args, kwargs = calls[i]
        calls[i] = None           # let the arguments go as soon as the task is done
        try:
            if kind == CALL:
                out.append(fn(*args, **kwargs))
            elif kind == CHUNK:
                out.append([fn(x) for x in args])
            else:
                out.append([fn(*a) for a in args])
        except BaseException as e:   # SystemExit and KeyboardInterrupt are the task's error too
            out.append(Failure(capture(e)))
        del args, kwargs
    return _Results(out, time.perf_counter() - t0, pool_mode)


# -- revoking batches that have not started ------------------------------------------------------
class _Gate:
    """Per executor on a worker: the last batch started, and batches taken back."""

    __slots__ = ("started", "revoked")

    def __init__(self) -> None:
        self.started = 0
        self.revoked: set[int] = set()


_gates: dict[Any, _Gate] = {}
_gates_lock = threading.Lock()


def _claim(key: Any, seq: int) -> bool:
    """May batch ``seq`` run? (No, if it was revoked.) Batches start in the order sent."""
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = _Gate()
        if seq in gate.revoked:
            gate.revoked.discard(seq)
            return False
        if seq > gate.started:
            gate.started = seq
        return True


@internal_op
def _revoke(ctx: OpContext, key: Any, seqs: list[int]) -> None:
    """Take back the batches ``seqs`` that have not started; answer which were taken."""
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = _Gate()
        taken = [s for s in seqs if s > gate.started]
        gate.revoked.update(taken)
    ctx.reply(taken)


# -- functions shipped once ----------------------------------------------------------------------
_shipped: dict[tuple[Any, int], Callable[..., Any]] = {}


def _fn_store(key: Any, fid: int, fn: Callable[..., Any]) -> Callable[..., Any]:
    _shipped[(key, fid)] = fn
    return fn


def _fn_lookup(key: Any, fid: int) -> Callable[..., Any]:
    return _shipped[(key, fid)]


def _fn_drop(key: Any, fids: list[int] | None) -> None:
    """Forget shipped functions (``fids=None``: all of executor ``key``, and its gate)."""
    if fids is None:
        for k in [k for k in _shipped if k[0] == key]:
            del _shipped[k]
        with _gates_lock:
            _gates.pop(key, None)
    else:
        for fid in fids:
            _shipped.pop((key, fid), None)


class _Shipped:
    """A function on its way to a worker: whole the first time, by id afterwards."""

    __slots__ = ("key", "fid", "fn")

    def __init__(self, key: Any, fid: int, fn: Callable[..., Any] | None) -> None:
        self.key, self.fid, self.fn = key, fid, fn

    def __reduce__(self):
        if self.fn is not None:
            return (_fn_store, (self.key, self.fid, self.fn))
        return (_fn_lookup, (self.key, self.fid))


def _init_worker(authkey: bytes | None, packed: _Packed, log: bool) -> None:
    """On a new worker: the master's multiprocessing authkey (so manager proxies passed as
    arguments connect, as in a multiprocessing child), then the user's initializer
    (unpickled only now, after the authkey)."""
    if authkey is not None:
        multiprocessing.current_process().authkey = authkey
    initializer, initargs = loads(packed.data, packed.bufs)
    if initializer is None:
        return
    try:
        initializer(*initargs)
    except BaseException:
        if log:
            logging.getLogger("concurrent.futures").critical("Exception in initializer:",
                                                             exc_info=True)
        raise


# ================================================================================================
# On the master
# ================================================================================================
class _Task:
    """One call to run: ``fn(*args, **kwargs)``, or a chunk of a map (``kind``)."""

    __slots__ = ("fn", "args", "kwargs", "kind", "sink", "started", "solo")

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: dict, kind: int, sink: Any) -> None:
        self.fn, self.args, self.kwargs, self.kind, self.sink = fn, args, kwargs, kind, sink
        self.started = False     # the sink was told it runs
        self.solo = False        # to be sent alone (after a crash or a failed message)


class _Batch:
    __slots__ = ("tasks", "seq", "sent", "alone", "settled", "revoking")

    def __init__(self, tasks: list[_Task]) -> None:
        self.tasks = tasks
        self.seq = 0
        self.sent = 0.0
        self.alone = False
        self.settled = False
        self.revoking = False


class _Worker:
    """The executor's record of one worker (``pid`` is ``None`` while it starts)."""

    __slots__ = ("pid", "owned", "batches", "outbox", "ntasks", "assigned", "retiring", "gone",
                 "send_lock", "seq", "idle_since", "proc")

    def __init__(self, pid: int | None, owned: bool) -> None:
        self.pid = pid
        self.owned = owned
        self.batches: collections.deque[_Batch] = collections.deque()   # sent, in order
        self.outbox: collections.deque[_Batch] = collections.deque()    # picked, not yet sent
        self.ntasks = 0          # tasks sent or picked, not yet answered
        self.assigned = 0        # tasks given to it in its life (max_tasks_per_child)
        self.retiring = False
        self.gone = False
        self.send_lock = threading.Lock()
        self.seq = 0
        self.idle_since = time.monotonic()
        self.proc: Any = None    # the local process handle, when there is one

    def exited(self) -> bool:
        """Whether its local process is known to have ended (before its connection says so)."""
        proc = self.proc
        if proc is None and self.pid is not None:
            w = PGRP.workers.get(self.pid)
            proc = self.proc = getattr(getattr(w, "config", None), "process", None) or False
        return bool(proc) and hasattr(proc, "poll") and proc.poll() is not None


class WorkerProcess:
    """A worker seen as a process (what the standard library keeps in ``_processes``):
    ``pid`` is the operating system's, with ``is_alive``, ``join``, ``terminate``, ``kill``."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        w = PGRP.workers.get(worker_id)
        config = getattr(w, "config", None)
        self._proc = getattr(config, "process", None)
        self.pid = (getattr(w, "ospid", None) or getattr(config, "ospid", None)
                    or getattr(self._proc, "pid", None))
        self.name = f"pydist-worker-{worker_id}"

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} pid={self.pid} {'alive' if self.is_alive() else 'gone'}>"

    @property
    def exitcode(self) -> int | None:
        if self._proc is not None and hasattr(self._proc, "poll"):
            return self._proc.poll()
        return None if self.is_alive() else 0

    def is_alive(self) -> bool:
        if self._proc is not None and hasattr(self._proc, "poll"):
            return self._proc.poll() is None
        return self.worker_id in PGRP.workers and self.worker_id not in PGRP.removed

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)

    def _signal(self, sig: int) -> None:
        if self.pid is not None and self.is_alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class _FnCache:
    """Which function was shipped under which id to which worker, holding functions weakly."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.entries: dict[int, tuple[weakref.ref, int, set[int]]] = {}   # id(fn) -> (ref, fid, pids)
        self.fids = itertools.count(1)
        self.dead: list[tuple[int, set[int]]] = []

    @staticmethod
    def wanted(fn: Any) -> bool:
        """Worth caching: a function pickled by value (a lambda, a closure, from __main__)."""
        return isinstance(fn, types.FunctionType) and (
            fn.__module__ == "__main__" or "<" in fn.__qualname__)

    def prepare(self, fn: Any, pid: int) -> tuple[Any, Any]:
        """What to send as ``fn`` to ``pid``, and a token for ``sent``."""
        if not self.wanted(fn) or pid == PGRP.myid:
            return fn, None
        with self.lock:
            entry = self.entries.get(id(fn))
            if entry is None or entry[0]() is not fn:
                entry = (weakref.ref(fn, partial(self._died, id(fn))), next(self.fids), set())
                self.entries[id(fn)] = entry
            ref, fid, pids = entry
            if pid in pids:
                return _Shipped(self.key, fid, None), None
        return _Shipped(self.key, fid, fn), (pids, pid)

    @staticmethod
    def sent(token: Any) -> None:
        if token is not None:
            pids, pid = token
            pids.add(pid)

    def _died(self, ident: int, ref: weakref.ref) -> None:
        with self.lock:
            entry = self.entries.get(ident)
            if entry is not None and entry[0] is ref:
                del self.entries[ident]
                if entry[2]:
                    self.dead.append((entry[1], entry[2]))

    def forget_worker(self, pid: int) -> None:
        with self.lock:
            for _, _, pids in self.entries.values():
                pids.discard(pid)

    def take_dead(self) -> dict[int, list[int]]:
        """Functions let go since the last call: pid -> fids to drop there."""
        with self.lock:
            dead, self.dead = self.dead, []
        out: dict[int, list[int]] = collections.defaultdict(list)
        for fid, pids in dead:
            for pid in pids:
                out[pid].append(fid)
        return out


_WAITING = ("PENDING", "RUNNING")


def pump_for(sink: Any, done: Callable[[], bool]) -> None:
    """Wait for ``done()`` by reading, in this thread, the connection of the worker that
    runs ``sink``'s task (no hand-off from the reader thread: the reply is handled here).
    Returns early, leaving the rest to an ordinary wait, where this thread may not read."""
    while not done():
        pid = sink.pid
        if pid is None:
            return
        w = PGRP.workers.get(pid)
        inbox = getattr(w, "inbox", None)
        if inbox is None or inbox.ended or not _may_pump():
            return
        inbox.pump(lambda: done() or sink.pid != pid)
        if sink.pid == pid:
            return       # done, or the connection ended


class _Future(cf.Future):
    """A ``concurrent.futures.Future`` whose untimed ``result``/``exception`` read the
    worker's reply in the waiting thread."""

    pid: int | None = None

    def _settled(self) -> bool:
        return self._state not in _WAITING

    def result(self, timeout: float | None = None) -> Any:
        if timeout is None and self._state in _WAITING:
            pump_for(self, self._settled)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if timeout is None and self._state in _WAITING:
            pump_for(self, self._settled)
        return super().exception(timeout)


def _unwrap(exc: BaseException, tb_class: type) -> BaseException:
    """The exception a task's future raises: the original, remote traceback as cause."""
    if isinstance(exc, RemoteException):
        original = exc.captured.ex
        original.__cause__ = tb_class(f'\n"""\n{exc.captured.traceback}"""')
        return original
    return exc


class _Core:
    """Everything an executor owns; the ``Executor`` object is a thin front, so that
    dropping it can shut this down (``weakref.finalize``)."""

    def __init__(self, max_workers: int, initializer: Callable[..., Any] | None, initargs: tuple,
                 max_tasks: int | None, transport: str, pool: AbstractWorkerPool | None,
                 eager: bool = False, pool_mode: bool = False,
                 tb_class: type = _RemoteTraceback) -> None:
        self.max_workers = max_workers
        self.initializer, self.initargs = initializer, initargs
        self.max_tasks = max_tasks
        self.transport = transport
        self.given_pool = pool
        self.eager = eager                  # keep max_workers alive (Pool), not on demand
        self.pool_mode = pool_mode
        self.tb_class = tb_class
        self.key = (PGRP.myid, os.getpid(), next(_keys))
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.pending: collections.deque[_Task] = collections.deque()
        self.workers: list[_Worker] = []
        self.to_start: list[_Worker] = []
        self.starter: threading.Thread | None = None
        self.helpers: set[threading.Thread] = set()
        self.unfinished = 0
        self.shutdown = False
        self.stopped = False
        self.terminating = False
        self.broken: str | None = None
        self.est: float | None = None       # seconds per task, measured on the workers
        self.rtt = 0.0005                   # seconds of round trip beyond the work
        self.fcache = _FnCache(self.key)
        self.feeds: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.stop_lock = threading.Lock()
        self.stop_done = threading.Event()
        self.steal_timer: threading.Timer | None = None
        self.used_pids: set[int] = set()
        self.exiting = 0                    # retired workers whose processes are not gone yet
        _live.add(self)

    # -- submitting ------------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.broken:
            raise BrokenProcessPool(self.broken)
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

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

    def _fail_pending(self) -> None:
        with self.lock:
            doomed = list(self.pending)
            self.pending.clear()
        self._settle_all(doomed, BrokenProcessPool(self.broken or "the process pool is broken"))

    # -- dispatching -----------------------------------------------------------------------------
    def cap(self) -> int:
        """Tasks a worker may hold: 1 until tasks are measured, then enough to cover the
        round trip (many tiny tasks, one long one)."""
        if self.est is None:
            return 1
        ahead = max(2 * self.rtt, AHEAD_TIME)
        return 1 + min(MAX_AHEAD, int(ahead / max(self.est, 1e-7)))

    def dispatch(self) -> None:
        while True:
            with self.lock:
                w = self._pick()
                if w is None:
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
                if w.retiring or w.gone:
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
                        if w.pid is None or w.gone or not w.outbox:
                            break
                        batch = w.outbox.popleft()
                        w.seq += 1
                        batch.seq = w.seq
                        batch.alone = not w.batches
                        w.batches.append(batch)
                    self._send(w, batch)
            finally:
                w.send_lock.release()
            with self.lock:
                if w.pid is None or w.gone or not w.outbox:
                    return

    def _send(self, w: _Worker, batch: _Batch) -> None:
        try:
            self._send_batch(w, batch)
        except BaseException as e:     # a bug here must not leave the batch unanswered
            _report(e)
            if self._answered(w, batch):
                self._settle_all(batch.tasks, e)

    def _send_batch(self, w: _Worker, batch: _Batch) -> None:
        tasks = batch.tasks
        fn = tasks[0].fn
        try:
            data, bufs = dumps([(t.kind, t.args, t.kwargs) for t in tasks])
        except BaseException as e:
            self._unsendable(w, batch, e)
            return
        g, token = self.fcache.prepare(fn, w.pid)   # type: ignore[arg-type]
        for t in tasks:
            t.sink.pid = w.pid
        batch.sent = time.perf_counter()
        try:
            if batch.alone and w.exited():
                # It died while idle and its connection has not said so yet: the batch would
                # go nowhere and be taken for the one that killed it.
                raise ProcessExitedException(w.pid, "has exited")   # type: ignore[arg-type]
            _, done = _start(w.pid, _run_batch, (g, _Packed(data, *bufs), self.pool_mode,   # type: ignore[arg-type]
                                                 self.key, batch.seq), _NO_KWARGS, keep=False)
        except SerializationError as e:   # the function itself cannot be pickled
            self._unsendable(w, batch, e)
            return
        except Exception as e:            # the worker is gone (or unusable): the batch never left
            if not isinstance(e, ProcessExitedException):
                e = ProcessExitedException(w.pid, f"could not be sent a task ({e})")  # type: ignore[arg-type]
            if self._answered(w, batch):
                self._requeue(batch.tasks)
            self._worker_died(w, e)
            return
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
        if value is _REVOKED:
            return     # taken back earlier; its tasks went elsewhere
        if type(value) is Failure and isinstance(value.exc, ProcessExitedException):
            self._worker_died(w, value.exc)
            return
        if batch.settled:
            return
        if type(value) is _Results:          # run in this very process
            value = (value.values, value.elapsed)
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
        self.dispatch()
        if not w.ntasks:
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

    def _learn(self, batch: _Batch, elapsed: float, now: float) -> None:
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
            if self.unfinished <= 0:
                self.changed.notify_all()

    def _requeue(self, tasks: list[_Task], solo: bool = False) -> None:
        """Put tasks back at the front of the queue, in order."""
        with self.lock:
            for t in tasks:
                t.solo = t.solo or solo
            self.pending.extendleft(reversed(tasks))

    # -- death, retirement, growth ---------------------------------------------------------------
    def _worker_died(self, w: _Worker, exc: ProcessExitedException) -> None:
        with self.lock:
            if w.gone:
                return
            w.gone = True
            if w in self.workers:
                self.workers.remove(w)
            sent, queued = list(w.batches), list(w.outbox)
            w.batches.clear()
            w.outbox.clear()
            for b in sent + queued:
                b.settled = True
            w.ntasks = 0
            doomed: list[_Task] = []
            again: list[_Task] = []
            if self.terminating:
                doomed = [t for b in sent + queued for t in b.tasks]
            elif sent:
                # The oldest batch sent was running: alone, its task is the culprit; in
                # company, each is tried again alone. The later ones never started.
                running = sent[0]
                if len(running.tasks) == 1:
                    doomed = running.tasks
                else:
                    again = list(running.tasks)
                    for t in again:
                        t.solo = True
                again += [t for b in sent[1:] + queued for t in b.tasks]
            else:
                again = [t for b in queued for t in b.tasks]
            self.pending.extendleft(reversed(again))
            adopt = self.given_pool is not None and not self.workers
        if w.pid is not None:
            self.fcache.forget_worker(w.pid)
        self._settle_all(doomed, exc)
        if adopt:
            self._helper(self._adopt_then_dispatch)
        self.dispatch()

    def _adopt_then_dispatch(self) -> None:
        self._adopt_pool()
        self.dispatch()

    def _retire_due(self, w: _Worker) -> bool:
        """(Under the lock.) ``w`` has done its share and is idle: take it out."""
        if not w.retiring or w.ntasks or w.outbox or w.gone:
            return False
        w.gone = True
        if w in self.workers:
            self.workers.remove(w)
        return True

    def _retire(self, w: _Worker) -> None:
        if w.owned and w.pid is not None:
            with self.lock:
                self.exiting += 1
            self._helper(self._remove_retired, w.pid)

    def _remove_retired(self, pid: int) -> None:
        """Remove a retired worker; its process counts against the bound until it is gone."""
        try:
            rmprocs(pid, waitfor=30)
        finally:
            with self.lock:
                self.exiting -= 1
            self.dispatch()

    def _grow(self) -> None:
        """(Under the lock.) Start workers where tasks wait and no worker is idle."""
        if self.broken or self.terminating or self.stopped or self.given_pool is not None:
            return
        # A retiring worker (max_tasks_per_child) takes no more tasks: once it runs, its
        # successor may start while it finishes its last ones (so at most twice max_workers
        # processes). One still starting holds its place.
        have = sum(1 for w in self.workers if not w.retiring or w.pid is None)
        if have >= self.max_workers:
            return
        # Processes still exiting count too: never more than twice max_workers at once.
        room = 2 * self.max_workers - len(self.workers) - self.exiting
        if self.eager and not self.shutdown:
            need = self.max_workers - have
        else:
            # As the standard library does: a task that finds no idle worker starts one.
            idle = sum(1 for w in self.workers if not w.ntasks and not w.retiring)
            queued = len(self.pending) + sum(max(0, w.ntasks - 1) for w in self.workers)
            need = min(queued - idle, self.max_workers - have)
        need = min(need, room)
        if need <= 0:
            return
        fresh = [_Worker(None, owned=True) for _ in range(need)]
        self.workers.extend(fresh)
        self.to_start.extend(fresh)
        if self.starter is None:
            self.starter = threading.Thread(target=self._starter, name="pydist-executor-start",
                                            daemon=True)
            self.starter.start()

    def _starter(self) -> None:
        """Start the workers asked for, a group at a time, until none is wanted."""
        while True:
            with self.lock:
                group, self.to_start = self.to_start, []
                if not group:
                    self.starter = None
                    self.changed.notify_all()
                    return
            self._start_group(group)

    def _start_group(self, group: list[_Worker]) -> None:
        try:
            with _addprocs_lock:
                pids = addprocs(len(group), transport=self.transport)
        except BaseException as e:
            for pid in getattr(e, "pids", None) or ():
                self._helper(rmprocs, pid, waitfor=30)
            self._break(f"A worker process could not be started ({e}); the process pool is "
                        f"not usable anymore", e)
            return
        failure = self._initialize(pids)
        if failure is not None:
            self._helper(rmprocs, *pids, waitfor=30)
            self._break("A worker's initializer failed, the process pool is not usable anymore",
                        failure)
            return
        with self.lock:
            unwanted = self.broken is not None or self.stopped
            for w, pid in zip(group, pids):
                w.pid = pid
                self.used_pids.add(pid)
                if unwanted:
                    w.gone = True
        if unwanted:
            self._helper(rmprocs, *pids, waitfor=30)
            return
        for w in group:
            self._flush(w)
        self.dispatch()
        self._maybe_steal()

    def _initialize(self, pids: list[int]) -> BaseException | None:
        """Run ``_init_worker`` on each new worker; the first failure, unwrapped. Only the
        local workers this executor starts itself are given multiprocessing's authkey."""
        authkey = None if self.given_pool is not None else bytes(multiprocessing.current_process().authkey)
        calls = []
        try:
            data, bufs = dumps((self.initializer, self.initargs))
            for pid in pids:
                calls.append(remotecall(_init_worker, pid, authkey, _Packed(data, *bufs),
                                        not self.pool_mode))
            for f in calls:
                f.fetch()
        except SerializationError as e:
            return e.__cause__ or e
        except BaseException as e:
            return _unwrap(e, self.tb_class)
        return None

    def _adopt_pool(self) -> None:
        """Take the given pool's workers (at the start, and when all known ones died)."""
        pool = self.given_pool
        assert pool is not None
        try:
            pids = [p for p in pool.workers() if p not in self.used_pids]
        except Exception:   # the pool's owner is gone
            pids = []
        pids = pids[: self.max_workers]
        if not pids:
            with self.lock:
                waiting = bool(self.pending) or self.unfinished > 0
            if waiting:
                self._break("Every worker of the given pool has exited, the process pool is not "
                            "usable anymore", None)
            return
        failure = self._initialize(pids)
        if failure is not None:
            self._break("A worker's initializer failed, the process pool is not usable anymore",
                        failure)
            return
        with self.lock:
            for pid in pids:
                self.used_pids.add(pid)
                self.workers.append(_Worker(pid, owned=False))

    def _helper(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn`` in a thread of its own, waited for by ``shutdown``."""
        def run() -> None:
            try:
                fn(*args, **kwargs)
            except Exception:
                pass
            finally:
                with self.lock:
                    self.helpers.discard(t)
        t = threading.Thread(target=run, name="pydist-executor-helper", daemon=True)
        with self.lock:
            t.start()
            self.helpers.add(t)

    # -- breaking and stopping -------------------------------------------------------------------
    def _break(self, why: str, cause: BaseException | None) -> None:
        """The executor cannot go on: every unfinished task fails, every worker goes."""
        with self.lock:
            if self.broken:
                return
            self.broken = why
            doomed = list(self.pending)
            self.pending.clear()
            owned = []
            for w in self.workers:
                for b in list(w.batches) + list(w.outbox):
                    b.settled = True
                    doomed.extend(b.tasks)
                w.batches.clear()
                w.outbox.clear()
                w.gone = True
                if w.owned and w.pid is not None:
                    owned.append(w.pid)
            self.workers.clear()
        exc = BrokenProcessPool(why)
        exc.__cause__ = cause
        self._settle_all(doomed, exc)
        if owned:
            self._helper(rmprocs, *owned, waitfor=30)
        with self.lock:
            self.changed.notify_all()

    def shutdown_(self, wait: bool, cancel_futures: bool) -> None:
        with self.lock:
            self.shutdown = True
            cancelled: list[_Task] = []
            if cancel_futures:
                keep = collections.deque()
                for t in self.pending:
                    if t.started:
                        keep.append(t)
                    else:
                        cancelled.append(t)
                self.pending = keep
            feeds = list(self.feeds)
        for t in cancelled:
            t.sink.cancel()
        self._finished(len(cancelled))
        for feed in feeds:
            feed.at_shutdown(cancel_futures)
        if wait and not getattr(_settling, "active", False):
            self.stop()
        else:
            threading.Thread(target=self.stop, name="pydist-executor-stop", daemon=True).start()

    def stop(self) -> None:
        """Wait for every task, then remove the workers (idempotent)."""
        with self.stop_lock:
            with self.lock:
                while self.unfinished > 0 and not self.broken:
                    self.changed.wait(0.1)
                    self._purge_cancelled()
                self.stopped = True
                while self.starter is not None:
                    self.changed.wait(0.1)
                owned = [w.pid for w in self.workers if w.owned and w.pid is not None]
                given = [w.pid for w in self.workers if not w.owned and w.pid is not None]
                for w in self.workers:
                    w.gone = True
                self.workers.clear()
                helpers = list(self.helpers)
                if self.steal_timer is not None:
                    self.steal_timer.cancel()
            if owned:
                try:
                    rmprocs(*owned, waitfor=30)
                except Exception:
                    pass
            for pid in given:
                try:
                    remote_do(_fn_drop, pid, self.key, None)
                except Exception:
                    pass
            for t in helpers:
                t.join(35)
            _live.discard(self)
            self.stop_done.set()

    def _purge_cancelled(self) -> None:
        """(Under the lock.) Drop pending tasks cancelled by their owners."""
        keep = collections.deque(t for t in self.pending if t.started or not t.sink.cancelled())
        gone = len(self.pending) - len(keep)
        if gone:
            for t in self.pending:
                if not t.started and t.sink.cancelled():
                    t.sink.set_running_or_notify_cancel()
            self.pending = keep
            self.unfinished -= gone

    def terminate(self, why: str) -> None:
        """Stop now (``Pool.terminate``): unfinished tasks fail, workers are removed."""
        with self.lock:
            self.shutdown = True
            self.terminating = True
        self._break(why, None)
        with self.lock:
            self.stopped = True

    def abandon(self) -> None:
        """The executor was garbage collected without ``shutdown``: finish, then stop."""
        if not self.stopped:
            self.shutdown_(wait=False, cancel_futures=False)

    # -- work stealing -------------------------------------------------------------------------
    def _maybe_steal(self) -> None:
        """A worker fell idle with nothing pending: take back batches queued behind a long
        task on another worker (those not started yet), so the idle one runs them."""
        now = time.perf_counter()
        est = self.est or 0.0
        later: float | None = None
        with self.lock:
            if self.pending or self.broken or self.terminating:
                return
            if not any(not w.ntasks and w.pid is not None and not w.retiring for w in self.workers):
                return
            victims = []
            for w in self.workers:
                if w.pid is None or len(w.batches) < 2:
                    continue
                running = w.batches[0]
                due = running.sent + max(STEAL_AFTER, 4 * est * len(running.tasks))
                if now < due:
                    later = due if later is None else min(later, due)
                    continue
                seqs = [b.seq for b in list(w.batches)[1:] if not b.revoking]
                if seqs:
                    for b in list(w.batches)[1:]:
                        b.revoking = True
                    victims.append((w, seqs))
            if not victims and later is not None and self.steal_timer is None:
                self.steal_timer = threading.Timer(later - now + 0.0005, self._steal_timer)
                self.steal_timer.daemon = True
                self.steal_timer.start()
        for w, seqs in victims:
            try:
                _, done = _start(w.pid, _revoke, (self.key, seqs), _NO_KWARGS, keep=False)  # type: ignore[arg-type]
            except Exception:
                continue
            done.add_callback(partial(self._revoked_safely, w))

    def _steal_timer(self) -> None:
        with self.lock:
            self.steal_timer = None
        self._maybe_steal()

    def _revoked_safely(self, w: _Worker, taken: Any) -> None:
        try:
            self._revoked(w, taken)
        except BaseException as e:
            _report(e)

    def _revoked(self, w: _Worker, taken: Any) -> None:
        if type(taken) is Failure or not taken:
            with self.lock:
                for b in w.batches:
                    b.revoking = False
            return
        taken = set(taken)
        moved: list[_Task] = []
        with self.lock:
            if w.gone:
                return
            for b in list(w.batches):
                if b.seq in taken and not b.settled:
                    b.settled = True
                    w.batches.remove(b)
                    w.ntasks -= len(b.tasks)
                    w.assigned -= len(b.tasks)
                    moved.extend(b.tasks)
                b.revoking = False
            if self.max_tasks is not None and w.assigned < self.max_tasks:
                w.retiring = False
            self.pending.extendleft(reversed(moved))
        self.dispatch()

    def _drop_dead_functions(self) -> None:
        for pid, fids in self.fcache.take_dead().items():
            try:
                remote_do(_fn_drop, pid, self.key, fids)
            except Exception:
                pass

    # -- introspection ---------------------------------------------------------------------------
    def processes(self, wait: float = 60.0) -> dict[int, WorkerProcess]:
        """The live workers as processes, by OS pid (waiting for those being started)."""
        deadline = time.monotonic() + wait
        with self.lock:
            while self.starter is not None and time.monotonic() < deadline:
                self.changed.wait(0.05)
            pids = [w.pid for w in self.workers if w.pid is not None and not w.gone]
        out = {}
        for pid in pids:
            p = WorkerProcess(pid)
            out[p.pid] = p
        return out


def _on_worker_lost(pid: int) -> None:
    """A worker died or was removed: executors using it learn now, not at their next send
    (a pool keeps its size; ``_processes`` stays true)."""
    for core in list(_live):
        with core.lock:
            hit = [w for w in core.workers if w.pid == pid and not w.gone]
        for w in hit:
            detail = PGRP.removed.get(pid, "")
            threading.Thread(target=core._worker_died, args=(w, ProcessExitedException(pid, detail)),
                             name="pydist-executor-lost", daemon=True).start()


PGRP.on_worker_lost.append(_on_worker_lost)


def _report(exc: BaseException) -> None:
    """An error in the executor's own machinery: said on stderr (the tasks it hit fail)."""
    import traceback
    print("pydist executor: internal error", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


def _copy_exc(exc: BaseException) -> BaseException:
    """A fresh instance of ``exc`` for each future (exceptions carry their traceback)."""
    try:
        new = exc.__class__(*exc.args)
    except Exception:
        return exc
    new.__cause__ = exc.__cause__
    return new


# ================================================================================================
# The map window
# ================================================================================================
class _Slot:
    """Where one task of a map puts its result (lighter than a Future)."""

    __slots__ = ("feed", "value", "exc", "state", "pid")

    PENDING, RUNNING, DONE, CANCELLED = 0, 1, 2, 3

    def __init__(self, feed: "_Feed") -> None:
        self.feed = feed
        self.value: Any = None
        self.exc: BaseException | None = None
        self.state = 0
        self.pid: int | None = None

    def done(self) -> bool:
        return self.state >= 2

    def set_running_or_notify_cancel(self) -> bool:
        if self.state == 3:
            return False
        self.state = 1
        return True

    def cancel(self) -> bool:
        if self.state == 0:
            self.state = 3
            self.feed.wake(self)
            return True
        return self.state == 3

    def cancelled(self) -> bool:
        return self.state == 3

    def set_result(self, value: Any) -> None:
        self.value = value
        self.state = 2
        self.feed.wake(self)

    def set_exception(self, exc: BaseException) -> None:
        self.exc = exc
        self.state = 2
        self.feed.wake(self)


class _Feed:
    """A map's input and its window of tasks in flight, refilled as results are taken."""

    def __init__(self, core: _Core, fn: Callable[..., Any], source: Iterator[Any], kind: int,
                 window: int, keep: set | None = None) -> None:
        self.core = core
        self.fn = fn
        self.kind = kind
        self.source: Iterator[Any] | None = source
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.cond = threading.Condition(threading.Lock())
        self.window: collections.deque[_Slot] = collections.deque()
        self.waiting: _Slot | None = None
        self.min_window = window
        self.cancel_rest = False
        self.keep = keep                # who holds this feed while its input is unread
        if keep is not None:
            keep.add(self)
        core.feeds.add(self)

    def wake(self, slot: _Slot) -> None:
        if self.waiting is slot:
            with self.cond:
                self.cond.notify()

    def target(self) -> int:
        core = self.core
        per_worker = core.cap() if self.kind == CALL else 1
        return max(self.min_window, min(8192, 2 * per_worker * max(1, core.max_workers)))

    def top_up(self, first: bool = False, drain: bool = False) -> None:
        """Read more input into tasks until the window is full (or the input ends).
        ``first``: the call from ``map`` itself (it may raise as ``submit`` does)."""
        with self.lock:
            if self.source is None:
                return
            target = self.target()
            if not (first or drain) and len(self.window) > target * 3 // 4:
                return
            want = None if drain else max(0, target - len(self.window))
            tasks: list[_Task] = []
            fn, kind, window = self.fn, self.kind, self.window
            try:
                for item in (self.source if want is None else itertools.islice(self.source, want)):
                    slot = _Slot(self)
                    tasks.append(_Task(fn, item, _NO_KWARGS, kind, slot))
                    window.append(slot)
                if want is None or len(tasks) < want:
                    self.source = None
            except BaseException as e:
                self.source = None
                self.error = e
            if self.source is None and self.keep is not None:
                self.keep.discard(self)
            if tasks:
                self.core.enqueue(tasks, check=first)

    def at_shutdown(self, cancel_futures: bool) -> None:
        """The executor shuts down: the rest of the input is submitted now (as the
        standard library would have done at ``map`` time), or cancelled."""
        if cancel_futures:
            with self.lock:
                self.source = None
                self.cancel_rest = True
        else:
            self.top_up(drain=True)

    def pop(self, deadline: float | None) -> Any:
        """The next result in order (raising its exception), waiting up to ``deadline``."""
        slot = self.window[0]
        if slot.state < 2 and deadline is None:
            pump_for(slot, slot.done)
        if slot.state < 2:
            with self.cond:
                self.waiting = slot
                while slot.state < 2:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self.waiting = None
                        raise TimeoutError()
                    self.cond.wait(left)
                self.waiting = None
        self.window.popleft()
        if slot.state == 3:
            raise cf.CancelledError()
        if slot.exc is not None:
            exc, slot.exc = slot.exc, None
            raise exc
        value, slot.value = slot.value, None
        return value

    def close(self) -> None:
        with self.lock:
            self.source = None
            for slot in self.window:
                slot.cancel()
            self.window.clear()
            if self.keep is not None:
                self.keep.discard(self)
        self.core.feeds.discard(self)


def _chunks(iterables: tuple, size: int) -> Iterator[list]:
    it = zip(*iterables)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _map_results(feed: _Feed, deadline: float | None, chunked: bool,
                 owner: Any) -> Iterator[Any]:
    """The generator ``map`` returns (``owner`` keeps the executor alive while it runs)."""
    try:
        while True:
            feed.top_up()
            if not feed.window:
                if feed.cancel_rest:
                    raise cf.CancelledError()
                if feed.error is not None:
                    err, feed.error = feed.error, None
                    raise err
                return
            if chunked:
                chunk = feed.pop(deadline)
                chunk.reverse()
                while chunk:
                    yield chunk.pop()
            else:
                yield feed.pop(deadline)
    finally:
        feed.close()


# ================================================================================================
# The executor
# ================================================================================================
class Executor(cf.Executor):
    """A process pool executor on pydist workers (a drop-in for the standard library's
    ``concurrent.futures.ProcessPoolExecutor``).

    ``mp_context`` is accepted and ignored (workers are fresh interpreters, never forks).
    Beyond the standard library: ``transport`` picks how to talk to the workers it starts,
    and ``pool`` makes it use the workers of a pydist worker pool instead.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None, transport: str = "auto",
                 pool: AbstractWorkerPool | None = None) -> None:
        if max_workers is None:
            max_workers = (len(pool.workers()) or 1) if pool is not None else (os.cpu_count() or 1)
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            elif max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if pool is not None and not isinstance(pool, AbstractWorkerPool):
            raise TypeError(f"pool must be a pydist worker pool, not {type(pool).__name__}")
        self._given_context = mp_context
        self._core = _Core(max_workers, initializer, tuple(initargs), max_tasks_per_child,
                           transport, pool)
        if pool is not None:
            self._core._adopt_pool()
        weakref.finalize(self, _Core.abandon, self._core).atexit = False   # see _at_exit

    # -- the standard interface --------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)``; a ``concurrent.futures.Future`` for its result."""
        core = self._core
        future = _Future()
        task = _Task(fn, args, kwargs or _NO_KWARGS, CALL, future)
        with core.lock:
            core.check_open()
            core.pending.append(task)
            core.unfinished += 1
        core.dispatch()
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like ``builtins.map(fn, *iterables)``, run on the workers; results in order.

        The input is read a bounded window ahead of the results taken (all at once only
        when the executor shuts down first); ``TimeoutError`` once ``timeout`` seconds have
        passed since this call; ``chunksize`` items go to a worker as one task.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        core = self._core
        if chunksize == 1:
            feed = _Feed(core, fn, zip(*iterables), CALL, 64)
        else:
            feed = _Feed(core, fn, _chunks(iterables, chunksize), STARCHUNK, 16)
        try:
            feed.top_up(first=True)
        except BaseException:
            feed.close()
            raise
        if feed.error is not None:
            # The input failed before the first window was full: raise here, as the
            # standard library does (the tasks already submitted still run).
            err, feed.error = feed.error, None
            feed.window.clear()
            feed.close()
            raise err
        return _map_results(feed, deadline, chunksize > 1, self)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; ``cancel_futures`` cancels those not started; ``wait`` waits until
        every other task has finished and the workers are gone (else that happens in the
        background)."""
        self._core.shutdown_(wait, cancel_futures)

    # -- what the standard library's object also shows -----------------------------------------
    @property
    def _max_workers(self) -> int:
        return self._core.max_workers

    @property
    def _broken(self) -> str | bool:
        return self._core.broken or False

    @property
    def _processes(self) -> dict[int, WorkerProcess]:
        """The worker processes by OS pid (as the standard library's ``_processes``)."""
        return self._core.processes()

    @property
    def _executor_manager_thread(self) -> "_Stopping | None":
        """What ``join()`` waits for the end of a shutdown (the standard library's
        manager thread ends once the workers are gone)."""
        return _Stopping(self._core)

    @property
    def _mp_context(self) -> Any:
        if self._given_context is not None:
            return self._given_context
        if self._core.max_tasks is not None:
            return multiprocessing.get_context("spawn")
        return multiprocessing.get_context()

    def __repr__(self) -> str:
        core = self._core
        state = "broken" if core.broken else ("shut down" if core.shutdown else "running")
        return f"<pydist.Executor max_workers={core.max_workers} {state}>"


ProcessPoolExecutor = Executor


class _Stopping:
    """The end of an executor's shutdown, as a thread-like object (``join``, ``is_alive``)."""

    def __init__(self, core: _Core) -> None:
        self._core = core

    def join(self, timeout: float | None = None) -> None:
        self._core.stop_done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._core.stop_done.is_set()


def _at_exit() -> None:
    """At interpreter exit (before ``atexit`` functions, as the standard library's hook):
    no new tasks; executors still running finish theirs and remove their workers; pools
    are terminated."""
    global _global_shutdown
    _global_shutdown = True
    for core in list(_live):
        if core.stopped or core.terminating:
            continue
        try:
            if core.pool_mode:    # a Pool is terminated at exit, as multiprocessing does
                core.terminate("the pool was terminated at interpreter exit")
            else:
                core.shutdown_(wait=True, cancel_futures=False)
        except Exception:
            pass


try:
    threading._register_atexit(_at_exit)     # type: ignore[attr-defined]
except (AttributeError, RuntimeError):
    atexit.register(_at_exit)
