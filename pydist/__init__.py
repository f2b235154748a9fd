"""pydist: Julia's Distributed standard library for Python.

Remote calls, futures, remote channels, worker pools and ``pmap`` over local workers
(shared-memory rings) and remote hosts (TCP over SSH), plus drop-in replacements for
``multiprocessing.Pool`` and ``concurrent.futures.ProcessPoolExecutor``.

    import pydist as pd
    w = pd.addprocs(2)
    pd.remotecall_fetch(lambda x: x + 1, w[0], 41)   # 42
"""
from __future__ import annotations

import importlib
from typing import Any

from .cluster import WorkerState, myid, nprocs, nworkers, procs, worker_state, workers
from .control import addprocs, cluster_cookie, interrupt, rmprocs
from .errors import (AuthenticationError, CapturedException, InvalidStateException, LaunchError,
                     ProcessExitedException, RemoteException)
from .managers.base import ClusterManager, WorkerConfig, default_addprocs_params
from .managers.local import LocalManager
from .managers.ssh import SSHManager
from .messages import RRID
from .remotecall import remote_do, remotecall, remotecall_fetch, remotecall_wait
from .remoteref import AbstractRemoteRef, Future, RemoteChannel, channel_from_id, remoteref_id
from .channel import Channel
from .macros import ANY, distributed, everywhere, fetchfrom, remotecall_eval, spawn, spawnat
from .bootstrap import init_worker, process_messages, start_worker
from .workerpool import (AbstractWorkerPool, CachingPool, WorkerPool, clear, default_worker_pool,
                         remote)
from .pmap import pmap
from .api import close, fetch, isready, put, take, wait, worker_id_from_socket

__version__ = "0.1.0"

# The drop-ins load on first use, so a worker process (and a program that only uses the
# Julia API) does not pay for importing them.
_LAZY = {"Executor": ".executor", "ProcessPoolExecutor": ".executor", "Pool": ".pool"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pydist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "myid", "procs", "workers", "nprocs", "nworkers", "addprocs", "rmprocs", "interrupt",
    "cluster_cookie", "remotecall", "remotecall_fetch", "remotecall_wait", "remote_do",
    "Future", "RemoteChannel", "Channel", "channel_from_id", "AbstractRemoteRef", "RRID",
    "remoteref_id", "fetch", "put", "take", "isready", "close",
    "ANY", "spawnat", "spawn", "fetchfrom", "everywhere", "distributed",
    "wait", "worker_id_from_socket", "RemoteException", "CapturedException",
    "ProcessExitedException", "InvalidStateException", "LaunchError", "AuthenticationError",
    "ClusterManager", "WorkerConfig", "LocalManager", "SSHManager", "default_addprocs_params", "init_worker",
    "start_worker", "process_messages", "Executor", "ProcessPoolExecutor", "Pool",
    "AbstractWorkerPool", "WorkerPool", "CachingPool", "default_worker_pool", "clear", "remote",
    "pmap", "remotecall_eval", "WorkerState", "worker_state",
]
