"""Connections between processes: the hello, the join handshake and peer connections.

``authenticate`` runs the hello over a fresh transport (with a deadline) and only then
raises the frame limit. ``join_worker`` is the master's half of the join (steps 2–5 of
the story in ``group.py``); ``serve_incoming`` is the worker's half and also accepts
worker-to-worker connections; ``connect_peer`` makes a worker-to-worker connection.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any

from .. import transport as _transport
from ..errors import AuthenticationError, DecodeError, LaunchError, ProcessExitedException, TransportError
from ..transport import DEFAULT_MAX_FRAME, Transport
from ..wire.codec import Handshake, decode_message, encode_message
from ..wire.messages import (
    NULL_HEADER,
    IdentifySocketAckMsg,
    IdentifySocketMsg,
    JoinCompleteMsg,
    JoinPGRPMsg,
    Message,
    RemoteDoMsg,
)
from . import deadlines
from .dispatch import OpContext, internal_op, start_serving
from .group import PGRP
from .peers import W_CONNECTED, W_TERMINATED, Worker, choose_address
from .values import Failure, unwrap
from .waiting import call_on_owner

__all__ = ["authenticate", "proven", "join_worker", "serve_incoming", "accept_loop",
           "connect_peer", "HELLO_TIMEOUT"]

HELLO_TIMEOUT = 10.0
JOIN_TIMEOUT = 60.0
PEER_CONNECT_TIMEOUT = 30.0
MAX_UNAUTHENTICATED = 64


def _with_deadline(t: Transport, seconds: float) -> deadlines.Deadline:
    """A deadline that aborts ``t`` when ``seconds`` pass (cancel it when done)."""
    return deadlines.after(seconds, t.abort)


def authenticate(t: Transport, cookie: str, role: str, timeout: float = HELLO_TIMEOUT) -> None:
    """Run the hello over ``t``; on success raise its frame limit, else abort it and raise
    ``AuthenticationError`` naming the peer."""
    hs = Handshake(cookie, role)
    timer = _with_deadline(t, timeout)
    try:
        t.send_frame([hs.first_frame()])
        proof = hs.receive(t.recv_frame())
        assert proof is not None
        t.send_frame([proof])
        hs.receive(t.recv_frame())
    except AuthenticationError as e:
        t.abort()
        raise AuthenticationError(f"connection with {t.peer} refused: {e}") from None
    except TransportError as e:
        t.abort()
        why = "timed out" if timer.expired() else f"failed ({e})"
        raise AuthenticationError(f"hello with {t.peer} {why}") from None
    finally:
        timer.cancel()
    t.max_frame = DEFAULT_MAX_FRAME


def proven(t: Transport) -> bool:
    """Whether ``t`` has passed the hello already (a worker that dialed its master has):
    ``authenticate`` raises the frame limit only then."""
    return t.max_frame >= DEFAULT_MAX_FRAME


def _exchange(t: Transport, msg: Message, timeout: float) -> Message:
    """Send ``msg`` and read the peer's answer, with a deadline."""
    timer = _with_deadline(t, timeout)
    try:
        t.send_frame(encode_message(NULL_HEADER, msg))
        return decode_message(t.recv_frame())[1]
    finally:
        timer.cancel()


def _read_first(t: Transport, timeout: float) -> Message:
    timer = _with_deadline(t, timeout)
    try:
        return decode_message(t.recv_frame())[1]
    finally:
        timer.cancel()


# -- the master's half -----------------------------------------------------------------------
def join_worker(w: Worker, params: dict[str, Any]) -> None:
    """Connect to a launched worker, authenticate, send it its id and wait until it joins."""
    assert w.manager is not None and w.config is not None and PGRP.cookie is not None
    t = w.manager.connect(w.id, w.config)
    try:
        if not proven(t):
            authenticate(t, PGRP.cookie, "dial")
        live = [o for p, o in sorted(PGRP.workers.items()) if p != w.id and o.state == W_CONNECTED]
        peers = tuple((o.id, o.addresses, o.host_key) for o in live)
        msg = JoinPGRPMsg(self_pid=w.id, other_workers=peers, topology=params["topology"],
                          lazy=params["lazy"],
                          enable_threaded_blas=bool(params.get("enable_threaded_blas")),
                          sys_path=tuple(sys.path), master_host_key=PGRP.host_key,
                          connect_to=_peers_to_dial(w, live, params))
        answer = _exchange(t, msg, params.get("worker_timeout") or JOIN_TIMEOUT)
    except (TransportError, DecodeError, AuthenticationError) as e:
        t.abort()
        raise LaunchError(f"worker {w.id} did not join: {e}") from e
    if not isinstance(answer, JoinCompleteMsg):
        t.abort()
        raise LaunchError(f"worker {w.id} answered the join with {type(answer).__name__}")
    w.ospid, w.host_key, w.hostname = answer.ospid, answer.host_key, answer.hostname
    w.addresses = tuple(w.config.addresses)
    w.config.ospid = answer.ospid
    w.transport, w.state = t, W_CONNECTED
    w.connected.set()
    start_serving(w)


