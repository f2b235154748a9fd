"""The cluster-manager interface, as in Julia: ``ClusterManager`` and ``WorkerConfig``.

A manager ``launch``es workers and appends one ``WorkerConfig`` per started worker to
``launched`` (notifying ``launch_ntfy`` after each), then returns. The process group
then calls ``connect`` for each config to get a ``Transport`` to the worker, and calls
``manage`` on register/deregister/interrupt/finalize and ``kill`` on ``rmprocs``.
"""
from __future__ import annotations

import abc
import os
import signal
import threading
import time
from typing import Any

from .. import transport as _transport
from ..cluster.peers import WorkerConfig, choose_address
from ..cluster.stopping import request_exit, send_interrupt
from ..net.address import format_tcp_url
from ..transport import Transport

__all__ = ["ClusterManager", "default_addprocs_params", "parse_contact_line", "CONTACT_PREFIX"]

CONTACT_PREFIX = "PYDIST_WORKER"


def default_addprocs_params(manager: ClusterManager | None = None) -> dict[str, Any]:
    """The keyword parameters ``addprocs`` passes to ``launch`` unless told otherwise."""
    import sys
    params: dict[str, Any] = {
        "topology": "all_to_all",
        "lazy": True,
        "dir": os.getcwd(),
        "exename": sys.executable,
        "exeflags": (),
        "enable_threaded_blas": False,
        "env": {},
        "transport": "auto",
        "worker_timeout": None,   # seconds to start and join; None: PYDIST_WORKER_TIMEOUT or 60
    }
    if manager is not None:
        params.update(manager.default_params())
    return params


def parse_contact_line(line: str) -> tuple[str, ...] | None:
    """The addresses in a worker's contact line, or ``None`` if ``line`` is not one."""
    words = line.strip().split()
    if len(words) < 3 or words[0] != CONTACT_PREFIX:
        return None
    return tuple(words[2:])


class ClusterManager(abc.ABC):
    """Starts and stops workers for ``addprocs`` (Julia's ``ClusterManager``)."""

    def default_params(self) -> dict[str, Any]:
        """Manager-specific defaults merged into ``default_addprocs_params``."""
        return {}

    def known_params(self) -> tuple[str, ...]:
        """Extra ``addprocs`` keywords this manager understands."""
        return ()

    def check_params(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` for parameters this manager cannot use,
        before anything is launched (the default accepts everything)."""

    @abc.abstractmethod
    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Start workers; append a config per worker to ``launched`` and notify."""

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """Hear of a worker event: ``"register"``, ``"deregister"``, ``"interrupt"``,
        ``"finalize"``. The default interrupts through the cluster connection."""
        if op == "interrupt":
            send_interrupt(pid)

    def connect(self, pid: int, config: WorkerConfig) -> Transport:
        """Open the master's transport to worker ``pid`` (per ``config.transport``)."""
        addresses = tuple(config.addresses)
        if not addresses and config.host and config.port:   # a Julia-style manager's config
            addresses = (format_tcp_url(config.host, int(config.port)),)
        address = choose_address(addresses, config.transport, str(pid))
        config.transport = address.partition("://")[0]
        return _transport.connect(address, 30.0)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Make worker ``pid`` exit: ask it, then terminate its process if it lingers."""
        request_exit(pid)
        proc = config.process
        if proc is not None and hasattr(proc, "wait"):
            _terminate_ladder(proc)


def _terminate_ladder(proc: Any, grace: float = 5.0, term_wait: float = 2.0) -> None:
    """Wait for ``proc`` to exit; SIGTERM after ``grace`` s, SIGKILL ``term_wait`` s later."""
    for sig, wait in ((None, grace), (signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
        if sig is not None:
            try:
                proc.send_signal(sig)
            except (ProcessLookupError, OSError):
                return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return
            time.sleep(0.01)
