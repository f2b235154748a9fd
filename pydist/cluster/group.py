"""The process group: each process's view of the cluster, and the one owner of pid -> worker.

How a worker joins (the story the code below tells):

1. The master asks a ``ClusterManager`` to launch workers. A launched worker listens on
   one or more transports and prints a contact line naming their addresses.
2. The master opens a transport to it (``manager.connect``) and both sides run the
   authenticated hello (``codec.Handshake``) before anything else. Only then is the frame
   limit raised and anything unpickled.
3. The master sends ``JoinPGRPMsg``: the worker's id, the topology, the peers it may talk
   to, and the master's ``sys.path``.
4. The worker adopts its id and answers ``JoinCompleteMsg`` (os pid, host key).
5. Both sides start one reader thread on the connection; the master puts the worker in
   the default pool.
6. Worker-to-worker connections are made on first use (``lazy=True``) or at join: the
   higher id dials the lower, proves the cookie and sends ``IdentifySocketMsg``; the
   dialed side answers ``IdentifySocketAckMsg``. A lower id that needs a higher one asks
   it, through the master, to dial.

The ``ProcessGroup`` owns every table (workers, owned references, reply waiters); other
modules change them only through its methods, under its lock.
"""
from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, overload

from ..errors import ProcessExitedException, SerializationError, TransportError, describe_exit
from ..wire import serialize
from ..wire.codec import encode_message
from ..wire.messages import (
    RRID,
    CallFetchMsg,
    CallMsg,
    CallWaitMsg,
    Message,
    MsgHeader,
    RemoteDoMsg,
    ResultMsg,
    make_rrid,
)
from .peers import W_CONNECTED, W_CREATED, W_TERMINATED, W_TERMINATING, Worker
from .runner import TaskRunner
from .values import Failure, RemoteValue

__all__ = ["ProcessGroup", "PGRP", "host_key", "cluster_cookie"]

# Seconds a failed send waits for the connection's reader to hand over what the dead peer
# sent and report the death (the reader needs milliseconds unless a handler holds it).
DRAIN_TIMEOUT = 0.5


def host_key() -> str:
    """An identity shared by exactly the processes that share a host, /dev/shm and network.

    Two processes with equal keys can use shared memory and abstract Unix sockets
    between them; ``procs(pid)`` groups by it.
    """
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    for path in ("/dev/shm", "/proc/self/ns/net"):
        try:
            st = os.stat(path)
            parts.append(f"{st.st_dev}:{st.st_ino}")
        except OSError:
            pass
    return "|".join(parts)


