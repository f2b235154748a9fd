"""The master's books: tasks, the batches they travel in, the workers that run them.

A ``_Task`` waits in the executor's pending queue, then goes to a worker's ``outbox`` in
a ``_Batch``; once sent, the batch moves to the worker's ``batches`` (in the order sent,
so the oldest one is the one running there) until it is answered. Its ``sink`` is where
the outcome lands: a ``concurrent.futures.Future``, a map's slot, a ``Pool`` result.

``WorkerProcess`` shows a worker as the standard library's process objects look.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..cluster.group import PGRP
from ..pools.scheduler import Slot

_NO_KWARGS: dict[str, Any] = {}


class _Task:
    """One call to run: ``fn(*args, **kwargs)``, or a chunk of a map (``kind``)."""

    __slots__ = ("fn", "args", "kwargs", "kind", "sink", "started", "solo")

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any], kind: int, sink: Any) -> None:
        self.fn, self.args, self.kwargs, self.kind, self.sink = fn, args, kwargs, kind, sink
        self.started = False     # the sink was told it runs
        self.solo = False        # to be sent alone (after a crash or a failed message)


class _Batch:
    __slots__ = ("tasks", "seq", "sent", "alone", "settled", "revoking", "direct", "sending")

    def __init__(self, tasks: list[_Task]) -> None:
        self.tasks = tasks
        self.seq = 0
        self.sent = 0.0
        self.alone = False
        self.settled = False
        self.revoking = False
        self.direct = False      # one task sent straight to an idle worker (``_run_one``)
        self.sending = False     # on its worker's books, its send not finished yet

    @property
    def units(self) -> int:
        """Its tasks (a ``pools/stealing.QueuedCall``)."""
        return len(self.tasks)


class _Worker(Slot):
    """The executor's record of one worker (``pid`` is ``None`` while it starts): its
    books in the shared scheduling (``pools/scheduler.py``: ``load`` counts the tasks sent
    or picked and not answered; ``unreachable``, see ``_Staff.lost_in_send``), and the
    batches that carry its tasks."""

    __slots__ = ("owned", "batches", "outbox", "send_lock", "seq", "proc")

    def __init__(self, pid: int | None, owned: bool) -> None:
        super().__init__(pid)
        self.owned = owned
        self.batches: collections.deque[_Batch] = collections.deque()   # sent, in order
        self.outbox: collections.deque[_Batch] = collections.deque()    # picked, not yet sent
        self.send_lock = threading.Lock()
        self.seq = 0
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
            code: int | None = self._proc.poll()
            return code
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