def _peers_to_dial(w: Worker, live: list[Worker], params: dict[str, Any]) -> tuple[int, ...]:
    """Which existing workers the new one connects to at once (the rest: lazily, or never)."""
    if params["topology"] == "all_to_all":
        return () if params["lazy"] else tuple(o.id for o in live)
    if params["topology"] == "custom":
        mine = set(w.config.connect_idents or ()) if w.config else set()
        ident = w.config.ident if w.config else None
        return tuple(o.id for o in live if o.config is not None and
                     (o.config.ident in mine or (ident is not None and ident in (o.config.connect_idents or ()))))
    return ()


# -- the worker's half ---------------------------------------------------------------------
class _Unproven:
    """Connections still proving themselves; past the cap the oldest is dropped, so idle
    connections can delay a legitimate peer by one hello at most, never lock it out."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._lock = threading.Lock()
        self._conns: dict[int, Transport] = {}

    def admit(self, t: Transport) -> None:
        with self._lock:
            self._conns[id(t)] = t
            victims = []
            while len(self._conns) > self._cap:
                oldest = next(iter(self._conns))
                victims.append(self._conns.pop(oldest))
        for v in victims:
            v.abort()

    def done(self, t: Transport) -> None:
        with self._lock:
            self._conns.pop(id(t), None)


_unproven = _Unproven(MAX_UNAUTHENTICATED)


def accept_loop(listener: Any) -> None:
    """Accept connections forever; each gets its own thread for the hello and what follows."""
    while True:
        try:
            t = listener.accept()
        except TransportError:
            return
        _unproven.admit(t)
        threading.Thread(target=serve_incoming, args=(t,), name="pydist-incoming",
                         daemon=True).start()


def serve_incoming(t: Transport) -> None:
    """Authenticate an incoming connection, then serve it as the master or a peer."""
    try:
        try:
            if not proven(t):
                authenticate(t, PGRP.cookie or "", "accept")
            first = _read_first(t, JOIN_TIMEOUT)
        finally:
            _unproven.done(t)
    except (AuthenticationError, TransportError, DecodeError) as e:
        t.abort()
        if "refused" in str(e):   # a wrong proof is worth a line; a dropped idle socket is not
            print(f"pydist: process {PGRP.myid} refused a connection: {e}", file=sys.stderr)
        return
    w: Worker | None
    if isinstance(first, JoinPGRPMsg) and PGRP.role == "worker" and 1 not in PGRP.workers:
        w = _adopt(first, t)
    elif isinstance(first, IdentifySocketMsg) and first.from_pid > 1:
        w = _accept_peer(first.from_pid, t)
    else:
        t.abort()
        print(f"pydist: process {PGRP.myid} refused a connection that opened with "
              f"{type(first).__name__}", file=sys.stderr)
        return
    if w is not None:
        start_serving(w)


def _adopt(msg: JoinPGRPMsg, t: Transport) -> Worker:
    """Become worker ``msg.self_pid`` of the master at the other end of ``t``."""
    PGRP.myid = msg.self_pid
    PGRP.topology, PGRP.lazy = msg.topology, msg.lazy
    for entry in reversed(msg.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    for pid, addresses, key in msg.other_workers:
        peer = Worker(pid)
        peer.addresses, peer.host_key = tuple(addresses), key
        PGRP.add_worker(peer)
    master = Worker(1)
    master.host_key = msg.master_host_key
    master.transport, master.state = t, W_CONNECTED
    master.connected.set()
    PGRP.add_worker(master)
    for pid in msg.connect_to:
        _dial(PGRP.workers[pid])
    t.send_frame(encode_message(NULL_HEADER, JoinCompleteMsg(
        cpu_threads=os.cpu_count() or 1, ospid=os.getpid(), host_key=PGRP.host_key,
        hostname=_hostname())))
    if PGRP.on_joined is not None:
        PGRP.on_joined()
    return master


def _hostname() -> str:
    import socket
    return socket.gethostname()


def _accept_peer(pid: int, t: Transport) -> Worker | None:
    """Register ``t`` as the connection from worker ``pid``; ``None`` (and ``t`` closed) for
    a duplicate, for a worker this process has heard is gone, or for a dialer that died
    before the answer reached it.

    A connection from a worker already said to be gone (it dialed while it was exiting) must
    make no record: one that looked alive without a connection would send a later call's
    wish to be dialed to a process that no longer exists, and that call would wait out
    ``PEER_CONNECT_TIMEOUT``. So the record is made or connected only once the answer is
    sent, under the lock that ``_process_gone`` (``processes/lifecycle.py``) records a
    removal under.
    """
    with PGRP.lock:
        w = PGRP.workers.get(pid)
        refused = pid in PGRP.removed or (w is not None and w.transport is not None
                                          and w.state == W_CONNECTED)
    if refused:
        t.abort()
        return None
    try:
        t.send_frame(encode_message(NULL_HEADER, IdentifySocketAckMsg(PGRP.myid)))
    except TransportError:
        t.abort()
        return None
    with PGRP.lock:
        if pid in PGRP.removed:   # said gone while we answered
            w = None
        else:
            w = PGRP.workers.setdefault(pid, Worker(pid))
            w.transport, w.state = t, W_CONNECTED
    if w is None:
        t.abort()
        return None
    w.connected.set()
    return w


# -- worker-to-worker connections -----------------------------------------------------------
def connect_peer(pid: int) -> None:
    """Make sure a connection to ``pid`` exists (Julia: the higher id dials the lower)."""
    if PGRP.role != "worker" or pid == 1:
        raise ProcessExitedException(pid, "is not connected")
    if PGRP.topology == "master_worker":
        raise ValueError(f"worker {PGRP.myid} cannot talk to worker {pid}: the cluster was "
                         f"started with topology='master_worker'; use 'all_to_all'")
    if PGRP.topology == "custom":
        raise ValueError(f"worker {PGRP.myid} is not connected to worker {pid} in this custom "
                         f"topology; list it in WorkerConfig.connect_idents")
    w = _peer_record(pid)
    with w.connect_lock:
        if w.state == W_CONNECTED and w.transport is not None:
            return
        if pid < PGRP.myid:
            _dial(w)
        else:
            w.connected.clear()
            # Between the check above and the clear, ``pid`` may have dialed in on its own
            # (it needed us too), or been reported gone: either set the event we just cleared.
            if w.state == W_TERMINATED:
                raise ProcessExitedException(pid, w.detail)
            if w.state == W_CONNECTED and w.transport is not None:
                return
            PGRP.send(1, NULL_HEADER, RemoteDoMsg(_ask_to_dial, (pid, PGRP.myid), {}))
            if not w.connected.wait(PEER_CONNECT_TIMEOUT):
                raise ProcessExitedException(pid, f"did not connect to worker {PGRP.myid} "
                                                  f"within {PEER_CONNECT_TIMEOUT:.0f} s")


def _peer_record(pid: int) -> Worker:
    """This worker's record of ``pid``, asking the master for its addresses if unknown."""
    w = PGRP.workers.get(pid)
    if w is not None and (w.addresses or pid > PGRP.myid):
        return w
    addresses, key = unwrap(call_on_owner(_worker_info, 1, pid))
    with PGRP.lock:
        # The master may have said meanwhile that ``pid`` is gone (``processes/lifecycle.py``, ``_process_gone``
        # records that under this lock): a record made now would wait for it in vain.
        if pid in PGRP.removed:
            raise ProcessExitedException(pid, PGRP.removed[pid])
        w = PGRP.workers.setdefault(pid, Worker(pid))
    w.addresses, w.host_key = tuple(addresses), key
    return w


