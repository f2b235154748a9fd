"""Cluster managers: how workers are launched, connected, interrupted and killed."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # each loads on first use: a local cluster never needs the SSH modules
    from .base import ClusterManager, WorkerConfig, default_addprocs_params
    from .local import LocalManager
    from .ssh import SSHManager
    from .slurm import SlurmManager
    from .elastic import ElasticManager

_LAZY = {"ClusterManager": ".base", "WorkerConfig": ".base", "default_addprocs_params": ".base",
         "LocalManager": ".local", "SSHManager": ".ssh",
         "SlurmManager": ".slurm", "ElasticManager": ".elastic"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pydist.managers' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = ["ClusterManager", "WorkerConfig", "default_addprocs_params", "LocalManager",
           "SSHManager", "SlurmManager", "ElasticManager"]