class ProcessGroup:
    """Every table this process keeps about the cluster (Julia's ``PGRP``)."""

    def __init__(self) -> None:
        self.myid = 1
        self.role = "master"
        self.cookie: str | None = None
        self.topology = "all_to_all"
        self.lazy = True
        self.lock = threading.RLock()
        self.workers: dict[int, Worker] = {}
        self.removed: dict[int, str] = {}
        self.refs: dict[RRID, RemoteValue] = {}
        self.waiting: dict[RRID, tuple[RemoteValue, int]] = {}
        self._ids = itertools.count(1)
        self.next_pid = 2
        self.host_key = host_key()
        self._runner: TaskRunner | None = None
        self.connect_peer: Callable[[int], None] | None = None   # set by join
        self.listeners: list[Any] = []
        self.sending = threading.local()   # .pid: the destination of the message being pickled
        self.on_worker_lost: list[Callable[[int], None]] = []
        self.on_joined: Callable[[], None] | None = None        # set by bootstrap
        self.exiting = False   # set by ``stop_sending`` when this process begins to exit

    # -- identities -----------------------------------------------------------------
    def next_rrid(self) -> RRID:
        """A fresh reference id owned by this process."""
        return make_rrid((self.myid, next(self._ids)))

    @property
    def runner(self) -> TaskRunner:
        """The task runner of this process (created on first use on the master)."""
        if self._runner is None:
            with self.lock:
                if self._runner is None:
                    self._runner = TaskRunner(main_thread=False)
        return self._runner

    @property
    def existing_runner(self) -> TaskRunner | None:
        """The task runner of this process if it has one yet, else ``None`` (never makes
        one): code that only adapts to a runner (lends its thread while it blocks) reads it."""
        return self._runner

    def set_runner(self, runner: TaskRunner) -> None:
        self._runner = runner

    # -- the worker table -------------------------------------------------------------
    def add_worker(self, w: Worker) -> None:
        with self.lock:
            self.workers[w.id] = w

    def check_pid(self, pid: int, param: str = "pid") -> None:
        """Raise if ``pid`` cannot be talked to: ``TypeError`` (naming ``param``) if it is not
        an int, ``ValueError`` if it never existed, ``ProcessExitedException`` if it is gone."""
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"{param} must be a process id (an int), not {pid!r} "
                            f"({type(pid).__name__})")
        if pid == self.myid:
            return
        with self.lock:
            w = self.workers.get(pid)
            detail = self.removed.get(pid)
        if w is not None and w.state != W_TERMINATED:
            return
        if detail is not None or w is not None:
            raise ProcessExitedException(pid, detail or (w.detail if w else ""))
        if self.role == "worker" and pid >= 1:
            return   # a peer this worker has not met yet; the connection will tell
        raise ValueError(f"no process with id {pid} exists in this cluster "
                         f"(known: {sorted([self.myid, *self.workers])})")

    def worker(self, pid: int) -> Worker:
        """The connected record for ``pid``, connecting lazily where the topology allows."""
        w = self.workers.get(pid)
        if w is not None and w.transport is not None and w.state in (W_CONNECTED, W_TERMINATING):
            return w
        self.check_pid(pid)
        if self.connect_peer is None:
            raise ProcessExitedException(pid, "is not connected")
        self.connect_peer(pid)
        w = self.workers.get(pid)
        if w is None or w.transport is None or w.state not in (W_CONNECTED, W_TERMINATING):
            raise ProcessExitedException(pid, (w.detail if w else "") or "could not be reached")
        return w

    def worker_ids(self) -> list[int]:
        with self.lock:
            return sorted(pid for pid, w in self.workers.items()
                          if pid != 1 and w.state in (W_CREATED, W_CONNECTED))

    # -- sending --------------------------------------------------------------------
    def stop_sending(self) -> None:
        """Send nothing more from this process: it is exiting (every later ``send`` raises).

        An exiting worker closes its connections one after another. A call of its own that
        waits on a peer sees that peer's connection end first and would report the peer's
        death to its caller, over a connection not yet closed, while the peer lives on. No
        message leaves once exiting has begun, so the caller learns only that this process
        is gone, from the end of its own connection.
        """
        self.exiting = True

    def send(self, pid: int, header: MsgHeader, msg: Message) -> None:
        """Encode and send one message to ``pid`` (errors of pickling propagate)."""
        if self.exiting:
            raise ProcessExitedException(self.myid, "is exiting: it sends nothing more")
        w = self.worker(pid)
        tls = self.sending
        outer = getattr(tls, "pid", None), getattr(tls, "counted", None)
        # .counted: what was counted for this message, by the object pickled (a message may
        # be pickled twice, by pickle and then by cloudpickle: each thing is counted once).
        tls.pid, tls.counted = pid, {}
        try:
            parts = encode_message(header, msg)
        except SerializationError as e:
            tls.pid, tls.counted = outer
            raise _name_unpicklable(msg, pid, e) from e.__cause__
        finally:
            tls.pid, tls.counted = outer
        t = w.transport
        if t is None:   # lost between the lookup and here: say so as any later send would
            raise ProcessExitedException(pid, w.detail or self.removed.get(pid, ""))
        try:
            t.send_frame(parts)
        except TransportError as e:
            raise self._send_failed(w, e) from None

    def _send_failed(self, w: Worker, error: TransportError) -> ProcessExitedException:
        """A send to ``w`` failed: it died, or its connection did. What it sent before may
        still wait in the connection, unread: so its reader decides the death, once it has
        handed all that over and met the end. This waits for that (``DRAIN_TIMEOUT`` at
        most: a reader stuck in a handler, then this decides); on the reader's own thread it
        cannot wait, and leaves the decision to the reader, which reads on after this
        handler (``w.draining`` says so meanwhile)."""
        inbox = w.inbox
        if inbox is not None and inbox.w is w and w.state != W_TERMINATED:
            w.draining = True
            if inbox.reader == threading.get_ident():
                return ProcessExitedException(w.id, w.detail or self.exit_detail(w)
                                              or f"lost its connection ({error})")
            _await_reader(w, inbox, DRAIN_TIMEOUT)
        self.worker_lost(w, self.exit_detail(w) or f"lost its connection ({error})")
        return ProcessExitedException(w.id, w.detail)

    @staticmethod
    def exit_detail(w: Worker) -> str:
        """How a local worker process ended, when its handle can tell (within half a second)."""
        proc = getattr(w.config, "process", None) if w.config is not None else None
        if proc is None or not hasattr(proc, "wait"):
            return ""
        try:
            code = proc.wait(timeout=0.5)
        except Exception:
            return ""
        return f"(pid {getattr(proc, 'pid', None)}) {describe_exit(code)}"

    # -- reply waiters --------------------------------------------------------------
    def expect_reply(self, pid: int) -> tuple[RRID, RemoteValue]:
        """Register a waiter for a reply from ``pid``; it fails if ``pid`` dies."""
        rrid = self.next_rrid()
        rv = RemoteValue()
        with self.lock:
            self.waiting[rrid] = (rv, pid)
        return rrid, rv

    def forget_reply(self, rrid: RRID) -> None:
        with self.lock:
            self.waiting.pop(rrid, None)

    def complete_reply(self, rrid: RRID, value: Any) -> None:
        """Deliver a reply to its waiter (a late reply to a forgotten waiter is dropped)."""
        with self.lock:
            entry = self.waiting.pop(rrid, None)
        if entry is not None:
            entry[0].try_set(value)

    def waits_on(self, pid: int) -> bool:
        """Whether anything here waits for a reply from ``pid``."""
        with self.lock:
            return any(p == pid for _, p in self.waiting.values())

    # -- owned references ------------------------------------------------------------
    @overload
    def lookup_ref(self, rrid: RRID, create: Literal[True] = True) -> RemoteValue: ...
    @overload
    def lookup_ref(self, rrid: RRID, create: bool) -> RemoteValue | None: ...

    def lookup_ref(self, rrid: RRID, create: bool = True) -> RemoteValue | None:
        """The cell behind ``rrid`` owned here, created on first mention (as Julia does)."""
        with self.lock:
            rv = self.refs.get(rrid)
            if rv is None and create:
                rv = RemoteValue()
                rv.clients.add(rrid.whence)
                self.refs[rrid] = rv
            return rv

    def del_client(self, rrid: RRID, client: int) -> None:
        with self.lock:
            rv = self.refs.get(rrid)
            if rv is not None:
                rv.clients.discard(client)
                if not rv.clients:
                    del self.refs[rrid]

    def del_clients(self, ids: list[tuple[int, int]], client: int) -> None:
        """``del_client`` for each reference id given as ``(whence, id)``, under one lock."""
        refs = self.refs
        with self.lock:
            for whence, n in ids:
                rrid = make_rrid((whence, n))
                rv = refs.get(rrid)
                if rv is not None:
                    rv.clients.discard(client)
                    if not rv.clients:
                        del refs[rrid]

    def drop_client(self, client: int) -> None:
        """Forget process ``client`` in every client set (it is gone: its del-client notices
        will never come); values no process holds any more are freed, as Julia does."""
        with self.lock:
            for rrid, rv in list(self.refs.items()):
                clients = getattr(rv, "clients", None)
                if clients is not None and client in clients:
                    clients.discard(client)
                    if not clients:
                        del self.refs[rrid]

    def add_client(self, rrid: RRID, client: int) -> None:
        with self.lock:
            rv = self.refs.get(rrid)
            if rv is None:           # first mention here: its creator holds it too
                rv = RemoteValue()
                rv.clients.add(rrid.whence)
                self.refs[rrid] = rv
            rv.clients.add(client)

    # -- death ----------------------------------------------------------------------
    def worker_lost(self, w: Worker, detail: str) -> None:
        """Mark ``w`` terminated and fail everything that waits on it (idempotent)."""
        with self.lock:
            if w.state == W_TERMINATED:
                return
            w.state = W_TERMINATED
            w.detail = w.detail or detail
            self.removed[w.id] = w.detail
            # Scanning every waiter is fine: deaths are rare, and it needs no per-worker
            # bookkeeping that could miss a waiter registered before the record existed.
            doomed = [r for r, (_, p) in self.waiting.items() if p == w.id]
            pending = [self.waiting.pop(r)[0] for r in doomed]
            t, w.transport = w.transport, None
            inbox = w.inbox
        exc = ProcessExitedException(w.id, w.detail)
        for rv in pending:
            rv.try_set(Failure(exc))
        self.drop_client(w.id)
        if t is not None:
            t.abort()
        if inbox is not None:
            inbox.ended = True
            inbox.notify()
        w.connected.set()
        for cb in list(self.on_worker_lost):
            try:
                cb(w.id)
            except Exception:   # a listener's bug must not stop the others
                pass
        w.gone.set()           # after the listeners: rmprocs returns once the manager knows
        with self.lock:        # only its id and how it ended are kept (in ``removed``)
            if self.workers.get(w.id) is w:
                del self.workers[w.id]


