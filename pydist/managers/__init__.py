"""Cluster managers: how workers are launched, connected, interrupted and killed."""
from __future__ import annotations

from .base import ClusterManager, WorkerConfig, default_addprocs_params
from .local import LocalManager
from .ssh import SSHManager

__all__ = ["ClusterManager", "WorkerConfig", "default_addprocs_params", "LocalManager",
           "SSHManager"]
