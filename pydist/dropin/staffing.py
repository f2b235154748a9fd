"""Workers coming and going: the part of an executor (``_Staff``) that keeps the staff.

The ``_Staff`` owns the executor's worker records (``workers``, in ``records.py``), the
workers being started and the starter thread, the helper threads, and the count of
retired workers whose processes are not gone yet.

* Growth (``grow``, under the lock): a task that finds no idle worker starts one, up to
  ``max_workers`` (a ``Pool`` keeps them all alive); a starter thread adds them a group
  at a time and runs the initializer on each (``_init_worker``); a failure breaks the
  executor. An executor given a pydist pool borrows that pool's workers instead, through
  the pool's ``take``/``put_back`` (``borrowing.py``).
* Death (``worker_died``): the task that was running fails; the others go back to the
  front of the queue (those that shared its message one by one) and the worker is
  replaced by the next dispatch. ``_on_worker_lost`` tells every executor at once. The
  death is decided after the connection's reader has handed over every answer the worker
  sent before it went, never by a send that failed first (``lost_in_send``): otherwise
  an answered batch not yet read would be taken for the one running, and its task blamed.
* Retirement (``max_tasks_per_child``): a worker that has done its share takes no more
  tasks and is removed once idle; its process counts against the bound of twice
  ``max_workers`` until it is gone. ``max_memory_per_child`` retires a worker the same
  way once its resident memory, read after each answer, is over the limit.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..cluster.destinations import Limits, pickling_ahead
from ..cluster.group import PGRP
from ..cluster.output import wait_relayed
from ..cluster.peers import W_TERMINATED
from ..errors import ProcessExitedException, SerializationError
from ..processes.lifecycle import addprocs, rmprocs
from ..refs.remotecall import remotecall
from ..wire.serialize import dumps
from .closing import _live
from .futures import _unwrap
from .mainscript import main_code
from .mpshare import check_shared, dumps_shared, tracker_handle
from .records import WorkerProcess, _Task, _Worker
from .worker_side import _init_worker, _Packed

_addprocs_lock = threading.Lock()     # one addprocs at a time from the drop-ins
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def check_max_memory(value: Any, given_pool: Any) -> int | None:
    """``max_memory_per_child`` checked: a positive int of bytes, or None."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_memory_per_child must be an int (bytes) or None, not {value!r}")
    if value <= 0:
        raise ValueError(f"max_memory_per_child must be > 0 bytes, got {value}")
    if given_pool is not None:
        raise ValueError("max_memory_per_child needs workers the executor starts itself, "
                         "not a given pool")
    return value


