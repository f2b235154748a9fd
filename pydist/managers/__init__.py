"""Cluster managers: how workers are launched, connected, interrupted and killed.

* ``base.py``: ``ClusterManager`` (Julia's), ``default_addprocs_params``, the contact line;
* ``params.py``: the keywords every ``addprocs`` shares, checked before anything starts;
* ``local.py``: ``LocalManager``, workers on this host (``forkclient.py``: started by the
  worker server, ``processes/forkserver.py``);
* ``ssh.py``: ``SSHManager`` (``machines.py`` the host specs, ``sshcommand.py`` the remote
  command, ``sshsession.py`` one ssh process per host);
* ``slurm.py``: ``SlurmManager`` (``slurmjob.py``: the ``srun`` job step);
* ``dialback.py``: workers that dial the master (Slurm tasks, elastic workers).

A worker's ``WorkerConfig`` is the cluster layer's (``cluster/peers.py``); the
``ElasticManager``, which joins workers by calling ``addprocs`` itself, lives beside
``addprocs`` (``processes/elastic.py``). Built on the cluster layer and the transports.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # each loads on first use: a local cluster never needs the SSH modules
    from ..cluster.peers import WorkerConfig
    from .base import ClusterManager, default_addprocs_params
    from .local import LocalManager
    from .slurm import SlurmManager
    from .ssh import SSHManager

_LAZY = {"ClusterManager": ".base", "WorkerConfig": "..cluster.peers",
         "default_addprocs_params": ".base", "LocalManager": ".local", "SSHManager": ".ssh",
         "SlurmManager": ".slurm"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pydist.managers' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = ["ClusterManager", "WorkerConfig", "default_addprocs_params", "LocalManager",
           "SSHManager", "SlurmManager"]
