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
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # what each name is; at run time its module loads on first use (below)
    from .arrays.sharedarray import SharedArray, indexpids, localindices, sdata, shared_ones, shared_zeros
    from .cluster.group import cluster_cookie
    from .cluster.membership import myid, nprocs, nworkers, procs, worker_id_from_socket, worker_state, workers
    from .cluster.peers import WorkerConfig, WorkerState
    from .dropin.executor import Executor, ProcessPoolExecutor
    from .dropin.pool import Pool
    from .errors import (
        AuthenticationError,
        CapturedException,
        InvalidStateException,
        LaunchError,
        ProcessExitedException,
        RemoteException,
    )
    from .managers.base import ClusterManager, default_addprocs_params
    from .managers.forkclient import set_worker_preload
    from .managers.local import LocalManager
    from .managers.slurm import SlurmManager
    from .managers.ssh import SSHManager
    from .pools.pmap import pmap
    from .pools.progress import progress
    from .pools.workerpool import AbstractWorkerPool, CachingPool, WorkerPool, clear, default_worker_pool, remote
    from .processes.bootstrap import init_worker, process_messages, start_worker
    from .processes.elastic import ElasticManager
    from .processes.lifecycle import addprocs, interrupt, rmprocs
    from .processes.logforward import forward_logging
    from .refs.channel import Channel
    from .refs.generic import close, fetch, isready, put, take, wait
    from .refs.macros import ANY, distributed, everywhere, fetchfrom, remotecall_eval, spawn, spawnat
    from .refs.remotecall import remote_do, remotecall, remotecall_fetch, remotecall_wait
    from .refs.remotechannel import RemoteChannel, channel_from_id
    from .refs.remoteref import AbstractRemoteRef, Future, remoteref_id
    from .wire.messages import RRID

__version__ = "0.1.0"

# ``import pydist`` loads none of its modules: each public name loads its module on first
# use, so a program, and a worker, pays only for what its first calls need.
_MODULES: dict[str, tuple[str, ...]] = {
    ".cluster.peers": ("WorkerState", "WorkerConfig"),
    ".cluster.membership": ("myid", "nprocs", "nworkers", "procs", "worker_state", "workers",
                            "worker_id_from_socket"),
    ".cluster.group": ("cluster_cookie",),
    ".processes.lifecycle": ("addprocs", "interrupt", "rmprocs"),
    ".errors": ("AuthenticationError", "CapturedException", "InvalidStateException", "LaunchError",
                "ProcessExitedException", "RemoteException"),
    ".managers.base": ("ClusterManager", "default_addprocs_params"),
    ".managers.forkclient": ("set_worker_preload",),
    ".managers.local": ("LocalManager",),
    ".managers.ssh": ("SSHManager",),
    ".managers.slurm": ("SlurmManager",),
    ".processes.elastic": ("ElasticManager",),
    ".wire.messages": ("RRID",),
    ".refs.remotecall": ("remote_do", "remotecall", "remotecall_fetch", "remotecall_wait"),
    ".refs.remoteref": ("AbstractRemoteRef", "Future", "remoteref_id"),
    ".refs.remotechannel": ("RemoteChannel", "channel_from_id"),
    ".refs.channel": ("Channel",),
    ".refs.macros": ("ANY", "distributed", "everywhere", "fetchfrom", "remotecall_eval", "spawn",
                     "spawnat"),
    ".processes.bootstrap": ("init_worker", "process_messages", "start_worker"),
    ".pools.workerpool": ("AbstractWorkerPool", "CachingPool", "WorkerPool", "clear",
                          "default_worker_pool", "remote"),
    ".pools.pmap": ("pmap",),
    ".pools.progress": ("progress",),
    ".processes.logforward": ("forward_logging",),
    ".refs.generic": ("close", "fetch", "isready", "put", "take", "wait"),
    ".dropin.executor": ("Executor", "ProcessPoolExecutor"),
    ".dropin.pool": ("Pool",),
    # numpy is imported only by a program that uses SharedArrays
    ".arrays.sharedarray": ("SharedArray", "sdata", "localindices", "indexpids", "shared_zeros",
                            "shared_ones"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pydist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """This package: importing a submodule named as a function (``pmap``, ``remotecall``)
    must not hide the function behind the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return    # the submodule stays in sys.modules; the name stays the function's
        super().__setattr__(name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (importlib.import_module, (self.__name__,))   # by name, as a plain module pickles


sys.modules[__name__].__class__ = _Package

__all__ = [
    "myid", "procs", "workers", "nprocs", "nworkers", "addprocs", "rmprocs", "interrupt",
    "cluster_cookie", "remotecall", "remotecall_fetch", "remotecall_wait", "remote_do",
    "Future", "RemoteChannel", "Channel", "channel_from_id", "AbstractRemoteRef", "RRID",
    "remoteref_id", "fetch", "put", "take", "isready", "close",
    "ANY", "spawnat", "spawn", "fetchfrom", "everywhere", "distributed",
    "wait", "worker_id_from_socket", "RemoteException", "CapturedException",
    "ProcessExitedException", "InvalidStateException", "LaunchError", "AuthenticationError",
    "ClusterManager", "WorkerConfig", "LocalManager", "SSHManager", "SlurmManager",
    "ElasticManager", "default_addprocs_params", "init_worker",
    "start_worker", "process_messages", "Executor", "ProcessPoolExecutor", "Pool",
    "AbstractWorkerPool", "WorkerPool", "CachingPool", "default_worker_pool", "clear", "remote",
    "pmap", "progress", "set_worker_preload", "SharedArray", "sdata", "localindices", "indexpids",
    "shared_zeros", "shared_ones", "forward_logging", "remotecall_eval",
    "WorkerState", "worker_state",
]
