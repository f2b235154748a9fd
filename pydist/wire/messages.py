"""The message kinds processes exchange, after Julia's ``messages.jl``.

Every message travels as a header (``MsgHeader``: the reference ids it answers or
notifies) and a body (one of the frozen dataclasses below). ``TAGS`` is the one table that
maps each kind to the byte that names it on the wire; ``KINDS`` is its inverse.

Only the standard library is imported here (layer L0).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "RRID", "NULL_RRID", "make_rrid", "MsgHeader", "NULL_HEADER", "Message", "CallMsg", "CallFetchMsg",
    "CallWaitMsg", "RemoteDoMsg", "ResultMsg", "IdentifySocketMsg", "IdentifySocketAckMsg",
    "JoinPGRPMsg", "JoinCompleteMsg", "TAGS", "KINDS",
]


class RRID(NamedTuple):
    """A remote reference id: the process that created the reference and a serial number.

    A named tuple: every reply, reference and cached function is looked up by one, and a
    tuple's hash and comparison run in C (a dataclass's in Python)."""

    whence: int
    id: int


NULL_RRID = RRID(0, 0)
# ``make_rrid((whence, id))``: an RRID without the Python-level ``__new__`` of a named
# tuple (half the cost), for the paths every call takes.
make_rrid = functools.partial(tuple.__new__, RRID)


@dataclass(frozen=True, slots=True)
class MsgHeader:
    """What a message answers (``response_oid``) and whom it should notify (``notify_oid``)."""

    response_oid: RRID = NULL_RRID
    notify_oid: RRID = NULL_RRID


NULL_HEADER = MsgHeader()


class Message:
    """Base of every message kind."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class CallMsg(Message):
    """Run ``f(*args, **kwargs)`` and store the result under ``header.response_oid``."""

    f: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallFetchMsg(Message):
    """Run the call and send its result back to ``header.notify_oid``."""

    f: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallWaitMsg(Message):
    """Run the call, store it under ``response_oid``, then notify ``notify_oid`` (no value)."""

    f: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RemoteDoMsg(Message):
    """Run the call for its effect; errors are printed there, never returned."""

    f: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResultMsg(Message):
    """The value (or a captured failure) answering ``header.response_oid``."""

    value: Any


@dataclass(frozen=True, slots=True)
class IdentifySocketMsg(Message):
    """First message on a worker-to-worker connection: who is dialing."""

    from_pid: int


@dataclass(frozen=True, slots=True)
class IdentifySocketAckMsg(Message):
    """The dialed worker accepted the connection (and says who it is)."""

    pid: int = 0


@dataclass(frozen=True, slots=True)
class JoinPGRPMsg(Message):
    """Master to a new worker: your id, the cluster's shape and the peers you know of."""

    self_pid: int
    other_workers: tuple[tuple[int, tuple[str, ...], str], ...] = ()   # ((pid, (address, ...), host_key), ...)
    topology: str = "all_to_all"
    lazy: bool = True
    enable_threaded_blas: bool = False
    sys_path: tuple[str, ...] = ()               # the master's sys.path, prepended where missing
    master_host_key: str = ""
    connect_to: tuple[int, ...] = ()             # peers to dial before answering (non-lazy, custom)


@dataclass(frozen=True, slots=True)
class JoinCompleteMsg(Message):
    """A worker's answer to ``JoinPGRPMsg``: it is ready."""

    cpu_threads: int
    ospid: int
    host_key: str = ""
    hostname: str = ""


# The one tag table. Tags are part of the wire protocol: never renumber, only append.
TAGS: dict[type, int] = {
    CallMsg: 1,
    CallFetchMsg: 2,
    CallWaitMsg: 3,
    RemoteDoMsg: 4,
    ResultMsg: 5,
    IdentifySocketMsg: 6,
    IdentifySocketAckMsg: 7,
    JoinPGRPMsg: 8,
    JoinCompleteMsg: 9,
}
KINDS: dict[int, type] = {tag: kind for kind, tag in TAGS.items()}
