"""Who is in the cluster: ``myid``, ``workers``, ``procs``, ``nprocs``, ``nworkers``,
``worker_state`` and ``worker_id_from_socket``.

The master knows every worker; a worker asks the master (``workers()``, ``procs()``).
"""
from __future__ import annotations

from typing import Any

from .dispatch import OpContext, internal_op
from .group import PGRP
from .peers import W_CONNECTED, W_TERMINATED, WorkerState
from .values import Failure, unwrap
from .waiting import call_on_owner

__all__ = ["myid", "workers", "procs", "nprocs", "nworkers", "worker_state",
           "worker_id_from_socket"]


def myid() -> int:
    """The id of this process: 1 on the master, the worker's id on a worker."""
    return PGRP.myid


def workers() -> list[int]:
    """The ids of all workers (``[1]`` when there are none), ascending."""
    if PGRP.role == "worker":
        answer: list[int] = unwrap(call_on_owner(_ask_master, 1, "workers", None))
        return answer
    ids = PGRP.worker_ids()
    return ids or [1]


def procs(pid: int | None = None) -> list[int]:
    """Every process id, master included; with ``pid``: those on the same host as ``pid``."""
    if PGRP.role == "worker":
        answer: list[int] = unwrap(call_on_owner(_ask_master, 1, "procs", pid))
        return answer
    ids = [1, *PGRP.worker_ids()]
    if pid is None:
        return ids
    PGRP.check_pid(pid)
    keys = {1: PGRP.host_key}
    with PGRP.lock:
        keys.update({p: w.host_key for p, w in PGRP.workers.items()})
    return [p for p in ids if keys.get(p) == keys.get(pid)]


def nprocs() -> int:
    """``len(procs())``."""
    return len(procs())


def nworkers() -> int:
    """The number of workers; 1 when only the master exists (as in Julia)."""
    n = len(procs()) - 1
    return n if n > 0 else 1


def worker_state(pid: int) -> WorkerState:
    """The state of process ``pid`` as this process knows it (``W_TERMINATED`` once removed)."""
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise TypeError(f"pid must be a process id (an int), not {pid!r} ({type(pid).__name__})")
    if pid == PGRP.myid:
        return W_CONNECTED
    w = PGRP.workers.get(pid)
    if w is not None:
        return WorkerState(w.state)
    if pid in PGRP.removed:
        return W_TERMINATED
    raise ValueError(f"no process with id {pid} exists in this cluster")


@internal_op
def _ask_master(ctx: OpContext, which: str, pid: int | None) -> None:
    """On the master: ``workers()`` or ``procs(pid)`` for a worker that asks."""
    try:
        ctx.reply(workers() if which == "workers" else procs(pid))
    except Exception as e:   # a bad pid: the asking worker raises it
        ctx.reply(Failure(e))


def worker_id_from_socket(s: Any) -> int:
    """The id of the process at the other end of a connection (a socket or a transport)."""
    with PGRP.lock:
        candidates = list(PGRP.workers.values())
    for w in candidates:
        t = w.transport
        if t is None:
            continue
        if t is s or getattr(t, "socket", None) is s:
            return w.id
        try:
            if hasattr(s, "fileno") and hasattr(t, "fileno") and s.fileno() == t.fileno():
                return w.id
        except (OSError, ValueError):
            continue
    raise ValueError(f"{s!r} is not a connection of this process's cluster")
