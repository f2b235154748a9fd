"""This process's record of each other process, and what a manager says about one.

A ``Worker`` is created when a process is joined (on the master) or first heard of (on a
worker), goes through the states of ``WorkerState`` and is forgotten once terminated (the
process group keeps only how it ended). A manager describes each worker it launched with a
``WorkerConfig``; the cluster dials one of its ``addresses`` (``choose_address``) through
the manager's ``connect`` and tells the manager of the worker's events (``Manager``, which
every ``ClusterManager`` is).
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import LaunchError

if TYPE_CHECKING:
    from ..transport import Transport

__all__ = ["WorkerState", "W_CREATED", "W_CONNECTED", "W_TERMINATING", "W_TERMINATED", "Worker",
           "WorkerConfig", "Manager", "TRANSPORTS", "choose_address"]

TRANSPORTS = ("auto", "shm", "tcp")


class WorkerState(enum.StrEnum):
    """A worker's state, as in Julia's cluster.jl (equal to its lower-case word)."""

    W_CREATED = "created"
    W_CONNECTED = "connected"
    W_TERMINATING = "terminating"
    W_TERMINATED = "terminated"


W_CREATED, W_CONNECTED, W_TERMINATING, W_TERMINATED = WorkerState


@dataclass
class WorkerConfig:
    """What a manager knows about one worker (Julia's ``WorkerConfig``), plus ``transport``.

    ``addresses`` holds the URLs the worker listens on, as its contact line gave them.
    """

    exename: str | None = None
    exeflags: tuple[str, ...] = ()
    host: str | None = None
    port: int | None = None
    sshflags: tuple[str, ...] = ()
    max_parallel: int | None = None
    connect_at: Any = None
    process: Any = None
    ospid: int | None = None
    environ: dict[str, str] | None = None
    ident: Any = None
    connect_idents: list[Any] | None = None
    enable_threaded_blas: bool | None = None
    count: int | None = None
    bind_addr: str | None = None
    tunnel: bool | None = None
    multiplex: bool | None = None
    userdata: Any = None
    transport: str = "auto"
    addresses: tuple[str, ...] = ()
    io: Any = field(default=None, repr=False)   # the worker's output stream, if the manager has it


class Manager(Protocol):
    """What the cluster asks of a worker's manager (``managers.base.ClusterManager``)."""

    def connect(self, pid: int, config: WorkerConfig) -> Transport:
        """Open this process's transport to worker ``pid``."""

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """Hear of a worker event (``"register"``, ``"deregister"``, ``"interrupt"``, ...)."""

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Make worker ``pid`` exit."""


class Worker:
    """This process's record of one other process of the cluster."""

    def __init__(self, pid: int, config: WorkerConfig | None = None,
                 manager: Manager | None = None) -> None:
        self.id = pid
        self.config = config
        self.manager = manager
        self.transport: Transport | None = None
        self.state = W_CREATED
        self.host_key = ""
        self.hostname = ""
        self.ospid: int | None = None
        self.addresses: tuple[str, ...] = ()
        self.connected = threading.Event()   # set once a transport is up (or it died)
        self.gone = threading.Event()        # set once terminated
        self.detail = ""                     # how it ended, for ProcessExitedException
        self.connect_lock = threading.Lock()
        self.inbox: Any = None               # the read side of the connection (inbox.Inbox)
        self.draining = False                # a send failed; its reader reads what is left

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.state}>"


def choose_address(addresses: tuple[str, ...], transport: str, where: str = "") -> str:
    """Pick the address to dial for ``transport`` ("auto" prefers shared memory)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
    if not addresses:
        raise LaunchError(f"worker {where} gave no address to dial: its WorkerConfig needs "
                          f"addresses (from its contact line) or host and port")
    by_scheme = {a.partition("://")[0]: a for a in addresses}
    order = {"auto": ("shm", "tcp"), "shm": ("shm",), "tcp": ("tcp",)}[transport]
    for scheme in order:
        if scheme in by_scheme:
            return by_scheme[scheme]
    raise LaunchError(f"worker {where} offers no {transport} address (it offered {list(addresses)}); "
                      f"try transport='tcp'")