def _resident_bytes(w: _Worker) -> int | None:
    """The resident memory of ``w``'s local process (``None``: not local, or gone)."""
    config = getattr(PGRP.workers.get(w.pid), "config", None) if w.pid is not None else None
    ospid = getattr(config, "ospid", None)
    if not ospid or getattr(config, "process", None) is None:   # only processes started here
        return None
    try:
        with open(f"/proc/{ospid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


_PER_WORKER: Any = (b"", [])          # init_packed: pickle the initializer for each worker


class _Staff:
    """The executor's workers: started, borrowed, lost, retired."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.workers: list[_Worker] = []
        self.to_start: list[_Worker] = []
        self.starter: threading.Thread | None = None
        self.helpers: set[threading.Thread] = set()
        self.exiting = 0                 # retired workers whose processes are not gone yet
        self.used_pids: set[int] = set()
        self.init_packed: tuple[bytes, list[Any]] | None = None
        self.init_limits = Limits()      # where the pickled initializer may go

    # -- death, retirement, growth ---------------------------------------------------------------
    def worker_died(self, w: _Worker, exc: ProcessExitedException) -> None:
        core = self.core
        with core.lock:
            if w.gone:
                return
            w.gone = True
            if w in self.workers:
                self.workers.remove(w)
            # A batch still being sent is its sender's to settle (it may never have left).
            sent, queued = [b for b in w.batches if not b.sending], list(w.outbox)
            w.batches.clear()
            w.outbox.clear()
            for b in sent + queued:
                b.settled = True
            w.load = 0
            doomed: list[_Task] = []
            again: list[_Task] = []
            if core.flags.terminating:
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
            core.tasks.push_front(again)
        if w.pid is not None:
            core.fcache.forget_worker(w.pid)
        core.fail_all(doomed, exc)
        core.dispatcher.dispatch()

    def lost_in_send(self, w: _Worker, exc: ProcessExitedException) -> None:
        """A send to ``w`` failed (its batch is back in the queue). Which of its batches was
        running when it died can only be told once its connection's reader has handed over
        every answer ``w`` sent before it went: ``ProcessGroup.send`` waits for that before
        it raises, so the death is decided here; unless this thread is that very reader (the
        cluster marks the worker ``draining``), which reads on once this returns and reports
        the death then (``_on_worker_lost``). Until then nothing more is sent to ``w``."""
        record = PGRP.workers.get(w.pid) if w.pid is not None else None
        if record is not None and record.draining and record.state != W_TERMINATED:
            with self.core.lock:
                w.unreachable = True
        else:
            self.worker_died(w, exc)
        self.core.dispatcher.dispatch()

    def retire_due(self, w: _Worker) -> bool:
        """(Under the lock, after an answer from ``w``.) ``w`` has done its share (or
        outgrown ``max_memory_per_child``) and is idle: take it out."""
        max_memory = self.core.max_memory
        if max_memory is not None and not w.retiring and not w.gone:
            rss = _resident_bytes(w)
            w.retiring = rss is not None and rss > max_memory
        if not w.leaving() or w.outbox:
            return False
        w.gone = True
        if w in self.workers:
            self.workers.remove(w)
        return True

    def retire(self, w: _Worker) -> None:
        """A worker taken off the books once idle: removed if this executor started it,
        else given back to its pool."""
        if w.pid is None:
            return
        if not w.owned:
            if self.core.borrower is not None:
                self.core.borrower.give_back(w.pid)
            return
        with self.core.lock:
            self.exiting += 1
        self.helper(self._remove_retired, w.pid)

    def _remove_retired(self, pid: int) -> None:
        """Remove a retired worker; its process counts against the bound until it is gone."""
        try:
            rmprocs(pid, waitfor=30)
        finally:
            with self.core.lock:
                self.exiting -= 1
            self.core.dispatcher.dispatch()

    def workers_wanted(self) -> int:
        """(Under the lock.) How many more workers the tasks waiting here want."""
        core = self.core
        # A retiring worker (max_tasks_per_child) takes no more tasks: once it runs, its
        # successor may start while it finishes its last ones (so at most twice max_workers
        # processes). One still starting holds its place.
        most: int = core.max_workers
        have = sum(1 for w in self.workers if not w.retiring or w.pid is None)
        if have >= most:
            return 0
        if core.eager and not core.flags.shutdown:
            return most - have
        # As the standard library does: a task that finds no idle worker starts one.
        idle = sum(1 for w in self.workers if not w.load and not w.retiring)
        queued = len(core.tasks.pending) + sum(max(0, w.load - 1) for w in self.workers)
        return min(queued - idle, most - have)

    def grow(self) -> None:
        """(Under the lock.) Start (or borrow) workers where tasks wait and none is idle."""
        core = self.core
        if core.flags.closed():
            return
        need = self.workers_wanted()
        if need <= 0:
            return
        if core.borrower is not None:
            core.borrower.want()
            return
        # Processes still exiting count too: never more than twice max_workers at once.
        need = min(need, 2 * core.max_workers - len(self.workers) - self.exiting)
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
        """Start the workers asked for, a group at a time, until none is wanted. The first
        worker of an executor starts alone, so the first task runs as soon as one worker
        can take it: the others are launched while it runs the initializer."""
        while True:
            with self.core.lock:
                group, self.to_start = self.to_start, []
                first = not any(w.pid is not None for w in self.workers)
                if not group:
                    self.starter = None
                    self.core.changed.notify_all()
                    return
            if first and len(group) > 1:
                self._start_first(group[0], group[1:])
            else:
                self._start_group(group)

    def _start_group(self, group: list[_Worker]) -> None:
        pids = self._launch(group)
        if pids is not None:
            self._settle(group, pids)

    def _start_first(self, first: _Worker, rest: list[_Worker]) -> None:
        """Launch ``first``; then launch ``rest`` in a thread while ``first`` settles."""
        pids = self._launch([first])
        if pids is None:
            return
        launched: list[list[int] | None] = []
        others = threading.Thread(target=lambda: launched.append(self._launch(rest)),
                                  name="pydist-executor-launch", daemon=True)
        others.start()
        self._settle([first], pids)
        others.join()
        rest_pids = launched[0] if launched else None
        if rest_pids is None:
            return
        flags = self.core.flags
        if flags.broken is not None or flags.stopped:
            # (No initializer to run on workers nobody will use.)
            for w in rest:
                w.gone = True
            self.helper(rmprocs, *rest_pids, waitfor=30)
            return
        self._settle(rest, rest_pids)

    def _launch(self, group: list[_Worker]) -> list[int] | None:
        """Start the processes of ``group``; their ids, or ``None`` (the executor broke)."""
        core = self.core
        try:
            self._init_payload()    # an initializer that cannot be pickled needs no worker
        except SerializationError as e:
            core.closer.break_("A worker's initializer failed, the process pool is not usable "
                               "anymore", e.__cause__ or e)
            return None
        try:
            with _addprocs_lock:
                return addprocs(len(group), transport=core.transport, output="raw")
        except BaseException as e:
            for pid in getattr(e, "pids", None) or ():
                self.helper(rmprocs, pid, waitfor=30)
            core.closer.break_(f"A worker process could not be started ({e}); the process pool "
                               f"is not usable anymore", e)
            return None

    def _settle(self, group: list[_Worker], pids: list[int]) -> None:
        """Initialize the workers just started and put them to work (or remove them, if
        the executor broke or stopped meanwhile)."""
        core = self.core
        failure = self.initialize(pids)
        if failure is not None:
            self.helper(rmprocs, *pids, waitfor=30)
            core.closer.break_("A worker's initializer failed, the process pool is not usable "
                               "anymore", failure)
            return
        with core.lock:
            unwanted = core.flags.broken is not None or core.flags.stopped
            for w, pid in zip(group, pids):
                w.pid = pid
                self.used_pids.add(pid)
                if unwanted:
                    w.gone = True
        if unwanted:
            self.helper(rmprocs, *pids, waitfor=30)
            return
        core.pool.enlist(pids)
        for w in group:
            core.dispatcher.flush(w)
        core.dispatcher.dispatch()
        core.stealer.maybe_steal()

    def _init_payload(self) -> tuple[bytes, list[Any]] | None:
        """The initializer and its arguments, pickled once (SerializationError if they
        cannot be); ``None`` if they hold multiprocessing objects, which are pickled for
        each worker (``mpshare.py``: each gets descriptors of its own)."""
        core = self.core
        if self.init_packed is None:
            try:
                with pickling_ahead() as self.init_limits:
                    self.init_packed = dumps((core.initializer, core.initargs),
                                             main_by_reference=core.main is not None)
            except SerializationError:
                check_shared((core.initializer, core.initargs), core.main is not None)
                self.init_packed = _PER_WORKER
        return None if self.init_packed is _PER_WORKER else self.init_packed

    def initialize(self, pids: list[int]) -> BaseException | None:
        """Run ``_init_worker`` on each new worker; the first failure, unwrapped. Only the
        local workers this executor starts itself are given multiprocessing's authkey."""
        core = self.core
        own = core.borrower is None
        authkey = bytes(multiprocessing.current_process().authkey) if own else None
        calls = []
        main = None if core.main is None else (core.main, sys.path, sys.argv, main_code(core.main))
        try:
            payload = self._init_payload()
            for pid in pids:
                with pickling_ahead() as limits:
                    data, bufs = payload or dumps_shared((core.initializer, core.initargs),
                                                         core.main is not None)
                (limits if payload is None else self.init_limits).check(pid)
                tracker = tracker_handle() if authkey is not None else None
                calls.append(remotecall(_init_worker, pid, authkey, _Packed(data, *bufs),
                                        not core.pool_mode, tracker, main))
            for pid, f in zip(pids, calls):
                mark = f.fetch()
                if mark is not None:   # the script or the initializer printed: that goes first
                    wait_relayed(pid, *mark)
        except SerializationError as e:
            return e.__cause__ or e
        except BaseException as e:
            return _unwrap(e, core.tb_class)
        return None

    def helper(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn`` in a thread of its own, waited for by ``shutdown``."""
        lock = self.core.lock

        def run() -> None:
            try:
                fn(*args, **kwargs)
            except Exception:
                pass
            finally:
                with lock:
                    self.helpers.discard(t)
        t = threading.Thread(target=run, name="pydist-executor-helper", daemon=True)
        with lock:
            t.start()
            self.helpers.add(t)

    # -- introspection ---------------------------------------------------------------------------
    def processes(self, wait: float = 60.0) -> dict[int, WorkerProcess]:
        """The live workers as processes, by OS pid (waiting for those being started)."""
        core = self.core
        deadline = time.monotonic() + wait
        with core.lock:
            while self.starter is not None and time.monotonic() < deadline:
                core.changed.wait(0.05)
            pids = [w.pid for w in self.workers if w.pid is not None and not w.gone]
        out: dict[Any, WorkerProcess] = {}     # (by OS pid, None if unknown)
        for pid in pids:
            p = WorkerProcess(pid)
            out[p.pid] = p
        return out


def _on_worker_lost(pid: int) -> None:
    """A worker died or was removed: executors using it learn now, not at their next send
    (a pool keeps its size; ``_processes`` stays true)."""
    for core in list(_live):
        with core.lock:
            hit = [w for w in core.staff.workers if w.pid == pid and not w.gone]
        for w in hit:
            detail = PGRP.removed.get(pid, "")
            threading.Thread(target=core.staff.worker_died,
                             args=(w, ProcessExitedException(pid, detail)),
                             name="pydist-executor-lost", daemon=True).start()


PGRP.on_worker_lost.append(_on_worker_lost)