PGRP = ProcessGroup()


def cluster_cookie(cookie: str | None = None) -> str:
    """The cluster cookie (made at random on first use); with an argument, set it."""
    if cookie is not None:
        if not isinstance(cookie, str):
            raise TypeError(f"the cluster cookie must be a str, not {type(cookie).__name__}")
        if not cookie:
            raise ValueError("the cluster cookie must not be empty")
        PGRP.cookie = cookie
    elif PGRP.cookie is None:
        PGRP.cookie = secrets.token_hex(16)
    return PGRP.cookie


def _await_reader(w: Worker, inbox: Any, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``w``'s reader to meet the end of its connection
    and mark ``w`` terminated (everything read before is handled by then)."""
    deadline = time.monotonic() + timeout

    def done() -> bool:
        return w.state == W_TERMINATED
    while not done() and (left := deadline - time.monotonic()) > 0:
        if inbox.ended:           # the reader met the end and is saying how it ended
            w.gone.wait(min(left, 0.01))
        else:
            inbox.wait(done, left)


def _name_unpicklable(msg: Message, pid: int, error: SerializationError) -> SerializationError:
    """The pickling error of a message, saying which argument (or the result) failed."""
    parts: list[tuple[str, Any]] = []
    if isinstance(msg, (CallMsg, CallFetchMsg, CallWaitMsg, RemoteDoMsg)):
        parts.append(("the function", msg.f))
        parts += [(f"argument {i + 1}", a) for i, a in enumerate(msg.args)]
        parts += [(f"keyword argument {k!r}", v) for k, v in msg.kwargs.items()]
    elif isinstance(msg, ResultMsg):
        parts.append(("the result", msg.value))
    for what, obj in parts:
        try:
            serialize.dumps(obj)
        except SerializationError as e:
            cause = e.__cause__ or e
            kind = type(obj)
            return SerializationError(f"{what} ({kind.__module__}.{kind.__qualname__}) cannot be "
                                      f"pickled for process {pid}: {type(cause).__name__}: {cause}")
    return error