def _dial(w: Worker) -> None:
    policy = "auto" if w.host_key == PGRP.host_key else "tcp"
    address = choose_address(w.addresses, policy, str(w.id))
    try:
        t = _transport.connect(address, PEER_CONNECT_TIMEOUT)
        authenticate(t, PGRP.cookie or "", "dial")
        answer = _exchange(t, IdentifySocketMsg(PGRP.myid), JOIN_TIMEOUT)
    except (TransportError, AuthenticationError, DecodeError) as e:
        raise ProcessExitedException(w.id, f"could not be reached at {address}: {e}") from None
    if not isinstance(answer, IdentifySocketAckMsg):
        t.abort()
        raise ProcessExitedException(w.id, f"answered with {type(answer).__name__}")
    w.transport, w.state = t, W_CONNECTED
    w.connected.set()
    start_serving(w)


@internal_op
def _worker_info(ctx: OpContext, pid: int) -> None:
    """On the master: the addresses and host key of worker ``pid``."""
    w = PGRP.workers.get(pid)
    if w is None:
        detail = PGRP.removed.get(pid)
        exc: Exception = (ProcessExitedException(pid, detail) if detail is not None else
                          ValueError(f"no process with id {pid} exists in this cluster"))
        ctx.reply(Failure(exc))
        return
    ctx.reply((w.addresses, w.host_key))


@internal_op
def _ask_to_dial(ctx: OpContext, target: int, requester: int) -> None:
    """On the master: forward a lower worker's wish to be dialed by ``target``."""
    try:
        PGRP.send(target, NULL_HEADER, RemoteDoMsg(_dial_back, (requester,), {}))
    except (ProcessExitedException, ValueError):
        pass


@internal_op
def _dial_back(ctx: OpContext, requester: int) -> None:
    """On a higher worker: dial ``requester`` (off the reader thread: dialing blocks)."""
    def run() -> None:
        try:
            connect_peer(requester)
        except Exception as e:  # the requester times out and reports it
            print(f"pydist: worker {PGRP.myid} could not dial worker {requester}: {e}",
                  file=sys.stderr)
    threading.Thread(target=run, daemon=True).start()


PGRP.connect_peer = connect_peer
